r"""Make reinforced webdataset shards: source + teacher + recipe -> shards + manifest.

With no arguments, runs the built-in offline demo (generated images, a small teacher trained
here, shards in shards/demo/). Under torchrun every rank takes its share of the shards.

    python tools/make_shards.py --source data/train --teacher timm:resnet50 \
        --teacher-checkpoint teacher.pth --recipe rrc+ra/re --rounds 16 --topk 10 --out shards/train
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="make_shards.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--config", help="YAML file of these options (command-line options win)")
    p.add_argument(
        "--source", help="ImageFolder dir, webdataset .tar pattern, or cifar100:ROOT / flowers102:ROOT / food101:ROOT"
    )
    p.add_argument("--teacher", action="append", help="timm:NAME; repeat or comma-separate for an ensemble")
    p.add_argument(
        "--teacher-checkpoint", action="append", help="state_dict per teacher member (loaded with weights_only=True)"
    )
    p.add_argument("--teacher-num-classes", type=int, help="classifier size of teacher members without a checkpoint")
    p.add_argument(
        "--pretrained", action="store_true", help="load timm's pretrained weights for members without a checkpoint"
    )
    p.add_argument("--class-map", help="JSON {source class name: teacher class id}, for a teacher with other classes")
    p.add_argument("--recipe", help="preset (rrc, rrc+ra/re, center) or a YAML/JSON recipe file (default rrc)")
    p.add_argument("--image-size", type=int, help="output size of the recipe (overrides the recipe's)")
    p.add_argument("--decode", choices=["full", "reduced"], help="decode mode (overrides the recipe's)")
    p.add_argument("--rounds", type=int, help="augmentation rounds per sample (default 8)")
    p.add_argument("--topk", type=int, help="teacher classes kept per round (default 10)")
    p.add_argument("--out", help="output folder or s3://bucket/prefix (default shards/out)")
    p.add_argument("--shard-size", type=int, help="source samples per shard (default 1000)")
    p.add_argument("--batch-size", type=int, help="images (samples x rounds) per teacher call (default 256)")
    p.add_argument("--workers", type=int, help="DataLoader workers that decode and replay (default 4)")
    p.add_argument("--seed", type=int, help="seed of the augmentation parameters (default 0)")
    p.add_argument("--device", help="auto (default), cpu, cuda, cuda:N")
    p.add_argument("--name", help="dataset name in the manifest (default reinforced)")
    p.add_argument("--split", help="split name; shards are SPLIT-000000.tar (default train)")
    p.add_argument(
        "--no-shuffle",
        action="store_true",
        help="keep the source's order in the shards (default: a permutation seeded by --seed, so that "
        "class-sorted sources such as ImageFolder give mixed shards)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


_KEYS = {
    "source": "source",
    "teacher": "teacher",
    "teacher_checkpoint": "teacher_checkpoint",
    "teacher_num_classes": "teacher_num_classes",
    "pretrained": "pretrained",
    "class_map": "class_map",
    "recipe": "recipe",
    "image_size": "image_size",
    "decode": "decode",
    "rounds": "rounds",
    "topk": "topk",
    "out": "out",
    "shard_size": "shard_size",
    "batch_size": "batch_size",
    "workers": "workers",
    "seed": "seed",
    "device": "device",
    "name": "name",
    "split": "split",
    "shuffle": "shuffle",
}


def _fail(message: str) -> int:
    print(f"make_shards.py: error: {message}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        from wds_reinforce.demo import run_demo

        run_demo()
        return 0
    args = build_parser().parse_args(argv)
    options: dict[str, Any] = {}
    if args.config:
        import yaml

        try:
            with open(args.config) as f:
                loaded = yaml.safe_load(f) or {}
        except (OSError, yaml.YAMLError) as exc:
            return _fail(f"expected a readable YAML --config, got {args.config!r} ({exc})")
        if not isinstance(loaded, dict):
            return _fail(f"expected a YAML mapping in --config, got {type(loaded).__name__}")
        loaded = {k.replace("-", "_"): v for k, v in loaded.items()}
        unknown = sorted(set(loaded) - set(_KEYS))
        if unknown:
            return _fail(f"unknown --config option(s) {unknown}; expected some of {sorted(_KEYS)}")
        options.update(loaded)
    for key in _KEYS:
        value = getattr(args, key, None)  # config-only keys (shuffle) have no flag of that name
        if value is not None and value is not False:
            options[key] = value
    if not options.get("source"):
        return _fail("expected --source (or run with no arguments for the demo)")
    if not options.get("teacher"):
        return _fail("expected --teacher, e.g. timm:resnet50")
    options.setdefault("out", "shards/out")
    if args.no_shuffle:
        options["shuffle"] = False
    progress = not args.no_progress

    from wds_reinforce.errors import UsageError
    from wds_reinforce.producer import prepare_job

    try:
        job = prepare_job(progress=progress, **options)
    except UsageError as exc:
        return _fail(str(exc))
    summary = job.run()
    if summary.manifest_written:
        print(summary.format())
    else:
        print(f"rank {job.rank}: made {summary.made} shards, reused {summary.reused}; rank 0 writes the manifest")
    return 0


if __name__ == "__main__":
    sys.exit(main())
