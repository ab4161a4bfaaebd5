"""SourceImage: header size, full and reduced decode, colour conversion, and the pixel-count guard.

A decompression bomb is a tiny file whose header promises a huge image (a 631-byte JPEG that
says 65500x65500 would ask for 12 GiB). It must be refused from the header, before any decoder
runs, everywhere an image is decoded: ``SourceImage``, ``augment.replay`` and the producer,
which lists it as skipped instead of crashing.
"""

from __future__ import annotations

import io
import json
import struct
import zlib

import numpy as np
import PIL.Image
import PIL.ImageFile
import pytest
import simplejpeg
import torch
from PIL import Image

from tests.conftest import encode, photo_like
from wds_reinforce.core.augment import Recipe, replay, round_rng
from wds_reinforce.core.decode import SourceImage, max_pixels, reduced_scale
from wds_reinforce.core.errors import DecodeError

BOMB_SIDE = 65500  # the largest side a JPEG header can hold


def _jpeg_bomb(side: int = BOMB_SIDE) -> bytes:
    """A real 8x8 baseline JPEG whose SOF0 header is patched to say side x side."""
    data = bytearray(encode(np.zeros((8, 8, 3), np.uint8), quality=50))
    sof = data.index(b"\xff\xc0")  # marker, length (2), precision (1), height (2), width (2)
    data[sof + 5 : sof + 9] = struct.pack(">HH", side, side)
    return bytes(data)


def _png_bomb(side: int = BOMB_SIDE) -> bytes:
    """A real 8x8 PNG whose IHDR is patched to say side x side (CRC fixed, so it parses)."""
    data = bytearray(encode(np.zeros((8, 8, 3), np.uint8), "PNG"))
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", side, side)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


@pytest.fixture
def no_decoder(monkeypatch):
    """Make any pixel decode fail the test: what is refused must be refused from the header."""

    def refuse(*args, **kwargs):
        raise AssertionError("a decoder ran")

    monkeypatch.setattr(simplejpeg, "decode_jpeg", refuse)
    monkeypatch.setattr(PIL.ImageFile.ImageFile, "load", refuse)


BOMBS = {"jpeg": _jpeg_bomb, "png": _png_bomb}


# ----------------------------------------------------------------------------------------
# Decompression bombs


def test_the_bomb_is_tiny_and_claims_a_huge_image():
    bomb = _jpeg_bomb()
    assert len(bomb) < 1000
    assert simplejpeg.decode_jpeg_header(bomb)[:2] == (BOMB_SIDE, BOMB_SIDE)


@pytest.mark.parametrize("fmt", sorted(BOMBS))
def test_a_bomb_is_refused_from_its_header(fmt, no_decoder):
    limit = rf"limit of {max_pixels()}"
    with pytest.raises(DecodeError, match=limit):
        _ = SourceImage(BOMBS[fmt]()).size
    with pytest.raises(DecodeError, match=limit):
        SourceImage(BOMBS[fmt]()).decode()
    with pytest.raises(DecodeError, match=limit):
        SourceImage(BOMBS[fmt]()).decode(8)


@pytest.mark.parametrize("fmt", sorted(BOMBS))
@pytest.mark.parametrize("mode", ["full", "reduced"])
def test_replay_refuses_a_bomb(fmt, mode, no_decoder):
    recipe = Recipe.from_spec("rrc", size=32, decode=mode)
    params = recipe.sample(round_rng(0, "bomb", 0), (BOMB_SIDE, BOMB_SIDE))
    with pytest.raises(DecodeError, match=rf"limit of {max_pixels()}"):
        replay(BOMBS[fmt](), params, recipe)


def test_the_limit_is_twice_pillows(monkeypatch):
    assert max_pixels() == 2 * PIL.Image.MAX_IMAGE_PIXELS
    monkeypatch.setattr(PIL.Image, "MAX_IMAGE_PIXELS", 1000)
    assert max_pixels() == 2000


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # Pillow warns from 1x its limit
def test_a_lower_pillow_limit_refuses_a_normal_image(fmt, monkeypatch):
    data = encode(photo_like(40, 48, seed=3), fmt)  # 1920 pixels
    monkeypatch.setattr(PIL.Image, "MAX_IMAGE_PIXELS", 500)  # refused above 1000
    with pytest.raises(DecodeError, match="limit of 1000"):
        _ = SourceImage(data).size
    with pytest.raises(DecodeError, match="limit of 1000"):
        SourceImage(data).decode()
    monkeypatch.setattr(PIL.Image, "MAX_IMAGE_PIXELS", 960)  # 1920 is exactly the limit: allowed
    assert SourceImage(data).decode().shape == (3, 40, 48)


@pytest.mark.parametrize("fmt", sorted(BOMBS))
def test_no_pillow_limit_disables_the_guard(fmt, monkeypatch):
    monkeypatch.setattr(PIL.Image, "MAX_IMAGE_PIXELS", None)
    assert max_pixels() is None
    assert SourceImage(BOMBS[fmt]()).size == (BOMB_SIDE, BOMB_SIDE)  # read, never decoded
    data = encode(photo_like(40, 48, seed=3), "PNG" if fmt == "png" else "JPEG")
    assert SourceImage(data).decode().shape == (3, 40, 48)


def test_the_producer_lists_a_bomb_as_skipped(tmp_path):
    from tests.producer_data import TEACHER, job_args, make_image_folder
    from wds_reinforce.produce.make import make_shards

    source = make_image_folder(tmp_path / "src", per_class=2, corrupt=False)
    (source / "dog" / "bomb.jpg").write_bytes(_jpeg_bomb())
    summary = make_shards(str(source), TEACHER, out=str(tmp_path / "out"), **job_args())
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    skipped = {s["key"]: s["reason"] for s in manifest["skipped"]}
    assert list(skipped) == ["dog_bomb"]
    assert skipped["dog_bomb"].startswith("DecodeError:") and f"limit of {max_pixels()}" in skipped["dog_bomb"]
    assert summary.skipped == 1 and summary.samples == 6 == sum(s["samples"] for s in manifest["shards"])


# ----------------------------------------------------------------------------------------
# Size, reduced decode, colour


def test_size_reads_the_header_without_decoding(jpeg_bytes, no_decoder):
    assert SourceImage(jpeg_bytes).size == (375, 500)
    assert SourceImage(encode(photo_like(37, 52, seed=2), "PNG")).size == (37, 52)


def test_full_decode_matches_pillow(jpeg_bytes):
    img = SourceImage(jpeg_bytes).decode()
    assert img.dtype == torch.uint8 and img.shape == (3, 375, 500)
    ref = torch.from_numpy(np.array(Image.open(io.BytesIO(jpeg_bytes)).convert("RGB"))).permute(2, 0, 1)
    assert (img.int() - ref.int()).abs().max() <= 2  # both libjpeg-turbo, accurate DCT


def test_a_decoded_tensor_is_used_as_is():
    t = torch.zeros(3, 5, 7, dtype=torch.uint8)
    src = SourceImage(t)
    assert src.size == (5, 7) and src.decode() is t
    with pytest.raises(ValueError, match=r"expected a uint8 tensor of shape \(3, H, W\)"):
        SourceImage(torch.zeros(5, 7, 3, dtype=torch.uint8))
    with pytest.raises(TypeError, match="expected encoded image bytes or a uint8 tensor, got str"):
        SourceImage("x.jpg")


@pytest.mark.parametrize("scale", [1, 2, 4, 8])
def test_reduced_decode_shape(jpeg_bytes, scale):
    src = SourceImage(jpeg_bytes)
    img = src.decode(scale)
    assert img.dtype == torch.uint8 and img.shape == (3, -(-375 // scale), -(-500 // scale))
    assert src.decode(scale) is img  # decoded once per scale
    assert src.size == (375, 500)  # always the full-scale size


def test_reduced_decode_is_a_downscaled_image(jpeg_bytes):
    src = SourceImage(jpeg_bytes)
    full = src.decode(1)[:, :368, :496].float()
    half = src.decode(2)[:, :184, :248].float()
    pooled = torch.nn.functional.avg_pool2d(full[None], 2)[0]
    assert (half - pooled).abs().mean() < 4


def test_reduced_decode_of_png_is_full_scale():
    data = encode(photo_like(40, 48, seed=4), "PNG")
    assert SourceImage(data).decode(4).shape == (3, 40, 48)


@pytest.mark.parametrize(
    ("region", "target", "scale"),
    [
        ((800, 800), (100, 100), 8),
        ((799, 800), (100, 100), 4),
        ((400, 1000), (100, 100), 4),
        ((200, 399), (100, 100), 2),
        ((199, 800), (100, 100), 1),
        ((50, 50), (100, 100), 1),
        ((224, 448), (224, 224), 1),
    ],
)
def test_reduced_scale_keeps_the_region_at_least_the_target(region, target, scale):
    assert reduced_scale(region, target) == scale


def test_grayscale_jpeg_decodes_to_rgb():
    gray = photo_like(40, 48, seed=5)[..., 0]
    img = SourceImage(encode(gray, quality=95)).decode()
    assert img.shape == (3, 40, 48)
    assert torch.equal(img[0], img[1]) and torch.equal(img[1], img[2])
    assert (img[0].int() - torch.from_numpy(gray).int()).abs().float().mean() < 3


def test_rgba_png_decodes_to_rgb():
    arr = np.dstack([photo_like(30, 20, seed=6), np.full((30, 20), 128, np.uint8)])
    img = SourceImage(encode(arr, "PNG")).decode()
    assert torch.equal(img, torch.from_numpy(arr[..., :3]).permute(2, 0, 1))


def test_cmyk_jpeg_decodes_to_rgb():
    rgb = Image.fromarray(photo_like(40, 48, seed=7))
    buf = io.BytesIO()
    rgb.convert("CMYK").save(buf, "JPEG", quality=95)
    src = SourceImage(buf.getvalue())
    assert src.size == (40, 48)
    img = src.decode()
    assert img.shape == (3, 40, 48)
    # simplejpeg >= 1.9 converts CMYK itself, older ones leave it to Pillow: either way RGB
    ref = torch.from_numpy(np.array(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))).permute(2, 0, 1)
    assert (img.int() - ref.int()).abs().max() <= 2
    assert (img.float() - torch.from_numpy(np.array(rgb)).permute(2, 0, 1).float()).abs().mean() < 4


@pytest.mark.parametrize("keep", [1 / 3, 0.999])
def test_truncated_jpeg_is_a_decode_error(jpeg_bytes, keep):
    src = SourceImage(jpeg_bytes[: int(len(jpeg_bytes) * keep)])
    assert src.size == (375, 500)  # the header is intact
    with pytest.raises(DecodeError, match="cannot decode image: image file is truncated"):
        src.decode()


@pytest.mark.parametrize("data", [b"", b"\xff\xd8\xff\xe0 this is not a jpeg", b"GIF89a\x00", b"\x89PNG\r\n\x1a\n"])
def test_bytes_that_are_no_image_are_a_decode_error(data):
    with pytest.raises(DecodeError, match="cannot decode image"):
        _ = SourceImage(data).size
    with pytest.raises(DecodeError, match="cannot decode image"):
        SourceImage(data).decode()
