#!/usr/bin/env python
"""The accuracy experiment on the built-in demo data: plain labels vs reinforced shards.

1. the demo images (shared with ``python tools/make_shards.py``; generated if missing);
2. a teacher clearly stronger than the student (a larger timm model trained longer on plain
   labels with ``tools/train.py``; cached);
3. the demo images reinforced with that teacher (``tools/make_shards.py``; cached, resumable);
4. the student trained on plain labels and on the reinforced shards, same epochs, iterations,
   augmentation distribution and seeds (``tools/train.py``), evaluated on the held-out split.

Prints a Markdown table (and ``--json`` lines) with top-1 per run, the means and the times.

    python tools/experiment.py                      # teacher resnet18 x 30 epochs, student resnet10t x 10, seeds 0 1
"""

from __future__ import annotations

import argparse
import json
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
            if line.startswith("epoch"):
                print("  " + line.rstrip(), flush=True)
            if line.strip():
                last = line
        if proc.wait():
            raise SystemExit(f"experiment.py: error: {cmd[1]} failed (see {log})")
    return json.loads(last)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="experiment.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--root", default="shards/experiment", help="work folder (default shards/experiment)")
    p.add_argument("--demo", default="shards/demo", help="the demo folder whose images are used (default shards/demo)")
    p.add_argument("--teacher-model", default="resnet18")
    p.add_argument("--teacher-epochs", type=int, default=30)
    p.add_argument("--student-model", default="resnet10t")
    p.add_argument("--student-epochs", type=int, default=10)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--rounds", type=int, default=16)
    p.add_argument("--topk", type=int, default=3)
    p.add_argument("--p", type=float, default=1.0, help="probability of a reinforced round (train.py --p)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--json", action="store_true", help="also print one JSON line per run")
    args = p.parse_args(argv)

    from wds_reinforce.demo import DEMO_CLASSES, make_demo_images

    py = sys.executable
    root, demo = Path(args.root), Path(args.demo)
    root.mkdir(parents=True, exist_ok=True)
    train_dir = make_demo_images(demo / "source" / "train", 400, seed=0)
    # A held-out split larger than the demo's, so that a point of top-1 is above the noise.
    val_dir = make_demo_images(root / "val", 200, seed=2)
    common = [
        "--val",
        str(val_dir),
        "--eval-crop-pct",
        "1.0",
        "--batch-size",
        str(args.batch_size),
        "--workers",
        str(args.workers),
        "--json",
    ]
    started = time.perf_counter()

    # Plain shards of the source (a random-init teacher, top-1): the teacher trains from them on labels.
    plain = root / "plain"
    if not (plain / "manifest.json").is_file():
        subprocess.run(
            [
                py,
                "tools/make_shards.py",
                "--source",
                str(train_dir),
                "--teacher",
                "timm:resnet10t",
                "--teacher-num-classes",
                str(len(DEMO_CLASSES)),
                "--image-size",
                "64",
                "--rounds",
                "1",
                "--topk",
                "1",
                "--shard-size",
                "600",
                "--workers",
                "1",
                "--out",
                str(plain),
                "--no-progress",
            ],
            cwd=ROOT,
            check=True,
        )
    teacher_ckpt = root / f"teacher_{args.teacher_model}_{args.teacher_epochs}ep.pt"
    teacher_log = root / "teacher.json"
    if not teacher_ckpt.is_file() or not teacher_log.is_file():
        # The teacher trains on milder crops than the students' recipe: crops that miss the shape
        # carry a wrong one-hot label, which a teacher should not learn from.
        teacher_recipe = root / "teacher_recipe.json"
        teacher_recipe.write_text(json.dumps({"ops": [{"op": "rrc", "scale": [0.35, 1.0]}, {"op": "flip", "p": 0.5}]}))
        result = _run(
            [
                py,
                "tools/train.py",
                "--data",
                str(plain),
                "--targets",
                "labels",
                "--model",
                args.teacher_model,
                "--recipe",
                str(teacher_recipe),
                "--epochs",
                str(args.teacher_epochs),
                "--seed",
                "0",
                "--save",
                str(teacher_ckpt),
                *common,
            ],
            root / "teacher.log",
        )
        teacher_log.write_text(json.dumps(result))
    teacher = json.loads(teacher_log.read_text())
    print(f"teacher timm:{args.teacher_model}: val top-1 {teacher['top1']:.2f} % ({teacher['train_seconds']:.0f} s)")

    shards = root / f"reinforced_r{args.rounds}_k{args.topk}"
    t0 = time.perf_counter()
    subprocess.run(
        [
            py,
            "tools/make_shards.py",
            "--source",
            str(train_dir),
            "--teacher",
            f"timm:{args.teacher_model}",
            "--teacher-checkpoint",
            str(teacher_ckpt),
            "--image-size",
            "64",
            "--rounds",
            str(args.rounds),
            "--topk",
            str(args.topk),
            "--shard-size",
            "600",
            "--workers",
            "1",
            "--out",
            str(shards),
            "--no-progress",
        ],
        cwd=ROOT,
        check=True,
    )
    reinforce_seconds = time.perf_counter() - t0

    runs = []
    for seed in args.seeds:
        for targets in ("labels", "reinforced"):
            # Both arms read the same shards; the labels arm ignores the sidecars (p=0, fresh augmentations).
            result = _run(
                [
                    py,
                    "tools/train.py",
                    "--data",
                    str(shards),
                    "--targets",
                    targets,
                    "--model",
                    args.student_model,
                    "--epochs",
                    str(args.student_epochs),
                    "--seed",
                    str(seed),
                    "--p",
                    str(args.p),
                    *common,
                ],
                root / f"student_{targets}_{seed}.log",
            )
            runs.append(result)
            if args.json:
                print(json.dumps(result))

    def mean(targets: str) -> float:
        vals = [r["top1"] for r in runs if r["targets"] == targets]
        return sum(vals) / len(vals)

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
        name = "plain labels" if targets == "labels" else f"reinforced ({args.rounds} rounds, top-{args.topk})"
        print(f"| {name} | {cells} | {mean(targets):.2f} | {secs:.0f} s |")
    print()
    print(
        f"gain: {mean('reinforced') - mean('labels'):+.2f} points top-1 (mean over seeds {args.seeds}); "
        f"teacher timm:{args.teacher_model} {teacher['top1']:.2f} %; reinforcing took {reinforce_seconds:.0f} s; "
        f"total {time.perf_counter() - started:.0f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
