"""Reading another project's pickles without running them: an unpickler that resolves no globals.

apple/ml-dr released its metadata as ``torch.save`` files, which are pickles. Nothing here runs
them: ``load_torch_save`` opens torch.save's zip container and unpickles ``data.pkl`` with an
unpickler that resolves no globals (the standard C unpickler, so protocol 4 with FRAME is read;
``torch.load(weights_only=True)`` rejects these files). Any global is refused with the file name,
except the few names numpy uses for a scalar, which become inert placeholders that are themselves
refused wherever a value is used (``check_plain``): mixing rounds hold CutMix boxes as numpy
integers, and ``--drop-mixing`` must be able to skip those rounds.

Their reinforce script can also write each file with ``joblib.dump(..., compress=True)`` (a zlib
stream, or gzip for a ``.gz`` name, of a pickle in which every numpy array is a
``NumpyArrayWrapper`` record followed by the array's raw bytes), and CIFAR's own batches are
pickles of numpy arrays. ``load_arrays`` reads both kinds: the only globals it resolves are
numpy's array and dtype names and joblib's wrapper, each to a placeholder here that builds the
array from its bytes with ``numpy.frombuffer`` (numeric dtypes only); nothing of numpy's or
joblib's pickle code runs. ``load_record`` tells the formats apart by their first bytes.
"""

from __future__ import annotations

import gc
import io
import pickle
import zipfile
import zlib
from typing import Any

import numpy as np

from wds_reinforce.importers import MetadataError

__all__ = [
    "restricted_loads",
    "load_torch_save",
    "load_arrays",
    "load_record",
    "check_plain",
    "Inert",
    "MAX_PICKLE_BYTES",
]

MAX_PICKLE_BYTES = 256 << 20  # the largest data.pkl read (8000 rounds of top-10 are ~3 MB)
_MAX_NODES = 50_000_000  # values visited by check_plain


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
_INERT_NAMES = frozenset(
    {("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"), ("numpy", "dtype")}
)


class _NoGlobals(pickle.Unpickler):
    def __init__(self, data: bytes, name: str):
        super().__init__(io.BytesIO(data))
        self._name = name

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _INERT_NAMES:
            return Inert(f"{module}.{name}")
        raise MetadataError(
            f"refused: the pickle needs the global {module}.{name}; their metadata holds only tuples, lists, "
            "dicts, numbers, strings, booleans and None, and nothing is unpickled beyond that",
            url=self._name,
        )

    def persistent_load(self, pid: Any) -> Any:
        raise MetadataError(
            "refused: the pickle refers to a persistent object (a tensor storage?); their metadata holds only "
            "plain values",
            url=self._name,
        )


# What the C unpickler raises for malformed or hostile input: all of it is bad data here.
_PICKLE_ERRORS = (
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


def restricted_loads(data: bytes, name: str) -> Any:
    """Unpickle ``data`` (any protocol up to 5) resolving no globals; ``name`` is the file, for errors.

    Raises:
        MetadataError: a global other than numpy's scalar names (which become inert placeholders),
            a persistent id, or a malformed pickle.
    """
    # Tens of thousands of small acyclic containers per file: the cyclic collector would run
    # many times over them for nothing (a quarter of an import's time).
    collecting = gc.isenabled()
    gc.disable()
    try:
        return _NoGlobals(data, name).load()
    except MetadataError:
        raise
    except _PICKLE_ERRORS as exc:
        raise MetadataError(f"refused: not a readable pickle ({type(exc).__name__}: {exc})", url=name) from None
    finally:
        if collecting:
            gc.enable()


def load_torch_save(data: bytes, name: str) -> Any:
    """The object in a ``torch.save`` file (its zip container's ``data.pkl``), read by ``restricted_loads``.

    Raises:
        MetadataError: not a torch.save zip container, no single ``*/data.pkl``, or a refused pickle.
    """
    if data[:4] != b"PK\x03\x04":
        raise MetadataError("not a torch.save zip container (torch >= 1.6); other formats are not read", url=name)
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            found = [i for i in zf.infolist() if i.filename.endswith("/data.pkl") and i.filename.count("/") == 1]
            if len(found) != 1:
                raise MetadataError(f"expected one */data.pkl in the torch.save container, got {len(found)}", url=name)
            if found[0].file_size > MAX_PICKLE_BYTES:
                size = found[0].file_size
                raise MetadataError(f"data.pkl of {size} bytes is over the {MAX_PICKLE_BYTES} limit", url=name)
            raw = zf.read(found[0])
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError, NotImplementedError) as exc:
        if isinstance(exc, MetadataError):
            raise
        raise MetadataError(f"not a readable torch.save container ({type(exc).__name__}: {exc})", url=name) from None
    return restricted_loads(raw, name)


_LEAVES = (int, float, str, bool, type(None))


def _what(value: Any) -> str:
    return value.name if isinstance(value, Inert) else type(value).__name__


def check_plain(obj: Any, name: str) -> None:
    """Raise ``MetadataError`` unless ``obj`` holds only tuples, lists, dicts, numbers, strings, bools, None."""
    stack, seen, count = [obj], set(), 0
    while stack:
        value = stack.pop()
        count += 1
        if count > _MAX_NODES:
            raise MetadataError(f"refused: more than {_MAX_NODES} values", url=name)
        kind = type(value)
        if kind in (tuple, list, dict):
            if id(value) in seen:
                continue
            seen.add(id(value))
            if kind is dict:
                stack.extend(value.keys())
                stack.extend(value.values())
            else:
                stack.extend(value)
        elif kind not in _LEAVES:
            raise MetadataError(f"refused: holds a {_what(value)}, not a plain value", url=name)


# ----------------------------------------------------------------------------------------
# Pickles that hold numpy arrays: joblib's files and CIFAR's batches

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
    count = int(np.prod(shape, dtype=np.int64)) if shape else 1
    if count * dtype.itemsize != len(raw):
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
        if key in _INERT_NAMES:
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
        size = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize if shape else dtype.itemsize
        if size > self._left:
            raise MetadataError(f"refused: an array of {size} bytes, over the limit", url=self._name)
        self._left -= size
        raw = self._stream.read(size)
        return _array(raw, dtype, list(shape), state.get("order") == "F", self._name)


def _unwrap(obj: Any) -> Any:
    """The loaded tree with every array placeholder replaced by its array."""
    if isinstance(obj, _Reconstructed) or hasattr(obj, "array") and type(obj).__name__ == "Wrapper":
        return obj.array
    if type(obj) is list:
        obj[:] = [_unwrap(v) for v in obj]
    elif type(obj) is dict:
        for k, v in obj.items():
            obj[k] = _unwrap(v)
    elif type(obj) is tuple:
        return tuple(_unwrap(v) for v in obj)
    return obj


def load_arrays(data: bytes, name: str, encoding: str = "ASCII") -> Any:
    """Unpickle ``data`` holding plain values and numeric numpy arrays (joblib's format or numpy's own).

    ``encoding`` is for Python 2 strings (CIFAR's batches: ``latin1``). Raises ``MetadataError`` for any
    other global, an object array, a persistent id or a malformed pickle.
    """
    # A stream without peek(): the C unpickler then reads exactly what it needs, so a wrapper's
    # array bytes are still in the stream when its record is built.
    stream = _Exact(data)
    try:
        return _unwrap(_ArrayUnpickler(stream, name, MAX_PICKLE_BYTES, encoding).load())
    except MetadataError as exc:
        if exc.url:
            raise
        raise MetadataError(exc.message, url=name) from None
    except _PICKLE_ERRORS as exc:
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


def _inflate(data: bytes, wbits: int, name: str) -> bytes:
    d = zlib.decompressobj(wbits)
    try:
        out = d.decompress(data, MAX_PICKLE_BYTES + 1)
    except zlib.error as exc:
        raise MetadataError(f"refused: not a readable compressed file ({exc})", url=name) from None
    if len(out) > MAX_PICKLE_BYTES:
        raise MetadataError(f"refused: over {MAX_PICKLE_BYTES} bytes once decompressed", url=name)
    if not d.eof:
        raise MetadataError("refused: a compressed file cut short", url=name)
    return out


def load_record(data: bytes, name: str) -> Any:
    """One of their files, whatever way it was written: ``torch.save`` (a zip), or ``joblib.dump``
    (zlib- or gzip-compressed, or not), each possibly gzipped; read without running any of it."""
    if data[:2] == b"\x1f\x8b":  # gzip: joblib's for a .gz name, or a file gzipped after
        return load_record(_inflate(data, 31, name), name)
    if data[:4] == b"PK\x03\x04":
        return load_torch_save(data, name)
    if data[:1] == b"\x78":  # zlib: what joblib.dump(compress=True) writes for their names
        data = _inflate(data, zlib.MAX_WBITS, name)
    if data[:1] != b"\x80":
        raise MetadataError("not a torch.save container, a joblib file or a pickle", url=name)
    collecting = gc.isenabled()
    gc.disable()
    try:
        return _listed(load_arrays(data, name))
    finally:
        if collecting:
            gc.enable()


def _listed(obj: Any) -> Any:
    """Arrays as the plain lists ``tolist`` gives: a record's values are then what torch.save's would be."""
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if type(obj) is list:
        obj[:] = [_listed(v) for v in obj]
    elif type(obj) is dict:
        for k, v in obj.items():
            obj[k] = _listed(v)
    elif type(obj) is tuple:
        return tuple(_listed(v) for v in obj)
    return obj
