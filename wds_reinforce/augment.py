"""Reproducible augmentations: sample parameters once, then apply them with a pure kernel.

Every op has ``sample(rng, size) -> row`` (a small numpy array, the op's column row in the
sidecar) and a pure ``apply(image, row)`` over uint8 CHW tensors. The RNG is always passed in,
seeded from (seed, key, round) by ``round_rng``; nothing here reads global RNG state.

A ``Recipe`` is an ordered list of ops (a geometry op first: ``rrc`` or ``center``), an output
size and a decode mode. ``replay(image, params, recipe)`` is the one function that turns an
encoded or decoded image plus one round's parameters into pixels; the producer and the loader
both call it, which is what makes replay exact.

Kernels are torchvision's ``transforms.v2.functional`` on uint8 tensors, so each op equals
torchvision's kernel bit for bit given the same parameters (see tests/test_augment.py).
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import math
from pathlib import Path
from typing import Any, ClassVar, Mapping, Sequence

import numpy as np
import torch
import simplejpeg
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from ._registry import Registry

__all__ = [
    "OPS",
    "RECIPES",
    "Op",
    "RandomResizedCrop",
    "CenterCrop",
    "HorizontalFlip",
    "RandAugment",
    "RandomErasing",
    "Recipe",
    "SourceImage",
    "DecodeError",
    "key_word",
    "round_rng",
    "replay",
    "normalize",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DECODE_MODES = ("full", "reduced")
_JPEG_SCALES = (8, 4, 2, 1)
_INTERPOLATIONS = {
    "nearest": InterpolationMode.NEAREST,
    "bilinear": InterpolationMode.BILINEAR,
    "bicubic": InterpolationMode.BICUBIC,
}

OPS: Registry[type[Op]] = Registry("op")
RECIPES: Registry[dict] = Registry("recipe")

Size = tuple[int, int]  # (height, width)


class DecodeError(ValueError):
    """Encoded image bytes that cannot be decoded."""


def key_word(key: str) -> int:
    """A stable 64-bit number for a sample key, for seeding generators from (seed, key, ...)."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little")


def round_rng(seed: int, key: str, round_index: int) -> np.random.Generator:
    """The generator for one (seed, sample key, round): independent of process, worker and time."""
    return np.random.default_rng([seed & 0xFFFFFFFFFFFFFFFF, key_word(key), round_index])


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
        raise ValueError(f"expected interpolation in {sorted(_INTERPOLATIONS)}, got {value!r}")
    return value


def _size(value: Any) -> Size:
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
    """One augmentation op. Subclasses set ``name`` (its registry name and sidecar column)."""

    name: ClassVar[str]
    geometry: ClassVar[bool] = False
    fields: ClassVar[int] = 0  # values per round in this op's sidecar column (0: no column)

    def sample(self, rng: np.random.Generator, size: Size) -> np.ndarray | None:
        """Draw this op's parameters for an input of ``size``; None if it has none."""
        return None

    def apply(self, img: torch.Tensor, row: np.ndarray | None) -> torch.Tensor:
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


class GeometryOp(Op):
    """The first op of a recipe: maps the decoded source to the recipe's output size."""

    geometry = True

    def __init__(self, size: Size):
        self.size = size

    def output_size(self, size: Size) -> Size:
        return self.size

    def region(self, row: np.ndarray | None, src: Size) -> tuple[Size, Size]:
        """(source region size, size it is resized to): what a reduced decode must keep."""
        raise NotImplementedError

    def apply_geometry(self, img: torch.Tensor, row: np.ndarray | None, src: Size) -> torch.Tensor:
        """Apply to ``img``, a decode of a ``src``-sized image that may be reduced in scale."""
        raise NotImplementedError

    def apply(self, img: torch.Tensor, row: np.ndarray | None) -> torch.Tensor:
        return self.apply_geometry(img, row, tuple(img.shape[-2:]))


def _scaled_box(box: Sequence[int], img: Size, src: Size) -> tuple[int, int, int, int]:
    """Map a (top, left, height, width) box in ``src`` pixels to an image of size ``img``."""
    top, left, h, w = (int(v) for v in box)
    if img == src:
        return top, left, h, w
    sy, sx = img[0] / src[0], img[1] / src[1]
    t, b = round(top * sy), round((top + h) * sy)
    l, r = round(left * sx), round((left + w) * sx)
    t, l = min(t, img[0] - 1), min(l, img[1] - 1)
    return t, l, max(b - t, 1), max(r - l, 1)


@OPS.register("rrc")
class RandomResizedCrop(GeometryOp):
    """torchvision's RandomResizedCrop: same parameter distribution, same kernel (crop, then resize)."""

    name = "rrc"
    fields = 4

    def __init__(
        self,
        size: Size,
        scale: Sequence[float] = (0.08, 1.0),
        ratio: Sequence[float] = (3 / 4, 4 / 3),
        interpolation: str = "bilinear",
        antialias: bool = True,
    ):
        super().__init__(_size(size))
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

    def region(self, row: np.ndarray | None, src: Size) -> tuple[Size, Size]:
        return (int(row[2]), int(row[3])), self.size

    def apply_geometry(self, img: torch.Tensor, row: np.ndarray | None, src: Size) -> torch.Tensor:
        top, left, h, w = _scaled_box(row, tuple(img.shape[-2:]), src)
        return TF.resized_crop(
            img, top, left, h, w, list(self.size), _INTERPOLATIONS[self.interpolation], antialias=self.antialias
        )


@OPS.register("center")
class CenterCrop(GeometryOp):
    """Resize so the crop is ``crop_pct`` of the resized image, then center crop (timm's eval view)."""

    name = "center"

    def __init__(self, size: Size, crop_pct: float = 0.875, interpolation: str = "bilinear", antialias: bool = True):
        super().__init__(_size(size))
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

    def apply_geometry(self, img: torch.Tensor, row: np.ndarray | None, src: Size) -> torch.Tensor:
        img = TF.resize(img, self._resize_to(), _INTERPOLATIONS[self.interpolation], antialias=self.antialias)
        return TF.center_crop(img, list(self.size))


@OPS.register("flip")
class HorizontalFlip(Op):
    name = "flip"
    fields = 1

    def __init__(self, p: float = 0.5):
        self.p = _prob("p", p)

    def _config(self) -> dict[str, Any]:
        return {"p": self.p}

    def sample(self, rng: np.random.Generator, size: Size) -> np.ndarray:
        return np.array([rng.random() < self.p], np.uint8)

    def apply(self, img: torch.Tensor, row: np.ndarray | None) -> torch.Tensor:
        return TF.horizontal_flip(img) if row[0] else img


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


@functools.lru_cache(maxsize=1024)
def _magnitude(op_id: int, bins: int, magnitude_bin: int, height: int, width: int) -> float:
    fn = RANDAUGMENT_SPACE[op_id][1]
    return 0.0 if fn is None else float(fn(bins, height, width)[magnitude_bin])


def randaugment_op(img: torch.Tensor, op_id: int, magnitude: float, interpolation: str, fill: Any) -> torch.Tensor:
    """Apply RandAugment op ``op_id`` at a signed ``magnitude`` (torchvision's semantics)."""
    name = RANDAUGMENT_SPACE[op_id][0]
    mode = _INTERPOLATIONS[interpolation]
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
            interpolation=mode,
            fill=fill,
            center=[0, 0],
        )
    if name in ("TranslateX", "TranslateY"):
        shift = [int(magnitude), 0] if name == "TranslateX" else [0, int(magnitude)]
        return TF.affine(img, angle=0.0, translate=shift, scale=1.0, interpolation=mode, shear=[0.0, 0.0], fill=fill)
    if name == "Rotate":
        return TF.rotate(img, angle=magnitude, interpolation=mode, fill=fill)
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


@OPS.register("ra")
class RandAugment(Op):
    """torchvision's RandAugment; each round stores num_ops pairs (op id, signed magnitude bin)."""

    name = "ra"

    def __init__(
        self,
        num_ops: int = 2,
        magnitude: int = 9,
        num_magnitude_bins: int = 31,
        interpolation: str = "nearest",
        fill: Sequence[int] | int | None = None,
    ):
        if not isinstance(num_ops, int) or not 0 <= num_ops <= 16:
            raise ValueError(f"expected num_ops an integer in [0, 16], got {num_ops!r}")
        if not isinstance(num_magnitude_bins, int) or not 2 <= num_magnitude_bins <= 128:
            raise ValueError(f"expected num_magnitude_bins an integer in [2, 128], got {num_magnitude_bins!r}")
        if not isinstance(magnitude, int) or not 0 <= magnitude < num_magnitude_bins:
            raise ValueError(f"expected magnitude an integer in [0, {num_magnitude_bins}), got {magnitude!r}")
        self.num_ops = num_ops
        self.fields = 2 * num_ops  # type: ignore[misc]
        self.magnitude = magnitude
        self.num_magnitude_bins = num_magnitude_bins
        self.interpolation = _interpolation(interpolation)
        self.fill = list(fill) if isinstance(fill, (list, tuple)) else fill

    def _config(self) -> dict[str, Any]:
        return {
            "num_ops": self.num_ops,
            "magnitude": self.magnitude,
            "num_magnitude_bins": self.num_magnitude_bins,
            "interpolation": self.interpolation,
            "fill": self.fill,
        }

    def sample(self, rng: np.random.Generator, size: Size) -> np.ndarray:
        row = np.zeros(2 * self.num_ops, np.int64)
        for i in range(self.num_ops):
            op_id = int(rng.integers(len(RANDAUGMENT_SPACE)))
            signed = RANDAUGMENT_SPACE[op_id][2]
            negative = bool(rng.random() < 0.5) if signed else False
            row[2 * i] = op_id
            row[2 * i + 1] = -self.magnitude if negative else self.magnitude
        return row

    def apply(self, img: torch.Tensor, row: np.ndarray | None) -> torch.Tensor:
        height, width = img.shape[-2:]
        for op_id, signed_bin in zip(row[0::2].tolist(), row[1::2].tolist()):
            magnitude = _magnitude(op_id, self.num_magnitude_bins, abs(signed_bin), height, width)
            magnitude = -magnitude if signed_bin < 0 else magnitude
            img = randaugment_op(img, op_id, magnitude, self.interpolation, self.fill)
        return img


@OPS.register("re")
class RandomErasing(Op):
    """torchvision's RandomErasing on uint8 pixels, filled with a constant.

    torchvision usually erases after normalisation with value 0; here normalisation is a later
    float stage, so the default fill is the ImageNet mean in uint8, which normalises to ~0.
    """

    name = "re"
    fields = 4

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

    def apply(self, img: torch.Tensor, row: np.ndarray | None) -> torch.Tensor:
        top, left, h, w = (int(v) for v in row)
        if h == 0 or w == 0:
            return img
        fill = torch.tensor(self.value, dtype=img.dtype).view(-1, 1, 1)
        return TF.erase(img, top, left, h, w, fill)


# ----------------------------------------------------------------------------------------
# Decoding


class SourceImage:
    """One source image, encoded bytes or a decoded uint8 CHW tensor, decoded lazily and at most once per scale.

    JPEG is decoded by libjpeg-turbo (simplejpeg, accurate DCT and upsampling), at 1/``scale``
    with DCT scaling when asked; other formats (and JPEGs it rejects, e.g. CMYK) by Pillow at
    full scale. Decoded images are (3, H, W) views of HWC memory, which the kernels accept as is.
    """

    __slots__ = ("data", "_size", "_decoded")

    def __init__(self, data: bytes | torch.Tensor):
        self.data = data
        self._decoded: dict[int, torch.Tensor] = {}
        self._size: Size | None = None
        if isinstance(data, torch.Tensor):
            if data.dtype != torch.uint8 or data.ndim != 3 or data.shape[0] != 3:
                raise ValueError(f"expected a uint8 tensor of shape (3, H, W), got {data.dtype} {tuple(data.shape)}")
            self._decoded[1] = data
            self._size = (int(data.shape[1]), int(data.shape[2]))
        elif not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"expected encoded image bytes or a uint8 tensor, got {type(data).__name__}")

    @property
    def size(self) -> Size:
        """(height, width) of the full-scale image, read from the header without decoding."""
        if self._size is None:
            self._size = _header_size(self.data)
        return self._size

    def decode(self, scale: int = 1) -> torch.Tensor:
        """RGB uint8 (3, H, W); a JPEG is decoded at 1/``scale`` (1, 2, 4 or 8) of its size."""
        img = self._decoded.get(scale)
        if img is None:
            if isinstance(self.data, torch.Tensor):
                raise ValueError("reduced-scale decode needs the encoded bytes, got a decoded tensor")
            img = torch.from_numpy(_decode_rgb(self.data, scale, self.size)).permute(2, 0, 1)
            self._decoded[scale] = img
        return img


# What Pillow raises for bad bytes; a decompression bomb is bad data too (not an OSError).
_PIL_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def _is_jpeg(data: bytes) -> bool:
    return data[:3] == b"\xff\xd8\xff"


def _header_size(data: bytes) -> Size:
    if _is_jpeg(data):
        try:
            height, width, _, _ = simplejpeg.decode_jpeg_header(data)
            return int(height), int(width)
        except ValueError:
            pass
    width, height = _open_pil(data).size
    return height, width


def _decode_rgb(data: bytes, scale: int, size: Size) -> np.ndarray:
    if _is_jpeg(data):
        try:
            return simplejpeg.decode_jpeg(
                data,
                "RGB",
                fastdct=False,
                fastupsample=False,
                min_height=-(-size[0] // scale) if scale > 1 else 0,
                min_width=-(-size[1] // scale) if scale > 1 else 0,
            )
        except ValueError:
            pass  # CMYK, or data libjpeg-turbo rejects: Pillow decides, at full scale
    try:
        return np.array(_open_pil(data).convert("RGB"))
    except _PIL_ERRORS as exc:
        raise DecodeError(f"cannot decode image: {exc}") from None


def _open_pil(data: bytes) -> Image.Image:
    try:
        return Image.open(io.BytesIO(data))
    except _PIL_ERRORS as exc:
        raise DecodeError(f"cannot decode image: {exc}") from None


def _reduced_scale(region: Size, target: Size) -> int:
    """The largest JPEG DCT scale (8, 4, 2, 1) at which ``region`` still covers ``target``."""
    for scale in _JPEG_SCALES:
        if region[0] >= target[0] * scale and region[1] >= target[1] * scale:
            return scale
    return 1


# ----------------------------------------------------------------------------------------
# Recipes


class Recipe:
    """An ordered list of ops, an output size and a decode mode; its fingerprint goes into every sidecar.

    Args:
        ops: op descriptions ``{"op": name, **arguments}`` or ``Op`` objects; the first must be a
            geometry op (``rrc`` or ``center``), which takes ``size`` from the recipe.
        size: output (height, width), or one int for a square.
        decode: ``full`` (decode at full size) or ``reduced`` (JPEG DCT-scaled decode at
            the largest of 1/8, 1/4, 1/2 that keeps the crop at least at the output size; chosen
            from the stored crop box, so producer and loader make the same choice).
        name: a label; not part of the fingerprint.
    """

    def __init__(self, ops: Sequence[Mapping[str, Any] | Op], size: Size | int = 224, decode: str = "full", name: str = "custom"):
        self.size = _size(size)
        if decode not in DECODE_MODES:
            raise ValueError(f"expected decode in {list(DECODE_MODES)}, got {decode!r}")
        self.decode = decode
        self.name = name
        built: list[Op] = []
        for i, spec in enumerate(ops):
            if isinstance(spec, Op):
                built.append(spec)
                continue
            if not isinstance(spec, Mapping) or "op" not in spec:
                raise ValueError(f"expected op {i} to be a mapping with an 'op' name, got {spec!r}")
            args = {k: v for k, v in spec.items() if k != "op"}
            cls = OPS.get(spec["op"])
            try:
                built.append(cls(self.size, **args) if cls.geometry else cls(**args))
            except TypeError as exc:
                raise ValueError(f"bad arguments for op {spec['op']!r}: {exc}") from None
        if not built or not built[0].geometry:
            raise ValueError(f"expected the first op to be one of {_geometry_names()}, got {[o.name for o in built]}")
        if any(op.geometry for op in built[1:]):
            raise ValueError("expected exactly one geometry op, first")
        names = [op.name for op in built]
        if len(set(names)) != len(names):
            raise ValueError(f"expected each op at most once, got {names}")
        if built[0].output_size(self.size) != self.size:
            raise ValueError(f"the geometry op's size {built[0].size} differs from the recipe's {self.size}")
        self.ops: tuple[Op, ...] = tuple(built)

    # -- description and identity

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "size": list(self.size),
            "decode": self.decode,
            "ops": [op.to_dict() for op in self.ops],
        }

    @functools.cached_property
    def fingerprint(self) -> bytes:
        """8 bytes of sha256 over the canonical JSON of everything that changes params or pixels."""
        desc = {k: v for k, v in self.to_dict().items() if k != "name"}
        canon = json.dumps(desc, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canon.encode()).digest()[:8]

    @property
    def columns(self) -> list[str]:
        """Names of the ops that record parameters, in order."""
        return [op.name for op in self.ops if type(op).sample is not Op.sample]

    @functools.cached_property
    def column_fields(self) -> dict[str, int]:
        """Column name -> values per round: what a sidecar of this recipe must hold."""
        return {op.name: op.fields for op in self.ops if op.name in self.columns}

    def check_columns(self, ops: Mapping[str, np.ndarray]) -> None:
        """Raise ValueError unless ``ops`` (a sidecar's columns) are exactly this recipe's."""
        got = {name: int(col.shape[1]) for name, col in ops.items()}
        if got != self.column_fields:
            raise ValueError(f"expected op columns {self.column_fields} (name: values per round), got {got}")

    @classmethod
    def from_dict(cls, desc: Mapping[str, Any]) -> Recipe:
        if not isinstance(desc, Mapping) or "ops" not in desc:
            raise ValueError(f"expected a recipe mapping with 'ops', got {desc!r}")
        unknown = set(desc) - {"name", "size", "decode", "ops"}
        if unknown:
            raise ValueError(f"unknown recipe field(s) {sorted(unknown)}; expected name, size, decode, ops")
        return cls(desc["ops"], desc.get("size", 224), desc.get("decode", "full"), desc.get("name", "custom"))

    @classmethod
    def from_spec(cls, spec: str | Mapping[str, Any] | Recipe, size: Size | int | None = None, decode: str | None = None) -> Recipe:
        """A recipe from a preset name (see ``RECIPES``), a YAML/JSON file path or a mapping.

        ``size`` and ``decode``, when given, override the spec's.
        """
        if isinstance(spec, Recipe):
            desc = spec.to_dict()
        elif isinstance(spec, Mapping):
            desc = dict(spec)
        elif isinstance(spec, str) and spec.endswith((".yaml", ".yml", ".json")):
            path = Path(spec)
            if not path.is_file():
                raise ValueError(f"recipe file {spec!r} does not exist")
            import yaml

            try:
                text = path.read_text()
                desc = json.loads(text) if spec.endswith(".json") else yaml.safe_load(text)
            except (OSError, ValueError, yaml.YAMLError) as exc:
                first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                raise ValueError(f"expected a readable {path.suffix[1:].upper()} recipe in {spec!r}: {first}") from None
        elif isinstance(spec, str):
            desc = dict(RECIPES.get(spec), name=spec)
        else:
            raise ValueError(f"expected a recipe name, file or mapping, got {spec!r}")
        if size is not None:
            desc["size"] = list(_size(size))
        if decode is not None:
            desc["decode"] = decode
        return cls.from_dict(desc)

    # -- sampling and replay

    def sample(self, rng: np.random.Generator, source_size: Size) -> dict[str, np.ndarray]:
        """One round's parameters for a source image of ``source_size`` (height, width)."""
        params: dict[str, np.ndarray] = {}
        size = source_size
        for op in self.ops:
            row = op.sample(rng, size)
            if row is not None:
                params[op.name] = row
            size = op.output_size(size)
        return params

    def sample_rounds(self, seed: int, key: str, rounds: int, source_size: Size) -> dict[str, np.ndarray]:
        """Parameters of rounds 0..R-1 of one sample as columns: name -> (R, fields) int64."""
        per_round = [self.sample(round_rng(seed, key, r), source_size) for r in range(rounds)]
        return {name: np.stack([p[name] for p in per_round]) for name in self.columns} if rounds else {
            name: np.zeros((0, 0), np.int64) for name in self.columns
        }

    def __repr__(self) -> str:
        return f"Recipe({self.name!r}, size={self.size}, decode={self.decode!r}, ops={list(self.ops)})"


def _geometry_names() -> list[str]:
    return [name for name in OPS if OPS.get(name).geometry]


def replay(
    image: bytes | torch.Tensor | SourceImage, params: Mapping[str, np.ndarray], recipe: Recipe
) -> torch.Tensor:
    """The pixels of one round: decode ``image`` as the recipe says and apply ``params``.

    Args:
        image: encoded bytes, a decoded uint8 (3, H, W) tensor (full decode only), or a
            ``SourceImage`` that caches decodes across rounds.
        params: one round's op parameters, column name -> row (``Sidecar.round_params`` or
            ``Recipe.sample``).
        recipe: the recipe the parameters were sampled with.

    Returns:
        uint8 tensor (3, height, width) of the recipe's size.
    """
    src = image if isinstance(image, SourceImage) else SourceImage(image)
    geometry, rest = recipe.ops[0], recipe.ops[1:]
    row = params.get(geometry.name)
    scale = 1
    if recipe.decode == "reduced":
        scale = _reduced_scale(*geometry.region(row, src.size))
    img = src.decode(scale)
    img = geometry.apply_geometry(img, row, src.size)
    for op in rest:
        img = op.apply(img, params.get(op.name))
    return img


def normalize(img: torch.Tensor, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> torch.Tensor:
    """uint8 (..., 3, H, W) -> float32 normalised; run it on the GPU where you can."""
    m, s = _scale_shift(tuple(mean), tuple(std), img.device)
    return (img.float() - m) / s


@functools.lru_cache(maxsize=16)
def _scale_shift(mean: tuple[float, ...], std: tuple[float, ...], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    # Built once per (mean, std, device): normalize runs per sample in loader workers.
    m = torch.tensor(mean, dtype=torch.float32, device=device).view(-1, 1, 1) * 255.0
    s = torch.tensor(std, dtype=torch.float32, device=device).view(-1, 1, 1) * 255.0
    return m, s


# ----------------------------------------------------------------------------------------
# Presets: the paper's ImageNet+ variants (the +mix ones come with the pairing stage).

_RRC = {"op": "rrc", "scale": [0.08, 1.0], "ratio": [3 / 4, 4 / 3], "interpolation": "bilinear", "antialias": True}
RECIPES.register("rrc", {"size": [224, 224], "decode": "full", "ops": [_RRC, {"op": "flip", "p": 0.5}]})
RECIPES.register(
    "rrc+ra/re",
    {
        "size": [224, 224],
        "decode": "full",
        "ops": [
            _RRC,
            {"op": "flip", "p": 0.5},
            {"op": "ra", "num_ops": 2, "magnitude": 9, "num_magnitude_bins": 31, "interpolation": "nearest"},
            {"op": "re", "p": 0.25, "scale": [0.02, 0.33], "ratio": [0.3, 3.3]},
        ],
    },
)
RECIPES.register("center", {"size": [224, 224], "decode": "full", "ops": [{"op": "center", "crop_pct": 0.875}]})
