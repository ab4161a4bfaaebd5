from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import encode, photo_like
from tests.shardmaker import make_shards

ROOT = Path(__file__).resolve().parents[1]


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
    import torch

    state = torch.load(data / "model.pt", weights_only=True)
    assert any(k.endswith("weight") for k in state)


def test_train_missing_data_is_a_one_line_error(tmp_path):
    out = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "train.py"), "--data", str(tmp_path / "none"), "--val", str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert out.returncode == 2
    assert out.stderr.startswith("train.py: error: cannot read") and "Traceback" not in out.stderr


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
    assert out.stderr.startswith("train.py: error: unknown recipe 'rrc+mixup'") and "Traceback" not in out.stderr


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
