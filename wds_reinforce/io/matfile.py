"""MATLAB's Level 5 MAT-files, numeric matrices only: what Flowers-102's ``setid.mat`` and ``imagelabels.mat`` hold.

torchvision reads those two files with ``scipy.io.loadmat``; scipy is no dependency here, and the
format's numeric part is small: a 128-byte header, then data elements (an 8-byte tag of type and
size, or a 4-byte "small" tag with up to 4 bytes of data, each element padded to 8 bytes). A
``miMATRIX`` element holds array flags, dimensions, a name and the real part; ``miCOMPRESSED``
holds one element, zlib-compressed. Anything else (cells, structs, sparse, complex) is refused.
"""

from __future__ import annotations

import math
import os
import struct
import zlib

import numpy as np

from wds_reinforce.core.errors import MetadataError

__all__ = ["read_mat"]

_MAX_BYTES = 64 << 20  # the Flowers files are a few tens of kB
# MAT data types -> numpy dtypes (little-endian here; swapped for a big-endian file).
_TYPES = {1: "i1", 2: "u1", 3: "i2", 4: "u2", 5: "i4", 6: "u4", 7: "f4", 9: "f8", 12: "i8", 13: "u8"}
_MATRIX, _COMPRESSED = 14, 15
_NUMERIC_CLASSES = range(6, 16)  # double, single, int8 .. uint64


def _elements(data: bytes, order: str, where: str):
    """(type, payload) of each data element in ``data``."""
    pos = 0
    while pos + 8 <= len(data):
        first, second = struct.unpack_from(order + "II", data, pos)
        if first >> 16:  # small data element: size in the upper half, data in the next 4 bytes
            kind, size = first & 0xFFFF, first >> 16
            if size > 4:
                raise MetadataError("a small data element longer than 4 bytes", url=where)
            yield kind, data[pos + 4 : pos + 4 + size]
            pos += 8
            continue
        kind, size = first, second
        end = pos + 8 + size
        if end > len(data):
            raise MetadataError("a data element runs past the end of the file", url=where)
        yield kind, data[pos + 8 : end]
        pos = end if kind == _COMPRESSED else pos + 8 + ((size + 7) // 8) * 8


def _numbers(kind: int, payload: bytes, order: str, where: str) -> np.ndarray:
    if kind not in _TYPES:
        raise MetadataError(f"refused: MAT data type {kind} (only numeric arrays are read)", url=where)
    dtype = np.dtype(_TYPES[kind]).newbyteorder(order)
    if len(payload) % dtype.itemsize:
        raise MetadataError("a numeric element whose size is no multiple of its type's", url=where)
    return np.frombuffer(payload, dtype).astype(dtype.newbyteorder("="))


def _matrix(payload: bytes, order: str, where: str) -> tuple[str, np.ndarray]:
    parts = list(_elements(payload, order, where))
    if len(parts) < 4:
        raise MetadataError("a matrix without flags, dimensions, name and data", url=where)
    flags = _numbers(*parts[0], order, where)
    mx_class, complex_flag = int(flags[0]) & 0xFF, int(flags[0]) & 0x800
    if mx_class not in _NUMERIC_CLASSES or complex_flag or len(parts) != 4:
        raise MetadataError(f"refused: a MAT array of class {mx_class} (only real numeric arrays are read)", url=where)
    dims = [int(d) for d in _numbers(*parts[1], order, where)]
    name = parts[2][1].decode("latin1")
    values = _numbers(*parts[3], order, where)
    # math.prod: exact (numpy's int64 product wraps round); a negative dimension is no size.
    if any(d < 0 for d in dims) or math.prod(dims) != values.size:
        raise MetadataError(f"{name}: {values.size} values for dimensions {dims}", url=where)
    return name, values.reshape(dims, order="F")  # MATLAB stores columns first


def read_mat(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The numeric arrays of a Level 5 MAT-file by name.

    Raises:
        MetadataError: not a Level 5 MAT-file, or one holding anything but real numeric arrays.
    """
    where = str(path)
    with open(path, "rb") as f:
        data = f.read(_MAX_BYTES + 1)
    if len(data) > _MAX_BYTES or len(data) < 128:
        raise MetadataError("not a MAT-file of the expected size", url=where)
    mark = data[126:128]
    if mark not in (b"IM", b"MI") or not data[:6] == b"MATLAB":
        raise MetadataError("not a Level 5 MAT-file (MATLAB 5.0 header)", url=where)
    order = "<" if mark == b"IM" else ">"
    out: dict[str, np.ndarray] = {}
    for kind, payload in _elements(data[128:], order, where):
        if kind == _COMPRESSED:
            try:
                inner = zlib.decompressobj().decompress(payload, _MAX_BYTES)
            except zlib.error as exc:
                raise MetadataError(f"a compressed element that does not inflate ({exc})", url=where) from None
            pieces = list(_elements(inner, order, where))
            if len(pieces) != 1:
                raise MetadataError("a compressed element holding other than one element", url=where)
            kind, payload = pieces[0]
        if kind != _MATRIX:
            raise MetadataError(f"refused: a top-level MAT element of type {kind}", url=where)
        name, values = _matrix(payload, order, where)
        out[name] = values
    return out
