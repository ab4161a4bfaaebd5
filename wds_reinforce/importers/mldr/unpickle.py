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
pickles of numpy arrays. ``io.pickles.load_arrays`` reads both kinds without running
numpy's or joblib's code; ``load_record`` tells the formats apart by their first bytes.
"""

from __future__ import annotations

import gc
import io
import math
import pickle
import zipfile
import zlib
from typing import Any

import numpy as np

from wds_reinforce.importers import MetadataError
from wds_reinforce.io.pickles import (
    INERT_NAMES,
    MAX_NODES,
    MAX_PICKLE_BYTES,
    PICKLE_ERRORS,
    Inert,
    load_arrays,
)

__all__ = [
    "restricted_loads",
    "load_torch_save",
    "load_arrays",
    "load_record",
    "check_plain",
    "Inert",
    "MAX_PICKLE_BYTES",
]

# Array values a record's arrays may become as Python values: their records hold rounds x top-k
# values (1000 x 10 for Flowers-102+); a Python int costs 36 bytes where a uint8 costs one.
MAX_LISTED = 1 << 22
# gzip layers unwrapped: joblib's own (a .gz name), and a file gzipped after.
MAX_GZIP_LAYERS = 2


class _NoGlobals(pickle.Unpickler):
    def __init__(self, data: bytes, name: str):
        super().__init__(io.BytesIO(data))
        self._name = name

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in INERT_NAMES:
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
    except PICKLE_ERRORS as exc:
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
        if count > MAX_NODES:
            raise MetadataError(f"refused: more than {MAX_NODES} values", url=name)
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
    layers = 0
    while data[:2] == b"\x1f\x8b":  # gzip: joblib's for a .gz name, or a file gzipped after
        layers += 1
        if layers > MAX_GZIP_LAYERS:
            raise MetadataError(f"refused: gzip inside gzip more than {MAX_GZIP_LAYERS} deep", url=name)
        data = _inflate(data, 31, name)
    if data[:4] == b"PK\x03\x04":
        return load_torch_save(data, name)
    if data[:1] == b"\x78":  # zlib: what joblib.dump(compress=True) writes for their names
        data = _inflate(data, zlib.MAX_WBITS, name)
    if data[:1] != b"\x80":
        raise MetadataError("not a torch.save container, a joblib file or a pickle", url=name)
    collecting = gc.isenabled()
    gc.disable()
    try:
        return load_arrays(data, name, leaf=_Lister(name, MAX_LISTED))
    finally:
        if collecting:
            gc.enable()


class _Lister:
    """An array as the plain list ``tolist`` gives (a record's values are then what torch.save's would be),
    refused once the file's arrays would give more than ``limit`` values in all."""

    __slots__ = ("name", "limit", "left")

    def __init__(self, name: str, limit: int):
        self.name, self.limit, self.left = name, limit, limit

    def __call__(self, obj: Any) -> Any:
        if not isinstance(obj, np.ndarray):
            return obj
        # What tolist builds: the values and every nested list (N empty lists for a shape (N, 0)).
        self.left -= obj.size + sum(math.prod(obj.shape[: i + 1]) for i in range(obj.ndim - 1))
        if self.left < 0:
            raise MetadataError(f"refused: arrays of more than {self.limit} values in all", url=self.name)
        return obj.tolist()
