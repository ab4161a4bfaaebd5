"""train.py with teachers and starting weights: --evaluate, --targets online, --init.

Issue 22 items 1-3, issue 20 item 4.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import encode, photo_like
from tests.producer_data import CLASSES, make_image_folder
from wds_reinforce.core.augment import normalize

ROOT = Path(__file__).resolve().parents[2]
TOOL = str(ROOT / "tools" / "train.py")
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _train(*args: str, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    out = subprocess.run(
        [sys.executable, TOOL, *args], capture_output=True, text=True, cwd=ROOT, env=env or ENV, timeout=300
    )
    if check:
        assert out.returncode == 0, out.stderr[-3000:]
    return out


def _result(out: subprocess.CompletedProcess) -> dict:
    return json.loads(out.stdout.strip().splitlines()[-1])


def _one_line_error(out: subprocess.CompletedProcess) -> str:
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-3000:]
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("train.py: error: "), out.stderr
    return lines[0]


def _teacher(path: Path, seed: int, classes=CLASSES, model: str = "test_resnet") -> Path:
    """A train.py-style checkpoint of a seeded random ``model`` (what --save writes, without the training)."""
    import timm

    from wds_reinforce.produce.checkpoint import save_checkpoint

    torch.manual_seed(seed)
    net = timm.create_model(model, num_classes=len(classes))
    save_checkpoint(path, net.state_dict(), arch=f"timm:{model}", class_names=classes, image_size=[32, 32])
    return path


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("teachers")
    make_image_folder(root / "train", per_class=4, corrupt=False)
    make_image_folder(root / "val", per_class=3, corrupt=False, seed=50)
    _teacher(root / "t0.pt", 0)
    _teacher(root / "t1.pt", 1)
    return root


def _softmax_of(ckpt: Path, images: torch.Tensor) -> torch.Tensor:
    """The checkpoint's softmax on uint8 images, computed here without the package's teacher."""
    import timm

    saved = torch.load(ckpt, weights_only=True)
    net = timm.create_model(saved["arch"].split(":")[1], num_classes=saved["num_classes"]).eval()
    net.load_state_dict(saved["state_dict"])
    cfg = net.pretrained_cfg
    with torch.inference_mode():
        return torch.softmax(net(normalize(images, cfg["mean"], cfg["std"])).double(), dim=1)


# ----------------------------------------------------------------------------------------
# --evaluate (item 2)


def test_evaluate_a_checkpoint_and_an_ensemble(folders):
    from wds_reinforce.cli.metrics import as_json, summarize
    from wds_reinforce.cli.training import val_views

    images, labels = val_views(str(folders / "val"), (32, 32), 0.875)
    p0, p1 = _softmax_of(folders / "t0.pt", images), _softmax_of(folders / "t1.pt", images)

    one = _result(_train("--evaluate", str(folders / "t0.pt"), "--val", str(folders / "val"), "--json"))
    assert one["evaluate"] == [str(folders / "t0.pt")] and one["teacher"] == ["timm:test_resnet"]
    assert one["images"] == 9 and one["image_size"] == [32, 32] and one["top5"] is None  # 3 classes
    expected = as_json(summarize(p0, labels))
    assert {k: one[k] for k in ("top1", "nll", "ece")} == pytest.approx(
        {k: expected[k] for k in ("top1", "nll", "ece")}, abs=2e-4
    )

    both = _train(
        "--evaluate", str(folders / "t0.pt"), "--evaluate", str(folders / "t1.pt"), "--val", str(folders / "val")
    )
    ensemble = summarize((p0 + p1) / 2, labels)
    line = both.stdout.strip().splitlines()[-1]
    assert line.startswith("timm:test_resnet + timm:test_resnet (mean of softmax) on 9 images at 32x32 px: top-1 ")
    assert f"NLL {ensemble['nll']:.4f}" in line and f"ECE {ensemble['ece']:.2%}" in line


@pytest.mark.parametrize(
    "extra, message",
    [
        ([], "expected --val (the held-out images) with --evaluate"),
        (["--val", "VAL", "--data", "VAL"], "expected no --data with --evaluate"),
        (["--val", "VAL", "--teacher-checkpoint", "T"], "expected no --teacher-checkpoint with --evaluate"),
    ],
)
def test_evaluate_argument_errors(folders, extra, message):
    extra = [str(folders / "val") if a == "VAL" else str(folders / "t0.pt") if a == "T" else a for a in extra]
    out = _train("--evaluate", str(folders / "t0.pt"), *extra, check=False)
    assert message in _one_line_error(out)


def test_evaluate_refuses_a_checkpoint_of_other_classes(folders, tmp_path):
    other = _teacher(tmp_path / "two.pt", 0, classes=("a", "b"))
    out = _train("--evaluate", str(other), "--val", str(folders / "val"), check=False)
    assert _one_line_error(out) == "train.py: error: expected --evaluate with the 3 classes of --val, got 2"
    missing = _train("--evaluate", str(tmp_path / "none.pt"), "--val", str(folders / "val"), check=False)
    assert "--evaluate: expected a checkpoint file, got" in _one_line_error(missing)


# ----------------------------------------------------------------------------------------
# --targets online (item 3)


def test_online_targets_are_the_teachers_softmax_of_the_labels_arms_batch(folders):
    from wds_reinforce.cli import training
    from wds_reinforce.cli.teachers import OnlineTargets, load_checkpoints

    args = training_args(folders, targets="online", teacher_checkpoint=[str(folders / "t0.pt")])
    data = training.load_data(args, "folder")
    teacher, _ = load_checkpoints(args.teacher_checkpoint, "--teacher-checkpoint", torch.device("cpu"))
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    class Recorded(OnlineTargets):
        def __call__(self, images):
            probs = super().__call__(images)
            seen.append((images.clone(), probs.clone()))
            return probs

    online = Recorded(teacher, torch.device("cpu"))
    dataset, sampler, loader = training.loader_for(data, args, 0, 1, 0)
    trainer = training.Trainer(args, len(CLASSES), torch.device("cpu"), 12 // 4, False, targets=online)
    sampler.set_epoch(0)
    trainer.epoch(0, loader)
    assert len(seen) == 3 and online.forwards == 12 and online.seconds > 0
    order = list(iter(sampler))
    for b, (images, probs) in enumerate(seen):
        # The batch is the labels arm's (fresh augmentation of this epoch), the targets the teacher's softmax.
        assert torch.equal(images, torch.stack([dataset[i][0] for i in order[4 * b : 4 * b + 4]]))
        assert torch.allclose(probs.double(), _softmax_of(folders / "t0.pt", images), atol=1e-5)
        assert not torch.equal(probs, dataset[order[4 * b]][1].expand_as(probs))  # not the one-hot targets


def test_online_run_reports_the_teachers_cost(folders):
    args = ["--data", str(folders / "train"), "--val", str(folders / "val"), "--targets", "online"]
    args += ["--model", "test_resnet", "--image-size", "32", "--epochs", "2", "--batch-size", "4", "--workers", "0"]
    out = _train(
        *args, "--teacher-checkpoint", str(folders / "t0.pt"), "--teacher-checkpoint", str(folders / "t1.pt"), "--json"
    )
    result = _result(out)
    assert result["targets"] == "online" and result["steps"] == 2 * 3 and result["teacher"] == ["test_resnet"] * 2
    assert result["teacher_forwards"] == 2 * 3 * 4 * 2 and result["teacher_seconds"] >= 0  # steps x batch x members
    assert set(result) >= {"top1", "top5", "nll", "ece", "teacher_forwards", "teacher_seconds", "init"}
    epochs = [line for line in out.stdout.splitlines() if line.startswith("epoch ")]
    assert len(epochs) == 2 and all(", teacher 24 forwards in " in line and ", val top-1 " in line for line in epochs)
    assert all(", NLL " in line and ", ECE " in line for line in epochs)
    labels = _result(_train(*[a if a != "online" else "labels" for a in args], "--json"))
    assert labels["teacher_forwards"] == 0 and labels["teacher_seconds"] == 0.0


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--targets", "online"], "expected --teacher-checkpoint CHECKPOINT (repeatable) with --targets online"),
        (
            ["--targets", "labels", "--teacher-checkpoint", "T"],
            "expected --targets online with --teacher-checkpoint, got --targets labels",
        ),
        (
            ["--targets", "online", "--teacher-checkpoint", "TWO"],
            "expected --teacher-checkpoint with the 3 classes of --data, got 2",
        ),
    ],
)
def test_online_argument_errors(folders, tmp_path, extra, message):
    two = str(_teacher(tmp_path / "two.pt", 0, classes=("a", "b")))
    extra = [str(folders / "t0.pt") if a == "T" else two if a == "TWO" else a for a in extra]
    out = _train("--data", str(folders / "train"), "--model", "test_resnet", "--image-size", "32", *extra, check=False)
    assert _one_line_error(out) == f"train.py: error: {message}"


# ----------------------------------------------------------------------------------------
# --init: fine-tuning (issue 20, item 4)


def training_args(folders: Path, **over) -> argparse.Namespace:
    from wds_reinforce.cli.train import build_parser

    args = build_parser().parse_args(["--data", str(folders / "train"), "--targets", "labels", "--image-size", "32"])
    args.model, args.batch_size, args.epochs = "test_resnet", 4, 1
    for key, value in over.items():
        setattr(args, key, value)
    return args


def _two_class_folder(root: Path) -> Path:
    for c, name in enumerate(("ant", "bee")):
        (root / name).mkdir(parents=True)
        for i in range(4):
            (root / name / f"{i}.jpg").write_bytes(encode(photo_like(40, 44, 700 + 10 * c + i)))
    return root


def test_fine_tune_from_a_saved_checkpoint_keeps_the_backbone_and_replaces_the_head(folders, tmp_path):
    from wds_reinforce.cli import training

    ckpt = tmp_path / "pre.pt"
    _train("--data", str(folders / "train"), "--targets", "labels", "--model", "test_resnet", "--image-size", "32",
           "--epochs", "1", "--batch-size", "4", "--workers", "0", "--save", str(ckpt))  # fmt: skip
    saved = torch.load(ckpt, weights_only=True)["state_dict"]
    two = _two_class_folder(tmp_path / "two")

    # The model before the first step: the saved backbone, a fresh 2-class head.
    args = training_args(folders, data=str(two), init=str(ckpt), model=None)
    from wds_reinforce.cli.finetune import resolve_model

    args.model = resolve_model(args.init, args.model)
    assert args.model == "test_resnet"  # taken from the checkpoint
    trainer = training.Trainer(args, 2, torch.device("cpu"), 2, False)
    state = trainer.model.state_dict()
    assert state["fc.weight"].shape == (2, saved["fc.weight"].shape[1]) and state["fc.bias"].shape == (2,)
    backbone = [k for k in saved if not k.startswith("fc.")]
    assert backbone and all(torch.equal(state[k], saved[k]) for k in backbone)
    assert all(p.requires_grad for p in trainer.model.parameters())

    out = _train("--data", str(two), "--targets", "labels", "--init", str(ckpt), "--image-size", "32",
                 "--epochs", "1", "--batch-size", "4", "--workers", "0", "--opt", "sgd", "--lr", "0.002",
                 "--warmup", "0", "--json", "--save", str(tmp_path / "ft.pt"))  # fmt: skip
    result = _result(out)
    assert result["init"] == str(ckpt) and result["model"] == "test_resnet" and result["steps"] == 2
    assert f"training timm:test_resnet from {ckpt} on 8 samples, 2 classes" in out.stdout
    assert torch.load(tmp_path / "ft.pt", weights_only=True)["state_dict"]["fc.weight"].shape[0] == 2


def _fake_hf_cache(cache: Path, model: str = "test_resnet") -> dict[str, torch.Tensor]:
    """timm's pretrained weights of ``model`` laid out as the Hugging Face hub caches them (no download)."""
    import timm
    from safetensors.torch import save_file
    from timm.models import get_pretrained_cfg

    torch.manual_seed(3)
    state = {k: v.contiguous() for k, v in timm.create_model(model).state_dict().items()}
    repo = cache / f"models--{get_pretrained_cfg(model).hf_hub_id.replace('/', '--')}"
    (repo / "snapshots" / ("0" * 40)).mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    save_file(state, str(repo / "snapshots" / ("0" * 40) / "model.safetensors"))
    return state


def test_fine_tune_from_timm_weights_in_the_local_cache(tmp_path, monkeypatch):
    import huggingface_hub.constants

    from wds_reinforce.cli.finetune import initial_model

    pretrained = _fake_hf_cache(tmp_path / "hub")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    net = initial_model("timm:test_resnet", "test_resnet", 2)
    state = net.state_dict()
    assert state["fc.weight"].shape[0] == 2 and net.num_classes == 2
    assert all(torch.equal(state[k], v) for k, v in pretrained.items() if not k.startswith("fc."))


def test_bad_init_is_a_one_line_error(folders, tmp_path):
    base = ["--data", str(folders / "train"), "--targets", "labels", "--image-size", "32"]
    env = {**ENV, "HF_HUB_CACHE": str(tmp_path / "empty-hub"), "TORCH_HOME": str(tmp_path / "torch")}
    uncached = _one_line_error(_train(*base, "--init", "timm:resnet10t", check=False, env=env))
    assert uncached.startswith("train.py: error: no cached pretrained weights for --init timm:resnet10t (looked in ")
    assert str(tmp_path / "empty-hub") in uncached and str(tmp_path / "torch" / "hub" / "checkpoints") in uncached
    assert "timm.create_model('resnet10t', pretrained=True)" in uncached
    missing = _one_line_error(_train(*base, "--init", str(tmp_path / "none.pt"), check=False))
    none = str(tmp_path / "none.pt")
    assert missing == f"train.py: error: expected --init timm:NAME or a checkpoint file, got {none!r} (not found)"
    (tmp_path / "junk.pt").write_text("not a checkpoint")
    junk = _one_line_error(_train(*base, "--init", str(tmp_path / "junk.pt"), check=False))
    assert junk.startswith("train.py: error: --init: expected a torch checkpoint at ")
    tagged = _one_line_error(_train(*base, "--init", "timm:resnet10t.no_such_tag", check=False))
    assert tagged.endswith("pretrained weights, got timm:resnet10t.no_such_tag")
    other = _one_line_error(_train(*base, "--init", str(folders / "t0.pt"), "--model", "resnet18", check=False))
    assert (
        other
        == f"train.py: error: expected --model test_resnet as --init {folders / 't0.pt'} holds, got --model resnet18"
    )


def test_evaluate_on_a_bad_val_is_a_one_line_error(folders, tmp_path):
    (tmp_path / "empty").mkdir()
    for val, said in (
        (tmp_path / "empty", "empty source"),
        ("http://127.0.0.1:9/x-{0..1}.tar", "unknown source 'http'"),
    ):
        line = _one_line_error(_train("--evaluate", str(folders / "t0.pt"), "--val", str(val), check=False))
        assert line.startswith("train.py: error: --val: ") and said in line


def test_save_makes_its_folder_before_training(folders, tmp_path):
    save = tmp_path / "new" / "deeper" / "model.pt"
    args = ["--data", str(folders / "train"), "--targets", "labels", "--image-size", "32", "--epochs", "1"]
    _train(*args, "--batch-size", "4", "--model", "test_resnet", "--save", str(save))
    assert torch.load(save, weights_only=True)["arch"] == "timm:test_resnet"
