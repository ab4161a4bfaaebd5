from __future__ import annotations

import pytest
import torch

from wds_reinforce.cli import demo
from wds_reinforce.cli.demo import DEMO_CLASSES, DEMO_SIZE, QUICK, run_demo
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
    assert any("on the full demo: ~1 minute" in line for line in lines)  # figures not of these settings
    assert [line.split(": loss")[0] for line in lines if "teacher epoch" in line] == ["  teacher epoch 1/1"]
    assert any(line.startswith("  teacher epoch 1/1") and line.endswith(", ETA 0s)") for line in lines)
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


def test_the_cached_teacher_is_kept_only_for_the_same_epochs(tmp_path):
    torch.set_num_threads(1)
    root = tmp_path / "demo"
    run_demo(root, per_class=11, rounds=2, epochs=1, log=lambda line: None)
    lines: list[str] = []
    run_demo(root, per_class=11, rounds=2, epochs=2, log=lines.append)
    assert [line.split(": loss")[0] for line in lines if "teacher epoch" in line] == [
        "  teacher epoch 1/2",
        "  teacher epoch 2/2",
    ]
    assert " ETA " in lines[2] and not any("reusing" in line and ".pt" in line for line in lines)
    lines.clear()
    run_demo(root, per_class=11, rounds=2, epochs=2, log=lines.append)
    assert any(line.startswith("[2/3] teacher: reusing") and "(2 epochs)" in line for line in lines)


def test_the_teacher_line_has_the_time_left():
    # At epoch 5 of 12 after 41 minutes: 7 more epochs at 8.2 minutes each.
    assert demo._epoch_line(4, 12, 0.5, 0.8, 41 * 60) == (
        "  teacher epoch 5/12: loss 0.500, val acc 80.0% (elapsed 41m00s, ETA 57m24s)"
    )


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        ([], {}),
        (["--epochs", "3"], {"epochs": 3}),
        (["--quick"], QUICK),
        (["--quick", "--epochs", "5"], {**QUICK, "epochs": 5}),
        (["--epochs", "1", "--root", "elsewhere"], {"epochs": 1, "root": "elsewhere"}),
    ],
)
def test_the_command_passes_epochs_and_quick_to_the_demo(monkeypatch, argv, expected):
    calls: list[dict] = []
    monkeypatch.setattr(demo, "run_demo", lambda **kw: calls.append(kw))
    assert demo.main(argv) == 0
    assert calls == [expected]


def test_quick_is_short_and_in_its_own_folder():
    assert QUICK["root"] != "shards/demo" and QUICK["epochs"] < 12 and QUICK["per_class"] < 400


def test_bad_epochs_is_a_one_line_error(monkeypatch, capsys):
    monkeypatch.setattr(demo, "run_demo", lambda **kw: pytest.fail("the demo ran"))
    assert demo.main(["--epochs", "0"]) == 2
    assert capsys.readouterr().err == "demo.py: error: expected --epochs >= 1, got 0\n"
