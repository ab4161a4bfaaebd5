"""RandAugment's op table and kernels: torchvision's space and semantics, for ``augment.RandAugment``.

A sidecar stores RandAugment as (op id, signed magnitude bin) pairs. The op id is the position
in ``RANDAUGMENT_SPACE``, so that order is part of the format (docs/FORMAT.md) and never changes.

Two kernels apply an op (see ``kernels``): ``randaugment_op``, torchvision's v2 tensor kernels
(kernel set 1), and ``fast_randaugment_op``, OpenCV and numpy on HWC arrays (kernel set 2): the
same ops, magnitudes, signs and fill, at a fifth to a sixteenth of the cost.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import cv2
import numpy as np
import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

__all__ = ["RANDAUGMENT_SPACE", "SIGNED", "magnitude_of", "randaugment_op", "fast_randaugment_op"]


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


# ----------------------------------------------------------------------------------------
# Kernel set 2: OpenCV and numpy on an HWC uint8 array.
#
# Colour ops are 256-entry look-up tables computed as torchvision computes each pixel (float32
# products, truncation), so Brightness, Contrast, Posterize, Solarize, AutoContrast and Equalize
# equal its pixels. Color and Sharpness blend with OpenCV, which rounds; an offset makes it
# truncate, leaving one-level differences in a few percent of Color's pixels. The affine ops use
# torchvision's inverse map (its centre and angle conventions) with OpenCV's nearest neighbour,
# which differs from grid_sample only on rounding ties; Translate is an exact whole-pixel shift.

_LEVELS = np.arange(256, dtype=np.float32)
_SHARPEN = np.array([[1, 1, 1], [1, 5, 1], [1, 1, 1]], np.float32) / np.float32(13.0)
# OpenCV rounds to nearest where torchvision truncates: adding this before rounding truncates,
# but for fractions within 1/512 below the next level.
_TRUNCATE = -0.5 + 1 / 512
# torchvision's grayscale (0.2989 R + 0.587 G + 0.114 B), truncated as it does for uint8 images.
_GRAY = np.array([[0.2989, 0.587, 0.114, _TRUNCATE]])


def fast_randaugment_op(arr: np.ndarray, op_id: int, magnitude: float, interpolation: int, fill: Any) -> np.ndarray:
    """Apply RandAugment op ``op_id`` at a signed ``magnitude`` to an HWC uint8 array.

    ``interpolation`` is an OpenCV flag (nearest or bilinear). Returns a new array, or ``arr``
    itself when the op leaves the image as it is.
    """
    name = RANDAUGMENT_SPACE[op_id][0]
    if name == "Identity":
        return arr
    height, width = arr.shape[:2]
    if name in ("ShearX", "ShearY"):
        shear = math.degrees(math.atan(magnitude))
        matrix = _inverse_affine((0.0, 0.0), 0.0, (0.0, 0.0), (shear, 0.0) if name == "ShearX" else (0.0, shear))
        return _warp(arr, matrix, interpolation, fill)
    if name in ("TranslateX", "TranslateY"):
        shift = int(magnitude)
        return _translate(arr, shift if name == "TranslateX" else 0, shift if name == "TranslateY" else 0, fill)
    if name == "Rotate":
        if magnitude % 360 == 0:
            return arr
        matrix = _inverse_affine((width * 0.5, height * 0.5), -magnitude, (0.0, 0.0), (0.0, 0.0))
        return _warp(arr, matrix, interpolation, fill)
    if name == "Brightness":
        return cv2.LUT(arr, _to_uint8(_LEVELS * np.float32(1.0 + magnitude)))
    if name == "Color":
        factor = 1.0 + magnitude
        gray = cv2.cvtColor(cv2.transform(arr, _GRAY), cv2.COLOR_GRAY2RGB)
        return cv2.addWeighted(arr, factor, gray, 1.0 - factor, _TRUNCATE)
    if name == "Contrast":
        factor = np.float32(1.0 + magnitude)
        mean = np.float32(cv2.mean(cv2.transform(arr, _GRAY))[0])
        return cv2.LUT(arr, _to_uint8(_LEVELS * factor + mean * (np.float32(1.0) - factor)))
    if name == "Sharpness":
        if height <= 2 or width <= 2:
            return arr
        factor = 1.0 + magnitude
        blurred = cv2.filter2D(arr, -1, _SHARPEN, borderType=cv2.BORDER_REPLICATE)
        out = cv2.addWeighted(arr, factor, blurred, 1.0 - factor, _TRUNCATE)
        out[0], out[-1], out[:, 0], out[:, -1] = arr[0], arr[-1], arr[:, 0], arr[:, -1]  # borders stay
        return out
    if name == "Posterize":
        bits = int(magnitude)
        if bits >= 8:
            return arr
        return np.bitwise_and(arr, np.uint8(((1 << bits) - 1) << (8 - bits)))
    if name == "Solarize":
        levels = np.arange(256)
        return cv2.LUT(arr, np.where(levels >= 255.0 * magnitude, 255 - levels, levels).astype(np.uint8))
    if name == "AutoContrast":
        return cv2.LUT(arr, _per_channel([_autocontrast_lut(c) for c in cv2.split(arr)]))
    return _equalize(arr)


def _to_uint8(values: np.ndarray) -> np.ndarray:
    """float32 levels -> uint8 as torchvision casts: clamp to [0, 255], truncate."""
    return np.clip(values, 0, 255).astype(np.uint8)


def _per_channel(luts: list[np.ndarray]) -> np.ndarray:
    return np.stack(luts, axis=1).reshape(1, 256, 3)


def _autocontrast_lut(channel: np.ndarray) -> np.ndarray:
    low, high, _, _ = cv2.minMaxLoc(channel)
    if high == low:
        return np.arange(256, dtype=np.uint8)
    inv_scale = np.float32(high - low) * np.float32(1.0 / 255.0)  # torchvision's float32 steps
    return _to_uint8((_LEVELS - np.float32(low)) / inv_scale)


def _equalize(arr: np.ndarray) -> np.ndarray:
    """torchvision's (and PIL's) equalize: per channel, a LUT from the cumulative histogram."""
    luts, changed = [], False
    pixels = arr.shape[0] * arr.shape[1]
    for c in range(3):
        hist = cv2.calcHist([arr], [c], None, [256], [0, 256]).ravel().astype(np.int64)
        cum = np.cumsum(hist)
        step = (pixels - int(hist[int(np.argmax(cum))])) // 255
        if step == 0:
            luts.append(np.arange(256, dtype=np.uint8))
            continue
        lut = np.zeros(256, np.int64)
        lut[1:] = (cum[:-1] + step // 2) // step
        luts.append(np.clip(lut, 0, 255).astype(np.uint8))
        changed = True
    return cv2.LUT(arr, _per_channel(luts)) if changed else arr


def _inverse_affine(
    center: tuple[float, float], angle: float, translate: tuple[float, float], shear: tuple[float, float]
) -> list[float]:
    """torchvision's ``_get_inverse_affine_matrix`` (scale 1), in pixel-corner coordinates."""
    rot, sx, sy = math.radians(angle), math.radians(shear[0]), math.radians(shear[1])
    cx, cy = center
    tx, ty = translate
    a = math.cos(rot - sy) / math.cos(sy)
    b = -math.cos(rot - sy) * math.tan(sx) / math.cos(sy) - math.sin(rot)
    c = math.sin(rot - sy) / math.cos(sy)
    d = -math.sin(rot - sy) * math.tan(sx) / math.cos(sy) + math.cos(rot)
    m = [d, -b, 0.0, -c, a, 0.0]
    m[2] += m[0] * (-cx - tx) + m[1] * (-cy - ty) + cx
    m[5] += m[3] * (-cx - tx) + m[4] * (-cy - ty) + cy
    return m


def _fill(fill: Any) -> tuple[float, ...]:
    if fill is None:
        return (0.0, 0.0, 0.0, 0.0)
    if isinstance(fill, (int, float)):
        return (float(fill),) * 3 + (0.0,)
    values = [float(v) for v in fill]
    return tuple((values * 3 if len(values) == 1 else values)[:3]) + (0.0,)


def _warp(arr: np.ndarray, matrix: list[float], interpolation: int, fill: Any) -> np.ndarray:
    a, b, c, d, e, f = matrix
    # The matrix maps an output pixel's centre (x + 0.5, y + 0.5) to input coordinates whose pixel
    # i spans [i, i + 1); OpenCV maps (x, y) to coordinates whose pixel i is centred on i.
    cv_matrix = np.array([[a, b, c + 0.5 * (a + b) - 0.5], [d, e, f + 0.5 * (d + e) - 0.5]])
    height, width = arr.shape[:2]
    return cv2.warpAffine(
        arr,
        cv_matrix,
        (width, height),
        flags=interpolation | cv2.WARP_INVERSE_MAP,
        borderMode=cv2.BORDER_CONSTANT,
        borderValue=_fill(fill),
    )


def _translate(arr: np.ndarray, dx: int, dy: int, fill: Any) -> np.ndarray:
    """An integer shift (torchvision's RandAugment translates by whole pixels): a copy with a border, no sampling."""
    height, width = arr.shape[:2]
    value = tuple(float(v) for v in np.clip(np.rint(_fill(fill)), 0, 255))  # torchvision rounds a fill
    if abs(dx) >= width or abs(dy) >= height:
        return np.full_like(arr, np.asarray(value[:3], np.uint8))
    kept = arr[max(-dy, 0) : height - max(dy, 0), max(-dx, 0) : width - max(dx, 0)]
    top, left = max(dy, 0), max(dx, 0)
    return cv2.copyMakeBorder(
        kept, top, max(-dy, 0), left, max(-dx, 0), cv2.BORDER_CONSTANT | cv2.BORDER_ISOLATED, value=value
    )
