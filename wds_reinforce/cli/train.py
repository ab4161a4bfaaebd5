"""Reference training on reinforced shards: a timm model, soft-target cross entropy, cosine LR.

A small script to copy from. It trains on the reinforced shards either with the teacher's soft
targets (``--targets reinforced``: one stored round per epoch, replayed exactly) or with plain
labels (``--targets labels``: fresh random augmentations of the same recipe, one-hot targets),
so the two arms see the same images, augmentation distribution, epochs and iterations. It
evaluates top-1 on a held-out split (an ImageFolder directory or webdataset shards) with a
center crop. CPU or GPU; under ``torchrun`` it trains with DDP.

    python tools/train.py --data shards/demo --val shards/demo/source/val --model resnet10t \\
        --epochs 10 --targets reinforced --seed 0
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time

import numpy as np
import torch
import torch.distributed as dist


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="train.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--data", required=True, help="reinforced shards: folder / URL prefix with manifest.json, or the manifest"
    )
    p.add_argument("--val", required=True, help="held-out images: ImageFolder directory or webdataset .tar pattern")
    p.add_argument("--model", default="resnet10t", help="timm model name, random init (default resnet10t)")
    p.add_argument(
        "--targets",
        choices=["reinforced", "labels"],
        default="reinforced",
        help="teacher soft targets or one-hot labels",
    )
    p.add_argument(
        "--p", type=float, default=1.0, help="probability of a reinforced round per sample (paper: 0.99; default 1.0)"
    )
    p.add_argument(
        "--densify", choices=["smooth", "zeros"], default="smooth", help="sparse -> dense targets (default smooth)"
    )
    p.add_argument(
        "--recipe",
        help="augmentation of the labels arm (and of non-reinforced samples): a preset or "
        "YAML/JSON recipe file, at the shards' size (default: the shards' own recipe)",
    )
    p.add_argument("--label-smoothing", type=float, default=0.1, help="smoothing of one-hot targets (default 0.1)")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--opt", choices=["sgd", "adamw"], default="adamw")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--warmup-epochs", type=float, default=1.0)
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers (default 2)")
    p.add_argument(
        "--eval-crop-pct", type=float, default=0.875, help="center crop fraction for evaluation (default 0.875)"
    )
    p.add_argument("--seed", type=int, default=0, help="seeds the model init, the round schedule and shuffling")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads in the main process (0: torch's default)")
    p.add_argument("--save", help="write the final state_dict here")
    p.add_argument("--json", action="store_true", help="print the final result as one JSON line")
    return p


def _check_args(args: argparse.Namespace) -> str | None:
    """A one-line complaint about an argument, or None."""
    checks = [
        (0.0 <= args.p <= 1.0, f"expected --p in [0, 1], got {args.p}"),
        (args.epochs >= 1, f"expected --epochs >= 1, got {args.epochs}"),
        (args.batch_size >= 1, f"expected --batch-size >= 1, got {args.batch_size}"),
        (args.workers >= 0, f"expected --workers >= 0, got {args.workers}"),
        (args.lr > 0, f"expected --lr > 0, got {args.lr}"),
        (0.0 <= args.label_smoothing < 1.0, f"expected --label-smoothing in [0, 1), got {args.label_smoothing}"),
        (0.0 < args.eval_crop_pct <= 1.0, f"expected --eval-crop-pct in (0, 1], got {args.eval_crop_pct}"),
    ]
    return next((message for ok, message in checks if not ok), None)


def _device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cpu")
    return torch.device(name)


def _val_views(spec: str, recipe_size: tuple[int, int], crop_pct: float) -> tuple[torch.Tensor, torch.Tensor]:
    from wds_reinforce.augment import Recipe, replay
    from wds_reinforce.sources import open_source

    source = open_source(spec)
    view = Recipe([{"op": "center", "crop_pct": crop_pct}], size=recipe_size)
    images = torch.stack([replay(source[i].data, {}, view) for i in range(len(source))])
    labels = torch.tensor([source[i].label for i in range(len(source))])
    return images, labels


@torch.inference_mode()
def evaluate(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, mean, std, device) -> float:
    from wds_reinforce.augment import normalize

    model.eval()
    correct = 0
    for b in range(0, len(images), 256):
        x = normalize(images[b : b + 256].to(device), mean, std)
        correct += int((model(x).argmax(1).cpu() == labels[b : b + 256]).sum())
    return correct / len(images)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import timm

    from wds_reinforce.augment import Recipe, normalize
    from wds_reinforce.dataset import ReinforcedDataset
    from wds_reinforce.format import FormatError
    from wds_reinforce.storage import manifest_url, read_manifest
    from wds_reinforce.targets import soft_cross_entropy

    parser_error = _check_args(args)
    if parser_error:
        print(f"train.py: error: {parser_error}", file=sys.stderr)
        return 2
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    device = _device(args.device)
    if distributed:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        if device.type == "cuda":
            torch.cuda.set_device(device)
    rank = dist.get_rank() if distributed else 0
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    reinforced = args.targets == "reinforced"
    try:
        manifest = read_manifest(manifest_url(args.data))
    except (FileNotFoundError, FormatError) as exc:
        print(f"train.py: error: {exc}", file=sys.stderr)
        return 2
    recipe = Recipe.from_dict(manifest.recipe)
    try:
        fresh = Recipe.from_spec(args.recipe, size=recipe.size) if args.recipe else recipe
        val_images, val_labels = _val_views(args.val, recipe.size, args.eval_crop_pct)
    except ValueError as exc:
        print(f"train.py: error: {exc}", file=sys.stderr)
        return 2
    # Labels arm: fresh augmentations each epoch (p=0 never uses a stored round); by default
    # the shards' recipe, so both arms see the same augmentation distribution.
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
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=args.batch_size,
        num_workers=args.workers,
        persistent_workers=args.workers > 0,
        drop_last=True,
    )
    world = dist.get_world_size() if distributed else 1
    steps_per_epoch = manifest.num_samples // (args.batch_size * world)
    model = timm.create_model(args.model, pretrained=False, num_classes=manifest.num_classes).to(device)
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
    warmup = int(args.warmup_epochs * steps_per_epoch)

    def lr_at(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    start, step, top1 = time.perf_counter(), 0, 0.0
    for epoch in range(args.epochs):
        dataset.set_epoch(epoch)
        train_model.train()
        losses = []
        # Under DDP a rank whose shards run out first must not leave the others waiting in an
        # all-reduce: join() shadows its missing steps.
        with train_model.join() if distributed else contextlib.nullcontext():
            for images, target in loader:
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
        top1 = evaluate(model, val_images, val_labels, mean, std, device)
        if rank == 0:
            print(
                f"epoch {epoch + 1}/{args.epochs}: loss {np.mean(losses):.4f}, val top-1 {top1:.2%} "
                f"({time.perf_counter() - start:.0f} s)",
                flush=True,
            )
    seconds = time.perf_counter() - start
    if rank == 0:
        if args.save:
            torch.save(model.state_dict(), args.save)
        result = {
            "model": args.model,
            "targets": args.targets,
            "seed": args.seed,
            "epochs": args.epochs,
            "steps": step,
            "batch_size": args.batch_size,
            "top1": round(100 * top1, 2),
            "train_seconds": round(seconds, 1),
            "teacher": [m.get("name") for m in manifest.teacher.get("members", [])],
        }
        print(json.dumps(result) if args.json else f"final val top-1 {top1:.2%} after {step} steps in {seconds:.0f} s")
    if distributed:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
