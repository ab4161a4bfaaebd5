"""Column codecs: how the (R, fields) values of one sidecar column become bytes, and back.

One class per value kind, ``encode`` and ``decode`` side by side, filed in ``CODECS`` by name
(``uint``, ``bits``, ``sparse``, ``i8``, ``i16``, ``f16``). docs/FORMAT.md specifies each.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from wds_reinforce.core.errors import FormatError
from wds_reinforce.core.registry import Registry

__all__ = ["CODECS", "Codec", "UINT_DTYPES", "uint_width"]

UINT_DTYPES = {1: np.dtype("<u1"), 2: np.dtype("<u2"), 4: np.dtype("<u4")}


CODECS: Registry[type[Codec]] = Registry("column codec")


class Codec:
    """How the (R, fields) values of one op column become bytes, and back.

    Codecs are stateless; a ``Column`` holds one instance. ``label`` names the column in
    error messages ("op column 'rrc'").
    """

    name: ClassVar[str]
    # True if ``decode`` can derive the row width from the byte length (``fields=None``).
    variable: ClassVar[bool] = False

    def encode(self, values: np.ndarray, rounds: int, label: str = "column") -> bytes:
        """The bytes of ``values``, a (rounds, fields) integer or float array.

        Raises:
            ValueError: a value this codec cannot hold.
        """
        raise NotImplementedError

    def decode(
        self, raw: bytes, rounds: int, fields: int | None, key: str | None = None, label: str = "column"
    ) -> np.ndarray:
        """The (rounds, fields) array in ``raw``, a read-only view of it where the layout allows.

        Raises:
            FormatError: a byte length that does not hold ``rounds`` rows of ``fields`` values.
        """
        raise NotImplementedError


def _codec(cls: type[Codec]) -> type[Codec]:
    CODECS.register(cls.name, cls)
    return cls


def uint_width(values: np.ndarray) -> int:
    """The smallest of 1, 2, 4 bytes that holds every value."""
    top = int(values.max()) if values.size else 0
    return 1 if top <= 0xFF else 2 if top <= 0xFFFF else 4


@_codec
class _UInt(Codec):
    """Little-endian unsigned integers of one width w in {1, 2, 4}: the smallest that holds the
    largest value. A reader derives w = len / (R * fields)."""

    name = "uint"

    def encode(self, values: np.ndarray, rounds: int, label: str = "column") -> bytes:
        if values.size and values.min() < 0:
            raise ValueError(f"expected non-negative values in {label}")
        return values.astype(UINT_DTYPES[uint_width(values)]).tobytes()

    def decode(
        self, raw: bytes, rounds: int, fields: int | None, key: str | None = None, label: str = "column"
    ) -> np.ndarray:
        n, count = len(raw), rounds * fields
        if count == 0 and n == 0:
            return np.zeros((rounds, fields), np.uint8)
        width = n // count if count and n % count == 0 else 0
        if width not in UINT_DTYPES:
            raise FormatError(f"{label} has {n} bytes, expected {rounds}x{fields} values of 1, 2 or 4 bytes", key)
        return np.frombuffer(raw, UINT_DTYPES[width]).reshape(rounds, fields)


@_codec
class _Bits(Codec):
    """One bit per value (nonzero = 1), R * fields bits packed least significant bit first."""

    name = "bits"

    def encode(self, values: np.ndarray, rounds: int, label: str = "column") -> bytes:
        return np.packbits(values.astype(bool).ravel(), bitorder="little").tobytes()

    def decode(
        self, raw: bytes, rounds: int, fields: int | None, key: str | None = None, label: str = "column"
    ) -> np.ndarray:
        count = rounds * fields
        if len(raw) != (count + 7) // 8:
            raise FormatError(f"{label} has {len(raw)} bytes, expected {(count + 7) // 8}", key)
        bits = np.unpackbits(np.frombuffer(raw, np.uint8), count=count, bitorder="little")
        return bits.reshape(rounds, fields)


_UINT = _UInt()


@_codec
class _Sparse(Codec):
    """For ops that usually do nothing: a presence bitmap of R bits (as ``bits``), then ``uint``
    values of the present rows only. An all-zero row is absent ("op not applied")."""

    name = "sparse"

    def encode(self, values: np.ndarray, rounds: int, label: str = "column") -> bytes:
        present = values.any(axis=1)
        bitmap = np.packbits(present, bitorder="little").tobytes()
        return bitmap + _UINT.encode(values[present], int(present.sum()), label)

    def decode(
        self, raw: bytes, rounds: int, fields: int | None, key: str | None = None, label: str = "column"
    ) -> np.ndarray:
        n, nmap = len(raw), (rounds + 7) // 8
        if n < nmap:
            raise FormatError(f"{label} has {n} bytes, fewer than its {nmap}-byte bitmap", key)
        present = np.unpackbits(np.frombuffer(raw, np.uint8, nmap), count=rounds, bitorder="little").astype(bool)
        count = int(present.sum())
        if count == 0:
            if n != nmap:
                raise FormatError(f"{label} has values but no row is present", key)
            return np.zeros((rounds, fields), np.uint16)
        values = _UINT.decode(raw[nmap:], count, fields, key, label)
        out = np.zeros((rounds, fields), values.dtype)
        out[present] = values
        return out


class _Fixed(Codec):
    """Values of one fixed little-endian dtype; the row width can be derived from the length."""

    dtype: ClassVar[np.dtype]
    variable = True

    def encode(self, values: np.ndarray, rounds: int, label: str = "column") -> bytes:
        if self.dtype.kind == "i" and values.size:
            info = np.iinfo(self.dtype)
            if values.min() < info.min or values.max() > info.max:
                raise ValueError(f"expected {label} values within {self.dtype}")
        return values.astype(self.dtype).tobytes()

    def decode(
        self, raw: bytes, rounds: int, fields: int | None, key: str | None = None, label: str = "column"
    ) -> np.ndarray:
        if rounds == 0:  # no rows: no bytes, and a width that the length cannot give is 0
            if raw:
                raise FormatError(f"{label} has {len(raw)} bytes, but there are no rounds", key)
            return np.zeros((0, fields or 0), self.dtype)
        per_row = len(raw) / (rounds * self.dtype.itemsize)
        width = int(per_row) if fields is None else fields
        if per_row != width:
            raise FormatError(f"{label} has {len(raw)} bytes, which is not {rounds} whole rows", key)
        return np.frombuffer(raw, self.dtype).reshape(rounds, width)


@_codec
class _Int8(_Fixed):
    name, dtype = "i8", np.dtype("<i1")


@_codec
class _Int16(_Fixed):
    name, dtype = "i16", np.dtype("<i2")


@_codec
class _Float16(_Fixed):
    name, dtype = "f16", np.dtype("<f2")
