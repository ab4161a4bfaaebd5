"""Sidecar op columns: one codec class per value kind, and the ``Column`` layouts readers know.

Part of the format (``format`` re-exports everything here; docs/FORMAT.md is the spec). Each
codec has ``encode`` and ``decode`` side by side and is filed in ``CODECS`` by name; a
``Column`` (name, codec, named fields) is declared by the op that writes it and filed in
``COLUMNS``, where a reader finds the layout of every column by its name.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from wds_reinforce.core.errors import FormatError
from wds_reinforce.core.registry import Registry

__all__ = ["CODECS", "Codec", "COLUMNS", "Column", "UINT_DTYPES", "uint_width"]

UINT_DTYPES = {1: np.dtype("<u1"), 2: np.dtype("<u2"), 4: np.dtype("<u4")}


# ----------------------------------------------------------------------------------------
# Column codecs: one class per kind, encode and decode side by side, in a name -> class registry.

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


# ----------------------------------------------------------------------------------------
# Columns


@dataclass(frozen=True)
class Column:
    """The layout of one op column: R rows, each ``repeat`` groups of the named ``fields``, in one codec.

    Ops declare their column (``augment.Op.column``) and register it in ``COLUMNS`` when they
    are defined; the reserved mixing columns are declared below. A reader decodes a column by
    its name alone, so a column's codec and fields never change once written.

    An all-zero row means "op not applied" for ops that may skip a round (random erasing, the
    mixing columns); their columns use the ``sparse`` codec, which stores only the other rows.

    Attributes:
        name: the key in the sidecar's ``ops`` map; an op's column is named like the op.
        codec: a name in ``CODECS``: ``uint``, ``bits``, ``sparse``, ``i8``, ``i16``, ``f16``.
        fields: the names of the values of one group, e.g. ("top", "left", "height", "width").
        repeat: groups per row; None for a width that depends on the recipe (RandAugment's
            ``num_ops`` pairs), which a reader derives from the byte length (fixed-width codecs only).
        doc: what the values mean.
        width: values per row, ``len(fields) * repeat`` (None with ``repeat`` None); derived.
    """

    name: str
    codec: str
    fields: tuple[str, ...]
    repeat: int | None = 1
    doc: str = ""
    width: int | None = field(init=False, repr=False, compare=False)  # values per row, len(fields) * repeat
    _codec: Codec = field(init=False, repr=False, compare=False)
    _label: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        codec = CODECS.get(self.codec)()
        fields = tuple(self.fields)
        if not fields or not all(isinstance(f, str) for f in fields):
            raise ValueError(f"expected column fields to be a non-empty tuple of names, got {self.fields!r}")
        if self.repeat is None and not codec.variable:
            raise ValueError(f"expected a fixed repeat for column {self.name!r}: codec {self.codec!r} cannot derive it")
        if self.repeat is not None and not (isinstance(self.repeat, int) and self.repeat >= 0):
            raise ValueError(f"expected repeat a non-negative integer or None, got {self.repeat!r}")
        object.__setattr__(self, "fields", fields)
        object.__setattr__(self, "width", None if self.repeat is None else len(fields) * self.repeat)
        object.__setattr__(self, "_codec", codec)
        object.__setattr__(self, "_label", f"op column {self.name!r}")

    def with_repeat(self, repeat: int) -> Column:
        """This column with ``repeat`` groups per row (an op's instance of a variable column)."""
        return dataclasses.replace(self, repeat=repeat)

    def encode(self, values: np.ndarray, rounds: int) -> bytes:
        """The bytes of ``values``, (rounds, width) or (rounds,) for one field.

        Raises:
            ValueError: the wrong shape, or values the codec cannot hold.
        """
        values = np.asarray(values)
        if values.ndim == 1:
            values = values[:, None]
        if values.ndim != 2 or values.shape[0] != rounds:
            raise ValueError(f"expected {self._label} with {rounds} rows, got shape {values.shape}")
        width, group = values.shape[1], len(self.fields)
        if (self.repeat is not None and width != self.width) or (self.repeat is None and width % group):
            expected = self.width if self.repeat is not None else f"a multiple of {group}"
            raise ValueError(f"expected {self._label} rows of {expected} values, got {width}")
        return self._codec.encode(values, rounds, self._label)

    def decode(self, raw: Any, rounds: int, key: str | None = None) -> np.ndarray:
        """The (rounds, width) array in ``raw``.

        Raises:
            FormatError: ``raw`` is not bytes, or its length does not fit ``rounds`` rows.
        """
        if not isinstance(raw, bytes):
            raise FormatError(f"{self._label} must be bytes, got {type(raw).__name__}", key)
        values = self._codec.decode(raw, rounds, self.width, key, self._label)
        if self.repeat is None and values.shape[1] % len(self.fields):
            raise FormatError(f"{self._label} has {len(raw)} bytes, which is not {rounds} whole rows", key)
        return values


# Every column a reader knows, by name. Ops add theirs (augment.register_op); the mixing columns
# (written by a recipe's ``mix``, see ``mixing``) are declared here.
COLUMNS: Registry[Column] = Registry("op column")
for _col in (
    Column("mixp", "sparse", ("partner",), doc="partner's position in the pairing window + 1; 0 = round not mixed"),
    Column("mixl", "sparse", ("weight",), doc="MixUp: the partner's weight x 256, 1..255; 0 = no MixUp"),
    Column(
        "mixb",
        "sparse",
        ("top", "left", "height", "width"),
        doc="CutMix: the box pasted from the partner, in output pixels; zeros = no CutMix",
    ),
):
    COLUMNS.register(_col.name, _col)
del _col
