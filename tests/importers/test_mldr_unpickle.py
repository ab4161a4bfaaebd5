"""importers.mldr.unpickle: what reading one of their files may cost (hand-written pickles)."""

from __future__ import annotations

import zlib

import numpy as np
import pytest

from tests.io.test_pickles import doubling
from tests.mldr_plus import NumpyArray, pickled
from wds_reinforce.importers.mldr import MetadataError, unpickle
from wds_reinforce.importers.mldr.unpickle import check_plain, load_record


def test_doubling_record_is_read_in_linear_time():
    """2**40 paths in 245 bytes, zlib-compressed as joblib writes: each shared tuple is walked once."""
    tree = load_record(zlib.compress(doubling(40)), "0.pth.tar")
    for _ in range(40):
        assert tree[0] is tree[1]
        tree = tree[0]
    assert tree == ()
    check_plain(load_record(zlib.compress(doubling(40)), "0.pth.tar"), "0.pth.tar")


def test_record_arrays_become_lists_up_to_a_total(monkeypatch):
    """``tolist`` makes 36-byte Python ints of 1-byte values: the file's arrays are capped in all."""
    assert unpickle.MAX_LISTED >= 1000 * 10 * 2  # Flowers-102+'s 1000 rounds of top-10, values and ids
    monkeypatch.setattr(unpickle, "MAX_LISTED", 5)
    three = NumpyArray(np.arange(3, dtype=np.int64), "joblib")
    assert load_record(pickled((1, three), protocol=4), "1.jb") == (1, [0, 1, 2])
    two = NumpyArray(np.arange(2, dtype=np.int64), "joblib")
    assert load_record(pickled((three, two), protocol=4), "2.jb") == ([0, 1, 2], [0, 1])
    with pytest.raises(MetadataError, match=r"^3\.jb: refused: arrays of more than 5 values in all$"):
        load_record(pickled((three, three), protocol=4), "3.jb")


def test_empty_inner_dimensions_count_the_lists_tolist_builds(monkeypatch):
    """Shape (N, 0) holds no value but lists to N empty lists: those count against the cap too."""
    monkeypatch.setattr(unpickle, "MAX_LISTED", 5)
    four = NumpyArray(np.zeros((4, 0), dtype=np.int64), "joblib")
    assert load_record(pickled((1, four), protocol=4), "4.jb") == (1, [[], [], [], []])
    six = NumpyArray(np.zeros((6, 0), dtype=np.int64), "joblib")
    with pytest.raises(MetadataError, match=r"^6\.jb: refused: arrays of more than 5 values in all$"):
        load_record(pickled((1, six), protocol=4), "6.jb")


def test_gzip_layers_are_bounded():
    data = pickled([1, 2], protocol=4)
    for _ in range(2):  # joblib's gzip for a .gz name, and the file gzipped after
        data = gzipped(data)
    assert load_record(data, "0.jb.gz") == [1, 2]
    with pytest.raises(MetadataError, match=r"^0\.jb\.gz: refused: gzip inside gzip more than 2 deep$"):
        load_record(gzipped(data), "0.jb.gz")


def gzipped(data: bytes) -> bytes:
    c = zlib.compressobj(1, zlib.DEFLATED, 31)
    return c.compress(data) + c.flush()
