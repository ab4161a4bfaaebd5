"""Reference training: a timm model, soft-target cross entropy, warm-up then cosine LR.

A small script to copy from. It trains on reinforced shards with the teacher's soft targets
(--targets reinforced: one stored round per epoch, replayed exactly), or on one-hot labels
(--targets labels) with fresh random augmentations each epoch, read from reinforced shards, an
ImageFolder directory or plain webdataset shards. So the same script trains the teacher from
your folder, then the student from the shards made with it:

    python tools/train.py --data data/train --val data/val --targets labels --model resnet18 \\
        --image-size 64 --epochs 30 --save teacher.pt          # a teacher, from the folder
    python tools/make_shards.py --source data/train --teacher-checkpoint teacher.pt \\
        --image-size 64 --out shards/mine                      # the checkpoint names its model
    python tools/train.py --data shards/mine --val data/val --epochs 10   # the student

Both arms of a comparison should see the same augmentation: --targets labels on reinforced
shards uses the shards' own recipe; on a folder, pass --recipe SHARDS to take it from them.
It evaluates top-1, top-5, NLL and ECE (15 bins) on a held-out split (ImageFolder or webdataset
shards) with a center crop after every epoch. CPU or GPU; under torchrun it trains with DDP.
--save writes a checkpoint (weights_only-safe) that names its model, classes and input size.

    python tools/train.py --evaluate teacher.pt --val data/val       # a checkpoint's metrics, no training
    python tools/train.py --data data/train --val data/val --targets online \\
        --teacher-checkpoint teacher.pt --image-size 64 --epochs 10  # online distillation, for comparison
    python tools/train.py --data data/train --val data/val --targets labels --init student.pt \\
        --opt sgd --lr 0.002 --weight-decay 5e-4 --warmup 0           # fine-tune, the head replaced
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

from wds_reinforce.core.threads import describe_defaults

__all__ = ["build_parser", "main", "data_kind"]

_PROG = "train.py"


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Every option's default in its help, unless the help already says it (or there is none)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "(default" in text or action.default in (None, False, argparse.SUPPRESS) or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)".lstrip()


def build_parser() -> argparse.ArgumentParser:  # long: one add_argument per option, nothing else
    p = argparse.ArgumentParser(prog=_PROG, description=__doc__, formatter_class=_Formatter)
    p.add_argument(
        "--data",
        help="reinforced shards (a folder or URL prefix holding manifest.json, or the manifest); with "
        "--targets labels or online also an ImageFolder directory or a plain webdataset .tar pattern "
        "(required, except with --evaluate)",
    )
    p.add_argument(
        "--val", help="held-out images, ImageFolder directory or webdataset .tar pattern (default: no evaluation)"
    )
    p.add_argument(
        "--model",
        help="timm model name, random init unless --init (default: resnet10t, or the model --init holds)",
    )
    p.add_argument(
        "--init",
        metavar="timm:NAME|CHECKPOINT",
        help="fine-tune from weights: timm's pretrained NAME (only if already in the local HF/torch cache; nothing "
        "is downloaded) or a train.py --save checkpoint; the classifier is replaced for --data's classes "
        "(default: random init)",
    )
    p.add_argument(
        "--targets",
        choices=["reinforced", "labels", "online"],
        default="reinforced",
        help="the teacher's stored soft targets (reinforced shards), one-hot labels, or online distillation: "
        "--teacher-checkpoint run on every training batch (the labels arm's augmentation), its full softmax",
    )
    p.add_argument(
        "--teacher-checkpoint",
        action="append",
        metavar="CHECKPOINT",
        help="the teacher of --targets online (and only there), a train.py --save checkpoint; repeat it for an "
        "ensemble (mean of softmax)",
    )
    p.add_argument(
        "--evaluate",
        action="append",
        metavar="CHECKPOINT",
        help="no training: report top-1, top-5, NLL and ECE of this checkpoint on --val; repeat it for an "
        "ensemble (mean of softmax); a bare state_dict is taken as --model (default: train)",
    )
    p.add_argument("--p", type=float, default=1.0, help="probability of a reinforced round per sample (paper: 0.99)")
    p.add_argument("--densify", choices=["smooth", "zeros"], default="smooth", help="sparse -> dense targets")
    p.add_argument(
        "--recipe",
        help="augmentation of the labels arm (and of non-reinforced samples): a preset, a YAML/JSON recipe "
        "file, or reinforced shards whose recipe to use (default: the shards' own recipe; rrc for a folder)",
    )
    p.add_argument(
        "--image-size",
        type=int,
        help="training size for a folder or plain shards (default: the recipe's, 224 for a preset); "
        "reinforced shards keep their own",
    )
    p.add_argument("--label-smoothing", type=float, default=0.1, help="smoothing of one-hot targets")
    p.add_argument("--epochs", type=int, default=10, help="passes over the data")
    p.add_argument("--batch-size", type=int, default=64, help="images per step (per rank)")
    p.add_argument("--opt", choices=["sgd", "adamw"], default="adamw", help="optimizer")
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    p.add_argument("--weight-decay", type=float, default=0.05, help="weight decay")
    p.add_argument(
        "--warmup", type=float, default=0.1, help="linear warm-up, as a fraction of all steps; then cosine decay"
    )
    p.add_argument(
        "--workers",
        type=int,
        help="DataLoader workers (default: half the available cores, at most 8 and the shards per rank)",
    )
    p.add_argument(
        "--threads",
        type=int,
        help=f"torch threads of the main process (default: OMP_NUM_THREADS, else the cores the workers leave; "
        f"{describe_defaults()})",
    )
    p.add_argument("--eval-crop-pct", type=float, default=0.875, help="center crop fraction for evaluation")
    p.add_argument("--seed", type=int, default=0, help="seeds the model init, the round schedule and shuffling")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda")
    p.add_argument(
        "--save", help="write a checkpoint here (weights, model name, classes, input size; make_shards.py reads it)"
    )
    p.add_argument("--json", action="store_true", help="print the final result as one JSON line")
    p.add_argument(
        "--progress-every",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="within an epoch, a line to stderr this often: steps done / total, steps/s, ETA",
    )
    return p


def _check_args(args: argparse.Namespace) -> str | None:
    """A one-line complaint about an argument, or None (no heavy imports needed)."""
    checks = [
        (0.0 <= args.p <= 1.0, f"expected --p in [0, 1], got {args.p}"),
        (args.epochs >= 1, f"expected --epochs >= 1, got {args.epochs}"),
        (args.batch_size >= 1, f"expected --batch-size >= 1, got {args.batch_size}"),
        (args.workers is None or args.workers >= 0, f"expected --workers >= 0, got {args.workers}"),
        (args.threads is None or args.threads >= 1, f"expected --threads >= 1, got {args.threads}"),
        (args.lr > 0, f"expected --lr > 0, got {args.lr}"),
        (0.0 <= args.warmup < 1.0, f"expected --warmup in [0, 1) (a fraction of the run), got {args.warmup}"),
        (0.0 <= args.label_smoothing < 1.0, f"expected --label-smoothing in [0, 1), got {args.label_smoothing}"),
        (0.0 < args.eval_crop_pct <= 1.0, f"expected --eval-crop-pct in (0, 1], got {args.eval_crop_pct}"),
        (args.image_size is None or args.image_size >= 8, f"expected --image-size >= 8, got {args.image_size}"),
    ]
    problem = next((message for ok, message in checks if not ok), None)
    if problem:
        return problem
    if args.val and "://" not in args.val and not os.path.isdir(args.val) and not _tar_matches(args.val):
        return f"expected --val an ImageFolder directory or webdataset .tar pattern, got {args.val!r} (not found)"
    if args.evaluate or not args.data:
        return _check_evaluate(args)
    if (args.targets == "online") != bool(args.teacher_checkpoint):
        if args.teacher_checkpoint:
            return f"expected --targets online with --teacher-checkpoint, got --targets {args.targets}"
        return "expected --teacher-checkpoint CHECKPOINT (repeatable) with --targets online"
    if _missing_locally(args.data):
        what = (
            "an ImageFolder directory, a webdataset .tar pattern or reinforced shards"
            if args.targets != "reinforced"
            else "reinforced shards (a folder holding manifest.json, or the manifest)"
        )
        return f"expected --data {what}, got {args.data!r} (not found)"
    kind = data_kind(args.data)
    if kind != "reinforced" and args.targets == "reinforced":
        what = "an ImageFolder" if kind == "folder" else "plain webdataset shards"
        return (
            f"expected reinforced shards (a folder or URL holding manifest.json) for --targets reinforced, got "
            f"{what} {args.data!r}: make them with make_shards.py, or train on labels with --targets labels"
        )
    if kind == "reinforced" and args.image_size is not None:
        return "expected no --image-size with reinforced shards (they are replayed at the size they were made at)"
    return None


def _check_evaluate(args: argparse.Namespace) -> str | None:
    """--evaluate's arguments: --val, and nothing that trains."""
    if not args.evaluate:
        return "expected --data (what to train on), or --evaluate CHECKPOINT with --val"
    if not args.val:
        return "expected --val (the held-out images) with --evaluate"
    training = [flag for flag, given in (("--data", args.data), ("--init", args.init)) if given]
    training += ["--teacher-checkpoint"] if args.teacher_checkpoint else []
    if training:
        return f"expected no {training[0]} with --evaluate (it evaluates checkpoints without training)"
    return None


def _missing_locally(spec: str) -> bool:
    """A local --data that names nothing there: no folder, no manifest file, no matching .tar."""
    if "://" in spec or os.path.exists(spec):
        return False
    return spec.endswith(".json") or not _tar_matches(spec)


def _tar_matches(spec: str) -> bool:
    import glob

    return ".tar" in spec and bool(glob.glob(spec.split("{", 1)[0].rstrip("*?[") + "*"))


def data_kind(spec: str) -> str:
    """``reinforced`` (a manifest, a folder or URL holding one), ``folder`` (ImageFolder) or ``shards`` (plain .tar)."""
    if "://" in spec or spec.endswith(".json"):
        return "reinforced"
    if os.path.isdir(spec):
        return "reinforced" if os.path.isfile(os.path.join(spec, "manifest.json")) else "folder"
    if ".tar" in spec:
        return "shards"
    return "reinforced"  # missing: reading its manifest says so


def _fail(message: str) -> int:
    print(f"{_PROG}: error: {message}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    problem = _check_args(args)
    if problem:
        return _fail(problem)
    from wds_reinforce.core.errors import UsageError

    try:
        return _evaluate(args) if args.evaluate else _train(args)
    except UsageError as exc:
        return _fail(str(exc).splitlines()[0])
    except KeyboardInterrupt:
        print(f"{_PROG}: interrupted" + (f"; nothing saved to {args.save}" if args.save else ""), file=sys.stderr)
        return 130


def _evaluate(args: argparse.Namespace) -> int:
    """--evaluate: one checkpoint's or an ensemble's metrics on --val, no training."""
    from wds_reinforce.cli.metrics import as_json, describe
    from wds_reinforce.cli.teachers import evaluate_checkpoints

    result = evaluate_checkpoints(args)
    metrics = result.pop("metrics")
    if args.json:
        print(json.dumps({**result, **as_json(metrics), "seconds": round(result["seconds"], 1)}), flush=True)
    else:
        what = " + ".join(result["teacher"]) + (" (mean of softmax)" if len(result["teacher"]) > 1 else "")
        h, w = result["image_size"]
        print(f"{what} on {result['images']} images at {h}x{w} px: {describe(metrics)}", flush=True)
    return 0


def _train(args: argparse.Namespace) -> int:
    from wds_reinforce.cli.finetune import resolve_model

    args.model = resolve_model(args.init, args.model)  # a bad --init fails before any data is read
    if args.save:  # its folder is made now: a run never ends unable to save
        try:
            os.makedirs(os.path.dirname(os.path.abspath(args.save)), exist_ok=True)
        except OSError as exc:
            return _fail(f"cannot make the folder of --save {args.save!r}: {exc.strerror or exc}")
    import timm

    if not timm.is_model(args.model):
        return _fail(f"unknown --model {args.model!r}; expected a timm model name (see timm.list_models())")

    import torch

    from wds_reinforce.cli import training
    from wds_reinforce.core.format import FormatError

    try:
        data = training.load_data(args, data_kind(args.data))
    except (FileNotFoundError, FormatError, ValueError) as exc:
        return _fail(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
    device = training.device_of(args.device)
    online = _online_targets(args, data, device)  # the teacher loads before the loader's workers start
    distributed, rank, world = training.start_distributed(device)
    workers, threads = training.workers_and_threads(args, data, world)
    torch.set_num_threads(threads)
    torch.manual_seed(args.seed)
    if rank == 0:
        _announce(args, data, workers, threads, device)
    dataset, sampler, loader = training.loader_for(data, args, rank, world, workers)
    steps = data.samples // (args.batch_size * world)
    if steps < 1:
        return _fail(f"expected at least --batch-size x ranks = {args.batch_size * world} samples, got {data.samples}")
    augmented = data.recipe if data.reinforced else data.fresh  # the recipe this run's views come from
    trainer = training.Trainer(args, len(data.class_names), device, steps, distributed, online, augmented)
    start, metrics, epoch_seconds = time.perf_counter(), None, []
    for epoch in range(args.epochs):
        (sampler if sampler is not None else dataset).set_epoch(epoch)
        forwards, teacher_seconds = (online.forwards, online.seconds) if online else (0, 0.0)
        losses, seconds = training.timed(lambda epoch=epoch: trainer.epoch(epoch, loader))
        epoch_seconds.append(seconds)
        metrics = trainer.evaluate(data.val)
        if rank == 0:
            teacher = (online.forwards - forwards, online.seconds - teacher_seconds) if online else None
            print(_epoch_line(args, epoch, losses, metrics, trainer.lr, teacher, seconds, start), flush=True)
    cost = _teacher_cost(online, distributed)
    if rank == 0:
        _finish(args, data, trainer, metrics, time.perf_counter() - start, epoch_seconds, (workers, threads), cost)
    if distributed:
        torch.distributed.destroy_process_group()
    return 0


def _online_targets(args: argparse.Namespace, data: Any, device: Any) -> Any:
    """--targets online: the teacher of --teacher-checkpoint, checked against the data's classes (else None)."""
    if args.targets != "online":
        return None
    from wds_reinforce.cli.teachers import OnlineTargets, check_classes, load_checkpoints

    teacher, infos = load_checkpoints(args.teacher_checkpoint, "--teacher-checkpoint", device)
    check_classes(teacher, infos, data.class_names, "--teacher-checkpoint", "--data")
    return OnlineTargets(teacher, device)


def _teacher_cost(online: Any, distributed: bool) -> tuple[int, float]:
    """(teacher forwards, teacher seconds) of the run, summed over ranks; (0, 0.0) without a teacher."""
    if online is None:
        return 0, 0.0
    if not distributed:
        return online.forwards, online.seconds
    import torch

    on = torch.device("cuda", torch.cuda.current_device()) if torch.distributed.get_backend() == "nccl" else "cpu"
    total = torch.tensor([float(online.forwards), online.seconds], dtype=torch.float64, device=on)
    torch.distributed.all_reduce(total)
    return int(total[0]), float(total[1])


def _epoch_line(
    args: argparse.Namespace,
    epoch: int,
    losses: list[float],
    metrics: dict[str, Any] | None,
    lr: float,
    teacher: tuple[int, float] | None,
    seconds: float,
    start: float,
) -> str:
    from wds_reinforce.cli.metrics import describe

    loss = sum(losses) / len(losses) if losses else float("nan")
    return (
        f"epoch {epoch + 1}/{args.epochs}: loss {loss:.4f}"
        + (f", val {describe(metrics)}" if metrics is not None else "")
        + f", lr {lr:.2e}"
        + (f", teacher {teacher[0]} forwards in {teacher[1]:.1f} s" if teacher is not None else "")
        + f" ({seconds:.0f} s; {time.perf_counter() - start:.0f} s)"
    )


def _announce(args: argparse.Namespace, data: Any, workers: int, threads: int, device: Any) -> None:
    from wds_reinforce.cli.training import recipe_label

    # Only for a baseline: a teacher (--save) is trained before any shards exist to compare with.
    if not data.reinforced and data.manifest is None and not args.recipe and not args.save:
        print(
            f"{_PROG}: note: the {args.targets} arm uses {recipe_label(data.fresh)}; to compare it with reinforced "
            f"shards, pass --recipe SHARDS to train on their augmentation",
            file=sys.stderr,
        )
    augmentation = recipe_label(data.recipe if data.reinforced else data.fresh)
    print(
        f"training timm:{args.model}{f' from {args.init}' if args.init else ''} on {data.samples} samples, "
        f"{len(data.class_names)} classes ({args.targets}), {augmentation}; {workers} workers, {threads} threads, "
        f"{device.type}",
        flush=True,
    )


def _finish(
    args: argparse.Namespace,
    data: Any,
    trainer: Any,
    metrics: dict[str, Any] | None,
    seconds: float,
    epoch_seconds: list[float],
    workers_threads: tuple[int, int],
    teacher_cost: tuple[int, float],
) -> None:
    """Save the checkpoint (``--save``) and print the result (a line, or ``--json``)."""
    from wds_reinforce.cli.metrics import as_json, describe
    from wds_reinforce.produce.checkpoint import save_checkpoint

    recipe = data.recipe if data.reinforced else data.fresh
    fields = as_json(metrics)
    if args.save:
        save_checkpoint(
            args.save,
            trainer.model.state_dict(),
            arch=f"timm:{args.model}",
            class_names=data.class_names,
            image_size=data.recipe.size,
            recipe=recipe.to_dict(),
            top1=fields["top1"],
            epochs=args.epochs,
            targets=args.targets,
            normalize={"mean": list(trainer.mean), "std": list(trainer.std)},  # what a teacher of it must use
        )
    if args.targets == "online":
        teacher = [name for _, name in trainer.targets.teacher.members]
    else:
        teacher = [m.get("name") for m in data.manifest.teacher.get("members", [])] if data.manifest else []
    result = {
        "model": args.model,
        "init": args.init,
        "targets": args.targets,
        "seed": args.seed,
        "epochs": args.epochs,
        "steps": trainer.step,
        "batch_size": args.batch_size,
        **fields,
        "train_seconds": round(seconds, 1),
        "epoch_seconds": [round(s, 1) for s in epoch_seconds],
        "teacher_forwards": teacher_cost[0],
        "teacher_seconds": round(teacher_cost[1], 1),
        "workers": workers_threads[0],
        "threads": workers_threads[1],
        "recipe": recipe.to_dict(),
        "normalize": {"mean": list(trainer.mean), "std": list(trainer.std), "from": trainer.normalized_by},
        "teacher": teacher,
    }
    final = f"final val {describe(metrics)}" if metrics is not None else "done"
    if args.targets == "online":
        final += f"; teacher {teacher_cost[0]} forwards in {teacher_cost[1]:.1f} s"
    print(json.dumps(result) if args.json else f"{final} after {trainer.step} steps in {seconds:.0f} s", flush=True)
    if args.save:
        size = data.recipe.size[0]
        print(f"saved {args.save} (timm:{args.model}, {len(data.class_names)} classes, {size} px)", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
