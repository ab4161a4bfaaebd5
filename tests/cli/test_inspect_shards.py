"""The inspect CLI: the teacher recheck's hint on other weights, and the rounds picture."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.producer_data import TEACHER, job_args, make_image_folder
from wds_reinforce.produce.make import make_shards

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
import inspect_shards as cli  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """Shards of a teacher with a checkpoint, made with a recipe file."""
    import timm

    root = tmp_path_factory.mktemp("inspect")
    src = make_image_folder(root / "src", per_class=3, corrupt=False)
    ckpt = root / "teacher.pt"
    torch.manual_seed(3)
    torch.save(timm.create_model("test_resnet", num_classes=3).state_dict(), ckpt)
    out = root / "out"
    args = job_args(image_size=32)
    args.pop("teacher_num_classes")
    make_shards(str(src), TEACHER, out=str(out), teacher_checkpoint=str(ckpt), **args)
    return out, ckpt


def test_recheck_with_the_manifests_teacher_and_the_checkpoint(made, capsys):
    out, ckpt = made
    assert cli.main([str(out), "--teacher-checkpoint", str(ckpt), "--checks", "4", "--device", "cpu"]) == 0
    assert "top-1 agreement 100.0%" in capsys.readouterr().out


def test_recheck_with_other_weights_says_the_weights_differ(made, capsys):
    out, _ = made
    assert cli.main([str(out), "--teacher", TEACHER, "--checks", "4", "--device", "cpu", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "the teacher's weights differ from the ones the shards were made with" in err
    assert "from teacher.pt); pass that checkpoint with --teacher-checkpoint" in err


def test_rounds_picture_is_enlarged_and_labelled(made, capsys, monkeypatch):
    from PIL import ImageDraw

    texts: list[str] = []
    draw_text = ImageDraw.ImageDraw.text
    monkeypatch.setattr(
        ImageDraw.ImageDraw,
        "text",
        lambda self, xy, text, *a, **k: texts.append(text) or draw_text(self, xy, text, *a, **k),
    )
    out, _ = made
    png = out.parent / "rounds.png"
    assert cli.main([str(out), "--grid", str(png), "--key", "dog_img_2"]) == 0
    assert texts[0] == "dog_img_2: label dog (1); 3 of 3 rounds, teacher's top-3 under each"
    assert texts[1] == "recipe rrc at 32x32 px, shown x4"
    tops = [t for t in texts if re.search(r": [01]\.\d\d$", t)]  # 3 rounds' top-2: "dog (1): 0.41", never "1 0.41"
    assert len(tops) == 6 and all(re.fullmatch(r"(cat|dog|eel) \([012]\): [01]\.\d\d", t) for t in tops)
    image = np.asarray(Image.open(png).convert("RGB"))
    # 3 rounds of 32 px shown x4: 128 px tiles (nearest), 4 columns of at least 150 px.
    assert image.shape[1] == 4 * 150 and image.shape[0] == 34 + 128 + 60
    tile = image[34 : 34 + 128, :128]
    assert (tile[::4, ::4] == tile[3::4, 3::4]).all()  # nearest: every 4x4 block is one pixel
    assert "wrote" in capsys.readouterr().out


@pytest.mark.parametrize("to", ["file", "pipe"])
def test_progress_off_a_terminal_is_a_line_per_shard(made, tmp_path, to):
    import json
    import subprocess

    out, _ = made
    shards = json.loads((out / "manifest.json").read_text())["shards"]
    tool = Path(__file__).resolve().parents[2] / "tools" / "inspect_shards.py"
    command = [sys.executable, str(tool), str(out), "--no-decode"]
    if to == "file":
        with open(tmp_path / "log", "w") as log:
            assert subprocess.run(command, stdout=subprocess.DEVNULL, stderr=log).returncode == 0
        err = (tmp_path / "log").read_bytes()
    else:
        err = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE).stderr
    assert b"\r" not in err  # bytes: text mode would read a carriage return as a newline
    lines = err.decode().split("\n")[:-1]
    assert len(lines) == len(shards) >= 2
    for i, (line, shard) in enumerate(zip(lines, shards), 1):
        assert line.startswith(f"verify: shard {i}/{len(shards)} done ({shard['name']}); ")
