"""tools/experiment.py: many students, three arms (labels, reinforced, online KD), the cost table, the break-even."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from wds_reinforce.cli.experiment_report import break_even, ece_floor, format_tables, paired_gain, summarize

ROOT = Path(__file__).resolve().parents[2]
STUDENTS = ["resnet10t", "mobilenetv3_small_100"]
ARMS = ["labels", "reinforced", "online"]


def _teacher(path: Path, seed: int = 0) -> None:
    """A random-init resnet10t teacher checkpoint (``seed`` picks its weights)."""
    import timm
    import torch

    from wds_reinforce.cli.demo import DEMO_CLASSES
    from wds_reinforce.produce.checkpoint import save_checkpoint

    torch.manual_seed(seed)
    net = timm.create_model("resnet10t", num_classes=len(DEMO_CLASSES))
    save_checkpoint(
        path, net.state_dict(), arch="timm:resnet10t", class_names=sorted(DEMO_CLASSES), image_size=[16, 16]
    )


def _tiny_data(tmp_path: Path) -> tuple[Path, Path, Path]:
    """Four demo images per class (24 px), a held-out two per class, a random-init teacher checkpoint."""
    from wds_reinforce.cli.demo import make_demo_images

    train = make_demo_images(tmp_path / "train", 4, seed=0, size=24)
    val = make_demo_images(tmp_path / "val", 2, seed=2, size=24)
    teacher = tmp_path / "teacher.pt"
    _teacher(teacher)
    return train, val, teacher


def test_end_to_end_json_has_every_field(tmp_path):
    train, val, teacher = _tiny_data(tmp_path)
    cmd = [
        sys.executable, "tools/experiment.py", "--source", str(train), "--val", str(val), "--root", str(tmp_path / "w"),
        "--teacher-checkpoint", str(teacher), "--students", ",".join(STUDENTS), "--arms", ",".join(ARMS),
        "--seeds", "0", "--student-epochs", "1", "--image-size", "16", "--rounds", "2", "--topk", "2",
        "--batch-size", "8", "--workers", "0", "--json",
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["reinforce"]["resumed"] is False and "resumed run" not in proc.stdout
    assert summary["teacher"] == ["resnet10t"] and summary["teacher_checkpoints"] == [str(teacher)]
    assert summary["teacher_train_seconds"] is None  # given, not trained here
    for key in ("teacher_top1", "teacher_nll", "teacher_ece"):
        assert isinstance(summary[key], float)
    assert summary["students"] == STUDENTS and summary["arms"] == ARMS and summary["seeds"] == [0]
    reinforce = summary["reinforce"]
    assert reinforce["images"] == 24 and reinforce["rounds"] == 2 and reinforce["members"] == 1
    assert reinforce["teacher_forwards"] == 24 * 2 and reinforce["seconds"] > 0
    assert len(summary["runs"]) == len(STUDENTS) * len(ARMS)
    for student in STUDENTS:
        for arm in ARMS:
            stats = summary["results"][student][arm]
            assert stats["seeds"] == [0] and len(stats["top1"]) == 1
            for key in ("top1", "nll", "ece", "train_seconds", "wall_seconds", "teacher_forwards"):
                assert stats[f"{key}_mean"] is not None, (student, arm, key)
            # one epoch of 24 images: the online teacher ran on every training image once; no other arm runs it
            assert stats["teacher_forwards_mean"] == (24 if arm == "online" else 0)
            assert (stats["gain"] is None) == (arm == "labels")
    for arm in ("reinforced", "online"):
        assert set(summary["gain"][arm]) == {"mean", "se", "pairs"} and summary["gain"][arm]["pairs"] == 2
    cost = summary["cost"]
    assert cost["reinforced"]["one_time_seconds"] == reinforce["seconds"]
    assert cost["reinforced"]["teacher_forwards"] == 48 and cost["online"]["teacher_forwards"] == 2 * 24
    assert cost["labels"]["one_time_seconds"] == 0 and cost["labels"]["teacher_forwards"] == 0
    for c in cost.values():
        assert c["runs"] == 2 and c["total_seconds"] == pytest.approx(c["student_seconds"] + c["one_time_seconds"])
    be = summary["break_even"]
    assert set(be["runs_per_student"]) == set(STUDENTS) and be["runs_by_forwards"] == 3 and "how" in be
    assert "| arm | student runs |" in proc.stdout and "break-even:" in proc.stdout

    # The same command again, the shard cost lost (as after an interrupted make_shards.py): every
    # student run is the cached one, and the shards' time, now of a run that only finished what it
    # found, says so.
    for cost_file in (tmp_path / "w").glob("*.cost.json"):
        cost_file.unlink()
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    rerun = json.loads(again.stdout.strip().splitlines()[-1])
    assert again.stdout.count("(cached student_") == len(STUDENTS) * len(ARMS) and rerun["runs"] == summary["runs"]
    assert rerun["reinforce"]["resumed"] is True and rerun["reinforce_resumed"] is True
    assert "a resumed run" in again.stdout and "note: the shards were made by a resumed run" in again.stdout


def _experiment():
    sys.path.insert(0, str(ROOT / "tools"))
    import experiment

    return experiment


def _cache_names(train: Path, val: Path, teacher: Path, *flags: str) -> dict[str, str]:
    """Every cache file name one experiment would use: a trained teacher's, the shards', each arm's run."""
    experiment = _experiment()
    args = experiment.build_parser().parse_args(
        ["--source", str(train), "--val", str(val), "--teacher-checkpoint", str(teacher), "--arms", ",".join(ARMS)]
        + ["--seeds", "0", "--image-size", "16", *flags]
    )
    keys = experiment._data_keys(args, str(train), str(val))
    shards = Path(experiment._shards_name(args, ["resnet10t"], [teacher], keys["source"]))
    common = experiment._common(args, str(val))
    plan = experiment._student_plan(args, shards, str(train), [teacher], common, keys["data"])
    names = {"teacher": experiment._teacher_name(args, "resnet18", keys["data"]), "shards": shards.name}
    return {**names, **{arm: name for name, _, arm, _ in plan}}


def test_the_cache_keys_change_with_every_setting_and_file_they_depend_on(tmp_path):
    train, val, teacher = _tiny_data(tmp_path)
    base = _cache_names(train, val, teacher)
    assert _cache_names(train, val, teacher) == base  # same settings and files: every step is a cache hit

    def changed(*flags: str) -> set[str]:
        names = _cache_names(train, val, teacher, *flags)
        return {step for step in base if names[step] != base[step]}

    student_arms = {"labels", "reinforced", "online"}
    assert changed("--recipe", "rrc+ra/re") == {"shards"} | student_arms
    assert changed("--recipe", "rrc+mix") == {"shards", "reinforced", "online"}  # labels are unmixed: shared
    assert changed("--teacher-epochs", "5") == {"teacher"}
    assert changed("--batch-size", "32") == {"teacher"} | student_arms
    assert changed("--workers", "0") == {"teacher"} | student_arms
    assert changed("--rounds", "4") == changed("--topk", "5") == {"shards", "reinforced", "online"}
    assert changed("--p", "0.5") == {"reinforced"}

    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps({"ops": [{"op": "rrc", "scale": [0.3, 1.0]}, {"op": "flip", "p": 0.5}]}))
    before = _cache_names(train, val, teacher, "--recipe", str(recipe))
    recipe.write_text(json.dumps({"ops": [{"op": "rrc", "scale": [0.5, 1.0]}, {"op": "flip", "p": 0.5}]}))
    after = _cache_names(train, val, teacher, "--recipe", str(recipe))  # the same path, other contents
    assert {step for step in base if after[step] != before[step]} == {"shards"} | student_arms

    _teacher(teacher, seed=1)  # the same path, another teacher
    assert changed() == {"shards", "reinforced", "online"}
    base = _cache_names(train, val, teacher)

    image = next(train.rglob("*.jpg"))
    os.utime(image, ns=(image.stat().st_atime_ns, image.stat().st_mtime_ns + 10**9))  # rewritten, same size
    assert changed() == {"teacher", "shards"} | student_arms
    base = _cache_names(train, val, teacher)

    shutil.copy(image, next(val.iterdir()) / "extra.jpg")  # the held-out split grew: every result, not the shards
    assert changed() == {"teacher"} | student_arms


def test_a_bad_recipe_fails_in_one_line_before_any_work(tmp_path, capsys):
    experiment = _experiment()
    for d in ("train", "val"):
        (tmp_path / d).mkdir()
    folders = ["--source", str(tmp_path / "train"), "--val", str(tmp_path / "val")]
    given = ["--teacher-checkpoint", str(tmp_path / "teacher.pt")]  # never read: the recipe is refused first
    assert experiment.main([*folders, *given, "--recipe", "no-such-recipe", "--root", str(tmp_path / "w")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("experiment.py: error: --recipe: unknown recipe 'no-such-recipe'") and "\n" not in err
    assert not (tmp_path / "w").exists()


def test_bad_arguments_fail_in_one_line_before_any_work(tmp_path, capsys):
    sys.path.insert(0, str(ROOT / "tools"))
    import experiment

    assert experiment.main(["--arms", "labels,teacher", "--root", str(tmp_path / "w")]) == 2
    assert capsys.readouterr().err.strip() == (
        "experiment.py: error: expected --arms a comma-separated subset of labels,reinforced,online, "
        "got 'labels,teacher'"
    )
    assert experiment.main(["--students", "resnet10t,no_such_net", "--root", str(tmp_path / "w")]) == 2
    assert "unknown --students model 'no_such_net'" in capsys.readouterr().err
    assert not (tmp_path / "w").exists()


def test_a_teacher_checkpoint_must_name_its_model(tmp_path, capsys):
    import torch

    sys.path.insert(0, str(ROOT / "tools"))
    import experiment

    bare = tmp_path / "bare.pt"
    torch.save({"w": torch.zeros(1)}, bare)
    for d in ("train", "val"):
        (tmp_path / d).mkdir()
    with pytest.raises(SystemExit, match=r"names its model, got .*bare.pt.* \(a bare state_dict\)"):
        experiment.main(
            ["--source", str(tmp_path / "train"), "--val", str(tmp_path / "val"), "--teacher-checkpoint", str(bare)]
            + ["--root", str(tmp_path / "w")]
        )


def test_break_even_is_the_first_run_count_where_reinforcing_once_is_cheaper():
    # 100 s once + 10 s a run against 30 s a run: 100 + 10 N < 30 N from N = 6 (N = 5 ties).
    assert break_even(100.0, 10.0, 30.0) == 6
    assert break_even(99.0, 10.0, 30.0) == 5
    assert break_even(0.0, 10.0, 30.0) == 1
    assert break_even(100.0, 30.0, 30.0) is None and break_even(100.0, 31.0, 30.0) is None


def _run(student, arm, seed, top1, wall, forwards=0):
    times = {"train_seconds": wall - 5, "wall_seconds": wall, "teacher_forwards": forwards, "teacher_seconds": 0.0}
    return {"student": student, "arm": arm, "seed": seed, "top1": top1, "top5": None, "nll": 1.0, "ece": 5.0, **times}


def test_summary_gains_costs_and_break_even():
    runs = [
        _run("a", "labels", 0, 50.0, 20), _run("a", "labels", 1, 52.0, 20),
        _run("a", "reinforced", 0, 55.0, 20), _run("a", "reinforced", 1, 59.0, 20),
        _run("a", "online", 0, 56.0, 40, 1000), _run("a", "online", 1, 56.0, 40, 1000),
        _run("b", "labels", 0, 40.0, 10), _run("b", "reinforced", 0, 43.0, 10), _run("b", "online", 0, 41.0, 30, 1000),
    ]  # fmt: skip
    summary = summarize(runs, {"seconds": 50.0, "teacher_forwards": 2500}, 300.0)
    a = summary["results"]["a"]
    assert a["reinforced"]["gain"] == 6.0 and a["reinforced"]["gain_se"] == pytest.approx(1.0)
    assert a["online"]["gain"] == 5.0 and a["labels"]["gain"] is None
    assert summary["gain"]["reinforced"] == {"mean": pytest.approx(5.0), "se": pytest.approx(1.15), "pairs": 3}
    assert summary["cost"]["reinforced"] == {
        "runs": 3, "student_seconds": 50.0, "one_time_seconds": 50.0, "total_seconds": 100.0, "teacher_forwards": 2500
    }  # fmt: skip
    assert summary["cost"]["online"]["teacher_forwards"] == 3000
    be = summary["break_even"]
    # per run: reinforced 50/3 s, online 110/3 s: 50 + 16.7 N < 36.7 N from N = 3
    assert be["runs"] == 3 and be["runs_per_student"] == {"a": 3, "b": 3} and be["runs_by_forwards"] == 3
    text = "\n".join(format_tables(summary, [0, 1], 10))
    assert "| a | reinforced | 55.00 | 59.00 | 57.00 | +6.00 ± 1.00 |" in text
    assert "| b | labels | 40.00 |  | 40.00 |  |" in text  # no gain of labels over itself
    assert "from 3 student runs on" in text and "teacher training, paid by both distillation arms: 300 s" in text
    assert summary["reinforce_resumed"] is False and "resumed" not in text
    resumed = summarize(runs, {"seconds": 5.0, "teacher_forwards": 2500, "resumed": True}, 300.0)
    assert resumed["reinforce_resumed"] is True
    assert "note: the shards were made by a resumed run" in "\n".join(format_tables(resumed, [0, 1], 10))


def test_paired_gain_and_the_ece_noise_floor():
    assert paired_gain([70.0], [75.0]) == (5.0, None)
    mean, se = paired_gain([70.0, 72.0], [77.0, 78.0])
    assert mean == 6.5 and se == pytest.approx(0.5)
    small, small_sd = ece_floor(300, 0.75, draws=400)
    large, large_sd = ece_floor(1200, 0.75, draws=400)
    assert 0 < large < small and 0 < large_sd < small_sd  # a calibrated model's measured ECE shrinks with n


def test_the_ece_floor_simulates_a_classifier_as_accurate_as_asked():
    from wds_reinforce.cli.experiment_report import _calibrated

    for accuracy in (0.2, 0.5, 0.8):
        conf, hit = _calibrated(np.random.default_rng(0), (100, 1000), accuracy)
        assert conf.mean() == pytest.approx(accuracy, abs=0.005) and hit.mean() == pytest.approx(accuracy, abs=0.005)
    # fewer confident images below 50 %: a lower floor than at 50 %, where confidences span [0, 1]
    assert ece_floor(1200, 0.2, draws=200)[0] < ece_floor(1200, 0.5, draws=200)[0] - 0.5
