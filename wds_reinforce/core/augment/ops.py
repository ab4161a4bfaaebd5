"""Augmentation ops: sample parameters once, check them, apply them with a pure kernel.

Every op has ``sample(rng, size) -> row`` (a small numpy array, the op's row in its sidecar
column), ``check(row, size)`` (cheap range checks that raise ``FormatError``) and a pure
``apply(image, row, kernels)`` over uint8 (3, H, W) tensors. An op that records parameters
takes its sidecar layout, ``column``, from the format's one table (``format.COLUMNS``, where every
column is declared); ``register_op`` files the op in ``OPS``. An all-zero row means "not
applied" for ops that may skip (stored with the sparse codec). The RNG is always passed in;
nothing here reads global RNG state.

Ops own the semantics (parameters, their distribution, checks); the pixel code is a kernel set
(``kernels``) that the recipe names: set 1 is torchvision's ``transforms.v2.functional`` (each op
equals torchvision's transform bit for bit given the same parameters), set 2 OpenCV and numpy.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import torch

from wds_reinforce.core.augment.kernels import CURRENT_KERNELS, KERNELS, Kernels
from wds_reinforce.core.augment.randaugment import RANDAUGMENT_SPACE, SIGNED, magnitude_of
from wds_reinforce.core.errors import FormatError
from wds_reinforce.core.format import COLUMNS, Column
from wds_reinforce.core.registry import Registry

__all__ = [
    "OPS",
    "Op",
    "GeometryOp",
    "register_op",
    "RandomResizedCrop",
    "CenterCrop",
    "HorizontalFlip",
    "RandAugment",
    "RandomErasing",
    "check_size",
]

_INTERPOLATIONS = ("bicubic", "bilinear", "nearest")
_CURRENT = KERNELS.get(CURRENT_KERNELS)

OPS: Registry[type[Op]] = Registry("op")

Size = tuple[int, int]  # (height, width)


# ----------------------------------------------------------------------------------------
# Argument checks: "expected X, got Y"


def _pair(name: str, value: Any, lo: float, hi: float) -> tuple[float, float]:
    try:
        a, b = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"expected {name} to be a pair (min, max), got {value!r}") from None
    if not (lo <= a <= b <= hi):
        raise ValueError(f"expected {name} with {lo} <= min <= max <= {hi}, got {value!r}")
    return a, b


def _prob(name: str, value: Any) -> float:
    if not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(f"expected {name} to be a probability in [0, 1], got {value!r}")
    return float(value)


def _interpolation(value: Any) -> str:
    if value not in _INTERPOLATIONS:
        raise ValueError(f"expected interpolation in {list(_INTERPOLATIONS)}, got {value!r}")
    return value


def check_size(value: Any) -> Size:
    if isinstance(value, int):
        value = (value, value)
    try:
        h, w = (int(v) for v in value)
        ok = all(isinstance(v, int) for v in value) and h > 0 and w > 0
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"expected size to be a positive int or (height, width), got {value!r}")
    return h, w


# ----------------------------------------------------------------------------------------
# Ops


class Op:
    """One augmentation op: sample parameters, check them, apply them with a pure kernel.

    Subclasses set ``name`` (the registry name, and the name of its sidecar column) and, if
    they record parameters, ``column``: their ``format.Column`` from ``format.COLUMNS`` (named
    fields, codec; declared there, with the format). An op whose column has a variable ``repeat``
    sets its own with ``with_repeat`` (RandAugment's ``num_ops`` pairs). An op that may skip a
    round samples an all-zero row for "not applied"; its column uses the ``sparse`` codec,
    which stores only the other rows.
    """

    name: ClassVar[str]
    geometry: ClassVar[bool] = False
    column: Column | None = None  # None: records no parameters

    def sample(self, rng: np.random.Generator, size: Size) -> np.ndarray | None:
        """Draw this op's parameters for an input of ``size``; None if it has none."""
        return None

    def check(self, row: np.ndarray | None, size: Size) -> None:
        """Raise ``FormatError`` unless ``row`` can be this op's parameters for an input of ``size``.

        Cheap (a few integer comparisons): ``replay`` calls it for every sample. The default
        checks only that an op with a column gets a row of the column's width.
        """
        if self.column is not None:
            _ints(row, self)

    def apply(self, img: torch.Tensor, row: np.ndarray | None, kernels: Kernels = _CURRENT) -> torch.Tensor:
        """Apply parameters ``row`` to a uint8 (3, H, W) image with ``kernels`` (the recipe's kernel set)."""
        raise NotImplementedError

    def output_size(self, size: Size) -> Size:
        return size

    def to_dict(self) -> dict[str, Any]:
        return {"op": self.name, **self._config()}

    def _config(self) -> dict[str, Any]:
        return {}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self._config().items())
        return f"{type(self).__name__}({args})"


def register_op(cls: type[Op]) -> type[Op]:
    """Class decorator: file ``cls`` in ``OPS`` under ``cls.name``.

    Raises:
        ValueError: the name is taken, or the op's column is not the format's column of its name
            (declare a new column in ``format.COLUMNS`` and docs/FORMAT.md first).
    """
    column = cls.column
    if column is not None and column.name != cls.name:
        raise ValueError(f"expected op {cls.name!r} to declare a column named {cls.name!r}, got {column.name!r}")
    if cls.name in OPS:
        raise ValueError(f"op {cls.name!r} is already registered")
    if column is not None and (
        cls.name not in COLUMNS or COLUMNS.get(cls.name).with_repeat(0) != column.with_repeat(0)
    ):
        raise ValueError(f"expected op {cls.name!r} to use the format's column {cls.name!r} (format.COLUMNS)")
    OPS.register(cls.name, cls)
    return cls


def _ints(row: np.ndarray | Sequence[int] | None, op: Op) -> list[int]:
    """``row`` as Python ints, as many as ``op``'s column holds, or FormatError."""
    if row is None:
        raise FormatError(f"no parameters for op {op.name!r}")
    values = row.tolist() if isinstance(row, np.ndarray) else [int(v) for v in row]
    if len(values) != op.column.width:
        raise FormatError(f"expected {op.column.width} parameters for op {op.name!r}, got {values}")
    return values


class GeometryOp(Op):
    """An op that sets the image's size: a recipe's first ops (``rrc``, ``center``, ``resize``, ``random_crop``, ...).

    ``sized_by_recipe`` ops (``rrc``, ``center``) take their output size from the recipe; the others
    carry their own. The first op of a recipe also decides a reduced decode (``region``) and is
    applied to the decode (``apply_geometry``); the last geometry op must give a ``fixed_size``,
    the recipe's.
    """

    geometry = True
    sized_by_recipe: ClassVar[bool] = False

    def __init__(self, size: Size):
        self.size = size

    def output_size(self, size: Size) -> Size:
        return self.size

    @property
    def fixed_size(self) -> Size | None:
        """The output size whatever the input's, or None when it depends on the input (``resize`` of the short side)."""
        return self.size

    def region(self, row: np.ndarray | None, src: Size) -> tuple[Size, Size]:
        """(source region size, size it is resized to): what a reduced decode must keep.

        The default keeps the whole source at its size: no reduced decode.
        """
        return src, src

    def apply_geometry(
        self, img: torch.Tensor, row: np.ndarray | None, src: Size, kernels: Kernels = _CURRENT
    ) -> torch.Tensor:
        """Apply to ``img``, a decode of a ``src``-sized image that may be reduced in scale."""
        raise NotImplementedError

    def apply(self, img: torch.Tensor, row: np.ndarray | None, kernels: Kernels = _CURRENT) -> torch.Tensor:
        return self.apply_geometry(img, row, tuple(img.shape[-2:]), kernels)


def _scaled_box(box: Sequence[int], img: Size, src: Size) -> tuple[int, int, int, int]:
    """Map a (top, left, height, width) box in ``src`` pixels to an image of size ``img``."""
    top, left, h, w = (int(v) for v in box)
    if img == src:
        return top, left, h, w
    sy, sx = img[0] / src[0], img[1] / src[1]
    t, b = round(top * sy), round((top + h) * sy)
    lo, hi = round(left * sx), round((left + w) * sx)
    t, lo = min(t, img[0] - 1), min(lo, img[1] - 1)
    return t, lo, max(b - t, 1), max(hi - lo, 1)


@register_op
class RandomResizedCrop(GeometryOp):
    """torchvision's RandomResizedCrop: same parameter distribution; crop, then resize."""

    name = "rrc"
    column = COLUMNS.get("rrc")
    sized_by_recipe = True

    def __init__(
        self,
        size: Size,
        scale: Sequence[float] = (0.08, 1.0),
        ratio: Sequence[float] = (3 / 4, 4 / 3),
        interpolation: str = "bilinear",
        antialias: bool = True,
    ):
        super().__init__(check_size(size))
        self.scale = _pair("scale", scale, 1e-9, 1.0)
        self.ratio = _pair("ratio", ratio, 1e-9, math.inf)
        self.interpolation = _interpolation(interpolation)
        self.antialias = bool(antialias)

    def _config(self) -> dict[str, Any]:
        return {
            "scale": list(self.scale),
            "ratio": list(self.ratio),
            "interpolation": self.interpolation,
            "antialias": self.antialias,
        }

    def sample(self, rng: np.random.Generator, size: Size) -> np.ndarray:
        height, width = size
        area = height * width
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            target_area = area * rng.uniform(self.scale[0], self.scale[1])
            aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
            w = int(round(math.sqrt(target_area * aspect)))
            h = int(round(math.sqrt(target_area / aspect)))
            if 0 < w <= width and 0 < h <= height:
                top = int(rng.integers(0, height - h + 1))
                left = int(rng.integers(0, width - w + 1))
                return np.array([top, left, h, w], np.int64)
        # Fallback to a central crop, as torchvision does.
        in_ratio = width / height
        if in_ratio < min(self.ratio):
            w, h = width, int(round(width / min(self.ratio)))
        elif in_ratio > max(self.ratio):
            h, w = height, int(round(height * max(self.ratio)))
        else:
            w, h = width, height
        return np.array([(height - h) // 2, (width - w) // 2, h, w], np.int64)

    def check(self, row: np.ndarray | None, size: Size) -> None:
        top, left, h, w = _ints(row, self)
        if h < 1 or w < 1 or top < 0 or left < 0 or top + h > size[0] or left + w > size[1]:
            raise FormatError(f"crop box {(top, left, h, w)} does not fit the {size[0]}x{size[1]} image")

    def region(self, row: np.ndarray | None, src: Size) -> tuple[Size, Size]:
        return (int(row[2]), int(row[3])), self.size

    def apply_geometry(
        self, img: torch.Tensor, row: np.ndarray | None, src: Size, kernels: Kernels = _CURRENT
    ) -> torch.Tensor:
        box = _scaled_box(row, tuple(img.shape[-2:]), src)
        return kernels.resized_crop(img, box, self.size, self.interpolation, self.antialias)


@register_op
class CenterCrop(GeometryOp):
    """Resize so the crop is ``crop_pct`` of the resized image, then center crop (timm's eval view)."""

    name = "center"
    sized_by_recipe = True

    def __init__(self, size: Size, crop_pct: float = 0.875, interpolation: str = "bilinear", antialias: bool = True):
        super().__init__(check_size(size))
        if not isinstance(crop_pct, (int, float)) or not 0 < crop_pct <= 1:
            raise ValueError(f"expected crop_pct in (0, 1], got {crop_pct!r}")
        self.crop_pct = float(crop_pct)
        self.interpolation = _interpolation(interpolation)
        self.antialias = bool(antialias)

    def _config(self) -> dict[str, Any]:
        return {"crop_pct": self.crop_pct, "interpolation": self.interpolation, "antialias": self.antialias}

    def _resize_to(self) -> list[int]:
        h, w = self.size
        if h == w:
            return [math.floor(h / self.crop_pct)]  # shorter side, aspect kept
        return [math.floor(h / self.crop_pct), math.floor(w / self.crop_pct)]

    def region(self, row: np.ndarray | None, src: Size) -> tuple[Size, Size]:
        target = self._resize_to()
        if len(target) == 1:
            short = min(src)
            target = [round(src[0] * target[0] / short), round(src[1] * target[0] / short)]
        return src, (target[0], target[1])

    def apply_geometry(
        self, img: torch.Tensor, row: np.ndarray | None, src: Size, kernels: Kernels = _CURRENT
    ) -> torch.Tensor:
        img = kernels.resize_short(img, self._resize_to(), self.interpolation, self.antialias)
        return kernels.center_crop(img, self.size)


@register_op
class HorizontalFlip(Op):
    """Horizontal flip with probability ``p``."""

    name = "flip"
    column = COLUMNS.get("flip")

    def __init__(self, p: float = 0.5):
        self.p = _prob("p", p)

    def _config(self) -> dict[str, Any]:
        return {"p": self.p}

    def sample(self, rng: np.random.Generator, size: Size) -> np.ndarray:
        return np.array([rng.random() < self.p], np.uint8)

    def check(self, row: np.ndarray | None, size: Size) -> None:
        (bit,) = _ints(row, self)
        if bit != 0 and bit != 1:
            raise FormatError(f"flip bit {bit} is not 0 or 1")

    def apply(self, img: torch.Tensor, row: np.ndarray | None, kernels: Kernels = _CURRENT) -> torch.Tensor:
        return kernels.hflip(img) if row[0] else img


@register_op
class RandAugment(Op):
    """torchvision's RandAugment, applied with probability ``p``; each round stores num_ops pairs (op id, signed bin).

    A round where it is not applied (``p`` < 1) stores the all-zero row: op 0 is Identity, so that
    row is, pixel for pixel, "not applied". With ``p`` 1 (the default) the description and the
    draws are those of the op before ``p`` existed.
    """

    name = "ra"
    # The class column has a variable width (readers derive it); an instance fixes num_ops pairs.
    column = COLUMNS.get("ra")

    def __init__(
        self,
        num_ops: int = 2,
        magnitude: int = 9,
        num_magnitude_bins: int = 31,
        interpolation: str = "nearest",
        fill: Sequence[int] | int | None = None,
        p: float = 1.0,
    ):
        if not isinstance(num_ops, int) or not 0 <= num_ops <= 16:
            raise ValueError(f"expected num_ops an integer in [0, 16], got {num_ops!r}")
        if not isinstance(num_magnitude_bins, int) or not 2 <= num_magnitude_bins <= 128:
            raise ValueError(f"expected num_magnitude_bins an integer in [2, 128], got {num_magnitude_bins!r}")
        if not isinstance(magnitude, int) or not 0 <= magnitude < num_magnitude_bins:
            raise ValueError(f"expected magnitude an integer in [0, {num_magnitude_bins}), got {magnitude!r}")
        self.num_ops = num_ops
        self.column = RandAugment.column.with_repeat(num_ops)
        self.magnitude = magnitude
        self.num_magnitude_bins = num_magnitude_bins
        self.interpolation = _interpolation(interpolation)
        self.fill = list(fill) if isinstance(fill, (list, tuple)) else fill
        self.p = _prob("p", p)

    def _config(self) -> dict[str, Any]:
        config = {
            "num_ops": self.num_ops,
            "magnitude": self.magnitude,
            "num_magnitude_bins": self.num_magnitude_bins,
            "interpolation": self.interpolation,
            "fill": self.fill,
        }
        if self.p != 1.0:  # absent = 1: recipes recorded before p existed keep their description and fingerprint
            config["p"] = self.p
        return config

    def sample(self, rng: np.random.Generator, size: Size) -> np.ndarray:
        row = np.zeros(2 * self.num_ops, np.int64)
        if self.p < 1.0 and rng.random() >= self.p:  # p == 1 draws nothing more: the same rows as before p
            return row
        for i in range(self.num_ops):
            op_id = int(rng.integers(len(RANDAUGMENT_SPACE)))
            negative = bool(rng.random() < 0.5) if SIGNED[op_id] else False
            row[2 * i] = op_id
            row[2 * i + 1] = -self.magnitude if negative else self.magnitude
        return row

    def check(self, row: np.ndarray | None, size: Size) -> None:
        values, bins = _ints(row, self), self.num_magnitude_bins
        for op_id, signed_bin in zip(values[0::2], values[1::2]):
            if not 0 <= op_id < len(RANDAUGMENT_SPACE):
                raise FormatError(f"RandAugment op id {op_id} is not in [0, {len(RANDAUGMENT_SPACE)}) in {values}")
            if not -bins < signed_bin < bins or (signed_bin < 0 and not SIGNED[op_id]):
                sign = f"(-{bins}, {bins})" if SIGNED[op_id] else f"[0, {bins})"
                raise FormatError(f"RandAugment magnitude bin {signed_bin} of op {op_id} is not in {sign} in {values}")

    def apply(self, img: torch.Tensor, row: np.ndarray | None, kernels: Kernels = _CURRENT) -> torch.Tensor:
        height, width = img.shape[-2:]
        for op_id, signed_bin in zip(row[0::2].tolist(), row[1::2].tolist()):
            magnitude = magnitude_of(op_id, self.num_magnitude_bins, abs(signed_bin), height, width)
            magnitude = -magnitude if signed_bin < 0 else magnitude
            img = kernels.randaugment(img, op_id, magnitude, self.interpolation, self.fill)
        return img


@register_op
class RandomErasing(Op):
    """torchvision's RandomErasing on uint8 pixels, filled with a constant.

    torchvision usually erases after normalisation with value 0; here normalisation is a later
    float stage, so the default fill is the ImageNet mean in uint8, which normalises to ~0.
    A round without erasing has the all-zero row; a box of zero height or width erases nothing.
    """

    name = "re"
    column = COLUMNS.get("re")

    def __init__(
        self,
        p: float = 0.25,
        scale: Sequence[float] = (0.02, 0.33),
        ratio: Sequence[float] = (0.3, 3.3),
        value: Sequence[int] | int = (124, 116, 104),
    ):
        self.p = _prob("p", p)
        self.scale = _pair("scale", scale, 0.0, 1.0)
        self.ratio = _pair("ratio", ratio, 1e-9, math.inf)
        values = [value] if isinstance(value, int) else list(value) if isinstance(value, (list, tuple)) else None
        if not values or len(values) not in (1, 3) or not all(isinstance(v, int) and 0 <= v <= 255 for v in values):
            raise ValueError(f"expected value an int in [0, 255] or 3 of them, got {value!r}")
        self.value = values

    def _config(self) -> dict[str, Any]:
        return {"p": self.p, "scale": list(self.scale), "ratio": list(self.ratio), "value": self.value}

    def sample(self, rng: np.random.Generator, size: Size) -> np.ndarray:
        none = np.zeros(4, np.int64)
        if rng.random() >= self.p:
            return none
        height, width = size
        area = height * width
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            erase_area = area * rng.uniform(self.scale[0], self.scale[1])
            aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
            h = int(round(math.sqrt(erase_area * aspect)))
            w = int(round(math.sqrt(erase_area / aspect)))
            if not (h < height and w < width):
                continue
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return np.array([top, left, h, w], np.int64)
        return none

    def check(self, row: np.ndarray | None, size: Size) -> None:
        top, left, h, w = _ints(row, self)  # all zero (not applied) passes
        if top < 0 or left < 0 or h < 0 or w < 0 or top + h > size[0] or left + w > size[1]:
            raise FormatError(f"erase box {[top, left, h, w]} does not fit the output size {size}")

    def apply(self, img: torch.Tensor, row: np.ndarray | None, kernels: Kernels = _CURRENT) -> torch.Tensor:
        top, left, h, w = (int(v) for v in row)
        if h == 0 or w == 0:
            return img
        return kernels.erase(img, (top, left, h, w), self.value)
