#!/usr/bin/env python
"""Does reinforcement pay on your data? Plain labels vs reinforced shards, same student, same budget.

1. the images: --source / --val ImageFolders (default: the demo's, generated if missing);
2. a teacher, or an ensemble (--teacher-models resnet18,resnet34: mean of softmax, as in the
   paper), each member trained on plain labels from the folder with tools/train.py (cached);
3. the source reinforced with it (tools/make_shards.py; cached, resumable);
4. the student trained on plain labels (from the folder, with the shards' own augmentation) and
   on the reinforced shards: same epochs, iterations, augmentation distribution and seeds,
   evaluated on --val. Runs are cached by their settings, so a second teacher reuses the
   labels runs.

Prints a Markdown table of top-1 per seed, the means, the gain (mean of the per-seed paired
differences) with its standard error, and the times (and --json lines).

    python tools/experiment.py                                    # demo images, teacher resnet18
    python tools/experiment.py --teacher-models resnet18,resnet34 # an ensemble teacher
    python tools/experiment.py --source data/train --val data/val --image-size 64 --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _run(cmd: list[str], log: Path) -> dict:
    """Run a tool, tee its output to ``log``, return its last line parsed as JSON."""
    print("$ " + " ".join(cmd), flush=True)
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        last = ""
        for line in proc.stdout:  # type: ignore[union-attr]
            f.write(line)
            if line.startswith(("epoch", "reinforce:")):
                print("  " + line.rstrip(), flush=True)
            if line.strip().startswith("{"):
                last = line
        if proc.wait():
            raise SystemExit(f"experiment.py: error: {cmd[1]} failed (see {log})")
    return json.loads(last) if last else {}


def _cached(path: Path, cmd: list[str], log: Path) -> dict:
    """The JSON result of ``cmd``, from ``path`` when an earlier run left it there."""
    if path.is_file():
        result = json.loads(path.read_text())
        print(f"(cached {path.name}: top-1 {result.get('top1')})", flush=True)
        return result
    result = _run(cmd, log)
    path.write_text(json.dumps(result))
    return result


def _tag(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:10]


def paired_gain(labels: list[float], reinforced: list[float]) -> tuple[float, float | None]:
    """Mean of the per-seed differences and its standard error (None with one seed)."""
    diffs = [r - b for b, r in zip(labels, reinforced)]
    mean = sum(diffs) / len(diffs)
    if len(diffs) < 2:
        return mean, None
    var = sum((d - mean) ** 2 for d in diffs) / (len(diffs) - 1)
    return mean, math.sqrt(var / len(diffs))


def _ensemble_top1(members: list[str], ckpts: list[Path], val: str, size: int) -> float:
    """Top-1 of the (ensemble) teacher on the held-out split, center view as train.py evaluates."""
    import torch

    from wds_reinforce.cli.training import val_views
    from wds_reinforce.produce.teacher import Teacher

    images, labels = val_views(val, (size, size), 1.0)
    teacher = Teacher([f"timm:{m}" for m in members], [str(c) for c in ckpts], device="auto")
    preds = torch.cat([teacher.predict(images[b : b + 256]).argmax(1) for b in range(0, len(images), 256)])
    return float((preds == labels).float().mean()) * 100


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="experiment.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--source", help="training ImageFolder (default: the demo's images under --demo)")
    p.add_argument("--val", help="held-out ImageFolder (default: 1,200 fresh demo images)")
    p.add_argument("--root", default="shards/experiment", help="work folder (default shards/experiment)")
    p.add_argument(
        "--demo",
        default="shards/demo",
        help="the demo folder whose images are the default source (default shards/demo)",
    )
    p.add_argument(
        "--image-size", type=int, default=64, help="size of the teacher's and the students' views (default 64)"
    )
    p.add_argument(
        "--teacher-models",
        default="resnet18",
        help="timm model(s), comma-separated for an ensemble (mean of softmax) (default resnet18)",
    )
    p.add_argument("--teacher-epochs", type=int, default=30, help="epochs of each teacher member (default 30)")
    p.add_argument("--student-model", default="resnet10t", help="timm model of both students (default resnet10t)")
    p.add_argument("--student-epochs", type=int, default=10, help="epochs of each student run (default 10)")
    p.add_argument(
        "--seeds", type=int, nargs="+", default=[0, 1], help="one student run of each arm per seed (default 0 1)"
    )
    p.add_argument("--rounds", type=int, default=16, help="augmentation rounds stored per image (default 16)")
    p.add_argument(
        "--recipe",
        default="rrc",
        help="the reinforced shards' recipe: a preset (rrc, rrc+mix, rrc+ra/re, rrc+ra/re+mix) or a recipe file; "
        "the labels arm reads the folder with the same ops (no mixing: plain labels cannot label a mixture) "
        "(default rrc)",
    )
    p.add_argument("--topk", type=int, default=3, help="teacher probabilities stored per round (default 3)")
    p.add_argument(
        "--p", type=float, default=1.0, help="probability of a reinforced round (train.py --p) (default 1.0)"
    )
    p.add_argument("--batch-size", type=int, default=64, help="batch size of every training run (default 64)")
    p.add_argument("--workers", type=int, help="DataLoader workers of every step (default: the tools' own choice)")
    p.add_argument("--json", action="store_true", help="also print one JSON line per run and a summary line")
    return p


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    members = [m.strip() for m in args.teacher_models.split(",") if m.strip()]
    if not members:
        p.error("expected at least one --teacher-models name")
    if (args.source is None) != (args.val is None):
        p.error("expected both --source and --val, or neither (the demo's images)")

    py = sys.executable
    root = Path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    if args.source is None:
        from wds_reinforce.cli.demo import make_demo_images

        source = str(make_demo_images(Path(args.demo) / "source" / "train", 400, seed=0))
        # A held-out split larger than the demo's, so that a point of top-1 is above the noise.
        val = str(make_demo_images(root / "val", 200, seed=2))
    else:
        source, val = args.source, args.val
    workers = ["--workers", str(args.workers)] if args.workers is not None else []
    common = ["--val", val, "--eval-crop-pct", "1.0", "--batch-size", str(args.batch_size), *workers, "--json"]
    started = time.perf_counter()
    data_tag = _tag(str(Path(source).resolve()), args.image_size)

    # 1. Teachers: plain labels, straight from the folder. They train on milder crops than the
    #    students' recipe: crops that miss the object carry a wrong one-hot label.
    teacher_recipe = root / "teacher_recipe.json"
    teacher_recipe.write_text(json.dumps({"ops": [{"op": "rrc", "scale": [0.35, 1.0]}, {"op": "flip", "p": 0.5}]}))
    ckpts, teachers = [], []
    for model in members:
        name = f"teacher_{model}_{args.teacher_epochs}ep_{data_tag}"
        ckpt = root / f"{name}.pt"
        result_file = root / f"{name}.json"
        if not ckpt.is_file():
            result_file.unlink(missing_ok=True)
        cmd = [
            py, "tools/train.py", "--data", source, "--targets", "labels", "--model", model,
            "--recipe", str(teacher_recipe), "--image-size", str(args.image_size),
            "--epochs", str(args.teacher_epochs), "--seed", "0", "--save", str(ckpt), *common,
        ]  # fmt: skip
        result = _cached(result_file, cmd, root / f"{name}.log")
        teachers.append(result)
        ckpts.append(ckpt)
        print(f"teacher timm:{model}: val top-1 {result['top1']:.2f} % ({result['train_seconds']:.0f} s)", flush=True)
    ensemble_top1 = _ensemble_top1(members, ckpts, val, args.image_size) if len(members) > 1 else teachers[0]["top1"]
    teacher_name = "+".join(members)
    if len(members) > 1:
        print(f"teacher ensemble {teacher_name} (mean of softmax): val top-1 {ensemble_top1:.2f} %", flush=True)

    # 2. Reinforce (the checkpoints name their models: no --teacher needed).
    recipe_part = "" if args.recipe == "rrc" else _tag(args.recipe) + "_"
    shards = root / f"reinforced_{teacher_name}_{recipe_part}r{args.rounds}_k{args.topk}_{data_tag}"
    t0 = time.perf_counter()
    cmd = [
        py, "tools/make_shards.py", "--source", source, "--image-size", str(args.image_size),
        "--rounds", str(args.rounds), "--topk", str(args.topk), "--shard-size", "600", "--out", str(shards),
        "--recipe", args.recipe,
        *[x for c in ckpts for x in ("--teacher-checkpoint", str(c))], *workers,
    ]  # fmt: skip
    print("$ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True)
    reinforce_seconds = time.perf_counter() - t0

    # 3. Students. The labels arm reads the folder with the shards' recipe (--recipe SHARDS):
    #    the same augmentation, and the same run whichever teacher made the shards (cached).
    runs = []
    for seed in args.seeds:
        for targets in ("labels", "reinforced"):
            base = [
                "--model", args.student_model, "--epochs", str(args.student_epochs), "--seed", str(seed), *common
            ]  # fmt: skip
            if targets == "labels":
                tag = _tag("labels", data_tag, base)
                cmd = [py, "tools/train.py", "--data", source, "--targets", "labels", "--recipe", str(shards), *base]
            else:
                tag = _tag("reinforced", shards.name, args.p, base)
                cmd = [py, "tools/train.py", "--data", str(shards), "--p", str(args.p), *base]
            name = f"student_{targets}_{seed}_{tag}"
            result = _cached(root / f"{name}.json", cmd, root / f"{name}.log")
            runs.append(result)
            if args.json:
                print(json.dumps(result))

    def tops(targets: str) -> list[float]:
        return [r["top1"] for r in runs if r["targets"] == targets]

    gain, se = paired_gain(tops("labels"), tops("reinforced"))
    print()
    print(
        f"| student timm:{args.student_model}, {args.student_epochs} epochs | "
        + " | ".join(f"seed {s}" for s in args.seeds)
        + " | mean | time / run |"
    )
    print("|---|" + "---|" * (len(args.seeds) + 2))
    for targets in ("labels", "reinforced"):
        rows = [r for r in runs if r["targets"] == targets]
        cells = " | ".join(f"{r['top1']:.2f}" for r in rows)
        secs = sum(r["train_seconds"] for r in rows) / len(rows)
        label = (
            "plain labels"
            if targets == "labels"
            else f"reinforced (teacher {teacher_name} at {ensemble_top1:.2f} %, recipe {args.recipe}, "
            f"{args.rounds} rounds, top-{args.topk})"
        )
        mean = sum(r["top1"] for r in rows) / len(rows)
        print(f"| {label} | {cells} | {mean:.2f} | {secs:.0f} s |")
    print()
    se_text = (
        f" ± {se:.2f} (standard error over {len(args.seeds)} seeds)" if se is not None else " (one seed: no error)"
    )
    print(
        f"gain: {gain:+.2f}{se_text} points top-1; teacher {teacher_name} {ensemble_top1:.2f} %; "
        f"reinforcing took {reinforce_seconds:.0f} s; total {time.perf_counter() - started:.0f} s"
    )
    if args.json:
        print(
            json.dumps(
                {
                    "teacher": members,
                    "teacher_top1": round(ensemble_top1, 2),
                    "teacher_member_top1": [t["top1"] for t in teachers],
                    "labels": tops("labels"),
                    "reinforced": tops("reinforced"),
                    "gain": round(gain, 2),
                    "gain_se": None if se is None else round(se, 2),
                    "reinforce_seconds": round(reinforce_seconds, 1),
                }
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
