"""io.pickles: the restricted array unpickler and its tree walk, on hand-written hostile pickles."""

from __future__ import annotations

import numpy as np
import pytest

from tests.mldr_plus import NumpyArray, pickled
from wds_reinforce.core.errors import MetadataError
from wds_reinforce.io.pickles import load_arrays, map_leaves


def doubling(n: int) -> bytes:
    """A pickle of ``n`` + 5 opcodes whose tree has 2**n paths: EMPTY_TUPLE, MEMOIZE, then n times
    (BINGET i, BINGET i, TUPLE2, MEMOIZE): level i + 1 is (level i, level i), one object referred to twice."""
    out = bytearray(b"\x80\x04)\x94")
    for i in range(n):
        out += b"h" + bytes([i]) + b"h" + bytes([i]) + b"\x86\x94"
    return bytes(out + b".")


class Box:
    """A value that is no container and no plain scalar: what ``map_leaves`` hands to its ``leaf``."""

    def __init__(self, v: int):
        self.v = v


def test_a_shared_container_is_walked_once():
    calls = []
    mapped = map_leaves(load_arrays(doubling(16), "x"), lambda v: calls.append(v) or v, "x")
    assert calls == []  # the leaves are empty tuples: no value at all to map
    assert mapped[0] is mapped[1] and mapped[0][0] is mapped[0][1]  # one result per shared container
    shared = [Box(1), 2, Box(3)]
    nodes, pair = [], (shared, Box(4))
    tree = {"a": [shared] * 1000, "b": pair, "c": (1, shared)}
    mapped = map_leaves(tree, lambda b: nodes.append(b) or b.v + 10, "x")
    assert [b.v for b in nodes] == [1, 3, 4]  # the shared list's values once, plain values never
    assert mapped["a"][999] == [11, 2, 13] and mapped["b"] == (shared, 14) and mapped["b"][0] is shared
    assert mapped["c"] is tree["c"]  # a tuple whose values stay is itself


@pytest.mark.parametrize("n", [40, 250])
def test_doubling_pickle_is_read_in_linear_time(n):
    """2**40 paths in 245 bytes: reading walks each container once (before: 2**n visits and tuples)."""
    tree = load_arrays(doubling(n), "bomb")
    depth = 0
    while tree:
        assert tree[0] is tree[1]
        tree, depth = tree[0], depth + 1
    assert depth == n


def test_walk_has_a_node_budget_and_refuses_what_it_cannot_map():
    with pytest.raises(MetadataError, match=r"^x: refused: more than 5 values$"):
        map_leaves([[1, 2], [3]], lambda b: b, "x", limit=5)  # the outer list, its 2 values, then 2 and 1
    assert map_leaves([[Box(1), 2], [3]], lambda b: -b.v, "x", limit=6) == [[-1, 2], [3]]
    # a tuple that holds itself through a list: ( [ <the tuple> ] ); its mapped copy cannot exist
    holds_itself = b"\x80\x02]q\x00\x85q\x01h\x00h\x01a0."
    with pytest.raises(MetadataError, match=r"^t: refused: a tuple that holds itself$"):
        load_arrays(holds_itself, "t")
    deep = b"\x80\x02" + b"]" * 50_000 + b"a" * 49_999 + b"."
    with pytest.raises(MetadataError, match=r"^d: refused: values nested deeper than Python's recursion limit$"):
        load_arrays(deep, "d")
    cycle = b"\x80\x02]q\x00h\x00a."  # a list that holds itself is its own result
    lst = load_arrays(cycle, "c")
    assert lst[0] is lst


def test_wrapped_array_size_is_exact():
    """joblib's shape (2**32, 2**32) of uint8: numpy's int64 product wraps round to 0 bytes."""
    data = pickled({"a": NumpyArray(np.zeros(3, np.uint8), "joblib")}, protocol=2)
    shape = b"(J\x03\x00\x00\x00t"
    assert data.count(shape) == 1
    huge = b"(\x8a\x05\x00\x00\x00\x00\x01\x8a\x05\x00\x00\x00\x00\x01t"  # LONG1 2**32, twice
    with pytest.raises(MetadataError, match=r"^j: refused: an array of 18446744073709551616 bytes, over the limit"):
        load_arrays(data.replace(shape, huge), "j")
