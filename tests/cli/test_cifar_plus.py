"""A CIFAR-like run end to end (issue 20): cifar100+ shards from a small folder, fine-tuned from a --save checkpoint.

32x32 PNGs in an ImageFolder (what ``cifar100:ROOT`` becomes), a tiny model pretrained on
another folder with ``train.py --save``, ``make_shards.py --recipe cifar100+ --image-size 32``
with a random-weight teacher, then ``train.py --data SHARDS --init pre.pt --val VAL`` with
apple/ml-dr's fine-tuning hyper-parameters: it prints its accuracy, its head has the shards'
classes, and it trained and evaluated with CIFAR-100's normalisation, which its checkpoint
keeps, so that ``--evaluate`` reports the same numbers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from tests.conftest import encode, photo_like
from wds_reinforce.core.augment import CIFAR100_MEAN, CIFAR100_STD

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _tool(name: str, *args: str) -> subprocess.CompletedProcess:
    out = subprocess.run(
        [sys.executable, str(ROOT / "tools" / name), *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=ENV,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Traceback" not in out.stderr
    return out


def _cifar_like(root: Path, classes: tuple[str, ...], per_class: int, seed: int) -> Path:
    """An ImageFolder of 32x32 PNGs (CIFAR's size; make_shards' cifar100: source writes PNG too)."""
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            (root / name / f"{i:03d}.png").write_bytes(encode(photo_like(32, 32, seed + 100 * c + i), "PNG"))
    return root


def test_cifar100_plus_shards_fine_tuned_from_a_saved_checkpoint(tmp_path):
    classes = ("apple", "bee", "cloud")
    train = _cifar_like(tmp_path / "cifar" / "train", classes, per_class=4, seed=0)
    val = _cifar_like(tmp_path / "cifar" / "val", classes, per_class=2, seed=50)
    other = _cifar_like(tmp_path / "other", ("ant", "bus"), per_class=4, seed=90)
    small = ["--epochs", "1", "--batch-size", "4", "--workers", "0", "--device", "cpu"]

    # 1. A backbone pretrained on other data, saved.
    pre = tmp_path / "pre.pt"
    _tool("train.py", "--data", str(other), "--targets", "labels", "--model", "test_resnet", "--image-size", "32",
          *small, "--save", str(pre))  # fmt: skip

    # 2. cifar100+ shards at 32 px, from a random-weight teacher of the folder's classes.
    shards = tmp_path / "shards"
    _tool("make_shards.py", "--source", str(train), "--teacher", "timm:test_resnet", "--teacher-num-classes", "3",
          "--recipe", "cifar100+", "--image-size", "32", "--rounds", "2", "--topk", "2", "--shard-size", "6",
          "--workers", "0", "--device", "cpu", "--out", str(shards), "--no-progress")  # fmt: skip
    manifest = json.loads((shards / "manifest.json").read_text())
    crop = manifest["recipe"]["ops"][1]
    assert manifest["recipe"]["size"] == [32, 32] and (crop["op"], crop["padding"]) == ("random_crop", 2)
    assert manifest["recipe"]["normalize"] == {"mean": list(CIFAR100_MEAN), "std": list(CIFAR100_STD)}
    seen = manifest["teacher"]["members"][0]
    assert seen["crop"]["op"] == "random_crop" and [op["op"] for op in seen["geometry"]] == ["resize", "random_crop"]

    # 3. Fine-tuned from the checkpoint, ml-dr's ft_plus.yaml hyper-parameters (fewer epochs).
    ft = tmp_path / "ft.pt"
    out = _tool("train.py", "--data", str(shards), "--init", str(pre), "--val", str(val), *small, "--opt", "sgd",
                "--lr", "0.002", "--weight-decay", "5e-4", "--warmup", "0", "--label-smoothing", "0.1",
                "--p", "0.99", "--densify", "smooth", "--json", "--save", str(ft))  # fmt: skip
    lines = out.stdout.strip().splitlines()
    assert f"training timm:test_resnet from {pre} on 12 samples, 3 classes (reinforced)" in lines[0]
    assert lines[1].startswith("epoch 1/1: loss ") and ", val top-1 " in lines[1] and "NLL" in lines[1]
    result = json.loads(lines[-1])
    assert result["init"] == str(pre) and result["steps"] == 3
    assert 0 <= result["top1"] <= 100 and result["nll"] > 0
    assert result["normalize"] == {"mean": list(CIFAR100_MEAN), "std": list(CIFAR100_STD), "from": "recipe"}
    saved = torch.load(ft, weights_only=True)
    assert saved["num_classes"] == 3 and saved["class_names"] == list(classes)
    assert saved["state_dict"]["fc.weight"].shape[0] == 3  # the new head: the shards' classes, not the 2 of pre.pt
    assert saved["normalize"] == {"mean": list(CIFAR100_MEAN), "std": list(CIFAR100_STD)}

    # 4. The checkpoint evaluated later: the same normalisation, so the same numbers.
    again = _tool("train.py", "--evaluate", str(ft), "--val", str(val), "--device", "cpu", "--json")
    again = json.loads(again.stdout.splitlines()[-1])
    assert (again["top1"], again["nll"]) == (result["top1"], result["nll"])
