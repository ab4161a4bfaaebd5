"""RandAugment's op table and kernels: torchvision's space and semantics, for ``augment.RandAugment``.

A sidecar stores RandAugment as (op id, signed magnitude bin) pairs. The op id is the position
in ``RANDAUGMENT_SPACE``, so that order is part of the format (docs/FORMAT.md) and never changes.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

__all__ = ["RANDAUGMENT_SPACE", "SIGNED", "magnitude_of", "randaugment_op"]


def _linspace(lo: float, hi: float) -> Any:
    return lambda bins, h, w: torch.linspace(lo, hi, bins)


# torchvision's RandAugment space, in its order: (name, magnitudes(bins, height, width), signed).
# The op id stored in a sidecar is the position in this tuple; never reorder it.
RANDAUGMENT_SPACE = (
    ("Identity", None, False),
    ("ShearX", _linspace(0.0, 0.3), True),
    ("ShearY", _linspace(0.0, 0.3), True),
    ("TranslateX", lambda bins, h, w: torch.linspace(0.0, 150.0 / 331.0 * w, bins), True),
    ("TranslateY", lambda bins, h, w: torch.linspace(0.0, 150.0 / 331.0 * h, bins), True),
    ("Rotate", _linspace(0.0, 30.0), True),
    ("Brightness", _linspace(0.0, 0.9), True),
    ("Color", _linspace(0.0, 0.9), True),
    ("Contrast", _linspace(0.0, 0.9), True),
    ("Sharpness", _linspace(0.0, 0.9), True),
    ("Posterize", lambda bins, h, w: (8 - (torch.arange(bins) / ((bins - 1) / 4))).round().int(), False),
    ("Solarize", _linspace(1.0, 0.0), False),
    ("AutoContrast", None, False),
    ("Equalize", None, False),
)

# Whether op id i may take a negative magnitude bin (torchvision negates those half the time).
SIGNED: tuple[bool, ...] = tuple(signed for _, _, signed in RANDAUGMENT_SPACE)


@functools.lru_cache(maxsize=1024)
def magnitude_of(op_id: int, bins: int, magnitude_bin: int, height: int, width: int) -> float:
    """The (unsigned) magnitude of bin ``magnitude_bin`` of ``bins`` for op ``op_id`` on a height x width image."""
    fn = RANDAUGMENT_SPACE[op_id][1]
    return 0.0 if fn is None else float(fn(bins, height, width)[magnitude_bin])


def randaugment_op(
    img: torch.Tensor, op_id: int, magnitude: float, interpolation: InterpolationMode, fill: Any
) -> torch.Tensor:
    """Apply RandAugment op ``op_id`` at a signed ``magnitude`` (torchvision's semantics)."""
    name = RANDAUGMENT_SPACE[op_id][0]
    if name == "Identity":
        return img
    if name in ("ShearX", "ShearY"):
        shear = math.degrees(math.atan(magnitude))
        return TF.affine(
            img,
            angle=0.0,
            translate=[0, 0],
            scale=1.0,
            shear=[shear, 0.0] if name == "ShearX" else [0.0, shear],
            interpolation=interpolation,
            fill=fill,
            center=[0, 0],
        )
    if name in ("TranslateX", "TranslateY"):
        shift = [int(magnitude), 0] if name == "TranslateX" else [0, int(magnitude)]
        return TF.affine(
            img, angle=0.0, translate=shift, scale=1.0, interpolation=interpolation, shear=[0.0, 0.0], fill=fill
        )
    if name == "Rotate":
        return TF.rotate(img, angle=magnitude, interpolation=interpolation, fill=fill)
    if name == "Brightness":
        return TF.adjust_brightness(img, 1.0 + magnitude)
    if name == "Color":
        return TF.adjust_saturation(img, 1.0 + magnitude)
    if name == "Contrast":
        return TF.adjust_contrast(img, 1.0 + magnitude)
    if name == "Sharpness":
        return TF.adjust_sharpness(img, 1.0 + magnitude)
    if name == "Posterize":
        return TF.posterize(img, int(magnitude))
    if name == "Solarize":
        return TF.solarize(img, 255.0 * magnitude)
    if name == "AutoContrast":
        return TF.autocontrast(img)
    return TF.equalize(img)
