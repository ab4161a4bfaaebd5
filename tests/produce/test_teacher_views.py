"""What a teacher records of the view it saw (a chain of geometry ops), and the normalisation it runs with."""

from __future__ import annotations

import pytest
import torch

from tests.producer_data import TEACHER
from wds_reinforce.core.augment import CIFAR100_MEAN, CIFAR100_STD, Recipe, normalize
from wds_reinforce.produce.checkpoint import save_checkpoint
from wds_reinforce.produce.teacher import load_teacher


def test_a_chain_of_geometry_ops_is_recorded_whole_and_crop_is_the_op_that_sets_the_size():
    teacher = load_teacher(TEACHER, num_classes=3, device="cpu")
    member = teacher.describe(Recipe.from_spec("cifar100+", size=32))["members"][0]
    assert member["input_size"] == [3, 32, 32]
    assert member["crop"] == {
        "op": "random_crop",
        "size": [32, 32],
        "padding": 2,
        "fill": 0,
        "padding_mode": "constant",
        "pad_if_needed": False,
    }
    assert member["interpolation"] == "bilinear"  # the resize's: the crop has none
    assert [op["op"] for op in member["geometry"]] == ["resize", "random_crop"]
    assert member["geometry"][0] == {"op": "resize", "size": 32, "interpolation": "bilinear", "antialias": True}


def test_a_one_op_view_is_described_as_before():
    teacher = load_teacher(TEACHER, num_classes=3, device="cpu")
    member = teacher.describe(Recipe.from_spec({"size": 32, "ops": [{"op": "rrc"}, {"op": "flip"}]}))["members"][0]
    assert "geometry" not in member  # job identities and teacher sets made before chains stay the same
    assert member["crop"] == {"op": "rrc", "scale": [0.08, 1.0], "ratio": [0.75, 4 / 3], "antialias": True}
    assert member["interpolation"] == "bilinear"
    center = teacher.describe(Recipe.from_spec("center", size=32))["members"][0]
    assert "geometry" not in center and center["crop"]["op"] == "center" and center["crop"]["crop_pct"] == 0.875


def _checkpoint(path, **extra):
    import timm

    model = timm.create_model("test_resnet", num_classes=3)
    save_checkpoint(path, model.state_dict(), "timm:test_resnet", ["a", "b", "c"], (32, 32), None, **extra)
    return model.eval()


def test_a_checkpoint_that_names_its_normalisation_is_run_with_it(tmp_path):
    norm = {"mean": list(CIFAR100_MEAN), "std": list(CIFAR100_STD)}
    model = _checkpoint(tmp_path / "cifar.pt", normalize=norm)
    teacher = load_teacher(TEACHER, str(tmp_path / "cifar.pt"), device="cpu")
    member = teacher.describe()["members"][0]
    assert (member["mean"], member["std"]) == (norm["mean"], norm["std"])
    x = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    with torch.inference_mode():
        want = torch.softmax(model(normalize(x, CIFAR100_MEAN, CIFAR100_STD)), dim=1)
        imagenet = torch.softmax(model(normalize(x)), dim=1)
    torch.testing.assert_close(teacher.predict(x), want)
    assert not torch.allclose(want, imagenet)
    # A checkpoint that names none keeps timm's config.
    _checkpoint(tmp_path / "plain.pt")
    member = load_teacher(TEACHER, str(tmp_path / "plain.pt"), device="cpu").describe()["members"][0]
    assert member["mean"] == list(load_teacher(TEACHER, num_classes=3, device="cpu").configs[0]["mean"])


def test_a_checkpoint_with_a_bad_normalisation_is_refused(tmp_path):
    _checkpoint(tmp_path / "bad.pt", normalize={"mean": [0.5], "std": [0.2, 0.2, 0.2]})
    with pytest.raises(ValueError, match=r"expected normalize \{'mean': \[3 floats\].*bad.pt"):
        load_teacher(TEACHER, str(tmp_path / "bad.pt"), device="cpu")
