"""Reading pickles without running them: the placeholders and the numpy-array unpickler the importers share.

``Inert`` stands in for the few numpy scalar names a record may hold. ``load_arrays`` reads
pickles of plain values and numeric numpy arrays, in numpy's own form (CIFAR's batches) or in
joblib's (a ``NumpyArrayWrapper`` record followed by the array's raw bytes): the only globals it
resolves are numpy's array and dtype names and joblib's wrapper, each to a placeholder here that
builds the array from its bytes with ``numpy.frombuffer`` (numeric dtypes only); nothing of
numpy's or joblib's pickle code runs.
"""

from __future__ import annotations

import io
import math
import pickle
from typing import Any

import numpy as np

from wds_reinforce.core.errors import MetadataError

__all__ = ["Inert", "INERT_NAMES", "MAX_NODES", "MAX_PICKLE_BYTES", "PICKLE_ERRORS", "load_arrays", "map_leaves"]

MAX_PICKLE_BYTES = 256 << 20  # the largest data.pkl read (8000 rounds of top-10 are ~3 MB)
MAX_NODES = 50_000_000  # values one walk over an unpickled object visits (map_leaves, check_plain)


class Inert:
    """What one of the few allowed global names becomes: a placeholder that does nothing.

    No module is imported and no attribute looked up: calling it (REDUCE) gives another
    placeholder, ``__setstate__`` (BUILD) ignores its state, and ``check_plain`` and
    ``convert_rounds`` refuse it wherever it turns up in data that is used.
    """

    __slots__ = ("name",)

    def __init__(self, name: str):
        self.name = name

    def __call__(self, *args: Any, **kwargs: Any) -> Inert:
        return Inert(f"{self.name}(...)")

    def __setstate__(self, state: Any) -> None:
        pass

    def __repr__(self) -> str:
        return f"<{self.name}>"


# numpy scalars pickle as multiarray.scalar(dtype(...), bytes); their mixing rounds hold some.
INERT_NAMES = frozenset({("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"), ("numpy", "dtype")})


# What the C unpickler raises for malformed or hostile input: all of it is bad data here.
PICKLE_ERRORS = (
    pickle.UnpicklingError,
    EOFError,
    ValueError,
    TypeError,
    AttributeError,
    IndexError,
    KeyError,
    OverflowError,
    RecursionError,
)


_RECONSTRUCT = frozenset({("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct")})
_NDARRAY = frozenset({("numpy", "ndarray")})
_WRAPPER = frozenset({("joblib.numpy_pickle", "NumpyArrayWrapper")})
_DTYPE = frozenset({("numpy", "dtype")})


class _Dtype:
    """``numpy.dtype(name, align, copy)`` and its state (byte order): becomes a numeric numpy dtype."""

    def __init__(self, name: Any, *args: Any):
        self.spec, self.order = name, "="

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) > 1 and state[1] in ("<", ">", "|", "="):
            self.order = state[1]

    def dtype(self, where: str) -> np.dtype:
        spec = self.spec.decode("latin1") if isinstance(self.spec, bytes) else self.spec
        try:
            dt = np.dtype(spec)
        except TypeError:
            dt = None
        if dt is None or dt.kind not in "biuf" or dt.fields is not None or dt.subdtype is not None:
            raise MetadataError(f"refused: an array of dtype {spec!r}; only numeric arrays are read", url=where)
        return dt.newbyteorder(self.order) if self.order in "<>" else dt


def _array(raw: bytes, dtype: np.dtype, shape: Any, fortran: bool, where: str) -> np.ndarray:
    if not isinstance(shape, (tuple, list)) or not all(type(n) is int and n >= 0 for n in shape):
        raise MetadataError(f"refused: an array of shape {shape!r}", url=where)
    # math.prod: exact; numpy's int64 product wraps round for a hostile shape.
    if math.prod(shape) * dtype.itemsize != len(raw):
        raise MetadataError(f"an array of shape {tuple(shape)} {dtype} with {len(raw)} bytes of data", url=where)
    arr = np.frombuffer(raw, dtype).reshape(tuple(shape), order="F" if fortran else "C")
    return arr.astype(dtype.newbyteorder("="), copy=False)


class _Reconstructed:
    """numpy's ``_reconstruct(ndarray, (0,), b"b")``; its BUILD state holds shape, dtype and the bytes."""

    def __init__(self, *args: Any):
        self.array: np.ndarray | None = None
        self.where = ""

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, tuple) or len(state) != 5 or not isinstance(state[2], _Dtype):
            raise MetadataError("refused: an array whose state is not numpy's (version, shape, dtype, ...)")
        _, shape, dtype, fortran, raw = state
        raw = raw.encode("latin1") if isinstance(raw, str) else raw  # a Python 2 pickle's str is its bytes
        if not isinstance(raw, (bytes, bytearray)):
            raise MetadataError("refused: an array whose data is not bytes (an object array?)")
        self.array = _array(bytes(raw), dtype.dtype(""), shape, bool(fortran), "")


class _ArrayUnpickler(pickle.Unpickler):
    """Resolves only the names above; joblib's wrapper reads its array's bytes from the stream itself."""

    def __init__(self, stream: Any, name: str, limit: int, encoding: str):
        super().__init__(stream, encoding=encoding)
        self._stream, self._name, self._left = stream, name, limit

    def find_class(self, module: str, name: str) -> Any:
        key = (module, name)
        if key in _RECONSTRUCT:
            return _Reconstructed
        if key in _NDARRAY:
            return Inert("numpy.ndarray")
        if key in _DTYPE:
            return _Dtype
        if key in _WRAPPER:
            unpickler = self

            class Wrapper:  # NEWOBJ needs a class; its state is joblib's record of the array that follows
                def __setstate__(self, state: Any) -> None:
                    self.array = unpickler._wrapped(state)

            return Wrapper
        if key in INERT_NAMES:
            return Inert(f"{module}.{name}")
        raise MetadataError(
            f"refused: the pickle needs the global {module}.{name}; only numpy arrays (numeric) and plain values "
            "are read",
            url=self._name,
        )

    def persistent_load(self, pid: Any) -> Any:
        raise MetadataError("refused: the pickle refers to a persistent object", url=self._name)

    def _wrapped(self, state: Any) -> np.ndarray:
        """joblib's array: (an alignment byte and padding) then the raw bytes, right after the record."""
        if not isinstance(state, dict) or not isinstance(state.get("dtype"), _Dtype):
            raise MetadataError(f"refused: a NumpyArrayWrapper record {state!r:.80}", url=self._name)
        dtype, shape = state["dtype"].dtype(self._name), state.get("shape")
        if not isinstance(shape, tuple) or not all(type(n) is int and n >= 0 for n in shape):
            raise MetadataError(f"refused: an array of shape {shape!r}", url=self._name)
        if state.get("numpy_array_alignment_bytes") is not None:
            pad = self._stream.read(1)
            self._stream.read(pad[0] if pad else 0)
        size = math.prod(shape) * dtype.itemsize  # exact: an int64 product can wrap round to a small size
        if size > self._left:
            raise MetadataError(f"refused: an array of {size} bytes, over the limit", url=self._name)
        self._left -= size
        raw = self._stream.read(size)
        return _array(raw, dtype, list(shape), state.get("order") == "F", self._name)


def map_leaves(obj: Any, leaf: Any, where: str = "", limit: int = MAX_NODES) -> Any:
    """``obj`` with each value that is no list, dict, tuple or plain scalar (int, float, str, bytes, bool,
    None) replaced by ``leaf(value)``; lists and dicts are changed in place, a tuple is copied if one of
    its values changes.

    A container met again (a pickle's memo lets one be referred to any number of times) is walked
    once and gives the same result each time, so the walk costs what the pickle's bytes do.

    Raises:
        MetadataError: (naming ``where``) containers of more than ``limit`` values in all, values nested
            deeper than Python's recursion limit, or a tuple that holds itself (through a list or dict).
    """
    walk = _Walk(leaf, where, limit)
    try:
        return walk.value(obj)
    except RecursionError:
        raise MetadataError("refused: values nested deeper than Python's recursion limit", url=where) from None


_PLAIN = frozenset({int, float, str, bytes, bool, type(None)})
_BUSY = object()  # a tuple being walked: met again, it holds itself


class _Walk:
    __slots__ = ("leaf", "where", "limit", "left", "done")

    def __init__(self, leaf: Any, where: str, limit: int):
        self.leaf, self.where, self.limit, self.left = leaf, where, limit, limit - 1
        # id -> (container, result): the container is kept so that its id is not reused by a new object.
        self.done: dict[int, tuple[Any, Any]] = {}

    def value(self, v: Any) -> Any:
        kind = type(v)
        if kind in _PLAIN:
            return v
        if kind is list or kind is dict or kind is tuple:
            return self.container(v)
        return self.leaf(v)

    def container(self, obj: Any) -> Any:
        seen = self.done.get(id(obj))
        if seen is not None:
            if seen[1] is _BUSY:
                raise MetadataError("refused: a tuple that holds itself", url=self.where)
            return seen[1]
        self.left -= len(obj)  # each reference counts: a memo hit costs its place in the container
        if self.left < 0:
            raise MetadataError(f"refused: more than {self.limit} values", url=self.where)
        plain, kind = _PLAIN, type(obj)
        if kind is tuple:
            self.done[id(obj)] = (obj, _BUSY)
            out = None
            for i, v in enumerate(obj):
                if type(v) not in plain:
                    new = self.value(v)
                    if new is not v:
                        out = list(obj) if out is None else out
                        out[i] = new
            result = obj if out is None else tuple(out)
            self.done[id(obj)] = (obj, result)
            return result
        self.done[id(obj)] = (obj, obj)  # a list or dict is its own result (and may hold itself)
        for k, v in enumerate(obj) if kind is list else obj.items():
            if type(v) not in plain:
                obj[k] = self.value(v)
        return obj


def _unwrap(obj: Any) -> Any:
    """An array placeholder's array, else ``obj``."""
    if isinstance(obj, _Reconstructed) or hasattr(obj, "array") and type(obj).__name__ == "Wrapper":
        return obj.array
    return obj


def load_arrays(data: bytes, name: str, encoding: str = "ASCII", leaf: Any = None) -> Any:
    """Unpickle ``data`` holding plain values and numeric numpy arrays (joblib's format or numpy's own).

    ``encoding`` is for Python 2 strings (CIFAR's batches: ``latin1``); ``leaf``, when given, maps each
    array (and any other value that is no container or plain scalar) in the same walk that puts the
    arrays in place (see ``map_leaves``). Raises ``MetadataError`` for any other global, an object array,
    a persistent id or a malformed pickle.
    """
    # A stream without peek(): the C unpickler then reads exactly what it needs, so a wrapper's
    # array bytes are still in the stream when its record is built.
    stream = _Exact(data)
    try:
        unwrap = _unwrap if leaf is None else lambda v: leaf(_unwrap(v))
        return map_leaves(_ArrayUnpickler(stream, name, MAX_PICKLE_BYTES, encoding).load(), unwrap, name)
    except MetadataError as exc:
        if exc.url:
            raise
        raise MetadataError(exc.message, url=name) from None
    except PICKLE_ERRORS as exc:
        raise MetadataError(f"refused: not a readable pickle ({type(exc).__name__}: {exc})", url=name) from None


class _Exact:
    __slots__ = ("_buf",)

    def __init__(self, data: bytes):
        self._buf = io.BytesIO(data)

    def read(self, n: int = -1) -> bytes:
        return self._buf.read(n)

    def readline(self) -> bytes:
        return self._buf.readline()

    def readinto(self, b: Any) -> int:
        return self._buf.readinto(b)
