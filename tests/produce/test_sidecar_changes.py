"""Adding rounds or a teacher to a sidecar set whose image shards changed since: refused before
anything is written, naming the image shard and the round group made from it."""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

from tests.produce.test_sidecar_sets import JOB, make_image_shards
from tests.producer_data import TEACHER
from wds_reinforce.core.errors import DataError
from wds_reinforce.core.format import Manifest
from wds_reinforce.produce.make import make_shards
from wds_reinforce.produce.teacher import load_teacher
from wds_reinforce.produce.teacher_sets import add_teacher_set

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[2]
SETS = dict(sidecars_only=True, round_group=2, **JOB)
FIRST = "rounds-00000-00001"  # the first group of a set of 4 rounds in groups of 2


@pytest.fixture
def made(tmp_path) -> tuple[list[Path], Path]:
    """Three image shards and a sidecar set of 4 rounds in 2 groups made from them."""
    images = make_image_shards(tmp_path / "images")
    out = tmp_path / "sets"
    make_shards([str(p) for p in images], TEACHER, out=str(out), rounds=4, **SETS)
    return images, out


def listing(root: Path) -> dict[str, tuple[int, str] | None]:
    """Every folder and file under ``root``, files with their size and sha256."""
    return {
        str(p.relative_to(root)): (p.stat().st_size, hashlib.sha256(p.read_bytes()).hexdigest())
        if p.is_file()
        else None
        for p in sorted(root.rglob("*"))
    }


def change(shard: Path, how: str) -> None:
    """Change an image shard in place: one byte inside an image (same keys), or its last sample dropped."""
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    if how == "byte":
        data = bytearray(shard.read_bytes())
        jpg = next(m for m, _ in members if m.name.endswith(".jpg"))
        data[jpg.offset_data + 100] ^= 0x20
        shard.write_bytes(bytes(data))
        return
    last = members[-1][0].name.split(".")[0]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for info, data in members:
            if info.name.split(".")[0] != last:
                tar.addfile(info, io.BytesIO(data))
    shard.write_bytes(buf.getvalue())


def _refusal(shard: Path) -> str:
    return rf"^{shard}: image shard changed since {FIRST} was made from it \(sha256 [0-9a-f]{{12}}\.\.\., now "


@pytest.mark.parametrize("how", ["byte", "dropped"])
def test_adding_rounds_after_an_image_shard_changed_writes_nothing(made, how):
    images, out = made
    change(images[1], how)
    before = listing(out)
    with pytest.raises(DataError, match=_refusal(images[1])) as err:
        make_shards([str(p) for p in images], TEACHER, out=str(out), rounds=8, **SETS)
    assert err.value.url == str(images[1]) and err.value.samples == 3  # the shard's samples, as made
    assert listing(out) == before


@pytest.mark.parametrize("how", ["byte", "dropped"])
def test_adding_a_teacher_after_an_image_shard_changed_writes_nothing(made, how):
    images, out = made
    change(images[2], how)
    before = listing(out)
    second = load_teacher("timm:test_efficientnet", num_classes=3, device="cpu")
    with pytest.raises(DataError, match=_refusal(images[2])):
        add_teacher_set(str(out), second, "second", batch_size=1, progress=False)
    assert listing(out) == before


def test_a_rank_refuses_for_another_ranks_image_shard(made, monkeypatch):
    """Rank 1 of 2 makes image shard 1 only, yet checks shard 0 too: no rank writes while another refuses."""
    images, out = made
    change(images[0], "byte")
    before = listing(out)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(DataError, match=_refusal(images[0])):
        make_shards([str(p) for p in images], TEACHER, out=str(out), rounds=8, **SETS)
    assert listing(out) == before


def test_the_cli_refuses_in_one_line_with_exit_2(made):
    images, out = made
    change(images[1], "byte")
    before = listing(out)
    common = ["--teacher-num-classes", "3", "--device", "cpu", "--batch-size", "1", "--out", str(out), "--no-progress"]
    add_rounds = [
        "--source",
        str(images[0]).replace("000000", "{000000..000002}"),
        "--sidecars-only",
        "--round-group",
        "2",
        "--rounds",
        "8",
    ]
    add_rounds += ["--teacher", TEACHER, "--image-size", "32", "--topk", "2", "--workers", "0", "--seed", "7"]
    add_teacher = ["--add-teacher", "second", "--teacher", "timm:test_efficientnet"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    for argv in ([*common, *add_rounds], [*common, *add_teacher]):
        proc = subprocess.run(
            [sys.executable, str(ROOT / "tools" / "make_shards.py"), *argv],
            capture_output=True,
            text=True,
            env=env,
            timeout=300,
        )
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        assert len(lines) == 1 and lines[0].startswith(f"make_shards.py: error: {images[1]}: image shard changed since")
        assert f"since {FIRST} was made from it" in lines[0]
    assert listing(out) == before


def test_unchanged_image_shards_take_new_rounds_and_a_teacher(made):
    images, out = made
    made_before = listing(out)
    summary = make_shards([str(p) for p in images], TEACHER, out=str(out), rounds=8, **SETS)
    assert (summary.made, summary.reused) == (6, 6)
    assert all(listing(out)[name] == entry for name, entry in made_before.items() if name.startswith("rounds-"))
    second = load_teacher("timm:test_efficientnet", num_classes=3, device="cpu")
    manifest = add_teacher_set(str(out), second, "second", batch_size=1, progress=False)
    assert [t.name for t in manifest.teacher_sets] == ["second"] and len(manifest.teacher_sets[0].groups) == 4
    assert Manifest.from_json((out / "manifest.json").read_text()).rounds == 8
