from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import encode, photo_like
from tests.producer_data import CLASSES, make_image_folder, make_wds_shard
from tests.shardmaker import make_shards
from wds_reinforce.cli.training import lr_factor

ROOT = Path(__file__).resolve().parents[2]
TOOL = str(ROOT / "tools" / "train.py")
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _train(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, TOOL, *args], capture_output=True, text=True, cwd=ROOT, env=ENV, check=check, timeout=300
    )


def _result(out: subprocess.CompletedProcess) -> dict:
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture
def data(tmp_path):
    make_shards(tmp_path / "ds", num_shards=2, per_shard=8, rounds=3, num_classes=3, size=32, record_pixels=False)
    for c in range(3):
        folder = tmp_path / "val" / f"c{c}"
        folder.mkdir(parents=True)
        for i in range(2):
            (folder / f"{i}.jpg").write_bytes(encode(photo_like(40, 40, 100 * c + i)))
    return tmp_path


@pytest.mark.parametrize("targets", ["reinforced", "labels"])
def test_train_runs_and_reports(data, targets):
    out = subprocess.run(
        [
            sys.executable,
            str(ROOT / "tools" / "train.py"),
            "--data",
            str(data / "ds"),
            "--val",
            str(data / "val"),
            "--epochs",
            "2",
            "--batch-size",
            "4",
            "--workers",
            "0",
            "--targets",
            targets,
            "--json",
            "--save",
            str(data / "model.pt"),
        ],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["targets"] == targets and result["steps"] == 2 * (16 // 4)
    assert 0 <= result["top1"] <= 100
    assert [line.split(":")[0] for line in out.stdout.splitlines() if line.startswith("epoch")] == [
        "epoch 1/2",
        "epoch 2/2",
    ]
    import torch

    saved = torch.load(data / "model.pt", weights_only=True)
    assert saved["arch"] == "timm:resnet10t" and saved["num_classes"] == 3 and saved["image_size"] == [32, 32]
    assert any(k.endswith("weight") for k in saved["state_dict"])


@pytest.mark.parametrize(
    "targets, expected",
    [
        ("labels", "an ImageFolder directory, a webdataset .tar pattern or reinforced shards"),
        ("reinforced", "reinforced shards (a folder holding manifest.json, or the manifest)"),
    ],
)
def test_train_missing_data_names_the_flag_and_what_it_reads(tmp_path, targets, expected):
    missing = str(tmp_path / "none")
    out = _train("--data", missing, "--val", str(tmp_path), "--targets", targets, check=False)
    assert out.returncode == 2
    assert out.stderr.strip() == f"train.py: error: expected --data {expected}, got {missing!r} (not found)"


def test_train_bad_recipe_is_a_one_line_error(data):
    out = subprocess.run(
        [
            sys.executable,
            str(ROOT / "tools" / "train.py"),
            "--data",
            str(data / "ds"),
            "--val",
            str(data / "val"),
            "--recipe",
            "rrc+mixup",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert out.returncode == 2
    assert out.stderr.startswith("train.py: error: expected --recipe a preset (center, ")
    assert "got 'rrc+mixup': no such preset, file or folder" in out.stderr and "Traceback" not in out.stderr


def test_train_under_torchrun_with_two_cpu_ranks(data):
    """DDP on gloo: both ranks step together and rank 0 reports."""
    make_shards(data / "ds4", num_shards=4, per_shard=8, rounds=3, num_classes=3, size=32, record_pixels=False)
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            str(ROOT / "tools" / "train.py"),
            "--data",
            str(data / "ds4"),
            "--val",
            str(data / "val"),
            "--epochs",
            "1",
            "--batch-size",
            "4",
            "--workers",
            "1",
            "--json",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads([line for line in out.stdout.splitlines() if line.startswith("{")][-1])
    assert result["steps"] == 32 // (4 * 2)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--p", "1.5"], "expected --p in [0, 1], got 1.5"),
        (["--batch-size", "0"], "expected --batch-size >= 1, got 0"),
        (["--val", "/nonexistent/val"], "/nonexistent/val"),
    ],
)
def test_train_bad_arguments_are_one_line_errors(data, extra, message):
    args = ["--data", str(data / "ds"), "--val", str(data / "val"), *extra]
    out = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "train.py"), *args], capture_output=True, text=True, cwd=ROOT
    )
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.startswith("train.py: error: ") and message in out.stderr


# ----------------------------------------------------------------------------------------
# A teacher from a folder or plain shards, then shards from its checkpoint as it is (issue 11, item 1)


def test_labels_from_an_image_folder_then_make_shards_takes_the_checkpoint_as_it_is(tmp_path):
    src = make_image_folder(tmp_path / "src", per_class=4)  # 12 images and one broken file
    val = make_image_folder(tmp_path / "val", per_class=2, corrupt=False, seed=50)
    ckpt = tmp_path / "teacher.pt"
    out = _train(
        "--data", str(src), "--val", str(val), "--targets", "labels", "--model", "test_resnet",
        "--image-size", "32", "--epochs", "2", "--batch-size", "4", "--workers", "0", "--json", "--save", str(ckpt),
    )  # fmt: skip
    result = _result(out)
    assert result["steps"] == 2 * (13 // 4) and result["recipe"]["size"] == [32, 32]
    assert result["recipe"]["ops"][0]["op"] == "rrc"
    assert "skipped sample dog_broken" in out.stderr and "Traceback" not in out.stderr
    assert "note:" not in out.stderr  # a teacher (--save): no shards to compare it with yet
    # No --teacher: the checkpoint names its model and classes.
    shards = tmp_path / "shards"
    made = subprocess.run(
        [
            sys.executable, str(ROOT / "tools" / "make_shards.py"), "--source", str(src),
            "--teacher-checkpoint", str(ckpt), "--image-size", "32", "--rounds", "2", "--shard-size", "5",
            "--workers", "0", "--device", "cpu", "--out", str(shards), "--no-progress",
        ],
        capture_output=True, text=True, env=ENV, timeout=300,
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    manifest = json.loads((shards / "manifest.json").read_text())
    assert manifest["teacher"]["members"][0]["name"] == "test_resnet" and manifest["topk"] == len(CLASSES)
    assert manifest["teacher"]["members"][0]["checkpoint"] == "teacher.pt"


def test_labels_from_plain_webdataset_shards(tmp_path):
    shard = make_wds_shard(tmp_path / "plain" / "train-000000.tar", per_class=3)  # 9 images, one without
    out = _train(
        "--data", str(shard), "--targets", "labels", "--model", "test_resnet", "--image-size", "32",
        "--epochs", "1", "--batch-size", "3", "--workers", "1", "--json",
    )  # fmt: skip
    result = _result(out)
    assert result["steps"] == 10 // 3 and result["top1"] is None and result["workers"] == 1
    assert "skipped sample nopic" in out.stderr


def test_reinforced_targets_need_reinforced_shards(tmp_path):
    src = make_image_folder(tmp_path / "src", per_class=2, corrupt=False)
    out = _train("--data", str(src), check=False)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip() == (
        f"train.py: error: expected reinforced shards (a folder or URL holding manifest.json) for --targets "
        f"reinforced, got an ImageFolder {str(src)!r}: make them with make_shards.py, or train on labels with "
        f"--targets labels"
    )


def test_unknown_model_is_a_one_line_error(data):
    out = _train("--data", str(data / "ds"), "--model", "no_such_net", check=False)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip() == (
        "train.py: error: unknown --model 'no_such_net'; expected a timm model name (see timm.list_models())"
    )


# ----------------------------------------------------------------------------------------
# The labels arm's augmentation (item 5)


def test_labels_arm_takes_the_recipe_of_reinforced_shards(data, tmp_path):
    src = make_image_folder(tmp_path / "src", per_class=3, corrupt=False)
    shards_recipe = json.loads((data / "ds" / "manifest.json").read_text())["recipe"]
    args = ["--data", str(src), "--targets", "labels", "--model", "test_resnet", "--epochs", "1"]
    args += ["--batch-size", "3", "--workers", "0", "--json"]
    taken = _train(*args, "--recipe", str(data / "ds"))
    result = _result(taken)
    assert result["recipe"]["ops"] == shards_recipe["ops"] and result["recipe"]["size"] == shards_recipe["size"]
    assert "note:" not in taken.stderr
    default = _train(*args, "--image-size", "32")
    assert "train.py: note: the labels arm uses rrc: rrc(scale 0.08-1) + flip at 32x32 px" in default.stderr
    assert "pass --recipe SHARDS" in default.stderr


# ----------------------------------------------------------------------------------------
# Warm-up as a fraction of the run (item 3); defaults in --help and thread choice (item 2)


def test_warmup_is_a_fraction_and_a_one_epoch_run_decays():
    total = 10  # a 1-epoch run of 10 steps
    factors = [lr_factor(step, total, 0.1) for step in range(total)]
    assert factors[0] == 1.0  # 1 warm-up step
    assert factors == sorted(factors, reverse=True) and factors[-1] < 0.05
    two_epochs = [lr_factor(step, 200, 0.1) for step in range(200)]
    assert two_epochs.index(max(two_epochs)) == 19  # 10 % warms up, not half the run
    assert lr_factor(0, 5, 0.0) == 1.0


def test_help_shows_defaults_and_the_thread_choice():
    out = _train("--help")
    text = " ".join(out.stdout.split())
    assert "(default: 10)" in text and "(default: 0.1)" in text  # --epochs, --warmup
    assert "cores available ->" in text and "workers," in text and "threads" in text


def test_bad_warmup_is_refused_before_loading_anything(data):
    out = _train("--data", str(data / "ds"), "--warmup-epochs", "1", check=False)
    assert out.returncode == 2 and "unrecognized arguments: --warmup-epochs" in out.stderr
    out = _train("--data", str(data / "ds"), "--warmup", "1.5", check=False)
    assert out.returncode == 2
    assert out.stderr.strip() == "train.py: error: expected --warmup in [0, 1) (a fraction of the run), got 1.5"


# ----------------------------------------------------------------------------------------
# Progress within an epoch (issue 21, item 11)


def test_progress_lines_within_an_epoch(data):
    out = _train(
        "--data", str(data / "ds"), "--epochs", "2", "--batch-size", "4", "--workers", "0", "--json",
        "--progress-every", "0",
    )  # fmt: skip
    steps = [line for line in out.stderr.splitlines() if ": step " in line]
    assert [line.split(" (")[0] for line in steps] == [
        f"  epoch {e}/2: step {s}/4" for e in (1, 2) for s in (1, 2, 3, 4)
    ]
    assert all(" steps/s, elapsed " in line and " for the epoch, " in line for line in steps)
    assert steps[-1].endswith("ETA 0s for the epoch, 0s for the run's training steps")
    assert "\r" not in out.stderr and _result(out)["steps"] == 8
    quiet = _train("--data", str(data / "ds"), "--epochs", "1", "--batch-size", "4", "--workers", "0", "--json")
    assert ": step " not in quiet.stderr  # the default: a line per 30 s
