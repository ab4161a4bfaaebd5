"""The sidecar's op columns: ``Column`` (name, codec, named fields) and ``COLUMNS``, the one table.

``COLUMNS`` declares every column a sidecar may hold, the ops' and mixing's, complete when this
module is imported (nothing registers into it as a side effect of importing an op). It is the
code form of docs/FORMAT.md's column table, which a test holds against it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from wds_reinforce.core.errors import FormatError
from wds_reinforce.core.format.codecs import CODECS, Codec
from wds_reinforce.core.registry import Registry

__all__ = ["Column", "COLUMNS"]


@dataclass(frozen=True)
class Column:
    """The layout of one op column: R rows, each ``repeat`` groups of the named ``fields``, in one codec.

    Every column is declared once, in ``COLUMNS`` below; an op (``Op.column``) and mixing take
    theirs from there. A reader decodes a column by its name alone, so a column's codec and
    fields never change once written.

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


_BOX = ("top", "left", "height", "width")

# Every column a reader knows, by name: what each op (``augment.ops``) and a recipe's ``mix``
# (``augment.mixing``) write. A new op adds its column here, with its row in docs/FORMAT.md.
COLUMNS: Registry[Column] = Registry("op column")
for _col in (
    Column("rrc", "uint", _BOX, doc="random resized crop: the crop box in source pixels"),
    Column(
        "random_crop",
        "uint",
        ("top", "left"),
        doc="random crop: the crop's offset in the padded image (torchvision RandomCrop.get_params' i, j)",
    ),
    Column("flip", "bits", ("flip",), doc="1 = flipped horizontally"),
    Column(
        "ra",
        "i8",
        ("op", "bin"),
        repeat=None,
        doc="RandAugment: op id in RANDAUGMENT_SPACE, signed magnitude bin; all zero = not applied (p < 1)",
    ),
    Column("re", "sparse", _BOX, doc="random erasing: the erase box in output pixels; zeros = not erased"),
    Column("mixp", "sparse", ("partner",), doc="partner's position in the pairing window + 1; 0 = round not mixed"),
    Column("mixl", "sparse", ("weight",), doc="MixUp: the partner's weight x 256, 1..255; 0 = no MixUp"),
    Column("mixb", "sparse", _BOX, doc="CutMix: the box pasted from the partner, in output pixels; zeros = no CutMix"),
):
    COLUMNS.register(_col.name, _col)
del _col
