"""A recipe at another size: ``Recipe.from_spec(..., size=N)`` resizes its geometry chain with it."""

from __future__ import annotations

import pytest

from tests.conftest import encode, photo_like
from wds_reinforce.core.augment import RECIPES, Recipe, replay, round_rng
from wds_reinforce.core.decode import SourceImage


def test_cifar100_plus_at_32_px_resizes_crops_and_pads_in_proportion():
    recipe = Recipe.from_spec("cifar100+", size=32)
    resize, crop = (op.to_dict() for op in recipe.ops[:2])
    assert resize == {"op": "resize", "size": 32, "interpolation": "bilinear", "antialias": True}
    assert crop["size"] == [32, 32] and crop["padding"] == 2  # 16 * 32 / 224 = 2.29
    assert recipe.size == (32, 32) and recipe.mean == Recipe.from_spec("cifar100+").mean
    assert [Recipe.from_spec("cifar100+", size=n).ops[1].padding[0] for n in (64, 112, 448)] == [5, 8, 32]
    src = SourceImage(encode(photo_like(32, 32, seed=5), "PNG"))
    for r in range(8):
        params = recipe.sample(round_rng(0, "k", r), src.size)
        assert 0 <= params["random_crop"].min() and params["random_crop"].max() <= 4
        assert tuple(replay(src, params, recipe).shape) == (3, 32, 32)
    for name in ("flowers102+", "food101+"):
        assert Recipe.from_spec(name, size=48).ops[0].size == (48, 48)


def test_the_same_size_changes_nothing():
    for name in RECIPES.names():
        preset = Recipe.from_spec(name)
        again = Recipe.from_spec(name, size=preset.size)
        assert again.to_dict() == preset.to_dict() and again.fingerprint == preset.fingerprint
    # The fingerprints recorded before sizes could be overridden.
    assert Recipe.from_spec("rrc+ra/re", kernels=1).fingerprint.hex() == "551ddeee2dfb6629"
    at_64 = Recipe.from_spec({**RECIPES.get("rrc"), "size": 64})
    assert Recipe.from_spec("rrc", size=64).fingerprint == at_64.fingerprint


def test_every_sized_geometry_op_scales_per_axis():
    spec = {
        "size": [224, 224],
        "ops": [
            {"op": "resize", "size": 256},
            {"op": "center_crop", "size": 240},
            {"op": "random_crop", "size": 224, "padding": [1, 2, 3, 4]},
            {"op": "flip"},
        ],
    }
    ops = Recipe.from_spec(spec, size=(448, 112)).to_dict()["ops"]
    assert ops[0]["size"] == 512  # a shorter side scales with the axis that grows most: 256 * 448 / 224
    assert ops[1]["size"] == [480, 120]
    assert ops[2]["size"] == [448, 112] and ops[2]["padding"] == [1, 4, 2, 8]  # left/right x 0.5, top/bottom x 2
    assert ops[3] == {"op": "flip", "p": 0.5}
    rrc = Recipe.from_spec({"size": 224, "ops": [{"op": "rrc", "scale": [0.5, 1.0]}]}, size=40)
    assert rrc.to_dict()["ops"][0]["scale"] == [0.5, 1.0] and rrc.size == (40, 40)


@pytest.mark.parametrize("size", [(32, 48), (48, 32), (20, 64)])
def test_a_non_square_size_still_replays_every_round(size):
    """The shorter side grows with the larger factor, so the resized image covers the crop; the padding
    scales per axis. (It used to shrink with the smaller one: every round failed with a crop too large.)"""
    recipe = Recipe.from_spec("cifar100+", size=size)
    for hw in ((32, 32), (40, 60), (90, 30)):
        src = SourceImage(encode(photo_like(*hw, seed=2), "PNG"))
        for r in range(4):
            params = recipe.sample(round_rng(0, "k", r), src.size)
            assert tuple(replay(src, params, recipe).shape) == (3, *size)


def test_a_padding_never_rounds_to_none_and_one_value_pads_every_side():
    assert Recipe.from_spec("cifar100+", size=6).ops[1].to_dict()["padding"] == 1  # 16 * 6 / 224 = 0.43
    spec = {"size": 224, "ops": [{"op": "random_crop", "size": 224, "padding": [16]}]}
    assert Recipe.from_spec(spec, size=32).ops[0].to_dict()["padding"] == 2
    unpadded = {"size": 224, "ops": [{"op": "random_crop", "size": 224, "padding": 0}]}
    assert Recipe.from_spec(unpadded, size=32).ops[0].to_dict()["padding"] == 0


def test_a_recipe_file_at_another_size(tmp_path):
    path = tmp_path / "cifar.yaml"
    path.write_text("size: 224\nops:\n  - {op: resize, size: 224}\n  - {op: random_crop, size: 224, padding: 28}\n")
    recipe = Recipe.from_spec(str(path), size=32)
    assert recipe.ops[1].size == (32, 32) and recipe.ops[1].padding == (4, 4, 4, 4)  # CIFAR's classic 4 px


def test_a_recipe_whose_own_sizes_disagree_is_still_refused():
    with pytest.raises(ValueError, match=r"size \(30, 30\) differs from the recipe's \(32, 32\).*--image-size"):
        Recipe([{"op": "resize", "size": 32}, {"op": "random_crop", "size": 30}], size=32)
    with pytest.raises(ValueError, match="bad arguments for op 'random_crop'"):
        Recipe.from_spec({"size": 224, "ops": [{"op": "random_crop", "padding": 4}]}, size=32)
