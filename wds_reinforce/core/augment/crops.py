"""Fixed-size geometry ops: ``resize``, ``random_crop`` and ``center_crop``, as torchvision's transforms.

These carry their own size (``rrc`` and ``center`` take the recipe's) and chain: CIFAR-100+
resizes the 32x32 images to 224, pads them by 16 and crops 224 at a random offset. Only
``random_crop`` records parameters: its offset in the padded image, exactly what torchvision's
``RandomCrop.get_params`` returns as (i, j). Padding follows torchvision's ``RandomCrop``
step by step (``padding``, then ``pad_if_needed`` for the width, then for the height, each on
both sides), because with ``reflect`` or ``symmetric`` padding the steps reflect what the
previous one added. Padding and cropping move pixels only, so both kernel sets give the same
pixels; ``resize`` is the kernel set's resize (see ``kernels``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from wds_reinforce.core.augment.kernels import CURRENT_KERNELS, KERNELS, PADDING_MODES, Kernels, resized_size
from wds_reinforce.core.augment.ops import GeometryOp, _interpolation, _ints, check_size, register_op
from wds_reinforce.core.errors import DataError, FormatError
from wds_reinforce.core.format import COLUMNS

__all__ = ["Resize", "RandomCrop", "PlainCenterCrop"]

Size = tuple[int, int]  # (height, width)
Sides = tuple[int, int, int, int]  # (left, top, right, bottom)

_CURRENT = KERNELS.get(CURRENT_KERNELS)


def _sides(value: Any) -> Sides:
    """torchvision's padding: one int for all sides, (left/right, top/bottom) or (left, top, right, bottom)."""
    if value is None:
        value = 0
    values = [value] if isinstance(value, int) else list(value) if isinstance(value, (list, tuple)) else None
    ok = values is not None and len(values) in (1, 2, 4)
    ok = ok and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values)
    if not ok:
        raise ValueError(
            "expected padding a non-negative int, or 2 (left/right, top/bottom) or 4 (left, top, right, bottom) "
            f"of them, got {value!r}"
        )
    if len(values) == 1:
        values = values * 4
    elif len(values) == 2:
        values = values * 2
    return tuple(values)  # type: ignore[return-value]


def _fill(value: Any) -> list[int]:
    values = [value] if isinstance(value, int) else list(value) if isinstance(value, (list, tuple)) else None
    if not values or len(values) not in (1, 3) or not all(isinstance(v, int) and 0 <= v <= 255 for v in values):
        raise ValueError(f"expected fill an int in [0, 255] or 3 of them, got {value!r}")
    return values


@register_op
class Resize(GeometryOp):
    """torchvision's ``Resize``: an int resizes the shorter side to it (aspect kept), (h, w) resizes to that."""

    name = "resize"

    def __init__(self, size: int | Sequence[int], interpolation: str = "bilinear", antialias: bool = True):
        if isinstance(size, (list, tuple)) and len(size) == 1:
            size = size[0]
        self.short = isinstance(size, int) and not isinstance(size, bool)
        super().__init__(check_size(size))
        self.interpolation = _interpolation(interpolation)
        self.antialias = bool(antialias)

    def _config(self) -> dict[str, Any]:
        size = self.size[0] if self.short else list(self.size)
        return {"size": size, "interpolation": self.interpolation, "antialias": self.antialias}

    @property
    def fixed_size(self) -> Size | None:
        return None if self.short else self.size

    def output_size(self, size: Size) -> Size:
        return resized_size(size, [self.size[0]] if self.short else self.size)

    def region(self, row: np.ndarray | None, src: Size) -> tuple[Size, Size]:
        return src, self.output_size(src)

    def apply_geometry(
        self, img: torch.Tensor, row: np.ndarray | None, src: Size, kernels: Kernels = _CURRENT
    ) -> torch.Tensor:
        # The size comes from the source's, not from a reduced decode's (whose aspect may differ by a pixel).
        return kernels.resize(img, self.output_size(src), self.interpolation, self.antialias)


@register_op
class RandomCrop(GeometryOp):
    """torchvision's ``RandomCrop``: pad, then crop ``size`` at a random offset of the padded image."""

    name = "random_crop"
    column = COLUMNS.get("random_crop")

    def __init__(
        self,
        size: int | Sequence[int],
        padding: int | Sequence[int] | None = 0,
        fill: int | Sequence[int] = 0,
        padding_mode: str = "constant",
        pad_if_needed: bool = False,
    ):
        super().__init__(check_size(size))
        self.padding = _sides(padding)
        self.fill = _fill(fill)
        if padding_mode not in PADDING_MODES:
            raise ValueError(f"expected padding_mode in {list(PADDING_MODES)}, got {padding_mode!r}")
        self.padding_mode = padding_mode
        if not isinstance(pad_if_needed, bool):
            raise ValueError(f"expected pad_if_needed true or false, got {pad_if_needed!r}")
        self.pad_if_needed = pad_if_needed

    def _config(self) -> dict[str, Any]:
        same = len(set(self.padding)) == 1
        return {
            "size": list(self.size),
            "padding": self.padding[0] if same else list(self.padding),
            "fill": self.fill[0] if len(self.fill) == 1 else list(self.fill),
            "padding_mode": self.padding_mode,
            "pad_if_needed": self.pad_if_needed,
        }

    def _steps(self, size: Size) -> tuple[list[Sides], Size]:
        """torchvision's padding steps for an input of ``size``, and the padded size.

        Raises:
            DataError: the input cannot give the crop (too small without ``pad_if_needed``), or a
                ``reflect`` or ``symmetric`` padding would reach past the image (torchvision refuses it).
        """
        steps = []
        height, width = size
        wanted = [self.padding]
        if self.pad_if_needed:
            pad_h, pad_w = self.padding[1] + self.padding[3], self.padding[0] + self.padding[2]
            extra_w, extra_h = max(self.size[1] - width - pad_w, 0), max(self.size[0] - height - pad_h, 0)
            wanted += [(extra_w, 0, extra_w, 0), (0, extra_h, 0, extra_h)]
        for left, top, right, bottom in wanted:
            if not (left or top or right or bottom):
                continue
            # torchvision mirrors each side once: reflect up to the size less 1 (the edge is not repeated),
            # symmetric up to the size (beyond, it raises IndexError, and OpenCV would mirror again)
            most = {"reflect": 1, "symmetric": 0}.get(self.padding_mode)
            if most is not None and (max(left, right) > width - most or max(top, bottom) > height - most):
                raise DataError(
                    f"{self.padding_mode} padding {(left, top, right, bottom)} reaches past the {height}x{width} image"
                )
            steps.append((left, top, right, bottom))
            height, width = height + top + bottom, width + left + right
        if height < self.size[0] or width < self.size[1]:
            raise DataError(f"the crop {self.size[0]}x{self.size[1]} is larger than the padded {height}x{width} image")
        return steps, (height, width)

    def sample(self, rng: np.random.Generator, size: Size) -> np.ndarray:
        _, (height, width) = self._steps(size)
        if (height, width) == self.size:
            return np.zeros(2, np.int64)
        top = int(rng.integers(0, height - self.size[0] + 1))
        left = int(rng.integers(0, width - self.size[1] + 1))
        return np.array([top, left], np.int64)

    def check(self, row: np.ndarray | None, size: Size) -> None:
        top, left = _ints(row, self)
        _, (height, width) = self._steps(size)
        if not (0 <= top <= height - self.size[0] and 0 <= left <= width - self.size[1]):
            raise FormatError(
                f"crop offset {(top, left)} of a {self.size[0]}x{self.size[1]} crop does not fit the padded "
                f"{height}x{width} image"
            )

    def apply_geometry(
        self, img: torch.Tensor, row: np.ndarray | None, src: Size, kernels: Kernels = _CURRENT
    ) -> torch.Tensor:
        steps, _ = self._steps(tuple(img.shape[-2:]))  # full scale: region() keeps the source whole
        for sides in steps:
            img = kernels.pad(img, sides, self.fill, self.padding_mode)
        top, left = (int(v) for v in row)
        return kernels.crop(img, top, left, self.size[0], self.size[1])


@register_op
class PlainCenterCrop(GeometryOp):
    """torchvision's ``CenterCrop`` (a smaller image is padded with zeros first). ``center`` is timm's eval view."""

    name = "center_crop"

    def __init__(self, size: int | Sequence[int]):
        super().__init__(check_size(size))

    def _config(self) -> dict[str, Any]:
        return {"size": list(self.size)}

    def apply_geometry(
        self, img: torch.Tensor, row: np.ndarray | None, src: Size, kernels: Kernels = _CURRENT
    ) -> torch.Tensor:
        return kernels.center_crop(img, self.size)
