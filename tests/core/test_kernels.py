"""Kernel sets: old recipes replay as before, new ones use the fast set, and the sets agree.

The legacy checks do not trust the kernel code under test: the fingerprints are the values the
code before kernel sets wrote into manifests, and the pixels are compared with the old replay
written out here with torchvision's v2 functional calls. Set 2 is compared with set 1 (that is,
torchvision) op by op: exactly where it computes the same arithmetic, within one level or a few
rounding ties where it does not (see ``kernels``).
"""

from __future__ import annotations

import math
from collections import defaultdict

import cv2
import numpy as np
import pytest
import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from tests.conftest import encode, photo_like
from tests.shardmaker import make_shards
from wds_reinforce.core.augment import RECIPES, Recipe, replay, round_rng
from wds_reinforce.core.augment.kernels import (
    CURRENT_KERNELS,
    KERNELS,
    LEGACY_KERNELS,
    FastKernels,
    TorchKernels,
    kernel_set,
)
from wds_reinforce.core.augment.randaugment import RANDAUGMENT_SPACE, magnitude_of
from wds_reinforce.core.decode import SourceImage
from wds_reinforce.read.dataset import ReinforcedDataset

K1, K2 = KERNELS.get(1), KERNELS.get(2)
PRESETS = ["center", "rrc", "rrc+ra/re"]

# What ``Recipe.from_spec(name).to_dict()`` gave, and the fingerprint it had, before kernel sets
# existed: every manifest written until then holds one of these.
_RRC = {"op": "rrc", "scale": [0.08, 1.0], "ratio": [0.75, 1.3333333333333333], "interpolation": "bilinear"}
LEGACY = {
    "rrc": (
        {
            "name": "rrc",
            "size": [224, 224],
            "decode": "full",
            "ops": [{**_RRC, "antialias": True}, {"op": "flip", "p": 0.5}],
        },
        "55bb39cb8ca03446",
    ),
    "rrc+ra/re": (
        {
            "name": "rrc+ra/re",
            "size": [224, 224],
            "decode": "full",
            "ops": [
                {**_RRC, "antialias": True},
                {"op": "flip", "p": 0.5},
                {
                    "op": "ra",
                    "num_ops": 2,
                    "magnitude": 9,
                    "num_magnitude_bins": 31,
                    "interpolation": "nearest",
                    "fill": None,
                },
                {"op": "re", "p": 0.25, "scale": [0.02, 0.33], "ratio": [0.3, 3.3], "value": [124, 116, 104]},
            ],
        },
        "551ddeee2dfb6629",
    ),
    "center": (
        {
            "name": "center",
            "size": [224, 224],
            "decode": "full",
            "ops": [{"op": "center", "crop_pct": 0.875, "interpolation": "bilinear", "antialias": True}],
        },
        "2343c9037074d62f",
    ),
    "rrc, reduced, 96": (
        {
            "name": "rrc",
            "size": [96, 96],
            "decode": "reduced",
            "ops": [{**_RRC, "antialias": True}, {"op": "flip", "p": 0.5}],
        },
        "abb8ba0a376b4e2a",
    ),
}


@pytest.fixture(scope="module")
def jpeg() -> bytes:
    return encode(photo_like(375, 500, seed=11, noise=20.0), quality=90)


@pytest.fixture(scope="module")
def small() -> np.ndarray:
    return photo_like(120, 160, seed=5, noise=20.0)


def _old_replay(decoded: torch.Tensor, params: dict, desc: dict) -> torch.Tensor:
    """The replay of the code before kernel sets (full decode), written with torchvision's functional calls."""
    img = decoded
    for spec in desc["ops"]:
        op = spec["op"]
        if op == "rrc":
            top, left, h, w = (int(v) for v in params["rrc"])
            img = TF.resized_crop(img, top, left, h, w, list(desc["size"]), InterpolationMode.BILINEAR, antialias=True)
        elif op == "center":
            side = math.floor(desc["size"][0] / spec["crop_pct"])
            img = TF.center_crop(TF.resize(img, [side], InterpolationMode.BILINEAR, antialias=True), desc["size"])
        elif op == "flip":
            img = TF.horizontal_flip(img) if params["flip"][0] else img
        elif op == "ra":
            row = params["ra"].tolist()
            for op_id, signed_bin in zip(row[0::2], row[1::2]):
                name = RANDAUGMENT_SPACE[op_id][0]
                height, width = img.shape[-2:]
                mags = _TV_SPACE[name](31, height, width)
                m = 0.0 if mags is None else float(mags[abs(signed_bin)])
                img = _tv_randaugment(img, name, -m if signed_bin < 0 else m)
        elif op == "re":
            top, left, h, w = (int(v) for v in params["re"])
            if h and w:
                img = TF.erase(img, top, left, h, w, torch.tensor(spec["value"], dtype=torch.uint8).view(-1, 1, 1))
    return img


def _tv_ra():
    from torchvision.transforms import v2

    return v2.RandAugment(num_ops=1, magnitude=9)


_TV = _tv_ra()
_TV_SPACE = {name: space[0] for name, space in _TV._AUGMENTATION_SPACE.items()}


def _tv_randaugment(img: torch.Tensor, name: str, magnitude: float) -> torch.Tensor:
    return _TV._apply_image_or_video_transform(img, name, magnitude, InterpolationMode.NEAREST, _TV._fill)


# ----------------------------------------------------------------------------------------
# Identity: old recipes keep theirs, new ones name set 2


@pytest.mark.parametrize("which", sorted(LEGACY))
def test_a_recorded_recipe_without_kernels_keeps_its_fingerprint_and_dict(which):
    desc, fingerprint = LEGACY[which]
    recipe = Recipe.from_dict(desc)
    assert recipe.kernels == LEGACY_KERNELS and isinstance(recipe.kernel_set, TorchKernels)
    assert recipe.fingerprint.hex() == fingerprint
    assert recipe.to_dict() == desc  # no "kernels" field: the manifest it came from still matches
    name, size, decode = desc["name"], desc["size"][0], desc["decode"]
    assert Recipe.from_spec(name, size=size, decode=decode, kernels=1).fingerprint.hex() == fingerprint


@pytest.mark.parametrize("name", PRESETS)
def test_a_recorded_recipe_without_kernels_replays_the_old_pixels(name, jpeg):
    desc = LEGACY[name][0]
    recipe = Recipe.from_dict(desc)
    src = SourceImage(jpeg)
    for r in range(12):
        params = recipe.sample(round_rng(4, "k", r), src.size)
        if name == "rrc+ra/re":  # every RandAugment op, both signs, both positions
            op_id = r % len(RANDAUGMENT_SPACE)
            sign = -1 if RANDAUGMENT_SPACE[op_id][2] and r % 2 else 1
            params["ra"] = np.array([op_id, sign * 9, (op_id + 5) % 14, 30])
            params["re"] = np.array([10 * r, 5, 40, 60]) if r % 3 else np.zeros(4, np.int64)
        expected = _old_replay(src.decode(1), params, desc)
        assert torch.equal(replay(src, params, recipe), expected), f"round {r}: {params}"


@pytest.mark.parametrize("name", PRESETS)
def test_new_recipes_use_the_fast_set(name):
    recipe = Recipe.from_spec(name)
    assert recipe.kernels == CURRENT_KERNELS == 2 and isinstance(recipe.kernel_set, FastKernels)
    assert recipe.to_dict()["kernels"] == 2
    assert recipe.fingerprint.hex() != LEGACY[name][1]  # the set is part of the identity
    again = Recipe.from_dict(recipe.to_dict())  # what a loader reads back from the manifest
    assert again.kernels == 2 and again.fingerprint == recipe.fingerprint
    assert Recipe.from_spec(recipe).kernels == 2
    legacy = Recipe.from_spec(name, kernels=1)
    assert Recipe.from_spec(legacy).kernels == 1 and Recipe.from_spec(legacy).fingerprint == legacy.fingerprint


def test_which_set_a_description_without_kernels_gets():
    desc = {"size": 32, "ops": [{"op": "rrc"}, {"op": "flip"}]}
    assert Recipe.from_dict(desc).kernels == 1  # a recorded recipe: made before kernel sets
    assert Recipe.from_spec(desc).kernels == 2  # a recipe to make shards with
    assert Recipe(desc["ops"], size=32).kernels == 2
    assert Recipe.from_dict(dict(desc, kernels=2)).kernels == 2
    assert all(RECIPES.get(name)["kernels"] == 2 for name in RECIPES.names())


@pytest.mark.parametrize("bad", [3, 0, -1])
def test_an_unknown_kernel_set_is_refused_naming_it(bad):
    desc = {"size": 32, "ops": [{"op": "rrc"}], "kernels": bad}
    with pytest.raises(
        ValueError, match=rf"recipe kernels {bad} is not a kernel set this wds_reinforce knows \(1, 2\)"
    ):
        Recipe.from_dict(desc)
    with pytest.raises(ValueError, match="upgrade wds_reinforce to replay it"):
        kernel_set(bad)
    with pytest.raises(ValueError, match=f"recipe kernels {bad} is not a kernel set"):
        Recipe([{"op": "rrc"}], kernels=bad)


@pytest.mark.parametrize("bad", ["2", True, None, 2.0])
def test_a_kernel_set_that_is_not_an_int_is_refused(bad):
    with pytest.raises(ValueError, match=rf"expected recipe kernels an int, one of 1, 2; got {bad!r}"):
        Recipe.from_dict({"size": 32, "ops": [{"op": "rrc"}], "kernels": bad})


def test_the_loader_refuses_shards_of_an_unknown_kernel_set(tmp_path):
    made = make_shards(tmp_path, rounds=2, num_shards=1, record_pixels=False)
    text = (tmp_path / "manifest.json").read_text().replace('"kernels": 2', '"kernels": 7')
    assert '"kernels": 7' in text
    (tmp_path / "manifest.json").write_text(text)
    with pytest.raises(ValueError, match="recipe kernels 7 is not a kernel set"):
        ReinforcedDataset(str(tmp_path))
    assert made.recipe.kernels == 2


# ----------------------------------------------------------------------------------------
# Exact replay with either set: producer pixels == loader pixels, for every preset


@pytest.mark.parametrize("kernels", [1, 2])
@pytest.mark.parametrize("name", PRESETS)
def test_loader_pixels_equal_producer_pixels(tmp_path, name, kernels):
    recipe = Recipe.from_spec(name, size=40, kernels=kernels)
    rounds = 4
    made = make_shards(tmp_path, recipe=recipe, rounds=rounds, num_shards=2, image_hw=(72, 90))
    ds = ReinforcedDataset(str(tmp_path), keys=("image", "__key__", "round"))
    seen = defaultdict(set)
    for epoch in range(rounds):
        ds.set_epoch(epoch)
        for img, key, rnd in ds:
            assert img.dtype == torch.uint8 and tuple(img.shape) == (3, 40, 40)
            assert torch.equal(img, made.pixels[(key, rnd)]), f"{key} round {rnd}"
            seen[key].add(rnd)
    assert all(v == set(range(rounds)) for v in seen.values())


@pytest.mark.parametrize("name", PRESETS)
def test_fast_replay_is_deterministic_and_ignores_thread_counts(name, jpeg):
    recipe = Recipe.from_spec(name)
    src = SourceImage(jpeg)
    params = [recipe.sample(round_rng(0, "k", r), src.size) for r in range(8)]
    first = [replay(src, p, recipe).clone() for p in params]
    threads = cv2.getNumThreads()
    try:
        cv2.setNumThreads(4)
        torch.manual_seed(1)
        np.random.seed(1)
        assert all(torch.equal(replay(jpeg, p, recipe), f) for p, f in zip(params, first))
    finally:
        cv2.setNumThreads(threads)
    decoded = src.decode(1).contiguous()  # a CHW-contiguous input takes the copying path, same pixels
    assert all(torch.equal(replay(decoded, p, recipe), f) for p, f in zip(params, first))


# ----------------------------------------------------------------------------------------
# Set 2 against set 1 (torchvision), op by op

# Ops whose set-2 arithmetic is torchvision's (look-up tables, whole-pixel shifts): equal pixels.
EXACT = {"Identity", "TranslateX", "TranslateY", "Brightness", "Posterize", "Solarize", "AutoContrast", "Equalize"}


@pytest.mark.parametrize("hw", [(224, 224), (120, 160), (37, 53)])
@pytest.mark.parametrize("op_id", range(len(RANDAUGMENT_SPACE)), ids=[s[0] for s in RANDAUGMENT_SPACE])
def test_fast_randaugment_matches_torchvision(op_id, hw):
    name, _, signed = RANDAUGMENT_SPACE[op_id]
    arr = photo_like(*hw, seed=op_id, noise=20.0)
    chw = torch.from_numpy(arr).permute(2, 0, 1)
    for signed_bin in [0, 9, 30] + ([-9, -30] if signed else []):
        m = magnitude_of(op_id, 31, abs(signed_bin), *hw)
        m = -m if signed_bin < 0 else m
        for fill in (None, [124, 116, 104]):
            expected = K1.randaugment(chw.contiguous(), op_id, m, "nearest", fill).int()
            got = K2.randaugment(chw, op_id, m, "nearest", fill)
            assert got.dtype == torch.uint8 and got.shape == chw.shape
            diff = (got.int() - expected).abs()
            where = f"{name} bin {signed_bin} fill {fill} on {hw}"
            if name in EXACT:
                assert diff.max() == 0, where
            elif name in ("ShearX", "ShearY", "Rotate"):  # nearest neighbour: only rounding ties differ
                # How many pixels sit on a tie depends on the test image, whose float32 sin differs
                # between numpy builds (1.36 % for Rotate bin 30 on an AVX-512 machine, < 1 % elsewhere).
                assert (diff > 0).float().mean() <= 0.02, where
            else:  # Color, Contrast, Sharpness: OpenCV blends, made to truncate
                assert diff.max() <= 1 and (diff > 0).float().mean() <= 0.05, where


def test_fast_resize_flip_and_erase_match_torchvision(small):
    src = torch.from_numpy(small).permute(2, 0, 1)
    # A downscale with antialiasing runs torchvision's own kernel: equal.
    for box in [(0, 0, 120, 160), (10, 20, 90, 100), (5, 7, 64, 49)]:
        for size in [(48, 48), (32, 40)]:
            assert torch.equal(
                K2.resized_crop(src, box, size, "bilinear", True), K1.resized_crop(src, box, size, "bilinear", True)
            )
    # An upscale, or no antialiasing: OpenCV's bilinear, the same filter up to rounding.
    for box, size, aa in [((10, 20, 30, 40), (48, 64), True), ((0, 0, 120, 160), (96, 128), False)]:
        got = K2.resized_crop(src, box, size, "bilinear", aa).int()
        diff = (got - K1.resized_crop(src, box, size, "bilinear", aa).int()).abs()
        assert diff.max() <= 2 and diff.float().mean() < 0.5
    for mode in ["nearest", "bicubic"]:
        got = K2.resized_crop(src, (10, 20, 30, 40), (48, 64), mode, True).int()
        diff = (got - K1.resized_crop(src, (10, 20, 30, 40), (48, 64), mode, True).int()).abs()
        assert diff.float().mean() < 2, mode
    assert torch.equal(K2.hflip(src), K1.hflip(src.contiguous()))
    for box, value in [((5, 7, 20, 30), [124, 116, 104]), ((0, 0, 120, 160), [9]), ((119, 159, 1, 1), [1, 2, 3])]:
        before = src.clone()
        assert torch.equal(K2.erase(src, box, value), K1.erase(src.contiguous(), box, value))
        assert torch.equal(src, before), "erasing must not write into its input"


def test_fast_center_crop_matches_torchvision(small):
    src = torch.from_numpy(small).permute(2, 0, 1)
    for size in [64, (48, 40)]:
        recipe = Recipe([{"op": "center", "crop_pct": 0.875}], size=size, kernels=1)
        fast = Recipe([{"op": "center", "crop_pct": 0.875}], size=size)
        assert torch.equal(replay(src, {}, fast), replay(src.contiguous(), {}, recipe))


def test_fast_outputs_are_views_of_hwc_memory_that_stack_and_normalise(jpeg):
    from wds_reinforce.core.augment import normalize

    recipe = Recipe.from_spec("rrc+ra/re")
    src = SourceImage(jpeg)
    imgs = [replay(src, recipe.sample(round_rng(0, "k", r), src.size), recipe) for r in range(4)]
    assert all(img.shape == (3, 224, 224) and img.stride()[0] == 1 for img in imgs)
    batch = torch.stack(imgs)
    assert batch.shape == (4, 3, 224, 224) and torch.equal(batch[2], imgs[2])
    torch.testing.assert_close(normalize(batch), normalize(batch.contiguous()))
