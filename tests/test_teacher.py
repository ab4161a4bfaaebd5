"""Teachers: member specs, checkpoints (weights_only), ensembles."""

from __future__ import annotations

import pytest
import torch

from tests.producer_data import TEACHER
from wds_reinforce.teacher import load_teacher, parse_teacher_spec


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
