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
It evaluates top-1 on a held-out split (ImageFolder or webdataset shards) with a center crop
after every epoch. CPU or GPU; under torchrun it trains with DDP. --save writes a checkpoint
(weights_only-safe) that names its model, classes and input size.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
from typing import Any

from wds_reinforce.core.threads import default_threads, default_workers, describe_defaults

__all__ = ["build_parser", "main", "lr_factor"]

_PROG = "train.py"


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Every option's default in its help, unless the help already says it (or there is none)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "(default" in text or action.default in (None, False, argparse.SUPPRESS) or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)".lstrip()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=_PROG, description=__doc__, formatter_class=_Formatter)
    p.add_argument(
        "--data",
        required=True,
        help="reinforced shards (a folder or URL prefix holding manifest.json, or the manifest); with "
        "--targets labels also an ImageFolder directory or a plain webdataset .tar pattern",
    )
    p.add_argument(
        "--val", help="held-out images, ImageFolder directory or webdataset .tar pattern (default: no evaluation)"
    )
    p.add_argument("--model", default="resnet10t", help="timm model name, random init")
    p.add_argument(
        "--targets",
        choices=["reinforced", "labels"],
        default="reinforced",
        help="the teacher's soft targets (reinforced shards) or one-hot labels",
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


def lr_factor(step: int, total: int, warmup: float) -> float:
    """LR multiplier at ``step`` of ``total``: linear warm-up over the first ``warmup`` fraction, then cosine to 0.

    A fraction (not epochs) so that a 1-epoch run decays and a 2-epoch run does not spend half
    its steps warming up.
    """
    warm = int(warmup * total)
    if step < warm:
        return (step + 1) / warm
    return 0.5 * (1 + math.cos(math.pi * min(step - warm, total - warm) / max(1, total - warm)))


def _device(name: str) -> Any:
    import torch

    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cpu")
    return torch.device(name)


def _val_views(spec: str, recipe_size: tuple[int, int], crop_pct: float) -> tuple[Any, Any]:
    import torch

    from wds_reinforce.core.augment import Recipe, replay
    from wds_reinforce.produce.sources import open_source

    source = open_source(spec)
    view = Recipe([{"op": "center", "crop_pct": crop_pct}], size=recipe_size)
    images = torch.stack([replay(source[i].data, {}, view) for i in range(len(source))])
    labels = torch.tensor([source[i].label for i in range(len(source))])
    return images, labels


def evaluate(model: Any, images: Any, labels: Any, mean: Any, std: Any, device: Any) -> float:
    import torch

    from wds_reinforce.core.augment import normalize

    model.eval()
    correct = 0
    with torch.inference_mode():
        for b in range(0, len(images), 256):
            x = normalize(images[b : b + 256].to(device), mean, std)
            correct += int((model(x).argmax(1).cpu() == labels[b : b + 256]).sum())
    return correct / len(images)


def _recipe_label(recipe: Any) -> str:
    """``rrc(scale 0.08-1) + flip at 64x64 px``: what an arm's augmentation is, in one line."""
    parts = []
    for op in recipe.to_dict()["ops"]:
        if op["op"] in ("rrc", "re") and "scale" in op:
            parts.append(f"{op['op']}(scale {op['scale'][0]:g}-{op['scale'][1]:g})")
        else:
            parts.append(op["op"])
    h, w = recipe.size
    return f"{recipe.name}: {' + '.join(parts)} at {h}x{w} px"


def _resolve_recipe(spec: str | None, size: int | None, default_size: tuple[int, int] | None) -> Any:
    """A recipe from a preset, a file, or reinforced shards (theirs), at ``size`` if given."""
    from wds_reinforce.core.augment import Recipe
    from wds_reinforce.layouts import manifest_url, read_manifest

    if spec is not None and data_kind(spec) == "reinforced" and (os.path.isdir(spec) or "://" in spec):
        recipe = Recipe.from_dict(read_manifest(manifest_url(spec)).recipe)
        recipe.name = f"{recipe.name} (from {spec})"
        return Recipe.from_spec(recipe, size=size) if size else recipe
    return Recipe.from_spec(spec or "rrc", size=size or default_size)


class _EpochSampler:
    """This rank's share of a seeded permutation per epoch, as ``epoch * n + index`` (so workers know the epoch)."""

    def __init__(self, n: int, seed: int, rank: int, world: int):
        self.n, self.seed, self.rank, self.world = n, seed, rank, world
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n // self.world

    def __iter__(self):
        import numpy as np

        order = np.random.default_rng([self.seed, self.epoch, 0x53414D50]).permutation(self.n)
        mine = order[self.rank :: self.world][: len(self)]
        return iter((self.epoch * self.n + mine).tolist())


class LabelledImages:
    """A source (ImageFolder or plain shards) as training samples: fresh augmentations, one-hot targets.

    Item ``epoch * len + i`` is sample i augmented with parameters seeded by (seed, epoch, i).
    An image that cannot be read or decoded gives None: dropped from its batch, and said once on stderr.
    """

    def __init__(self, source: Any, recipe: Any, seed: int, num_classes: int, label_smoothing: float):
        self.source, self.recipe, self.seed = source, recipe, seed
        self.num_classes, self.label_smoothing = num_classes, label_smoothing
        self._reported: set[int] = set()  # said once per process, not every epoch

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, item: int) -> Any:
        import numpy as np
        import torch

        from wds_reinforce.core.augment import replay
        from wds_reinforce.core.decode import SourceImage
        from wds_reinforce.core.errors import DataError

        epoch, index = divmod(item, len(self.source))
        try:
            sample = self.source[index]
            src = SourceImage(sample.data)
            params = self.recipe.sample(np.random.default_rng([self.seed, epoch, index]), src.size)
            image = replay(src, params, self.recipe)
        except (DataError, OSError) as exc:
            if index not in self._reported:
                self._reported.add(index)
                print(f"{_PROG}: skipped sample {self.source.key(index)}: {exc}", file=sys.stderr)
            return None
        target = torch.full((self.num_classes,), self.label_smoothing / self.num_classes)
        target[sample.label] += 1.0 - self.label_smoothing
        return image, target


def _collate(batch: list[Any]) -> Any:
    import torch.utils.data

    kept = [b for b in batch if b is not None]
    return torch.utils.data.default_collate(kept) if kept else None


def _fail(message: str) -> int:
    print(f"{_PROG}: error: {message}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    problem = _check_args(args)
    if problem:
        return _fail(problem)
    try:
        return _train(args)
    except KeyboardInterrupt:
        print(f"{_PROG}: interrupted" + (f"; nothing saved to {args.save}" if args.save else ""), file=sys.stderr)
        return 130


def _train(args: argparse.Namespace) -> int:

    import numpy as np
    import timm
    import torch
    import torch.distributed as dist

    if not timm.is_model(args.model):
        return _fail(f"unknown --model {args.model!r}; expected a timm model name (see timm.list_models())")

    from wds_reinforce.core.augment import normalize
    from wds_reinforce.core.format import FormatError
    from wds_reinforce.core.targets import soft_cross_entropy
    from wds_reinforce.layouts import layout_of, manifest_url, read_manifest
    from wds_reinforce.produce.checkpoint import save_checkpoint
    from wds_reinforce.produce.sources import open_source
    from wds_reinforce.read.dataset import ReinforcedDataset

    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    world = int(os.environ.get("WORLD_SIZE", "1"))
    kind = data_kind(args.data)
    reinforced = args.targets == "reinforced"
    try:
        if kind == "reinforced":
            manifest = read_manifest(manifest_url(args.data))
            from wds_reinforce.core.augment import Recipe

            recipe = Recipe.from_dict(manifest.recipe)
            # Labels arm: fresh augmentations (p=0 never uses a stored round); by default the
            # shards' recipe, so both arms see the same augmentation distribution.
            fresh = _resolve_recipe(args.recipe, None, recipe.size) if args.recipe else recipe
            class_names = list(manifest.class_names) or [str(i) for i in range(manifest.num_classes)]
            layout = layout_of(manifest)  # every worker of every rank needs a shard to read: one of the set's units
            samples, num_shards = layout.num_samples(manifest), len(layout.units(manifest, ""))
            source = None
        else:
            source = open_source(args.data)
            recipe = fresh = _resolve_recipe(args.recipe, args.image_size, None)
            class_names, samples, num_shards = list(source.class_names), len(source), None
        val = _val_views(args.val, recipe.size, args.eval_crop_pct) if args.val else None
    except (FileNotFoundError, FormatError, ValueError) as exc:
        return _fail(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
    num_classes = len(class_names)

    workers = args.workers
    if workers is None:
        workers = default_workers()
        if num_shards is not None:  # every worker of every rank needs a shard
            workers = min(workers, max(0, num_shards // world))
    threads = args.threads or default_threads(workers)
    torch.set_num_threads(threads)

    device = _device(args.device)
    if distributed:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        if device.type == "cuda":
            torch.cuda.set_device(device)
    rank = dist.get_rank() if distributed else 0
    torch.manual_seed(args.seed)

    def say(line: str) -> None:
        if rank == 0:
            print(line, flush=True)

    if rank == 0 and not reinforced and kind != "reinforced" and not args.recipe:
        print(
            f"{_PROG}: note: the labels arm uses {_recipe_label(fresh)}; to compare it with reinforced shards, "
            f"pass --recipe SHARDS to train on their augmentation",
            file=sys.stderr,
        )
    augmentation = _recipe_label(recipe if reinforced else fresh)
    say(
        f"training timm:{args.model} on {samples} samples, {num_classes} classes ({args.targets}), "
        f"{augmentation}; {workers} workers, {threads} threads, {device.type}"
    )

    if source is None:
        dataset = ReinforcedDataset(
            args.data,
            manifest=manifest,
            seed=args.seed,
            p=args.p if reinforced else 0.0,
            densify=args.densify,
            label_smoothing=args.label_smoothing,
            fallback_recipe=fresh,
            shardshuffle=True,
            shuffle=1000,
        )
        sampler = None
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=args.batch_size, num_workers=workers, persistent_workers=workers > 0, drop_last=True
        )
    else:
        dataset = LabelledImages(source, fresh, args.seed, num_classes, args.label_smoothing)
        sampler = _EpochSampler(len(source), args.seed, rank, world)
        loader = torch.utils.data.DataLoader(
            dataset,
            batch_size=args.batch_size,
            sampler=sampler,
            num_workers=workers,
            persistent_workers=workers > 0,
            drop_last=True,
            collate_fn=_collate,
        )
    steps_per_epoch = samples // (args.batch_size * world)
    if steps_per_epoch < 1:
        return _fail(f"expected at least --batch-size x ranks = {args.batch_size * world} samples, got {samples}")
    model = timm.create_model(args.model, pretrained=False, num_classes=num_classes).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    cfg = model.pretrained_cfg
    mean, std = cfg.get("mean", (0.485, 0.456, 0.406)), cfg.get("std", (0.229, 0.224, 0.225))
    train_model = torch.nn.parallel.DistributedDataParallel(model) if distributed else model
    if args.opt == "sgd":
        opt = torch.optim.SGD(
            model.parameters(), lr=args.lr, momentum=0.9, weight_decay=args.weight_decay, nesterov=True
        )
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    total = args.epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_factor(step, total, args.warmup))
    start, step, top1 = time.perf_counter(), 0, None
    epoch_seconds = []
    for epoch in range(args.epochs):
        began = time.perf_counter()
        if sampler is not None:
            sampler.set_epoch(epoch)
        else:
            dataset.set_epoch(epoch)
        train_model.train()
        losses = []
        # Under DDP a rank whose shards run out first must not leave the others waiting in an
        # all-reduce: join() shadows its missing steps.
        with train_model.join() if distributed else contextlib.nullcontext():
            for batch in loader:
                if batch is None:
                    continue  # every image of the batch unreadable (each said so)
                images, target = batch
                if step >= (epoch + 1) * steps_per_epoch:
                    break  # at most the same iterations per epoch on every rank
                x = normalize(images.to(device, non_blocking=True), mean, std)
                loss = soft_cross_entropy(train_model(x), target.to(device, non_blocking=True))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                losses.append(loss.item())
                step += 1
        epoch_seconds.append(time.perf_counter() - began)
        top1 = evaluate(model, *val, mean, std, device) if val is not None else None
        say(
            f"epoch {epoch + 1}/{args.epochs}: loss {np.mean(losses) if losses else float('nan'):.4f}"
            + (f", val top-1 {top1:.2%}" if top1 is not None else "")
            + f", lr {opt.param_groups[0]['lr']:.2e} ({epoch_seconds[-1]:.0f} s; {time.perf_counter() - start:.0f} s)"
        )
    seconds = time.perf_counter() - start
    if rank == 0:
        if args.save:
            save_checkpoint(
                args.save,
                model.state_dict(),
                arch=f"timm:{args.model}",
                class_names=class_names,
                image_size=recipe.size,
                recipe=(recipe if reinforced else fresh).to_dict(),
                top1=None if top1 is None else round(100 * top1, 2),
                epochs=args.epochs,
                targets=args.targets,
            )
        result = {
            "model": args.model,
            "targets": args.targets,
            "seed": args.seed,
            "epochs": args.epochs,
            "steps": step,
            "batch_size": args.batch_size,
            "top1": None if top1 is None else round(100 * top1, 2),
            "train_seconds": round(seconds, 1),
            "epoch_seconds": [round(s, 1) for s in epoch_seconds],
            "workers": workers,
            "threads": threads,
            "recipe": (recipe if reinforced else fresh).to_dict(),
            "teacher": [m.get("name") for m in manifest.teacher.get("members", [])] if source is None else [],
        }
        final = f"final val top-1 {top1:.2%}" if top1 is not None else "done"
        print(json.dumps(result) if args.json else f"{final} after {step} steps in {seconds:.0f} s")
        if args.save:
            print(f"saved {args.save} (timm:{args.model}, {num_classes} classes, {recipe.size[0]} px)", file=sys.stderr)
    if distributed:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
