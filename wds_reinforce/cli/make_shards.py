r"""Make reinforced webdataset shards: source + teacher + recipe -> shards + manifest.

With no arguments, runs the built-in offline demo (generated images, a small teacher trained
here, shards in shards/demo/). Under torchrun, or with RANK and WORLD_SIZE set by hand (one
process per rank, the same --out), every rank takes its share of the shards.

    python tools/make_shards.py --source data/train --teacher timm:resnet50 \
        --teacher-checkpoint teacher.pth --recipe rrc+ra/re --rounds 16 --topk 10 --out shards/train
    python tools/make_shards.py --source data/train --teacher-checkpoint teacher.pt --image-size 64 \
        --out shards/mine      # a checkpoint saved by train.py --save names its model: no --teacher
    python tools/make_shards.py --source 'imgs/train-{000000..000099}.tar' --sidecars-only \
        --round-group 10 --rounds 400 --teacher timm:resnet50 --teacher-checkpoint r50.pth --out sets/train

On a terminal it shows a progress bar; in a log file, a line per finished shard. Ctrl-C stops
it; rerunning the same command resumes (finished shards are verified and kept).
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import sys
from typing import Any

from wds_reinforce.core.errors import DataError, UsageError, check_int
from wds_reinforce.core.threads import default_threads, default_workers, describe_defaults

__all__ = ["main", "build_parser"]

_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for Ctrl-C


def build_parser() -> argparse.ArgumentParser:  # long: one add_argument per option, nothing else
    p = argparse.ArgumentParser(
        prog="make_shards.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--config", help="YAML file of these options (command-line options win)")
    p.add_argument(
        "--source", help="ImageFolder dir, webdataset .tar pattern, or cifar100:ROOT / flowers102:ROOT / food101:ROOT"
    )
    p.add_argument(
        "--teacher",
        action="append",
        help="timm:NAME; repeat or comma-separate for an ensemble (default: the models the checkpoints name)",
    )
    p.add_argument(
        "--teacher-checkpoint",
        action="append",
        help="checkpoint per teacher member, loaded with weights_only=True: one saved by train.py --save "
        "(it names its model), or a state_dict",
    )
    p.add_argument("--teacher-num-classes", type=int, help="classifier size of teacher members without a checkpoint")
    p.add_argument(
        "--pretrained", action="store_true", help="load timm's pretrained weights for members without a checkpoint"
    )
    p.add_argument("--class-map", help="JSON {source class name: teacher class id}, for a teacher with other classes")
    p.add_argument(
        "--recipe",
        help="preset (rrc, rrc+mix, rrc+ra/re, rrc+ra/re+mix, center, cifar100+, flowers102+, food101+; +mix: "
        "MixUp/CutMix within windows of 16 samples of a shard, the teacher labels the mixture) or a YAML/JSON "
        "recipe file (default rrc)",
    )
    p.add_argument(
        "--image-size",
        type=int,
        help="output size of the recipe (overrides the recipe's; its resizes, crops and padding scale with it: "
        "cifar100+ at 32 resizes to 32 and pads by 2, 16 x 32 / 224)",
    )
    p.add_argument("--decode", choices=["full", "reduced"], help="decode mode (overrides the recipe's)")
    p.add_argument("--rounds", type=int, help="augmentation rounds per sample (default 8)")
    p.add_argument("--topk", type=int, help="teacher classes kept per round (default 10, at most the classes)")
    p.add_argument("--out", help="output folder or s3://bucket/prefix (default shards/out)")
    p.add_argument("--shard-size", type=int, help="source samples per shard (default 1000)")
    p.add_argument("--batch-size", type=int, help="images (samples x rounds) per teacher call (default 256)")
    p.add_argument(
        "--workers",
        type=int,
        help="DataLoader workers that decode and replay (default: half the available cores, at most 8)",
    )
    p.add_argument(
        "--threads",
        type=int,
        help="torch threads of the teacher's process (default: OMP_NUM_THREADS, else the available cores minus "
        "the workers; "
        f"{describe_defaults()})",
    )
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
    p.add_argument(
        "--sidecars-only",
        action="store_true",
        help="leave the --source image shards (plain webdataset shards: local, http(s), s3) where they are and "
        "write only sidecar shards aligned with them, grouped by --round-group (sidecar sets); rerun with more "
        "--rounds to add rounds",
    )
    p.add_argument(
        "--round-group",
        "--group-rounds",
        dest="round_group",
        type=int,
        metavar="G",
        help="with --sidecars-only: rounds per sidecar shard, of which an epoch reads one (default: all --rounds); "
        "--group-rounds is another name for it, as in import_mldr.py",
    )
    p.add_argument(
        "--class-names",
        metavar="FILE",
        help="with --sidecars-only: a UTF-8 text file naming the teacher's classes, one per line (line i: class i), "
        "for the manifest (default: the class_names of a manifest.json or _info.json beside the image shards, else "
        "the samples' json class_name, else 0..N-1)",
    )
    p.add_argument(
        "--add-teacher",
        metavar="NAME",
        help="add --teacher's targets, as teacher set NAME, to the sidecar set in --out for the rounds it stores "
        "(the parameters are replayed, not stored again); train with teacher=k or teacher='mean'",
    )
    p.add_argument(
        "--no-progress",
        action="store_true",
        help="print nothing while working (default: a bar on a terminal, else a line per finished shard)",
    )
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
    "threads": "threads",
    "seed": "seed",
    "device": "device",
    "name": "name",
    "split": "split",
    "shuffle": "shuffle",
    "sidecars_only": "sidecars_only",
    "round_group": "round_group",
    "class_names": "class_names",
}


def _add_teacher(args: argparse.Namespace, options: dict[str, Any]) -> int:
    if not options.get("out") or not options.get("teacher"):
        return _fail("expected --out (the sidecar set) and --teacher with --add-teacher")
    from wds_reinforce.produce.teacher_sets import add_teacher_set

    try:
        manifest = add_teacher_set(
            options["out"],
            options["teacher"],
            args.add_teacher,
            batch_size=options.get("batch_size", 256),
            device=options.get("device", "auto"),
            teacher_checkpoint=options.get("teacher_checkpoint"),
            teacher_num_classes=options.get("teacher_num_classes"),
            pretrained=bool(options.get("pretrained")),
            progress=not args.no_progress,
        )
    except UsageError as exc:
        return _fail(_as_flags(str(exc)))
    except DataError as exc:  # e.g. an image shard changed since the set was made
        return _fail(str(exc))
    names = [t.name for t in manifest.teacher_sets]
    print(f"{options['out']}: teacher sets {names} beside the manifest's own teacher (use teacher=k or 'mean')")
    return 0


def _fail(message: str) -> int:
    print(f"make_shards.py: error: {message}", file=sys.stderr)
    return 2


# The library's errors name its arguments (topk, class_map); this command's name the flags that set them.
_IDENTIFIERS = (
    "topk",
    "class_map",
    "class_names",
    "image_size",
    "round_group",
    "shard_size",
    "batch_size",
    "teacher_num_classes",
)
_WORDS = ("rounds", "workers", "threads", "seed", "split")  # English too: flags only as "expected NAME", "NAME="
_FLAG_OF = {name: "--" + name.replace("_", "-") for name in _IDENTIFIERS + _WORDS}
_ARGUMENT = re.compile(
    r"(?<![\w'\"/.-])(?:(?P<id>{})|(?<=expected )(?P<word>{})(?= )|(?P<set>{})(?==))(?![\w'\"/.-])".format(
        "|".join(_IDENTIFIERS), "|".join(_WORDS), "|".join(_WORDS)
    )
)


def _as_flags(message: str) -> str:
    """A library error in this command's words: each argument it names becomes its flag."""
    return _ARGUMENT.sub(lambda m: _FLAG_OF[m.group(m.lastgroup)], message)


def _cheap_checks(options: dict[str, Any]) -> str | None:
    """A complaint about an argument that needs no torch, or None (the producer checks the rest)."""
    numbers = (("rounds", 1), ("topk", 1), ("shard_size", 1), ("batch_size", 1), ("workers", 0), ("threads", 1))
    try:
        for name, minimum in numbers:
            if options.get(name) is not None:
                check_int(_FLAG_OF[name], options[name], minimum)
    except UsageError as exc:
        return str(exc)
    source = options.get("source")
    if isinstance(source, str) and "://" not in source and not _is_registered_spec(source):
        pattern = source.split("{", 1)[0] if ".tar" in source else source
        if ".tar" in source and not glob.glob(pattern.rstrip("*?[") + "*"):
            return f"expected existing webdataset shard(s), got {source!r} (not found)"
        if ".tar" not in source and not os.path.isdir(source):
            return f"expected a source directory, .tar shard pattern or NAME:ROOT, got {source!r} (not found)"
    for ckpt in _as_list(options.get("teacher_checkpoint")):
        if ckpt and not os.path.isfile(ckpt):
            return f"expected a teacher checkpoint file, got {ckpt!r} (not found)"
    return None


def _as_list(value: Any) -> list[Any]:
    return [value] if isinstance(value, str) else list(value or [])


def _is_registered_spec(source: str) -> bool:
    name, sep, _ = source.partition(":")
    return bool(sep) and name.isidentifier() and len(name) > 1 and not os.path.exists(source)


def _teacher_from_checkpoints(checkpoints: list[str]) -> list[str]:
    """The members that checkpoints saved by train.py name (``--teacher`` left out)."""
    from wds_reinforce.produce.checkpoint import checkpoint_info

    members = []
    for ckpt in checkpoints:
        arch = checkpoint_info(ckpt).get("arch")
        if not isinstance(arch, str):
            raise ValueError(
                f"expected --teacher (e.g. timm:resnet50): the checkpoint {ckpt!r} does not say which model it holds"
            )
        members.append(arch)
    return members


def _named_recipe(spec: Any) -> Any:
    """A recipe file's recipe, named after the file unless it names itself (not "custom" in the manifest)."""
    if not (isinstance(spec, str) and spec.endswith((".yaml", ".yml", ".json")) and os.path.isfile(spec)):
        return spec
    from wds_reinforce.core.augment import Recipe

    try:
        recipe = Recipe.from_spec(spec)
    except ValueError:
        return spec  # the producer says what is wrong with it
    desc = recipe.to_dict()
    if desc.get("name") == "custom":
        desc["name"] = os.path.basename(spec)
    return desc


class _Refused(Exception):
    """A bad argument found while reading the command line: its one-line message."""


def _options(args: argparse.Namespace) -> dict[str, Any]:
    """The job's options: ``--config`` YAML, overridden by the flags given.

    Raises:
        _Refused: an unreadable or unknown ``--config``.
    """
    options: dict[str, Any] = {}
    if args.config:
        import yaml

        try:
            with open(args.config) as f:
                loaded = yaml.safe_load(f) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise _Refused(f"expected a readable YAML --config, got {args.config!r} ({exc})") from None
        if not isinstance(loaded, dict):
            raise _Refused(f"expected a YAML mapping in --config, got {type(loaded).__name__}")
        loaded = {k.replace("-", "_"): v for k, v in loaded.items()}
        unknown = sorted(set(loaded) - set(_KEYS))
        if unknown:
            raise _Refused(f"unknown --config option(s) {unknown}; expected some of {sorted(_KEYS)}")
        options.update(loaded)
    for key in _KEYS:
        value = getattr(args, key, None)  # config-only keys (shuffle) have no flag of that name
        if value is not None and value is not False:
            options[key] = value
    if args.no_shuffle:
        options["shuffle"] = False
    return options


def _demo() -> int:
    from wds_reinforce.cli.demo import run_demo

    try:
        run_demo()
    except KeyboardInterrupt:
        print("make_shards.py: interrupted; rerun the same command to resume", file=sys.stderr)
        return _INTERRUPTED
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        return _demo()
    args = build_parser().parse_args(argv)
    try:
        options = _options(args)
    except _Refused as exc:
        return _fail(str(exc))
    if args.add_teacher:
        return _add_teacher(args, options)
    if not options.get("source"):
        return _fail("expected --source (or run with no arguments for the demo)")
    if not options.get("teacher") and not options.get("teacher_checkpoint"):
        return _fail("expected --teacher, e.g. timm:resnet50 (or a --teacher-checkpoint saved by train.py)")
    problem = _cheap_checks(options)
    if problem:
        return _fail(problem)
    options.setdefault("out", "shards/out")
    # The teacher runs in this process next to the workers (one thread each): share the cores.
    if options.get("workers") is None:
        options["workers"] = default_workers()
    threads = options.pop("threads", None) or default_threads(options["workers"])
    return _make(options, threads, progress=not args.no_progress)


def _make(options: dict[str, Any], threads: int, progress: bool) -> int:
    """Check the options, run the job, print its summary (Ctrl-C: what was kept)."""
    import torch

    from wds_reinforce.produce.make import DEFAULT_TOPK, prepare_job, prepare_sidecar_job

    torch.set_num_threads(threads)
    job = None
    try:
        if not options.get("teacher"):
            try:
                options["teacher"] = _teacher_from_checkpoints(_as_list(options["teacher_checkpoint"]))
            except ValueError as exc:
                return _fail(str(exc))
        options["recipe"] = _named_recipe(options.get("recipe", "rrc"))
        try:
            if options.pop("sidecars_only", False):
                job = prepare_sidecar_job(progress=progress, **options)
            elif options.get("round_group") is not None or options.get("class_names") is not None:
                flag = "--round-group" if options.get("round_group") is not None else "--class-names"
                return _fail(f"expected {flag} only with --sidecars-only")
            else:
                job = prepare_job(progress=progress, **options)
        except UsageError as exc:
            return _fail(_as_flags(str(exc)))
        if options.get("topk") is None and job.topk < DEFAULT_TOPK:
            print(
                f"make_shards.py: note: keeping all {job.topk} classes per round (the default --topk "
                f"{DEFAULT_TOPK} is more than there are)",
                file=sys.stderr,
            )
        summary = job.run()
    except DataError as exc:  # e.g. an image shard changed since a sidecar set was made from it
        return _fail(str(exc))
    except KeyboardInterrupt:
        kept = job.finished_shards() if job is not None else 0
        print(f"make_shards.py: interrupted; rerun the same command to resume, {kept} shards kept", file=sys.stderr)
        return _INTERRUPTED
    print(summary.format())  # rank 0: every rank's work; another rank: its own share
    return 0


if __name__ == "__main__":
    sys.exit(main())
