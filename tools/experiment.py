#!/usr/bin/env python
"""Does reinforcement pay on your data? Plain labels, reinforced shards and online distillation, many students.

1. the images: --source / --val ImageFolders (default: the demo's, generated if missing);
2. a teacher, or an ensemble (--teacher-models resnet18,resnet34: mean of softmax, as in the
   paper), each member trained on plain labels from the folder with tools/train.py --save
   (cached), or the train.py checkpoints you already have (--teacher-checkpoint, repeatable);
3. the source reinforced with it once (tools/make_shards.py; cached with its wall time);
4. every student of --students, per seed, in every arm of --arms: plain labels (from the folder,
   with the shards' own augmentation), the reinforced shards (the stored teacher targets), and
   online distillation (the same teacher run on every training batch of the labels arm's
   augmentation): same epochs, iterations, augmentation distribution and seeds, evaluated on
   --val. Runs are cached by what made them (the images' listing, the recipe's contents, the
   teacher checkpoints' sha256, every setting), so a second teacher reuses the labels runs and a
   changed setting, file or checkpoint is never answered from the cache.

Prints a Markdown table per student and arm (top-1 per seed, mean, the gain over labels: mean of
the per-seed paired differences with its standard error, NLL, ECE, wall time and teacher forwards
per run), a cost table (student time, the one-time shard making, teacher forwards) and the
break-even: after how many student runs reinforcing once costs less than online distillation.

    python tools/experiment.py                                    # demo images, teacher resnet18
    python tools/experiment.py --teacher-models resnet18,resnet34 # an ensemble teacher
    python tools/experiment.py --students resnet10t,mobilenetv3_small_100 --arms labels,reinforced,online
    python tools/experiment.py --source data/train --val data/val --teacher-checkpoint teacher.pt --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from wds_reinforce.cli.experiment_report import ARMS, format_tables, paired_gain, summarize  # noqa: E402
from wds_reinforce.io.outputs import sha256_file  # noqa: E402

__all__ = ["build_parser", "main", "paired_gain"]


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
    began = time.perf_counter()
    result = _run(cmd, log)
    result["wall_seconds"] = round(time.perf_counter() - began, 1)  # the whole process: start-up, data, eval
    path.write_text(json.dumps(result))
    return result


def _tag(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:10]


# The teacher members train on milder crops than the students' recipe: crops that miss the object
# carry a wrong one-hot label, so the teacher trains on scale 0.35-1.
_TEACHER_RECIPE = {"ops": [{"op": "rrc", "scale": [0.35, 1.0]}, {"op": "flip", "p": 0.5}]}


def _listing(folder: str) -> str:
    """A digest of every file under ``folder`` (relative name, size, mtime): reads no image."""
    entries = []
    for top, dirs, files in os.walk(folder, followlinks=True):
        dirs.sort()
        for name in sorted(files):
            st = os.stat(os.path.join(top, name))
            entries.append((os.path.relpath(os.path.join(top, name), folder), st.st_size, st.st_mtime_ns))
    return _tag(entries)


def _data_keys(args: argparse.Namespace, source: str, val: str) -> dict[str, str]:
    """``source``: the training images and the view size (what the shards depend on); ``data``: with --val."""
    key = _tag(_listing(source), args.image_size)
    return {"source": key, "data": _tag(key, _listing(val))}


def _recipe(args: argparse.Namespace) -> dict:
    """The contents of --recipe at --image-size (a file by its text, not its path)."""
    from wds_reinforce.core.augment import Recipe

    return Recipe.from_spec(args.recipe, args.image_size).to_dict()


def _teacher_name(args: argparse.Namespace, model: str, data: str) -> str:
    """A trained member's file name: its model, its training settings and the images."""
    settings = _tag(_TEACHER_RECIPE, args.teacher_epochs, args.batch_size, args.workers, data)
    return f"teacher_{model}_{args.teacher_epochs}ep_{settings}"


def _shards_name(args: argparse.Namespace, members: list[str], ckpts: list[Path], source_key: str) -> str:
    """The shard folder's name: the teacher (its checkpoints' sha256), the recipe, rounds, top-k, the images."""
    key = _tag(_recipe(args), [sha256_file(c) for c in ckpts], args.rounds, args.topk, source_key)
    return f"reinforced_{'+'.join(members)}_r{args.rounds}_k{args.topk}_{key}"


def build_parser() -> argparse.ArgumentParser:  # long: one add_argument per option, nothing else
    p = argparse.ArgumentParser(
        prog="experiment.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--source", help="training ImageFolder (default: the demo's images under --demo)")
    p.add_argument("--val", help="held-out ImageFolder (default: 1,200 fresh demo images, 200 per class)")
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
    p.add_argument(
        "--teacher-checkpoint",
        action="append",
        metavar="CHECKPOINT",
        help="a teacher you already trained (a train.py --save checkpoint, which names its model); repeat it for "
        "an ensemble; replaces --teacher-models and the teacher training",
    )
    p.add_argument(
        "--students",
        default="resnet10t",
        help="timm model(s) of the students, comma-separated; each must build at --image-size "
        "(e.g. resnet10t,mobilenetv3_small_100,mobilevit_xxs) (default resnet10t)",
    )
    p.add_argument(
        "--arms",
        default="labels,reinforced",
        help="the arms each student runs, comma-separated: labels (one-hot), reinforced (the shards), online "
        "(online distillation from the same teacher) (default labels,reinforced)",
    )
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
    p.add_argument(
        "--per-class", type=int, default=400, help="demo training images per class, without --source (default 400)"
    )
    p.add_argument(
        "--val-per-class", type=int, default=200, help="demo held-out images per class, without --val (default 200)"
    )
    p.add_argument("--json", action="store_true", help="also print one JSON line per run and a summary line")
    return p


def _names(text: str) -> list[str]:
    return [n.strip() for n in text.split(",") if n.strip()]


def _check(args: argparse.Namespace) -> str | None:
    """A one-line complaint about the arguments, or None; nothing has run yet."""
    import timm

    if (args.source is None) != (args.val is None):
        return "expected both --source and --val, or neither (the demo's images)"
    for flag, folder in (("--source", args.source), ("--val", args.val)):
        if folder is not None and not Path(folder).is_dir():
            return f"expected {flag} an ImageFolder directory, got {folder!r} (not found)"
    arms = _names(args.arms)
    if not arms or any(a not in ARMS for a in arms):
        return f"expected --arms a comma-separated subset of {','.join(ARMS)}, got {args.arms!r}"
    models = [("--students", n) for n in _names(args.students)]
    if not models:
        return "expected at least one --students name"
    if not args.teacher_checkpoint:
        models += [("--teacher-models", n) for n in _names(args.teacher_models)]
        if not _names(args.teacher_models):
            return "expected at least one --teacher-models name"
    unknown = next(((flag, n) for flag, n in models if not timm.is_model(n)), None)
    if unknown:
        return f"unknown {unknown[0]} model {unknown[1]!r}; expected a timm model name (see timm.list_models())"
    for flag, value in (("--student-epochs", args.student_epochs), ("--teacher-epochs", args.teacher_epochs)):
        if value < 1:
            return f"expected {flag} >= 1, got {value}"
    if args.image_size < 8:
        return f"expected --image-size >= 8, got {args.image_size}"
    try:
        _recipe(args)
    except ValueError as exc:
        return f"--recipe: {exc}"
    return None


def _given_teachers(paths: list[str]) -> tuple[list[str], list[Path]]:
    """--teacher-checkpoint: the member names the checkpoints carry (train.py --save writes them)."""
    from wds_reinforce.produce.checkpoint import checkpoint_info

    members = []
    for path in paths:
        try:
            arch = checkpoint_info(path).get("arch")
        except ValueError as exc:
            raise SystemExit(f"experiment.py: error: --teacher-checkpoint: {exc}") from None
        if not arch:
            raise SystemExit(
                f"experiment.py: error: expected --teacher-checkpoint a train.py --save checkpoint that names its "
                f"model, got {path!r} (a bare state_dict)"
            )
        members.append(str(arch).split(":", 1)[-1])
    return members, [Path(p) for p in paths]


def _train_teachers(
    args: argparse.Namespace, members: list[str], root: Path, source: str, common: list[str], data: str
) -> tuple[list[Path], list[dict]]:
    """Each member on plain labels from the folder, with milder crops than the students' recipe."""
    teacher_recipe = root / "teacher_recipe.json"
    teacher_recipe.write_text(json.dumps(_TEACHER_RECIPE))
    ckpts, results = [], []
    for model in members:
        name = _teacher_name(args, model, data)
        ckpt = root / f"{name}.pt"
        result_file = root / f"{name}.json"
        if not ckpt.is_file():
            result_file.unlink(missing_ok=True)
        cmd = [
            sys.executable, "tools/train.py", "--data", source, "--targets", "labels", "--model", model,
            "--recipe", str(teacher_recipe), "--image-size", str(args.image_size),
            "--epochs", str(args.teacher_epochs), "--seed", "0", "--save", str(ckpt), *common,
        ]  # fmt: skip
        result = _cached(result_file, cmd, root / f"{name}.log")
        results.append(result)
        ckpts.append(ckpt)
        print(f"teacher timm:{model}: val top-1 {result['top1']:.2f} % ({result['train_seconds']:.0f} s)", flush=True)
    return ckpts, results


def _evaluate(ckpts: list[Path], val: str, args: argparse.Namespace, root: Path, data: str) -> dict:
    """train.py --evaluate of the checkpoints (an ensemble: mean of softmax) on --val, cached."""
    name = f"evaluate_{_tag([sha256_file(c) for c in ckpts], data)}"
    cmd = [sys.executable, "tools/train.py", *[x for c in ckpts for x in ("--evaluate", str(c))], "--val", val]
    cmd += ["--image-size", str(args.image_size), "--eval-crop-pct", "1.0", "--json"]
    return _cached(root / f"{name}.json", cmd, root / f"{name}.log")


def _reinforce(
    args: argparse.Namespace, shards: Path, source: str, ckpts: list[Path], workers: list[str], root: Path
) -> dict:
    """Make the shards once (resumable); their wall time is kept beside them, so a rerun reports it too.

    A run that found finished parts (resumed after an interruption, or only verifying) times just
    its own part, not the whole making: its cost says ``resumed``, and so does the report.
    """
    cost_file = root / f"{shards.name}.cost.json"
    if cost_file.is_file() and (shards / "manifest.json").is_file():
        cost = json.loads(cost_file.read_text())
        print(f"(cached {shards.name}: made in {cost['seconds']:.0f} s)", flush=True)
        return cost
    from wds_reinforce.produce.jobs import DONE_DIR

    # A part an earlier run finished (its done marker) is kept, not made again, and not timed.
    resumed = (shards / "manifest.json").is_file() or any((shards / DONE_DIR).rglob("*.json"))
    cmd = [
        sys.executable, "tools/make_shards.py", "--source", source, "--image-size", str(args.image_size),
        "--rounds", str(args.rounds), "--topk", str(args.topk), "--shard-size", "600", "--out", str(shards),
        "--recipe", args.recipe, *[x for c in ckpts for x in ("--teacher-checkpoint", str(c))], *workers,
    ]  # fmt: skip
    print("$ " + " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    if subprocess.run(cmd, cwd=ROOT).returncode:
        raise SystemExit("experiment.py: error: make_shards.py failed (its message is above)")
    seconds = time.perf_counter() - t0
    manifest = json.loads((shards / "manifest.json").read_text())
    images = sum(s["samples"] for s in manifest["shards"])
    members = len(manifest["teacher"].get("members", [])) or 1
    cost = {
        "seconds": round(seconds, 1),
        "images": images,
        "rounds": manifest["rounds"],
        "members": members,
        "teacher_forwards": images * manifest["rounds"] * members,
        "resumed": resumed,
    }
    cost_file.write_text(json.dumps(cost))
    return cost


def _common(args: argparse.Namespace, val: str) -> list[str]:
    """The train.py flags every training run shares."""
    workers = ["--workers", str(args.workers)] if args.workers is not None else []
    return ["--val", val, "--eval-crop-pct", "1.0", "--batch-size", str(args.batch_size), *workers, "--json"]


def _student_plan(
    args: argparse.Namespace, shards: Path, source: str, ckpts: list[Path], common: list[str], data: str
) -> list[tuple[str, str, str, list[str]]]:
    """Every (student, seed, arm) run as (cache name, student, arm, command).

    The name holds what the run depends on: the images (``data``), the student's settings, and
    the labels arm's ops (the recipe less its name and mixing: the same run whichever teacher made
    the shards, and for rrc and rrc+mix alike), the other arms' shard folder (teacher and recipe).
    """
    py, plan = sys.executable, []
    teacher = [x for c in ckpts for x in ("--teacher-checkpoint", str(c))]
    ops = {k: v for k, v in _recipe(args).items() if k not in ("name", "mix")}
    for student in _names(args.students):
        for seed in args.seeds:
            for arm in _names(args.arms):
                base = ["--model", student, "--epochs", str(args.student_epochs), "--seed", str(seed), *common]
                folder = [py, "tools/train.py", "--data", source, "--recipe", str(shards)]
                if arm == "labels":
                    tag = _tag("labels", data, ops, base)
                    cmd = [*folder, "--targets", "labels", *base]
                elif arm == "reinforced":
                    tag = _tag("reinforced", data, shards.name, args.p, base)
                    cmd = [py, "tools/train.py", "--data", str(shards), "--p", str(args.p), *base]
                else:
                    tag = _tag("online", data, shards.name, base)
                    cmd = [*folder, "--targets", "online", *teacher, *base]
                plan.append((f"student_{arm}_{seed}_{tag}", student, arm, cmd))
    return plan


def _student_runs(args: argparse.Namespace, plan: list[tuple[str, str, str, list[str]]], root: Path) -> list[dict]:
    """Every run of the plan, cached by its name; each result gains ``student`` and ``arm``."""
    runs = []
    for name, student, arm, cmd in plan:
        result = {**_cached(root / f"{name}.json", cmd, root / f"{name}.log"), "student": student, "arm": arm}
        runs.append(result)
        if args.json:
            print(json.dumps(result))
    return runs


def main(argv: list[str] | None = None) -> int:  # long: the experiment's steps in order, each a call
    args = build_parser().parse_args(argv)
    problem = _check(args)
    if problem:
        print(f"experiment.py: error: {problem}", file=sys.stderr)
        return 2
    root = Path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    if args.source is None:
        from wds_reinforce.cli.demo import make_demo_images

        source = str(make_demo_images(Path(args.demo) / "source" / "train", args.per_class, seed=0))
        # A held-out split larger than the demo's, so that a point of top-1 is above the noise.
        val = str(make_demo_images(root / "val", args.val_per_class, seed=2))
    else:
        source, val = args.source, args.val
    workers = ["--workers", str(args.workers)] if args.workers is not None else []
    common = _common(args, val)
    started = time.perf_counter()
    keys = _data_keys(args, source, val)

    # 1. The teacher: trained here (saved with --save, so that the online arm can load it), or given.
    if args.teacher_checkpoint:
        members, ckpts = _given_teachers(args.teacher_checkpoint)
        trained: list[dict] = []
    else:
        members = _names(args.teacher_models)
        ckpts, trained = _train_teachers(args, members, root, source, common, keys["data"])
    teacher_train_seconds = sum(t["train_seconds"] for t in trained) if trained else None
    ensemble = trained[0] if len(trained) == 1 else _evaluate(ckpts, val, args, root, keys["data"])
    member_top1 = [t["top1"] for t in trained] or [_evaluate([c], val, args, root, keys["data"])["top1"] for c in ckpts]
    teacher_name = "+".join(members)
    print(f"teacher {teacher_name}: val top-1 {ensemble['top1']:.2f} %, ECE {ensemble['ece']:.2f} %", flush=True)

    # 2. Reinforce once (the checkpoints name their models: no --teacher needed).
    shards = root / _shards_name(args, members, ckpts, keys["source"])
    reinforce = _reinforce(args, shards, source, ckpts, workers, root)

    # 3. The students, every arm: labels and online read the folder with the shards' recipe.
    runs = _student_runs(args, _student_plan(args, shards, source, ckpts, common, keys["data"]), root)
    summary = summarize(runs, reinforce, teacher_train_seconds)
    print()
    print(
        f"teacher {teacher_name} at {ensemble['top1']:.2f} % (NLL {ensemble['nll']:.4f}, ECE {ensemble['ece']:.2f} %); "
        f"recipe {args.recipe}, {args.rounds} rounds, top-{args.topk}, {args.image_size} px; reinforcing "
        f"{reinforce['images']} images x {reinforce['rounds']} rounds x {reinforce['members']} members took "
        f"{reinforce['seconds']:.0f} s" + (" (a resumed run: only its own part)" if reinforce.get("resumed") else "")
    )
    print()
    print("\n".join(format_tables(summary, args.seeds, args.student_epochs)))
    total = time.perf_counter() - started
    print(f"total {total:.0f} s")
    if args.json:
        head = {
            "teacher": members,
            "teacher_checkpoints": [str(c) for c in ckpts],
            "teacher_top1": ensemble["top1"],
            "teacher_nll": ensemble["nll"],
            "teacher_ece": ensemble["ece"],
            "teacher_member_top1": member_top1,
            "students": _names(args.students),
            "arms": _names(args.arms),
            "seeds": args.seeds,
            "student_epochs": args.student_epochs,
            "image_size": args.image_size,
            "reinforce": reinforce,
            "reinforce_seconds": reinforce["seconds"],
        }
        print(json.dumps({**head, **summary, "runs": runs, "total_seconds": round(total, 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
