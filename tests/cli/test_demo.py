from __future__ import annotations

import torch

from wds_reinforce.cli.demo import DEMO_CLASSES, DEMO_SIZE, run_demo
from wds_reinforce.core.format import Manifest


def test_tiny_demo_runs_offline_and_reuses_its_cache(tmp_path):
    torch.set_num_threads(1)
    lines: list[str] = []
    root = tmp_path / "demo"
    first = run_demo(root, per_class=11, rounds=2, epochs=1, log=lines.append)
    assert first.samples == 66 and first.made == 1
    manifest = Manifest.from_json((root / "manifest.json").read_text())
    assert manifest.class_names == sorted(DEMO_CLASSES) and manifest.recipe["size"] == [DEMO_SIZE, DEMO_SIZE]
    assert manifest.teacher["members"][0]["checkpoint"].endswith(".pt")
    assert any(line.startswith("next:") and "val top-1" in line for line in lines)
    # The commands the README gives, with the epochs they are timed at.
    assert f"  python tools/train.py --data {root} --val {root}/source/val --epochs 2" in lines
    assert f"  python tools/train.py --data {root} --val {root}/source/val --epochs 2 --targets labels" in lines
    member = manifest.teacher["members"][0]
    assert member["input_size"] == [3, DEMO_SIZE, DEMO_SIZE] and member["crop"]["op"] == "rrc"
    assert manifest.topk == 3
    lines.clear()
    again = run_demo(root, per_class=11, rounds=2, epochs=1, log=lines.append)
    assert (again.made, again.reused) == (0, 1)
    assert any("reusing" in line for line in lines)


def test_demo_remakes_shards_of_another_job(tmp_path):
    torch.set_num_threads(1)
    root = tmp_path / "demo"
    run_demo(root, per_class=11, rounds=2, epochs=1, log=lambda line: None)
    lines: list[str] = []
    again = run_demo(root, per_class=11, rounds=3, epochs=1, log=lines.append)  # other settings, same folder
    assert (again.made, again.reused) == (1, 0)
    assert any("another job" in line for line in lines)
    assert Manifest.from_json((root / "manifest.json").read_text()).rounds == 3
