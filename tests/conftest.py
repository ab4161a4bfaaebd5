from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image


def photo_like(height: int, width: int, seed: int) -> np.ndarray:
    """A smooth, textured RGB image (gradients, blobs, a little noise) like a photo, not like noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    img = np.zeros((height, width, 3), np.float32)
    for c in range(3):
        img[..., c] = 120 + 80 * np.sin(x / rng.uniform(20, 80) + rng.uniform(0, 6)) * np.cos(y / rng.uniform(20, 80))
    for _ in range(6):
        cy, cx, r = rng.uniform(0, height), rng.uniform(0, width), rng.uniform(10, max(height, width) / 3)
        mask = (y - cy) ** 2 + (x - cx) ** 2 < r * r
        img[mask] = img[mask] * 0.4 + rng.uniform(0, 255, 3) * 0.6
    img += rng.normal(0, 6, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def encode(arr: np.ndarray, fmt: str = "JPEG", **kwargs) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, fmt, **kwargs)
    return buf.getvalue()


@pytest.fixture
def jpeg_bytes() -> bytes:
    return encode(photo_like(375, 500, seed=1), quality=90)
