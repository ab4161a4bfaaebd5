"""The producer's entry points: check every argument, build a ``writer.ReinforceJob``, run it.

``prepare_job`` fails with a ``UsageError`` before anything is written (a missing or empty
source, an unknown recipe or teacher, a bad number, top-k above the class count, mismatched
classes, an unwritable or foreign output); ``make_shards`` then runs the job. Under torchrun
(RANK / WORLD_SIZE set) each rank makes its share of the shards.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from wds_reinforce.core.augment import Recipe
from wds_reinforce.core.errors import UsageError
from wds_reinforce.core.threads import default_workers
from wds_reinforce.io.storage import open_output
from wds_reinforce.produce.self_contained import ProducerSummary, ReinforceJob
from wds_reinforce.produce.sources import Source, WebDatasetSource, open_source
from wds_reinforce.produce.teacher import Teacher, load_teacher, parse_teacher_spec

__all__ = ["checked_teacher", "dist_env", "prepare_job", "make_shards"]


def dist_env() -> tuple[int, int]:
    try:
        rank = int(os.environ.get("RANK", 0))
        world = int(os.environ.get("WORLD_SIZE", 1))
    except ValueError:
        raise UsageError(
            f"expected integer RANK and WORLD_SIZE, got {os.environ.get('RANK')!r}, {os.environ.get('WORLD_SIZE')!r}"
        ) from None
    if not (world >= 1 and 0 <= rank < world):
        raise UsageError(f"expected 0 <= RANK < WORLD_SIZE, got RANK={rank}, WORLD_SIZE={world}")
    return rank, world


def _positive(name: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise UsageError(f"expected {name} an integer >= {minimum}, got {value!r}")
    return value


def _load_class_map(class_map: str | Mapping[str, int], source: Source, teacher_classes: int) -> list[int]:
    if isinstance(class_map, (str, os.PathLike)):
        path = Path(class_map)
        if not path.is_file():
            raise UsageError(f"expected class_map to be a JSON file, got {str(class_map)!r} (not found)")
        try:
            class_map = json.loads(path.read_text())
        except ValueError as exc:
            raise UsageError(f"expected class_map to be valid JSON, got {exc}") from None
    if not isinstance(class_map, Mapping):
        raise UsageError(
            f"expected class_map to map source class names to teacher class ids, got {type(class_map).__name__}"
        )
    missing = [c for c in source.class_names if c not in class_map]
    if missing:
        raise UsageError(f"expected class_map to cover every source class, got none for {missing[:5]}")
    ids = [class_map[c] for c in source.class_names]
    bad = [i for i in ids if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < teacher_classes]
    if bad:
        raise UsageError(f"expected class_map teacher ids in [0, {teacher_classes}), got {bad[:5]}")
    if len(set(ids)) != len(ids):
        raise UsageError("expected class_map to map source classes to distinct teacher ids")
    return ids


def checked_teacher(
    teacher: str | Sequence[str] | Teacher,
    checkpoint: str | Sequence[str | None] | None = None,
    num_classes: int | None = None,
    pretrained: bool = False,
    device: str = "auto",
) -> Teacher:
    """The teacher of a spec (or a ``Teacher`` as it is), any problem a one-line ``UsageError``."""
    if isinstance(teacher, Teacher):
        return teacher
    try:
        import timm

        for kind, model in parse_teacher_spec(teacher):
            if kind == "timm" and not timm.is_model(model):
                raise ValueError(f"unknown teacher 'timm:{model}'; expected a timm model name (see timm.list_models())")
        return load_teacher(teacher, checkpoint, num_classes=num_classes, pretrained=pretrained, device=device)
    except (ValueError, RuntimeError) as exc:  # RuntimeError: a checkpoint torch cannot read
        raise UsageError(str(exc).splitlines()[0]) from None


def prepare_job(
    source: str | Source,
    teacher: str | Sequence[str] | Teacher,
    out: str = "shards/out",
    recipe: str | Mapping[str, Any] | Recipe = "rrc",
    image_size: int | Sequence[int] | None = None,
    decode: str | None = None,
    rounds: int = 8,
    topk: int | None = None,
    shard_size: int = 1000,
    batch_size: int = 256,
    workers: int | None = None,
    seed: int = 0,
    device: str = "auto",
    teacher_checkpoint: str | Sequence[str | None] | None = None,
    teacher_num_classes: int | None = None,
    pretrained: bool = False,
    class_map: str | Mapping[str, int] | None = None,
    progress: bool = True,
    name: str = "reinforced",
    split: str = "train",
    shuffle: bool = True,
) -> ReinforceJob:
    """Check every argument and build the job; nothing is written.

    Raises:
        UsageError: a missing or empty source, an unknown recipe or teacher, a bad number,
            top-k above the class count, teacher classes that differ from the source's (without
            ``class_map``), an unwritable or foreign ``out``.
    """
    rounds = _positive("rounds", rounds)
    k = None if topk is None else _positive("topk", topk)  # None: up to 10, at most the classes
    shard_size = _positive("shard_size", shard_size)
    batch_size = _positive("batch_size", batch_size)
    workers = default_workers() if workers is None else _positive("workers", workers, 0)  # None: half the cores
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise UsageError(f"expected seed a non-negative integer, got {seed!r}")
    if not isinstance(split, str) or not split or "." in split or "/" in split:
        raise UsageError(f"expected split a name without dots or slashes, got {split!r}")
    rank, world = dist_env()
    try:
        src = open_source(source)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    try:
        rcp = Recipe.from_spec(recipe, size=image_size, decode=decode)
    except ValueError as exc:
        raise UsageError(f"bad recipe: {exc}") from None
    output = open_output(out)
    tch = checked_teacher(teacher, teacher_checkpoint, teacher_num_classes, pretrained, device)
    cmap = None
    if class_map is not None:
        cmap = _load_class_map(class_map, src, tch.num_classes)
        class_names = list(src.class_names)
    elif isinstance(src, WebDatasetSource) and src.class_names == [str(i) for i in range(len(src.class_names))]:
        # Class names inferred from labels only: the teacher must cover every label seen.
        if tch.num_classes < len(src.class_names):
            raise UsageError(
                f"expected a teacher with at least {len(src.class_names)} classes for the source's labels, "
                f"got {tch.num_classes} (pass a class_map to map them)"
            )
        class_names = [str(i) for i in range(tch.num_classes)]
    else:
        if tch.num_classes != src.num_classes:
            raise UsageError(
                f"expected a teacher with the source's {src.num_classes} classes, got {tch.num_classes} "
                f"(pass a class_map from source classes to teacher classes)"
            )
        class_names = list(src.class_names)
    if k is None:
        k = min(10, len(class_names))
    if k > len(class_names):
        raise UsageError(f"expected topk <= the {len(class_names)} classes, got {k}")
    output.check_writable()
    job = ReinforceJob(
        source=src,
        teacher=tch,
        recipe=rcp,
        output=output,
        rounds=rounds,
        topk=k,
        seed=seed,
        shard_size=shard_size,
        batch_size=batch_size,
        workers=workers,
        class_names=class_names,
        class_map=cmap,
        rank=rank,
        world_size=world,
        progress=progress,
        name=name,
        split=split,
        shuffle=bool(shuffle),
    )
    job.check_existing()
    return job


def make_shards(
    source: str | Source, teacher: str | Sequence[str] | Teacher, out: str = "shards/out", **kwargs: Any
) -> ProducerSummary:
    """Reinforce ``source`` with ``teacher`` into webdataset shards under ``out``.

    Args:
        source: a source spec (see ``wds_reinforce.sources.open_source``) or a ``Source``.
        teacher: ``"timm:NAME"``, comma-separated or a list for an ensemble, or a ``Teacher``.
        out: a folder or ``s3://bucket/prefix``.
        **kwargs: the other arguments of ``prepare_job`` (recipe, image_size, decode, rounds,
            topk, shard_size, batch_size (images, i.e. samples x rounds, per teacher call),
            workers, seed, device, teacher_checkpoint, teacher_num_classes, pretrained,
            class_map, progress, name, split, shuffle).

    Returns:
        A ``ProducerSummary``. Under torchrun (RANK / WORLD_SIZE set) each rank makes shards
        ``j % WORLD_SIZE == RANK``; rank 0 waits for all and writes the manifest.

    Raises:
        UsageError: bad arguments, before any work starts.
    """
    if kwargs.pop("sidecars_only", False):
        from wds_reinforce.produce.sidecar_sets import prepare_sidecar_job

        return prepare_sidecar_job(source, teacher, out, **kwargs).run()
    if kwargs.get("round_group") is not None:
        raise UsageError("expected round_group only with sidecars_only=True")
    kwargs.pop("round_group", None)
    return prepare_job(source, teacher, out, **kwargs).run()
