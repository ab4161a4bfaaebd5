"""resize, random_crop, center_crop; RandAugment's p; the fine-tuning presets.

random_crop is held against torchvision's own ``RandomCrop`` (v1, as apple/ml-dr ran it): the
offset torchvision draws is read from its ``get_params`` (a subclass that records what the real
one returned), stored as our row, and our replay must give torchvision's pixels exactly, with
either kernel set. Padding and cropping move pixels only, so set 2 must equal set 1 exactly, as
for flipping and erasing in test_kernels; resizing follows test_kernels' standard for resizes.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
import torchvision.transforms as T
from torchvision.transforms import InterpolationMode, v2
from torchvision.transforms.v2 import functional as TF

from tests.conftest import encode, photo_like
from tests.shardmaker import make_shards
from wds_reinforce.core.augment import RECIPES, Recipe, replay, round_rng
from wds_reinforce.core.augment.kernels import KERNELS
from wds_reinforce.core.augment.ops import OPS, RandAugment
from wds_reinforce.core.decode import SourceImage
from wds_reinforce.core.errors import DataError, FormatError
from wds_reinforce.read.dataset import ReinforcedDataset

K1, K2 = KERNELS.get(1), KERNELS.get(2)


@pytest.fixture(scope="module")
def odd() -> torch.Tensor:
    """A 37x53 photo-like uint8 (3, H, W) image, in HWC memory as the decoder writes it."""
    return torch.from_numpy(photo_like(37, 53, seed=3, noise=20.0)).permute(2, 0, 1)


class _Recording(T.RandomCrop):
    """torchvision's RandomCrop, remembering the offset its own get_params drew and the padded size."""

    def get_params(self, img, output_size):  # forward calls self.get_params(padded image, size)
        i, j, h, w = T.RandomCrop.get_params(img, output_size)
        self.offset, self.padded = (i, j), tuple(img.shape[-2:])
        return i, j, h, w


CROPS = [
    dict(size=(40, 48), padding=4),
    dict(size=(37, 53), padding=0),  # the whole image: torchvision's (0, 0) shortcut
    dict(size=(30, 30), padding=[3, 5], fill=7),
    dict(size=(41, 50), padding=[1, 2, 3, 4], padding_mode="edge"),
    dict(size=(44, 56), padding=5, padding_mode="reflect"),
    dict(size=(40, 60), padding=[6, 2], padding_mode="symmetric"),
    dict(size=(60, 70), padding=2, pad_if_needed=True),
    dict(size=(60, 70), padding=2, pad_if_needed=True, padding_mode="reflect"),
    dict(size=(45, 20), padding=None, pad_if_needed=True, padding_mode="symmetric"),
]


@pytest.mark.parametrize("kernels", [1, 2])
@pytest.mark.parametrize("args", CROPS, ids=[str(i) for i in range(len(CROPS))])
def test_random_crop_replays_torchvisions_random_crop_pixel_for_pixel(odd, args, kernels):
    op = {"op": "random_crop", **{k: v for k, v in args.items()}}
    recipe = Recipe([op], size=args["size"], kernels=kernels)
    for seed in range(6):
        tv = _Recording(**args)
        torch.manual_seed(seed)
        expected = tv(odd.contiguous())
        row = np.array(tv.offset)
        recipe.ops[0].check(row, tuple(odd.shape[-2:]))  # torchvision's offset is a valid row
        assert recipe.ops[0]._steps(tuple(odd.shape[-2:]))[1] == tv.padded
        got = replay(odd, {"random_crop": row}, recipe)
        assert got.shape == expected.shape and torch.equal(got, expected), f"seed {seed}: offset {tv.offset}"


@pytest.mark.parametrize("args", CROPS, ids=[str(i) for i in range(len(CROPS))])
def test_random_crop_samples_every_offset_torchvision_can_draw(odd, args):
    recipe = Recipe([{"op": "random_crop", **args}], size=args["size"])
    tv = _Recording(**args)
    tv(odd.contiguous())
    height, width = tv.padded
    rows = np.stack([recipe.sample(round_rng(0, "k", r), (37, 53))["random_crop"] for r in range(400)])
    assert (
        rows.min() >= 0 and rows[:, 0].max() <= height - args["size"][0] and rows[:, 1].max() <= width - args["size"][1]
    )
    if (height, width) != args["size"]:  # uniform over the offsets: the corners come up
        assert {rows[:, 0].min(), rows[:, 0].max()} == {0, height - args["size"][0]} or height == args["size"][0]
    again = np.stack([recipe.sample(round_rng(0, "k", r), (37, 53))["random_crop"] for r in range(400)])
    assert np.array_equal(rows, again)


@pytest.mark.parametrize("mode", ["constant", "edge", "reflect", "symmetric"])
@pytest.mark.parametrize("fill", [[0], [200], [1, 2, 3]])
def test_fast_padding_and_cropping_equal_torchvision(odd, mode, fill):
    for sides in [(1, 2, 3, 4), (5, 0, 0, 7), (0, 0, 0, 0), (36, 20, 52, 36)]:
        expected = K1.pad(odd.contiguous(), sides, fill, mode)
        if mode == "constant" or len(fill) == 1:  # torchvision takes a per-channel fill for "constant" only
            value = fill if len(fill) > 1 else fill[0]
            assert torch.equal(expected, TF.pad(odd.contiguous(), list(sides), fill=value, padding_mode=mode))
        got = K2.pad(odd, sides, fill, mode)
        assert got.dtype == torch.uint8 and torch.equal(got, expected), (sides, mode, fill)
    assert torch.equal(K2.crop(odd, 3, 4, 20, 30), K1.crop(odd.contiguous(), 3, 4, 20, 30))


def test_a_crop_that_does_not_fit_is_data_and_a_row_that_does_not_fit_is_a_format_error(odd):
    crop = Recipe([{"op": "random_crop", "size": 40}], size=40)
    with pytest.raises(DataError, match=r"the crop 40x40 is larger than the padded 37x53 image"):
        crop.sample(round_rng(0, "k", 0), (37, 53))
    with pytest.raises(DataError, match="larger than the padded"):
        replay(odd, {"random_crop": np.array([0, 0])}, crop)
    padded = Recipe([{"op": "random_crop", "size": 40, "padding": 2}], size=40)
    for row in ([1, 17], [0, 0]):
        padded.ops[0].check(np.array(row), (37, 53))
    for row in ([2, 0], [0, 18], [-1, 0]):
        with pytest.raises(FormatError, match=r"crop offset .* does not fit the padded 41x57 image"):
            replay(odd, {"random_crop": np.array(row)}, padded)
    reflect = Recipe([{"op": "random_crop", "size": 20, "padding": 40, "padding_mode": "reflect"}], size=20)
    with pytest.raises(DataError, match="reflect padding .* reaches past the 37x53 image"):
        reflect.sample(round_rng(0, "k", 0), (37, 53))


@pytest.mark.parametrize("kernels", [1, 2])
def test_symmetric_padding_past_the_image_is_data_with_either_set_and_up_to_it_is_torchvisions(kernels):
    small = torch.from_numpy(np.random.default_rng(5).integers(0, 256, (8, 8, 3), np.uint8)).permute(2, 0, 1)
    args = dict(size=32, pad_if_needed=True, padding_mode="symmetric")  # 24 a side: past the 8x8 image
    recipe = Recipe([{"op": "random_crop", **args}], size=32, kernels=kernels)
    with pytest.raises(DataError, match=r"symmetric padding \(24, 0, 24, 0\) reaches past the 8x8 image"):
        recipe.sample(round_rng(0, "k", 0), (8, 8))
    with pytest.raises(DataError, match="symmetric padding"):
        replay(small, {"random_crop": np.array([0, 0])}, recipe)
    # 8 a side, the most torchvision mirrors: the width by padding=, the height by pad_if_needed
    args = dict(size=(16, 24), padding=[8, 0], pad_if_needed=True, padding_mode="symmetric")
    recipe = Recipe([{"op": "random_crop", **args}], size=(16, 24), kernels=kernels)
    for seed in range(4):
        tv = _Recording(**args)
        torch.manual_seed(seed)
        expected = tv(small.contiguous())
        got = replay(small, {"random_crop": np.array(tv.offset)}, recipe)
        assert tv.padded == (24, 24) and torch.equal(got, expected), f"seed {seed}: offset {tv.offset}"


@pytest.mark.parametrize("size", [(30, 40), (37, 53), (50, 20), (60, 70)])
def test_center_crop_is_torchvisions_center_crop_with_either_set(odd, size):
    expected = T.CenterCrop(size)(odd.contiguous())
    for kernels in (1, 2):
        recipe = Recipe([{"op": "center_crop", "size": list(size)}], size=size, kernels=kernels)
        assert torch.equal(replay(odd, {}, recipe), expected), kernels
    assert OPS.get("center_crop")(size).to_dict() == {"op": "center_crop", "size": list(size)}


def test_resize_is_torchvisions_resize_and_the_fast_set_keeps_the_resize_standard(odd):
    # Set 1 is torchvision's v2 kernels (v1's Resize rounds uint8 differently, by one level at most).
    for size, out in [(24, (24, 34)), (80, (80, 114)), ([20, 30], (20, 30))]:
        chain = [{"op": "resize", "size": size}, {"op": "center_crop", "size": [16, 16]}]
        recipe = Recipe(chain, size=16, kernels=1)
        assert recipe.ops[0].output_size((37, 53)) == out
        expected = v2.Resize(size, InterpolationMode.BILINEAR, antialias=True)(odd.contiguous())
        assert tuple(expected.shape[-2:]) == out
        assert torch.equal(recipe.ops[0].apply(odd.contiguous(), None, K1), expected)
        fast = recipe.ops[0].apply(odd, None, K2)
        diff = (fast.int() - expected.int()).abs()
        if out[0] < 37:  # an antialiased downscale runs torchvision's kernel: equal
            assert diff.max() == 0, size
        else:  # an upscale: OpenCV's bilinear, equal up to rounding (test_kernels' standard)
            assert diff.max() <= 2 and diff.float().mean() < 0.5, size


def test_resize_on_a_reduced_decode_gives_the_size_of_the_source_s():
    jpg = encode(photo_like(375, 500, seed=2, noise=10.0), quality=90)
    ops = [{"op": "resize", "size": 64}, {"op": "center_crop", "size": 64}]
    full, reduced = Recipe(ops, size=64, kernels=2), Recipe(ops, size=64, decode="reduced", kernels=2)
    assert reduced.ops[0].region(None, (375, 500)) == ((375, 500), (64, 85))
    a, b = replay(jpg, {}, full), replay(jpg, {}, reduced)
    assert a.shape == b.shape == (3, 64, 64)
    assert (a.int() - b.int()).abs().float().mean() < 3  # a 1/4-scale decode, then the same resize


@pytest.mark.parametrize(
    "ops, size, match",
    [
        ([{"op": "resize", "size": 32}], 32, "expected the last geometry op to give a fixed size"),
        ([{"op": "resize", "size": 32}, {"op": "random_crop", "size": 30}], 32, r"size \(30, 30\) differs"),
        ([{"op": "resize", "size": 32}, {"op": "flip"}, {"op": "center_crop", "size": 32}], 32, "geometry ops first"),
        ([{"op": "random_crop", "size": 32, "padding": -1}], 32, "expected padding a non-negative int"),
        ([{"op": "random_crop", "size": 32, "padding": [1, 2, 3]}], 32, "expected padding a non-negative int"),
        ([{"op": "random_crop", "size": 32, "fill": 256}], 32, r"expected fill an int in \[0, 255\]"),
        ([{"op": "random_crop", "size": 32, "padding_mode": "wrap"}], 32, "expected padding_mode in"),
        ([{"op": "random_crop", "size": 32, "pad_if_needed": 1}], 32, "expected pad_if_needed true or false"),
        ([{"op": "random_crop", "padding": 4}], 32, "bad arguments for op 'random_crop'"),
        ([{"op": "resize", "size": 0}, {"op": "center_crop", "size": 32}], 32, "expected size to be a positive int"),
        ([{"op": "rrc"}, {"op": "ra", "p": 1.5}], 32, r"expected p to be a probability in \[0, 1\], got 1.5"),
    ],
)
def test_bad_crop_recipes_fail_early(ops, size, match):
    with pytest.raises(ValueError, match=match):
        Recipe(ops, size=size)


# ----------------------------------------------------------------------------------------
# RandAugment's p


def test_randaugment_with_p_1_is_the_op_before_p():
    legacy = {
        "op": "ra",
        "num_ops": 2,
        "magnitude": 9,
        "num_magnitude_bins": 31,
        "interpolation": "nearest",
        "fill": None,
    }
    assert RandAugment().to_dict() == legacy == RandAugment(p=1.0).to_dict()
    for r in range(50):  # the same draws: p == 1 takes nothing more from the generator
        a, b = RandAugment(), RandAugment(p=1.0)
        rng_a, rng_b = round_rng(1, "k", r), round_rng(1, "k", r)
        assert np.array_equal(a.sample(rng_a, (32, 32)), b.sample(rng_b, (32, 32)))
        assert rng_a.random() == rng_b.random()
    assert Recipe.from_spec("rrc+ra/re", kernels=1).fingerprint.hex() == "551ddeee2dfb6629"


def test_randaugment_with_p_below_1_stores_the_zero_row_which_replays_as_not_applied(odd):
    recipe = Recipe([{"op": "center_crop", "size": 32}, {"op": "ra", "num_ops": 3, "p": 0.5}], size=32)
    assert recipe.to_dict()["ops"][1]["p"] == 0.5
    assert Recipe.from_dict(recipe.to_dict()).fingerprint == recipe.fingerprint
    assert (
        recipe.fingerprint
        != Recipe([{"op": "center_crop", "size": 32}, {"op": "ra", "num_ops": 3}], size=32).fingerprint
    )
    rows = recipe.sample_rounds(0, "k", 400, (37, 53))["ra"]
    skipped = (rows == 0).all(axis=1)
    assert 0.4 < skipped.mean() < 0.6 and rows.shape == (400, 6)
    crop = recipe.ops[0].apply(odd, None)
    assert torch.equal(replay(odd, {"ra": rows[np.argmax(skipped)]}, recipe), crop)
    never = Recipe([{"op": "rrc"}, {"op": "ra", "p": 0.0}], size=32)
    assert not never.sample_rounds(0, "k", 20, (37, 53))["ra"].any()


# ----------------------------------------------------------------------------------------
# The fine-tuning presets and the loader


def test_the_fine_tuning_presets_are_their_configs():
    cifar = Recipe.from_spec("cifar100+")
    assert [op.name for op in cifar.ops] == ["resize", "random_crop", "flip", "ra", "re"]
    assert cifar.ops[0].to_dict() == {"op": "resize", "size": 224, "interpolation": "bilinear", "antialias": True}
    assert cifar.ops[1].size == (224, 224) and cifar.ops[1].padding == (16, 16, 16, 16)
    assert (cifar.ops[2].p, cifar.ops[3].p, cifar.ops[3].num_ops, cifar.ops[3].magnitude) == (0.5, 1.0, 2, 9)
    assert (cifar.ops[4].p, cifar.ops[4].value) == (0.25, [0])  # their erasing fills with 0 before normalising
    assert cifar.mean == pytest.approx((0.5071, 0.4865, 0.4409), abs=1e-4)
    assert cifar.std == pytest.approx((0.2673, 0.2564, 0.2762), abs=1e-4)
    assert cifar.columns == ["random_crop", "flip", "ra", "re"]
    for name in ("flowers102+", "food101+"):  # their crop's name was unknown to their code: no crop
        recipe = Recipe.from_spec(name)
        assert [op.name for op in recipe.ops] == ["resize", "flip", "ra", "re"] and recipe.ops[0].size == (224, 224)
        assert recipe.mean == (0.485, 0.456, 0.406) and recipe.std == (0.229, 0.224, 0.225)
    again = Recipe.from_dict(cifar.to_dict())  # what a loader reads back from the manifest
    assert again.fingerprint == cifar.fingerprint and again.mean == cifar.mean
    assert all("normalize" in RECIPES.get(name) for name in ("cifar100+", "flowers102+", "food101+"))
    src = SourceImage(encode(photo_like(32, 32, seed=4), "PNG"))
    for r in range(4):
        assert replay(src, cifar.sample(round_rng(0, "k", r), src.size), cifar).shape == (3, 224, 224)


def test_normalisation_is_recorded_but_not_part_of_the_fingerprint():
    ops = [{"op": "rrc"}, {"op": "flip"}]
    plain, cifar = Recipe(ops, size=32), Recipe(ops, size=32, normalize={"mean": [0.5] * 3, "std": [0.25] * 3})
    assert "normalize" not in plain.to_dict() and plain.mean == (0.485, 0.456, 0.406)
    assert cifar.to_dict()["normalize"] == {"mean": [0.5] * 3, "std": [0.25] * 3}
    assert cifar.fingerprint == plain.fingerprint
    with pytest.raises(ValueError, match=r"expected normalize \{'mean': \[3 floats\]"):
        Recipe(ops, size=32, normalize={"mean": [0.5], "std": [0.2] * 3})


@pytest.mark.parametrize("kernels", [1, 2])
def test_loader_pixels_equal_producer_pixels_for_the_new_ops(tmp_path, kernels):
    recipe = Recipe(
        [
            {"op": "resize", "size": 40},
            {"op": "random_crop", "size": 40, "padding": 4, "padding_mode": "reflect"},
            {"op": "flip"},
            {"op": "ra", "p": 0.5},
            {"op": "re", "p": 0.5, "value": 0},
        ],
        size=40,
        kernels=kernels,
    )
    rounds = 4
    made = make_shards(tmp_path, recipe=recipe, rounds=rounds, num_shards=2, image_hw=(36, 50))
    ds = ReinforcedDataset(str(tmp_path), keys=("image", "__key__", "round"))
    seen = 0
    for epoch in range(rounds):
        ds.set_epoch(epoch)
        for img, key, rnd in ds:
            assert tuple(img.shape) == (3, 40, 40)
            assert torch.equal(img, made.pixels[(key, rnd)]), f"{key} round {rnd}"
            seen += 1
    assert seen == rounds * len(made.keys)


def test_make_shards_lists_every_preset():
    from wds_reinforce.cli.make_shards import build_parser

    action = next(a for a in build_parser()._actions if a.dest == "recipe")
    assert all(name in action.help for name in RECIPES.names())


def test_producer_mixing_and_verify_with_the_new_ops(tmp_path):
    """The real producer (mixing included) and verify's teacher check on a recipe with every new op."""
    from tests.producer_data import TEACHER, job_args, make_image_folder
    from wds_reinforce.produce.make import make_shards as produce
    from wds_reinforce.produce.teacher import load_teacher
    from wds_reinforce.read.verify import verify_shards

    recipe = Recipe(
        [
            {"op": "resize", "size": 36},
            {"op": "center_crop", "size": 36},
            {"op": "random_crop", "size": 32, "padding": 2, "padding_mode": "symmetric"},
            {"op": "flip"},
            {"op": "ra", "p": 0.5},
        ],
        size=32,
        mix={"window": 4, "mode": "both", "mixup": {"p": 0.5, "alpha": 1.0, "max": 0.5}, "cutmix": {"p": 0.5}},
    )
    source = make_image_folder(tmp_path / "src", per_class=3, corrupt=False)
    produce(str(source), TEACHER, out=str(tmp_path / "out"), **job_args(recipe=recipe))
    teacher = load_teacher(TEACHER, num_classes=3, device="cpu")
    report = verify_shards(str(tmp_path / "out"), teacher=teacher, checks=6)
    assert report.ok, [str(p) for p in report.problems]
    assert report.teacher_checks == 6 and report.max_prob_diff < 2e-3 and report.top1_agreement == 1.0
    ds = ReinforcedDataset(str(tmp_path / "out"), keys=("image", "__key__"))
    assert all(tuple(img.shape) == (3, 32, 32) for img, _ in ds)


def test_the_spec_s_example_of_the_fine_tuning_columns():
    """docs/FORMAT.md's bytes of a random_crop column and of an ra column with a round not applied."""
    import msgpack

    from tests.core.test_format import FORMAT_MD
    from wds_reinforce.core.format import COLUMNS

    text = FORMAT_MD.read_text()
    rows = text[text.index("The columns of the fine-tuning recipes") : text.index("## Recipe and fingerprint")]
    shown = [bytes.fromhex(" ".join(re.findall(r"`([0-9a-f ]+)`", line))) for line in rows.splitlines()[-3:-1]]
    crop = COLUMNS.get("random_crop").encode(np.array([[10, 45], [0, 32], [16, 16]]), 3)
    ra = COLUMNS.get("ra").encode(np.array([[5, -9, 11, 9], [0, 0, 0, 0], [1, 9, 2, -9]]), 3)
    assert shown == [msgpack.packb({"random_crop": crop})[1:], msgpack.packb({"ra": ra})[1:]]
    assert COLUMNS.get("ra").decode(ra, 3)[1].tolist() == [0, 0, 0, 0]
