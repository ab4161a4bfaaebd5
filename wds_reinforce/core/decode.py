"""Source images: header size, full or reduced (DCT-scaled) JPEG decode, Pillow for the rest.

Decoding choices that change pixels (reduced decoding) are part of a recipe and made from the
stored parameters, so the producer and the loader decode the same way. A header that promises
more pixels than Pillow's decompression-bomb limit (``PIL.Image.MAX_IMAGE_PIXELS`` x 2, Pillow's
own error threshold) is refused before any memory is allocated, for JPEG and every other format.
"""

from __future__ import annotations

import io

import numpy as np
import simplejpeg
import torch
from PIL import Image

from wds_reinforce.core.errors import DecodeError

__all__ = ["SourceImage", "DecodeError", "DECODE_MODES", "reduced_scale", "max_pixels"]

Size = tuple[int, int]  # (height, width)
DECODE_MODES = ("full", "reduced")
_JPEG_SCALES = (8, 4, 2, 1)


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
        """(height, width) of the full-scale image, read from the header without decoding.

        Raises:
            DecodeError: unreadable bytes, or more pixels than ``max_pixels()`` allows.
        """
        if self._size is None:
            size = _header_size(self.data)
            limit = max_pixels()
            if limit is not None and size[0] * size[1] > limit:
                raise DecodeError(
                    f"image of {size[1]}x{size[0]} pixels exceeds the limit of {limit} "
                    "(a decompression bomb? see PIL.Image.MAX_IMAGE_PIXELS)"
                )
            self._size = size
        return self._size

    def decode(self, scale: int = 1) -> torch.Tensor:
        """RGB uint8 (3, H, W); a JPEG is decoded at 1/``scale`` (1, 2, 4 or 8) of its size."""
        img = self._decoded.get(scale)
        if img is None:
            if isinstance(self.data, torch.Tensor):
                raise ValueError("reduced-scale decode needs the encoded bytes, got a decoded tensor")  # a caller's bug
            img = torch.from_numpy(_decode_rgb(self.data, scale, self.size)).permute(2, 0, 1)
            self._decoded[scale] = img
        return img


def max_pixels() -> int | None:
    """The largest pixel count decoded: twice ``PIL.Image.MAX_IMAGE_PIXELS`` (None: no limit)."""
    limit = Image.MAX_IMAGE_PIXELS
    return None if limit is None else 2 * int(limit)


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


def reduced_scale(region: Size, target: Size) -> int:
    """The largest JPEG DCT scale (8, 4, 2, 1) at which ``region`` still covers ``target``."""
    for scale in _JPEG_SCALES:
        if region[0] >= target[0] * scale and region[1] >= target[1] * scale:
            return scale
    return 1
