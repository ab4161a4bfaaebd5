"""Kernel sets: the pixel code behind the ops, versioned, because the pixels are part of a recipe.

Exact replay comes from the producer and the loader running the same kernel on the same
parameters, whichever library it is. A recipe records which kernel set it was made with
(``Recipe.kernels``); a set, once released, never changes its pixels. A new, faster or better
kernel is a new set, so shards made with an old one keep replaying it bit for bit.

- ``1``: torchvision ``transforms.v2.functional`` on uint8 tensors. Every recipe recorded
  before kernel sets existed (no ``kernels`` field) uses it.
- ``2``: OpenCV and numpy on the HWC memory the JPEG decoder writes (no layout copies), 2x to
  16x faster per op. RandAugment keeps torchvision's 14 ops, magnitudes, signs and fill, and
  its pixels but for rounding: colour ops are 256-entry look-up tables computed as torchvision
  computes each pixel (float32, truncation); Color and Sharpness blend with OpenCV, made to
  truncate as torchvision does; the affine ops sample torchvision's inverse map (its centres
  and angle convention) with OpenCV's nearest neighbour, differing from grid_sample only on
  rounding ties; Translate is an exact whole-pixel shift. Resizing: OpenCV's bilinear
  (nearest, bicubic) where no antialiasing is asked or none is needed (an upscale), and
  torchvision's antialiased kernel on channels-last memory for a downscale with
  ``antialias: true``. Erasing, flipping, padding and cropping move pixels only (padding:
  OpenCV's borders for torchvision's four modes), so they equal set 1.

Both sets decode JPEGs the same way (libjpeg-turbo through simplejpeg, accurate DCT and fancy
upsampling: the fastest decoder measured that does both) and take and return uint8 (3, H, W)
tensors; set 2 keeps them as views of HWC arrays, which torch's ``stack`` and ``normalize``
accept as they are.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import cv2
import numpy as np
import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from wds_reinforce.core.augment.randaugment import fast_randaugment_op, randaugment_op
from wds_reinforce.core.registry import Registry

__all__ = [
    "KERNELS",
    "LEGACY_KERNELS",
    "CURRENT_KERNELS",
    "PADDING_MODES",
    "Kernels",
    "TorchKernels",
    "FastKernels",
    "kernel_set",
    "resized_size",
]

Size = tuple[int, int]  # (height, width)
Box = tuple[int, int, int, int]  # (top, left, height, width)
Sides = tuple[int, int, int, int]  # padding (left, top, right, bottom), torchvision's order

KERNELS: Registry[Kernels] = Registry("kernel set")
LEGACY_KERNELS = 1  # recipes recorded without a ``kernels`` field
CURRENT_KERNELS = 2  # what new recipes use

_TV_MODES = {
    "nearest": InterpolationMode.NEAREST,
    "bilinear": InterpolationMode.BILINEAR,
    "bicubic": InterpolationMode.BICUBIC,
}
_CV_MODES = {"nearest": cv2.INTER_NEAREST, "bilinear": cv2.INTER_LINEAR, "bicubic": cv2.INTER_CUBIC}
# torchvision's padding modes and OpenCV's borders that copy the same pixels: "reflect" leaves
# out the edge pixel (OpenCV's REFLECT_101), "symmetric" repeats it (OpenCV's REFLECT).
_CV_BORDERS = {
    "constant": cv2.BORDER_CONSTANT,
    "edge": cv2.BORDER_REPLICATE,
    "reflect": cv2.BORDER_REFLECT_101,
    "symmetric": cv2.BORDER_REFLECT,
}
PADDING_MODES = tuple(_CV_BORDERS)


class Kernels:
    """One kernel set: every pixel operation the ops need, on uint8 (3, H, W) tensors.

    ``interpolation`` is one of ``nearest``, ``bilinear``, ``bicubic``; boxes are
    (top, left, height, width) inside the image; ``size`` is (height, width).
    """

    version: int
    description: str

    def resized_crop(
        self, img: torch.Tensor, box: Box, size: Size, interpolation: str, antialias: bool
    ) -> torch.Tensor:
        raise NotImplementedError

    def resize(self, img: torch.Tensor, size: Size, interpolation: str, antialias: bool) -> torch.Tensor:
        return self.resized_crop(img, (0, 0, int(img.shape[-2]), int(img.shape[-1])), size, interpolation, antialias)

    def resize_short(self, img: torch.Tensor, size: list[int], interpolation: str, antialias: bool) -> torch.Tensor:
        """Resize with torchvision's size rule: [short side] keeps the aspect ratio, [h, w] does not."""
        raise NotImplementedError

    def center_crop(self, img: torch.Tensor, size: Size) -> torch.Tensor:
        """torchvision's center crop: a smaller image is first padded with zeros, as it pads."""
        height, width = img.shape[-2:]
        if size[0] > height or size[1] > width:
            dh, dw = max(size[0] - height, 0), max(size[1] - width, 0)
            img = self.pad(img, (dw // 2, dh // 2, (dw + 1) // 2, (dh + 1) // 2), [0], "constant")
            height, width = img.shape[-2:]
        top, left = int(round((height - size[0]) / 2.0)), int(round((width - size[1]) / 2.0))
        return img[..., top : top + size[0], left : left + size[1]]

    def pad(self, img: torch.Tensor, sides: Sides, fill: Sequence[int], mode: str) -> torch.Tensor:
        """torchvision's ``pad`` by (left, top, right, bottom); ``fill`` (1 or 3 values) for mode ``constant``."""
        raise NotImplementedError

    def crop(self, img: torch.Tensor, top: int, left: int, height: int, width: int) -> torch.Tensor:
        """The (top, left, height, width) box of an image that holds it."""
        return img[..., top : top + height, left : left + width]

    def hflip(self, img: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def erase(self, img: torch.Tensor, box: Box, value: Sequence[int]) -> torch.Tensor:
        raise NotImplementedError

    def randaugment(
        self, img: torch.Tensor, op_id: int, magnitude: float, interpolation: str, fill: Sequence[int] | int | None
    ) -> torch.Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(version={self.version})"


class TorchKernels(Kernels):
    """Set 1: torchvision's v2 kernels on uint8 tensors (bit for bit what recipes without ``kernels`` replay)."""

    version = 1
    description = "torchvision transforms.v2.functional on uint8 tensors"

    def resized_crop(
        self, img: torch.Tensor, box: Box, size: Size, interpolation: str, antialias: bool
    ) -> torch.Tensor:
        top, left, h, w = box
        return TF.resized_crop(img, top, left, h, w, list(size), _TV_MODES[interpolation], antialias=antialias)

    def resize_short(self, img: torch.Tensor, size: list[int], interpolation: str, antialias: bool) -> torch.Tensor:
        return TF.resize(img, size, _TV_MODES[interpolation], antialias=antialias)

    def center_crop(self, img: torch.Tensor, size: Size) -> torch.Tensor:
        return TF.center_crop(img, list(size))

    def pad(self, img: torch.Tensor, sides: Sides, fill: Sequence[int], mode: str) -> torch.Tensor:
        # The fill matters only to "constant" (torchvision refuses a per-channel one with another mode).
        value = 0 if mode != "constant" else fill[0] if len(fill) == 1 else [float(v) for v in fill]
        return TF.pad(img, list(sides), fill=value, padding_mode=mode)

    def crop(self, img: torch.Tensor, top: int, left: int, height: int, width: int) -> torch.Tensor:
        return TF.crop(img, top, left, height, width)

    def hflip(self, img: torch.Tensor) -> torch.Tensor:
        return TF.horizontal_flip(img)

    def erase(self, img: torch.Tensor, box: Box, value: Sequence[int]) -> torch.Tensor:
        top, left, h, w = box
        return TF.erase(img, top, left, h, w, torch.tensor(value, dtype=img.dtype).view(-1, 1, 1))

    def randaugment(
        self, img: torch.Tensor, op_id: int, magnitude: float, interpolation: str, fill: Sequence[int] | int | None
    ) -> torch.Tensor:
        return randaugment_op(img, op_id, magnitude, _TV_MODES[interpolation], fill)


def hwc(img: torch.Tensor) -> np.ndarray:
    """The HWC uint8 array behind a (3, H, W) tensor: a view when its memory is HWC, else a copy."""
    arr = img.permute(1, 2, 0).numpy()
    return arr if arr.strides[2] == 1 and arr.strides[1] == 3 else np.ascontiguousarray(arr)


def chw(arr: np.ndarray) -> torch.Tensor:
    """(3, H, W) tensor view of an HWC uint8 array."""
    return torch.from_numpy(arr).permute(2, 0, 1)


class FastKernels(Kernels):
    """Set 2: OpenCV and numpy on HWC memory; torchvision's antialiased resize where a downscale asks for it."""

    version = 2
    description = (
        "OpenCV/numpy on HWC uint8 (RandAugment colour ops as look-up tables, OpenCV nearest-neighbour "
        "affine); OpenCV resize, torchvision's antialiased resize for downscales with antialias"
    )

    def resized_crop(
        self, img: torch.Tensor, box: Box, size: Size, interpolation: str, antialias: bool
    ) -> torch.Tensor:
        top, left, h, w = box
        arr = hwc(img)[top : top + h, left : left + w]
        if antialias and interpolation != "nearest" and (h > size[0] or w > size[1]):
            # A downscale with antialiasing: no OpenCV kernel does it faster than torch's (INTER_AREA
            # is a box filter, 2.5x slower at non-integer scales). Given a contiguous channels-last
            # input, torch writes channels-last output (no repacking: 30 % faster).
            crop = torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1)
            batch = crop.as_strided((1, 3, h, w), (3 * h * w, 1, 3 * w, 3))
            out = torch.nn.functional.interpolate(
                batch, size=size, mode=interpolation, antialias=True, align_corners=False
            )[0]
            return out if out.stride(0) == 1 else chw(np.ascontiguousarray(out.permute(1, 2, 0).numpy()))
        return chw(cv2.resize(arr, (size[1], size[0]), interpolation=_CV_MODES[interpolation]))

    def resize_short(self, img: torch.Tensor, size: list[int], interpolation: str, antialias: bool) -> torch.Tensor:
        height, width = img.shape[-2:]
        return self.resize(img, resized_size((height, width), size), interpolation, antialias)

    def hflip(self, img: torch.Tensor) -> torch.Tensor:
        return chw(cv2.flip(hwc(img), 1))

    def pad(self, img: torch.Tensor, sides: Sides, fill: Sequence[int], mode: str) -> torch.Tensor:
        left, top, right, bottom = sides
        value = tuple(float(v) for v in fill) * (3 if len(fill) == 1 else 1)
        return chw(cv2.copyMakeBorder(hwc(img), top, bottom, left, right, _CV_BORDERS[mode], value=value))

    def erase(self, img: torch.Tensor, box: Box, value: Sequence[int]) -> torch.Tensor:
        top, left, h, w = box
        arr = hwc(img).copy()
        color = tuple(float(v) for v in value) * (3 if len(value) == 1 else 1)
        cv2.rectangle(arr, (left, top), (left + w - 1, top + h - 1), color, thickness=-1)  # a filled box
        return chw(arr)

    def randaugment(
        self, img: torch.Tensor, op_id: int, magnitude: float, interpolation: str, fill: Sequence[int] | int | None
    ) -> torch.Tensor:
        arr = hwc(img)
        out = fast_randaugment_op(arr, op_id, magnitude, _CV_MODES[interpolation], fill)
        return img if out is arr else chw(out)


def resized_size(size: Size, target: Sequence[int]) -> Size:
    """torchvision's output size of ``resize(target)``: [short side] keeps the aspect ratio."""
    if len(target) == 2:
        return int(target[0]), int(target[1])
    height, width = size
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = int(target[0]), int(target[0] * long / short)
    return (new_long, new_short) if width <= height else (new_short, new_long)


KERNELS.register(1, TorchKernels())  # type: ignore[arg-type]
KERNELS.register(2, FastKernels())  # type: ignore[arg-type]


def kernel_set(version: Any) -> Kernels:
    """The kernel set of a recipe's ``kernels`` field.

    Raises:
        ValueError: not an int, or a set this wds_reinforce does not know (made by a newer one?).
    """
    known = ", ".join(str(v) for v in KERNELS)
    if isinstance(version, bool) or not isinstance(version, int):
        raise ValueError(f"expected recipe kernels an int, one of {known}; got {version!r}")
    if version not in KERNELS:
        raise ValueError(
            f"recipe kernels {version} is not a kernel set this wds_reinforce knows ({known}): "
            "the recipe (or its shards) comes from a newer version; upgrade wds_reinforce to replay it"
        )
    return KERNELS.get(version)
