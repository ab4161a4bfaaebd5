"""Ops, recipes and replay.

Tolerance: with kernel set 1 every op is compared with torchvision's own v2 transform (or its
RandAugment op dispatcher) given the same parameters on the same uint8 tensor, and must match
exactly (tolerance 0), because set 1 is torchvision's v2 functional kernels. Set 2 (OpenCV and
numpy, the default of new recipes) is compared with set 1 in tests/test_kernels.py. Against
torchvision's PIL kernels there would be a difference of a few levels (different resampling
code); we make no such claim. Reduced-scale decode changes pixels by design and is compared
with a mean tolerance.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torchvision.transforms import v2

from tests.conftest import encode, photo_like
from wds_reinforce.core.augment import (
    OPS,
    RANDAUGMENT_SPACE,
    RECIPES,
    HorizontalFlip,
    Recipe,
    normalize,
    register_op,
    replay,
    round_rng,
)
from wds_reinforce.core.augment.kernels import KERNELS
from wds_reinforce.core.augment.randaugment import magnitude_of
from wds_reinforce.core.decode import DecodeError, SourceImage
from wds_reinforce.core.decode import reduced_scale as _reduced_scale
from wds_reinforce.core.errors import FormatError
from wds_reinforce.core.format import COLUMNS, Column, Sidecar, decode_sidecar, encode_sidecar

TORCHVISION = KERNELS.get(1)  # kernel set 1: torchvision's v2 functional kernels

ALL_RECIPES = ["rrc", "rrc+ra/re", "center"]


@pytest.fixture
def image() -> torch.Tensor:
    return torch.from_numpy(photo_like(120, 160, seed=3)).permute(2, 0, 1).contiguous()


def test_round_rng_depends_on_seed_key_round_only():
    first = round_rng(7, "key_1", 3).random(4)
    np.random.seed(123)
    torch.manual_seed(123)
    assert np.array_equal(round_rng(7, "key_1", 3).random(4), first)
    for other in [round_rng(8, "key_1", 3), round_rng(7, "key_2", 3), round_rng(7, "key_1", 4)]:
        assert not np.array_equal(other.random(4), first)


@pytest.mark.parametrize("name", ALL_RECIPES)
def test_sampling_is_deterministic(name):
    recipe = Recipe.from_spec(name)
    a = recipe.sample_rounds(0, "sample_0001", 16, (375, 500))
    b = recipe.sample_rounds(0, "sample_0001", 16, (375, 500))
    assert a.keys() == b.keys() == set(recipe.columns)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    if "rrc" in a:
        assert len({tuple(r) for r in a["rrc"]}) > 1, "rounds should differ"
        c = recipe.sample_rounds(1, "sample_0001", 16, (375, 500))
        assert not np.array_equal(a["rrc"], c["rrc"])


@pytest.mark.parametrize("name", ALL_RECIPES)
@pytest.mark.parametrize("decode", ["full", "reduced"])
def test_replay_from_stored_params_is_bit_exact(name, decode, jpeg_bytes):
    """Producer: sample, replay, encode the sidecar. Loader: decode the sidecar, replay from bytes."""
    recipe = Recipe.from_spec(name, decode=decode)
    src = SourceImage(jpeg_bytes)
    rounds = 6
    cols = recipe.sample_rounds(5, "k", rounds, src.size)
    produced = [replay(src, {c: v[r] for c, v in cols.items()}, recipe) for r in range(rounds)]
    sc = Sidecar(recipe.fingerprint, np.zeros((rounds, 1), np.int64), np.ones((rounds, 1), np.float16), cols)
    stored = decode_sidecar(encode_sidecar(sc))
    for r in range(rounds):
        out = replay(jpeg_bytes, stored.round_params(r), recipe)
        assert out.dtype == torch.uint8 and tuple(out.shape) == (3, 224, 224)
        assert torch.equal(out, produced[r]), f"round {r} differs"


def test_replay_of_a_decoded_tensor_equals_replay_of_bytes(jpeg_bytes):
    recipe = Recipe.from_spec("rrc+ra/re")
    decoded = SourceImage(jpeg_bytes).decode(1)
    params = recipe.sample(round_rng(0, "k", 0), tuple(decoded.shape[1:]))
    assert torch.equal(replay(decoded, params, recipe), replay(jpeg_bytes, params, recipe))


def test_reduced_decode_needs_bytes_when_it_reduces(jpeg_bytes):
    recipe = Recipe.from_spec("rrc", size=64, decode="reduced")
    decoded = SourceImage(jpeg_bytes).decode(1)
    params = {"rrc": np.array([0, 0, 300, 400]), "flip": np.array([0])}
    with pytest.raises(ValueError, match="reduced-scale decode needs the encoded bytes"):
        replay(decoded, params, recipe)


def test_reduced_decode_picks_the_dct_scale_from_the_crop(jpeg_bytes):
    assert _reduced_scale((375, 500), (224, 224)) == 1
    assert _reduced_scale((375, 500), (160, 160)) == 2
    assert _reduced_scale((900, 1000), (224, 224)) == 4
    full = Recipe.from_spec("rrc", size=64)
    reduced = Recipe.from_spec("rrc", size=64, decode="reduced")
    params = {"rrc": np.array([10, 20, 300, 400]), "flip": np.array([0])}  # 1/4 keeps 75x100 >= 64
    src = SourceImage(jpeg_bytes)
    a, b = replay(src, params, full), replay(src, params, reduced)
    assert 4 in src._decoded and tuple(src._decoded[4].shape[1:]) == (94, 125)
    # Same region, a different (DCT-scaled) decode and resampling: close, not equal.
    diff = (a.float() - b.float()).abs()
    assert 0 < diff.mean() < 6, diff.mean()


def test_each_op_equals_torchvision(image):
    # rrc vs v2.RandomResizedCrop with the same box
    recipe = Recipe.from_spec("rrc+ra/re", size=(48, 64))
    rrc, flip, ra, re = recipe.ops
    for r in range(20):
        row = rrc.sample(round_rng(1, "img", r), (120, 160))
        top, left, h, w = row.tolist()
        tv = v2.RandomResizedCrop((48, 64), antialias=True)
        expected = tv.transform(image, {"top": top, "left": left, "height": h, "width": w})
        assert torch.equal(rrc.apply(image, row, TORCHVISION), expected)
    assert torch.equal(flip.apply(image, np.array([1]), TORCHVISION), v2.RandomHorizontalFlip(p=1)(image))
    assert torch.equal(flip.apply(image, np.array([0]), TORCHVISION), image)
    # RandomErasing vs v2.RandomErasing with the same box and value
    row = np.array([5, 7, 20, 30])
    fill = torch.tensor(re.value, dtype=torch.uint8).view(-1, 1, 1)
    expected = v2.RandomErasing(p=1).transform(image, {"i": 5, "j": 7, "h": 20, "w": 30, "v": fill})
    assert torch.equal(re.apply(image, row, TORCHVISION), expected)
    assert torch.equal(re.apply(image, np.zeros(4, np.int64), TORCHVISION), image)
    # The default kernel set (2) flips and erases the same pixels
    assert torch.equal(flip.apply(image, np.array([1])), v2.RandomHorizontalFlip(p=1)(image))
    assert torch.equal(re.apply(image, row), expected)


@pytest.mark.parametrize(
    "op_id, signed_bin",
    [(i, b) for i, (_, _, signed) in enumerate(RANDAUGMENT_SPACE) for b in [9, 0, 30] + ([-9, -17] if signed else [])],
)
def test_randaugment_ops_equal_torchvision(image, op_id, signed_bin):
    recipe = Recipe.from_spec("rrc+ra/re")
    ra = recipe.ops[2]
    name = RANDAUGMENT_SPACE[op_id][0]
    tv = v2.RandAugment(num_ops=1, magnitude=abs(signed_bin))
    height, width = image.shape[-2:]
    space = tv._AUGMENTATION_SPACE[name]
    mags = space[0](31, height, width)
    magnitude = 0.0 if mags is None else float(mags[abs(signed_bin)])
    assert magnitude == magnitude_of(op_id, 31, abs(signed_bin), height, width)
    magnitude = -magnitude if signed_bin < 0 else magnitude
    expected = tv._apply_image_or_video_transform(image, name, magnitude, tv.interpolation, tv._fill)
    got = ra.apply(image, np.array([op_id, signed_bin]), TORCHVISION)
    assert torch.equal(got, expected), name


def test_center_equals_torchvision_resize_center_crop(image):
    recipe = Recipe.from_spec("center", size=64, kernels=1)
    expected = v2.Compose([v2.Resize(math.floor(64 / 0.875), antialias=True), v2.CenterCrop(64)])(image)
    assert torch.equal(replay(image, {}, recipe), expected)


def test_parameter_distributions_follow_torchvision_semantics():
    recipe = Recipe.from_spec("rrc+ra/re")
    rows = [recipe.sample(round_rng(0, f"k{i}", 0), (375, 500)) for i in range(2000)]
    boxes = np.stack([r["rrc"] for r in rows])
    top, left, h, w = boxes.T
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 375).all() and (left + w <= 500).all()
    area = h * w / (375 * 500)
    assert area.min() >= 0.08 * 0.95 and area.max() <= 1.0
    assert 0.3 < np.median(area) < 0.7
    flips = np.stack([r["flip"] for r in rows])[:, 0]
    assert 0.45 < flips.mean() < 0.55
    ra = np.stack([r["ra"] for r in rows])
    ops, bins = ra[:, 0::2].ravel(), ra[:, 1::2].ravel()
    assert set(ops.tolist()) == set(range(14))
    assert set(np.abs(bins).tolist()) == {9}
    unsigned = np.isin(ops, [i for i, (_, _, s) in enumerate(RANDAUGMENT_SPACE) if not s])
    assert (bins[unsigned] > 0).all() and 0.4 < (bins[~unsigned] < 0).mean() < 0.6
    erase = np.stack([r["re"] for r in rows])
    erased = erase[:, 2] > 0
    assert 0.2 < erased.mean() < 0.3
    e_top, e_left, e_h, e_w = erase[erased].T
    assert (e_top + e_h <= 224).all() and (e_left + e_w <= 224).all()
    frac = e_h * e_w / 224**2
    assert frac.min() >= 0.02 * 0.9 and frac.max() <= 0.33 * 1.1


def test_rrc_falls_back_to_a_central_crop():
    recipe = Recipe([{"op": "rrc", "scale": [1.0, 1.0], "ratio": [1.0, 1.0]}], size=8)
    assert recipe.sample(round_rng(0, "k", 0), (10, 40))["rrc"].tolist() == [0, 15, 10, 10]


def test_fingerprint_covers_parameters_not_the_name():
    base = Recipe.from_spec("rrc")
    assert Recipe.from_dict({**base.to_dict(), "name": "other"}).fingerprint == base.fingerprint
    assert Recipe.from_spec("rrc", size=160).fingerprint != base.fingerprint
    assert Recipe.from_spec("rrc", decode="reduced").fingerprint != base.fingerprint
    changed = base.to_dict()
    changed["ops"][1]["p"] = 0.4
    assert Recipe.from_dict(changed).fingerprint != base.fingerprint
    assert Recipe.from_spec("rrc", kernels=1).fingerprint != base.fingerprint  # kernels decide pixels
    assert len(base.fingerprint) == 8


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_recipe_from_file(tmp_path, suffix):
    desc = Recipe.from_spec("rrc+ra/re").to_dict()
    path = tmp_path / f"r{suffix}"
    if suffix == ".json":
        path.write_text(json.dumps(desc))
    else:
        import yaml

        path.write_text(yaml.safe_dump(desc))
    assert Recipe.from_spec(str(path)).fingerprint == Recipe.from_spec("rrc+ra/re").fingerprint


@pytest.mark.parametrize(
    "build, match",
    [
        (
            lambda: Recipe.from_spec("rrc+mixup"),
            r"unknown recipe 'rrc\+mixup'; expected one of: center, cifar100\+, flowers102\+, food101\+, rrc, "
            r"rrc\+mix, rrc\+ra/re, rrc\+ra/re\+mix",
        ),
        (lambda: Recipe.from_spec("missing.yaml"), "recipe file 'missing.yaml' does not exist"),
        (
            lambda: Recipe([{"op": "warp"}]),
            "unknown op 'warp'; expected one of: center, center_crop, flip, ra, random_crop, re, resize, rrc",
        ),
        (
            lambda: Recipe([{"op": "flip"}]),
            r"expected the first op to be one of \['center', 'center_crop', 'random_crop', 'resize', 'rrc'\]",
        ),
        (lambda: Recipe([{"op": "rrc"}, {"op": "flip"}, {"op": "center"}]), "expected the geometry ops first"),
        (lambda: Recipe([{"op": "rrc"}, {"op": "flip"}, {"op": "flip"}]), "expected each op at most once"),
        (
            lambda: Recipe([{"op": "rrc", "scale": [0.5, 0.1]}]),
            r"expected scale with 1e-09 <= min <= max <= 1.0, got \[0.5, 0.1\]",
        ),
        (lambda: Recipe([{"op": "rrc", "interpolation": "box"}]), "expected interpolation in"),
        (lambda: Recipe([{"op": "rrc"}, {"op": "flip", "p": 2}]), r"expected p to be a probability in \[0, 1\], got 2"),
        (lambda: Recipe([{"op": "rrc"}, {"op": "ra", "magnitude": 31}]), r"expected magnitude an integer in \[0, 31\)"),
        (lambda: Recipe([{"op": "rrc"}, {"op": "re", "value": "random"}]), "expected value an int in"),
        (lambda: Recipe([{"op": "rrc"}, {"op": "flip", "q": 1}]), "bad arguments for op 'flip'"),
        (lambda: Recipe([{"op": "rrc"}], decode="gpu"), r"expected decode in \['full', 'reduced'\], got 'gpu'"),
        (lambda: Recipe([{"op": "rrc"}], size=0), "expected size to be a positive int"),
        (lambda: Recipe.from_dict({"ops": [], "color": 1}), r"unknown recipe field\(s\) \['color'\]"),
    ],
)
def test_bad_recipes_fail_early(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def test_malformed_recipe_file_is_a_clear_error(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("ops: [ {op: rrc\n")
    with pytest.raises(ValueError, match="expected a readable YAML recipe in"):
        Recipe.from_spec(str(path))


def test_sidecar_columns_must_be_the_recipe_s():
    recipe = Recipe.from_spec("rrc+ra/re")
    cols = recipe.sample_rounds(0, "k", 3, (100, 120))
    recipe.check_columns(cols)
    assert recipe.column_fields == {"rrc": 4, "flip": 1, "ra": 4, "re": 4}
    with pytest.raises(FormatError, match="expected op columns"):
        recipe.check_columns({k: v for k, v in cols.items() if k != "flip"})
    with pytest.raises(FormatError, match="expected op columns"):
        recipe.check_columns({**cols, "ra": cols["ra"][:, :2]})


def test_decompression_bomb_is_bad_data(monkeypatch):
    from PIL import Image

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 40x50 is then more than 2x the limit
    with pytest.raises(DecodeError, match="cannot decode image"):
        SourceImage(encode(photo_like(40, 50, seed=0), "PNG")).decode(1)


def test_presets_are_listed():
    assert RECIPES.names() == [
        "center",
        "cifar100+",
        "flowers102+",
        "food101+",
        "rrc",
        "rrc+mix",
        "rrc+ra/re",
        "rrc+ra/re+mix",
    ]
    with pytest.raises(ValueError, match="already registered"):
        RECIPES.register("rrc", {})


def test_undecodable_bytes_raise_decode_error():
    for scale in [1, 2]:
        with pytest.raises(DecodeError, match="cannot decode image"):
            SourceImage(b"not an image at all").decode(scale)


def test_truncated_jpeg_raises_decode_error(jpeg_bytes):
    with pytest.raises(DecodeError, match="cannot decode image"):
        SourceImage(jpeg_bytes[: len(jpeg_bytes) // 2]).decode(1)


def test_png_and_grayscale_sources_decode_to_rgb():
    gray = photo_like(40, 50, seed=2)[..., 0]
    rgba = np.dstack([photo_like(40, 50, seed=2), np.full((40, 50), 128, np.uint8)])
    assert tuple(SourceImage(encode(rgba, "PNG")).decode(1).shape) == (3, 40, 50)
    for data in [encode(gray, "PNG"), encode(gray, "JPEG")]:
        img = SourceImage(data).decode(1)
        assert img.dtype == torch.uint8 and tuple(img.shape) == (3, 40, 50)
        assert torch.equal(img[0], img[1])


def test_normalize():
    img = torch.full((2, 3, 4, 4), 255, dtype=torch.uint8)
    out = normalize(img, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    assert out.dtype == torch.float32 and torch.allclose(out, torch.ones_like(out))


# Recipes whose ops cover each op's corners: tiny, thin and square sources, zero-size erase
# boxes (scale down to 0), RandAugment with 0 to 3 ops and every magnitude.
CHECK_RECIPES = [
    Recipe.from_spec("rrc+ra/re"),
    Recipe.from_spec("center"),
    Recipe([{"op": "rrc", "scale": [0.001, 1.0], "ratio": [0.1, 10.0]}, {"op": "flip", "p": 0.9}], size=(8, 300)),
    Recipe(
        [
            {"op": "rrc", "scale": [1.0, 1.0]},
            {"op": "ra", "num_ops": 3, "magnitude": 30},
            {"op": "re", "p": 1.0, "scale": [0.0, 0.01]},
        ],
        size=(5, 7),
    ),
    Recipe([{"op": "rrc"}, {"op": "ra", "num_ops": 0, "magnitude": 0, "num_magnitude_bins": 2}], size=1),
]


@pytest.mark.parametrize("recipe", CHECK_RECIPES, ids=lambda r: repr([op.name for op in r.ops]) + str(r.size))
def test_each_op_check_accepts_what_it_samples(recipe):
    for source in [(375, 500), (1, 1), (2, 300), (300, 2), (224, 224)]:
        for seed in range(300):
            params = recipe.sample(round_rng(seed, "k", 0), source)
            size = source
            for op in recipe.ops:
                try:
                    op.check(params.get(op.name), size)
                except FormatError as exc:
                    pytest.fail(f"seed {seed}, source {source}: {op.name} rejects its own sample: {exc}")
                size = op.output_size(size)


SRC, OUT = (375, 500), (224, 224)


@pytest.mark.parametrize(
    "op, row, size, match",
    [
        ("rrc", [0, 0, 0, 10], SRC, r"crop box \(0, 0, 0, 10\) does not fit the 375x500 image"),
        ("rrc", [0, 0, 10, 0], SRC, "crop box"),
        ("rrc", [300, 0, 76, 10], SRC, "crop box"),
        ("rrc", [0, 491, 10, 10], SRC, "crop box"),
        ("rrc", [-1, 0, 10, 10], SRC, "crop box"),
        ("rrc", [0, 0, 10], SRC, r"expected 4 parameters for op 'rrc', got \[0, 0, 10\]"),
        ("rrc", None, SRC, "no parameters for op 'rrc'"),
        ("flip", [2], OUT, "flip bit 2 is not 0 or 1"),
        ("flip", [-1], OUT, "flip bit -1 is not 0 or 1"),
        ("flip", [0, 1], OUT, "expected 1 parameters for op 'flip'"),
        ("ra", [14, 9, 0, 9], OUT, r"RandAugment op id 14 is not in \[0, 14\)"),
        ("ra", [0, 9, -1, 9], OUT, r"RandAugment op id -1 is not in \[0, 14\)"),
        ("ra", [1, 31, 0, 9], OUT, r"RandAugment magnitude bin 31 of op 1 is not in \(-31, 31\)"),
        ("ra", [1, -31, 0, 9], OUT, "RandAugment magnitude bin -31 of op 1"),
        ("ra", [10, -9, 0, 9], OUT, r"RandAugment magnitude bin -9 of op 10 is not in \[0, 31\)"),
        ("ra", [1, 9], OUT, "expected 4 parameters for op 'ra'"),
        ("re", [200, 0, 30, 30], OUT, r"erase box \[200, 0, 30, 30\] does not fit the output size \(224, 224\)"),
        ("re", [0, 0, 1, 225], OUT, "erase box"),
        ("re", [-1, 0, 1, 1], OUT, "erase box"),
        ("re", [0, 0, -1, 0], OUT, "erase box"),
    ],
)
def test_each_op_check_rejects_a_bad_row(op, row, size, match):
    ops = {o.name: o for o in Recipe.from_spec("rrc+ra/re").ops}
    with pytest.raises(FormatError, match=match):
        ops[op].check(None if row is None else np.array(row), size)


def test_checks_accept_the_edges():
    rrc, flip, ra, re = Recipe.from_spec("rrc+ra/re").ops
    rrc.check(np.array([0, 0, 375, 500]), SRC)
    rrc.check(np.array([374, 499, 1, 1]), SRC)
    flip.check(np.array([0], np.uint8), OUT)
    ra.check(np.array([1, -30, 13, 30], np.int8), OUT)
    re.check(np.zeros(4, np.uint16), OUT)  # not applied
    re.check(np.array([224, 0, 0, 5]), OUT)  # zero height: erases nothing
    re.check(np.array([0, 0, 224, 224]), OUT)
    Recipe.from_spec("center").ops[0].check(None, SRC)


def test_replay_of_a_corrupt_crop_box_raises_format_error(jpeg_bytes):
    recipe = Recipe.from_spec("rrc+ra/re")
    cols = recipe.sample_rounds(0, "k", 2, (375, 500))
    cols["rrc"][1] = [100, 0, 300, 500]  # 100 + 300 > 375
    sc = Sidecar(recipe.fingerprint, np.zeros((2, 1), np.int64), np.ones((2, 1), np.float16), cols)
    stored = decode_sidecar(encode_sidecar(sc))
    src = SourceImage(jpeg_bytes)
    replay(src, stored.round_params(0), recipe)
    src = SourceImage(jpeg_bytes)
    with pytest.raises(FormatError, match=r"crop box \(100, 0, 300, 500\) does not fit the 375x500 image"):
        replay(src, stored.round_params(1), recipe)
    assert not src._decoded, "checked before decoding"


def test_replay_checks_later_ops_against_the_output_size(jpeg_bytes):
    recipe = Recipe.from_spec("rrc+ra/re", size=64)
    params = recipe.sample(round_rng(0, "k", 0), (375, 500))
    params["re"] = np.array([0, 0, 100, 100])  # fits the source, not the 64x64 output
    with pytest.raises(FormatError, match=r"erase box \[0, 0, 100, 100\] does not fit the output size \(64, 64\)"):
        replay(jpeg_bytes, params, recipe)
    with pytest.raises(FormatError, match="no parameters for op 'flip'"):
        replay(jpeg_bytes, {k: v for k, v in params.items() if k != "flip"}, recipe)


def test_sidecar_columns_come_from_the_ops():
    recipe = Recipe.from_spec("rrc+ra/re")
    rrc, flip, ra, re = recipe.ops
    assert recipe.columns == ["rrc", "flip", "ra", "re"]
    assert (rrc.column, flip.column, re.column) == tuple(COLUMNS.get(n) for n in ("rrc", "flip", "re"))
    assert rrc.column.fields == re.column.fields == ("top", "left", "height", "width")
    assert flip.column.fields == ("flip",) and ra.column.fields == ("op", "bin")
    assert re.column.codec == "sparse"  # may skip a round: all-zero row = not applied
    assert COLUMNS.get("ra").width is None and ra.column.width == 4
    assert Recipe([{"op": "rrc"}, {"op": "ra", "num_ops": 3}]).column_fields == {"rrc": 4, "ra": 6}
    assert Recipe.from_spec("center").columns == []


def test_register_op_refuses_a_taken_or_mismatched_name():
    class Flip2(HorizontalFlip):
        pass

    with pytest.raises(ValueError, match="op 'flip' is already registered"):
        register_op(Flip2)

    class Odd(HorizontalFlip):
        name = "odd"
        column = Column("odd_col", "bits", ("x",))

    with pytest.raises(ValueError, match="expected op 'odd' to declare a column named 'odd'"):
        register_op(Odd)
    assert "odd" not in OPS and "odd_col" not in COLUMNS
