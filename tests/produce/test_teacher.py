"""Teachers: member specs, checkpoints (weights_only), ensembles."""

from __future__ import annotations

import pytest
import torch

from tests.producer_data import TEACHER
from wds_reinforce.produce.teacher import load_teacher, parse_teacher_spec


def test_checkpoint_sets_classes_and_ensemble_averages(tmp_path):
    import timm

    model = timm.create_model("test_resnet", num_classes=5)
    ckpt = tmp_path / "t.pt"
    torch.save(model.state_dict(), ckpt)
    one = load_teacher(TEACHER, str(ckpt), device="cpu")
    assert one.num_classes == 5
    two = load_teacher([TEACHER, TEACHER], [str(ckpt), None], num_classes=5, device="cpu")
    x = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    rnd = load_teacher(TEACHER, num_classes=5, device="cpu")
    torch.testing.assert_close(two.predict(x), (one.predict(x) + rnd.predict(x)) / 2)
    assert len(two.describe()["members"]) == 2


def test_teacher_specs():
    assert parse_teacher_spec("timm:a, timm:b") == [("timm", "a"), ("timm", "b")]
    assert parse_teacher_spec(["timm:a", "timm:b,timm:c"]) == [("timm", "a"), ("timm", "b"), ("timm", "c")]
    with pytest.raises(ValueError, match="expected at least one teacher"):
        parse_teacher_spec(" , ")
    with pytest.raises(ValueError, match="expected a teacher like 'timm:resnet50', got 'resnet50'"):
        parse_teacher_spec("resnet50")
    with pytest.raises(ValueError, match="unknown teacher kind 'hub'"):
        parse_teacher_spec("hub:x")


def test_checkpoint_that_is_not_a_state_dict_is_refused(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError, match="bad.pt"):
        load_teacher(TEACHER, str(bad), device="cpu")
    with pytest.raises(ValueError, match="not found"):
        load_teacher(TEACHER, str(tmp_path / "missing.pt"), device="cpu")


def test_predict_gives_probabilities():
    teacher = load_teacher(TEACHER, num_classes=4, device="cpu")
    probs = teacher.predict(torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8))
    assert probs.shape == (3, 4)
    torch.testing.assert_close(probs.sum(1), torch.ones(3))
    with pytest.raises(ValueError, match="expected uint8 images"):
        teacher.predict(torch.zeros(1, 3, 32, 32))


def test_manifest_entry_records_the_view_the_teacher_saw(tmp_path):
    from tests.producer_data import job_args, make_image_folder
    from wds_reinforce.core.augment import Recipe
    from wds_reinforce.produce.make import prepare_job

    teacher = load_teacher(TEACHER, num_classes=3, device="cpu")
    member = teacher.describe(Recipe.from_spec({"size": 32, "ops": [{"op": "rrc", "scale": [0.35, 1.0]}]}))
    member = member["members"][0]
    assert member["input_size"] == [3, 32, 32] and member["interpolation"] == "bilinear"
    assert member["crop"]["op"] == "rrc" and member["crop"]["scale"] == [0.35, 1.0]
    assert "crop_pct" not in member  # timm's pretrained config is not what the teacher saw
    # The producer records the recipe it ran the teacher on.
    src = make_image_folder(tmp_path / "src", per_class=2, corrupt=False)
    job = prepare_job(str(src), TEACHER, out=str(tmp_path / "out"), **job_args(image_size=24))
    member = job.describe_teacher()["members"][0]
    assert member["input_size"] == [3, 24, 24] and member["crop"]["op"] == "rrc"


def test_checkpoint_saved_by_train_names_its_model(tmp_path):
    import timm

    from wds_reinforce.produce.checkpoint import checkpoint_info, save_checkpoint

    model = timm.create_model("test_resnet", num_classes=4)
    ckpt = tmp_path / "teacher.pt"
    save_checkpoint(ckpt, model.state_dict(), "timm:test_resnet", ["a", "b", "c", "d"], (32, 32), {"ops": []})
    info = checkpoint_info(ckpt)
    assert info["arch"] == "timm:test_resnet" and info["class_names"] == ["a", "b", "c", "d"]
    assert "state_dict" not in info
    assert load_teacher(TEACHER, str(ckpt), device="cpu").num_classes == 4
    with pytest.raises(ValueError, match=r"expected a checkpoint of timm:resnet10t, got one of timm:test_resnet"):
        load_teacher("timm:resnet10t", str(ckpt), device="cpu")
    torch.save(model.state_dict(), tmp_path / "bare.pt")
    assert checkpoint_info(tmp_path / "bare.pt") == {}
