"""tools/experiment.py's arithmetic: per-arm means, paired gains, the cost table, the break-even.

Pure functions over the runs' ``train.py --json`` results; nothing here trains or opens files.
An arm is ``labels`` (one-hot), ``reinforced`` (the shards' stored teacher targets) or ``online``
(the teacher run on every training batch). Times are wall seconds; top-1 and ECE are percent.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["ARMS", "paired_gain", "break_even", "ece_floor", "summarize", "format_tables"]

ARMS = ("labels", "reinforced", "online")
_METRICS = ("top1", "top5", "nll", "ece", "train_seconds", "wall_seconds", "teacher_forwards", "teacher_seconds")
_DIGITS = {"nll": 4, "teacher_forwards": 0}


def paired_gain(labels: Sequence[float], other: Sequence[float]) -> tuple[float, float | None]:
    """Mean of the per-seed differences ``other - labels`` and its standard error (None with one seed)."""
    diffs = [o - b for b, o in zip(labels, other)]
    mean = sum(diffs) / len(diffs)
    if len(diffs) < 2:
        return mean, None
    var = sum((d - mean) ** 2 for d in diffs) / (len(diffs) - 1)
    return mean, math.sqrt(var / len(diffs))


def break_even(one_time: float, reinforced_per_run: float, online_per_run: float) -> int | None:
    """The fewest student runs N after which reinforcing once is cheaper in all than online distillation.

    Reinforced costs ``one_time + N * reinforced_per_run``, online ``N * online_per_run``; the
    first N where the former is strictly below the latter, or None when online is never dearer per run.
    """
    extra = online_per_run - reinforced_per_run
    if extra <= 0:
        return None
    return max(1, math.floor(one_time / extra) + 1)


def ece_floor(images: int, accuracy: float, bins: int = 15, draws: int = 2000, seed: int = 0) -> tuple[float, float]:
    """ECE (percent) of a perfectly calibrated classifier measured on ``images`` images: mean and sd over draws.

    The finite-sample noise of the metric: confidences uniform on ``[2a - 1, 1]``, or on ``[0, 2a]``
    when ``a < 0.5`` (either way their mean is ``a``, the accuracy), each image right with
    probability equal to its confidence, the same equal-width bins as ``metrics.ece``. A measured
    ECE within a few sds of this mean is noise.
    """
    conf, hit = _calibrated(np.random.default_rng(seed), (draws, images), accuracy)
    which = np.clip(np.ceil(conf * bins).astype(int) - 1, 0, bins - 1)
    gaps = np.zeros((draws, bins))
    for b in range(bins):
        inside = which == b
        gaps[:, b] = np.abs((conf * inside).sum(1) - (hit & inside).sum(1))
    ece = 100 * gaps.sum(1) / images
    return float(ece.mean()), float(ece.std(ddof=1))


def _calibrated(rng: np.random.Generator, shape: tuple[int, int], accuracy: float) -> tuple[np.ndarray, np.ndarray]:
    """Confidences with mean ``accuracy`` and whether each prediction is right (with that probability)."""
    low, high = (2 * accuracy - 1, 1.0) if accuracy >= 0.5 else (0.0, 2 * accuracy)
    conf = rng.uniform(low, high, size=shape)
    return conf, rng.random(shape) < conf


def _wall(run: dict[str, Any]) -> float:
    """A run's cost: the process's wall seconds (start-up, data, evaluation), else train.py's own."""
    return run.get("wall_seconds") or run["train_seconds"]


def _mean(values: Sequence[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return sum(known) / len(known) if known else None


def _arm_stats(rows: list[dict[str, Any]], labels: list[dict[str, Any]] | None) -> dict[str, Any]:
    """One (student, arm): per-seed top-1, every metric's mean, the paired gain over labels."""
    stats: dict[str, Any] = {"seeds": [r["seed"] for r in rows], "top1": [r["top1"] for r in rows]}
    for key in _METRICS:
        mean = _mean([r.get(key) for r in rows])
        stats[f"{key}_mean"] = None if mean is None else round(mean, _DIGITS.get(key, 2))
    stats["gain"] = stats["gain_se"] = None
    if labels is not None:
        by_seed = {r["seed"]: r["top1"] for r in labels}
        pairs = [(by_seed[r["seed"]], r["top1"]) for r in rows if r["seed"] in by_seed]
        if pairs:
            gain, se = paired_gain([b for b, _ in pairs], [o for _, o in pairs])
            stats["gain"], stats["gain_se"] = round(gain, 2), None if se is None else round(se, 2)
    return stats


def summarize(  # long: the summary's fields, one block each
    runs: list[dict[str, Any]], reinforce: dict[str, Any], teacher_train_seconds: float | None
) -> dict[str, Any]:
    """The experiment's summary from its student runs (each with ``student`` and ``arm`` added).

    ``reinforce`` holds the one-time shard making: ``seconds`` (wall), ``teacher_forwards`` and
    ``resumed`` (true when ``seconds`` covers only the part of the making after an interruption).
    Returns ``results`` (student -> arm -> stats), ``gain`` (arm -> mean over students of the
    per-student gains, with a standard error over every (student, seed) pair), ``cost`` (arm ->
    runs, student seconds, one-time seconds, total, teacher forwards), ``break_even`` and
    ``reinforce_resumed``.
    """
    students = list(dict.fromkeys(r["student"] for r in runs))
    arms = [a for a in ARMS if any(r["arm"] == a for r in runs)]
    results: dict[str, dict[str, Any]] = {}
    for student in students:
        mine = [r for r in runs if r["student"] == student]
        labels = [r for r in mine if r["arm"] == "labels"] or None
        results[student] = {
            a: _arm_stats([r for r in mine if r["arm"] == a], None if a == "labels" else labels) for a in arms
        }
    gain: dict[str, Any] = {}
    for arm in arms:
        if arm == "labels" or "labels" not in arms:
            continue
        diffs = []
        for student in students:
            by_seed = {r["seed"]: r["top1"] for r in runs if r["student"] == student and r["arm"] == "labels"}
            diffs += [
                r["top1"] - by_seed[r["seed"]]
                for r in runs
                if r["student"] == student and r["arm"] == arm and r["seed"] in by_seed
            ]
        mean, se = paired_gain([0.0] * len(diffs), diffs)
        gain[arm] = {"mean": round(mean, 2), "se": None if se is None else round(se, 2), "pairs": len(diffs)}
    cost: dict[str, Any] = {}
    for arm in arms:
        mine = [r for r in runs if r["arm"] == arm]
        one_time = reinforce["seconds"] if arm == "reinforced" else 0.0
        forwards = sum(r.get("teacher_forwards") or 0 for r in mine)
        forwards += reinforce["teacher_forwards"] if arm == "reinforced" else 0
        student_seconds = sum(_wall(r) for r in mine)
        cost[arm] = {
            "runs": len(mine),
            "student_seconds": round(student_seconds, 1),
            "one_time_seconds": round(one_time, 1),
            "total_seconds": round(student_seconds + one_time, 1),
            "teacher_forwards": forwards,
        }
    return {
        "results": results,
        "gain": gain,
        "cost": cost,
        "break_even": _break_even(runs, students, reinforce),
        "teacher_train_seconds": teacher_train_seconds,
        "reinforce_resumed": bool(reinforce.get("resumed")),
    }


def _break_even(runs: list[dict[str, Any]], students: list[str], reinforce: dict[str, Any]) -> dict[str, Any] | None:
    """Student runs after which reinforcing once beats online distillation: overall and per student."""

    def per_run(arm: str, key: str, student: str | None = None) -> float | None:
        value = _wall if key == "wall" else (lambda r: r[key])
        return _mean([value(r) for r in runs if r["arm"] == arm and student in (None, r["student"])])

    if per_run("reinforced", "wall") is None or per_run("online", "wall") is None:
        return None
    seconds = {
        s: break_even(reinforce["seconds"], per_run("reinforced", "wall", s), per_run("online", "wall", s))
        for s in students
    }
    online_forwards = per_run("online", "teacher_forwards") or 0.0
    return {
        "runs": break_even(reinforce["seconds"], per_run("reinforced", "wall"), per_run("online", "wall")),
        "runs_per_student": seconds,
        "runs_by_forwards": break_even(reinforce["teacher_forwards"], 0.0, online_forwards),
        "reinforce_seconds": reinforce["seconds"],
        "reinforced_seconds_per_run": round(per_run("reinforced", "wall"), 1),
        "online_seconds_per_run": round(per_run("online", "wall"), 1),
        "how": "the fewest N with reinforce_seconds + N * reinforced_seconds_per_run < N * online_seconds_per_run "
        "(wall seconds of the whole make_shards.py / train.py process, per student run the mean over students and "
        "seeds); by forwards: teacher forwards of "
        "reinforcing once against N online runs' teacher forwards",
    }


def _pm(value: float | None, se: float | None) -> str:
    if value is None:
        return ""
    return f"{value:+.2f}" + (f" ± {se:.2f}" if se is not None else "")


def _num(value: float | None, form: str) -> str:
    return "" if value is None else format(value, form)


def format_tables(summary: dict[str, Any], seeds: Sequence[int], epochs: int) -> list[str]:
    """The Markdown tables (accuracy per student and arm, then cost) and the break-even line."""
    lines = [
        f"| student, {epochs} epochs | arm | "
        + " | ".join(f"top-1 seed {s}" for s in seeds)
        + " | mean top-1 | gain over labels (± s.e.) | NLL | ECE (%) | train s / run | wall s / run"
        + " | teacher forwards / run |",
        "|---|---|" + "---|" * (len(seeds) + 7),
    ]
    for student, arms in summary["results"].items():
        for arm, st in arms.items():
            by_seed = dict(zip(st["seeds"], st["top1"]))
            cells = " | ".join(_num(by_seed.get(s), ".2f") for s in seeds)
            lines.append(
                f"| {student} | {arm} | {cells} | {_num(st['top1_mean'], '.2f')} | {_pm(st['gain'], st['gain_se'])} | "
                f"{_num(st['nll_mean'], '.4f')} | {_num(st['ece_mean'], '.2f')} | "
                f"{_num(st['train_seconds_mean'], '.0f')} | {_num(st['wall_seconds_mean'], '.0f')} | "
                f"{_num(st['teacher_forwards_mean'], '.0f')} |"
            )
    lines += [
        "",
        "| arm | student runs | student wall s | one-time s (shards) | total s | teacher forwards |",
        "|---|---|---|---|---|---|",
    ]
    for arm, c in summary["cost"].items():
        lines.append(
            f"| {arm} | {c['runs']} | {c['student_seconds']:.0f} | {c['one_time_seconds']:.0f} | "
            f"{c['total_seconds']:.0f} | {c['teacher_forwards']} |"
        )
    lines.append("")
    for arm, g in summary["gain"].items():
        lines.append(
            f"gain of {arm} over labels, mean of {g['pairs']} (student, seed) pairs: "
            f"{_pm(g['mean'], g['se'])} points top-1"
        )
    be = summary["break_even"]
    if be is not None:
        after = "never: online is not dearer per run" if be["runs"] is None else f"from {be['runs']} student runs on"
        lines.append(
            f"break-even: reinforcing once ({be['reinforce_seconds']:.0f} s) + "
            f"{be['reinforced_seconds_per_run']:.0f} s per reinforced run is cheaper than "
            f"{be['online_seconds_per_run']:.0f} s per online-KD run {after} "
            f"(per student: {be['runs_per_student']}; by teacher forwards: from {be['runs_by_forwards']} runs on)"
        )
    if summary.get("reinforce_resumed"):
        lines.append(
            "note: the shards were made by a resumed run, timed only for its own part: the one-time seconds are "
            "too low and the break-even too early; delete the shard folder and its .cost.json and rerun to measure"
        )
    if summary["teacher_train_seconds"] is not None:
        lines.append(f"teacher training, paid by both distillation arms: {summary['teacher_train_seconds']:.0f} s")
    return lines
