"""The producer's entry points: check every argument, build the job, run it.

``prepare_job`` (self-contained shards) and ``prepare_sidecar_job`` (sidecar sets beside plain
image shards) share one argument surface (``_Settings``) and fail with a ``UsageError`` before
anything is written: a missing or empty source, an unknown recipe or teacher, a bad number,
top-k above the class count, mismatched classes, an unwritable or foreign output.
``make_shards`` runs either. Under torchrun (RANK / WORLD_SIZE set) each rank makes its share.
"""

from __future__ import annotations

import inspect
import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wds_reinforce.core.augment import Recipe
from wds_reinforce.core.augment.ops import check_size
from wds_reinforce.core.errors import UsageError, check_int, check_split
from wds_reinforce.core.threads import default_workers
from wds_reinforce.io.outputs import Output
from wds_reinforce.io.storage import open_output
from wds_reinforce.produce.jobs import dist_env
from wds_reinforce.produce.self_contained import ReinforceJob
from wds_reinforce.produce.sidecar_sets import SidecarSetJob, found_class_names, image_shard_urls, read_class_names
from wds_reinforce.produce.sources import Source, WebDatasetSource, open_source
from wds_reinforce.produce.teacher import Teacher, load_teacher, parse_teacher_spec
from wds_reinforce.produce.teacher_job import ProducerSummary

__all__ = ["DEFAULT_TOPK", "checked_teacher", "prepare_job", "prepare_sidecar_job", "make_shards"]

DEFAULT_TOPK = 10  # teacher classes kept per round when topk is not given (at most the classes)


@dataclass(frozen=True)
class _Settings:
    """What every producer job takes, checked: the numbers, the recipe, the output and the teacher.

    ``check`` is the one place these arguments are named, defaulted and checked;
    ``prepare_job`` and ``prepare_sidecar_job`` pass their ``**settings`` to it.
    """

    rounds: int
    topk: int | None  # None: DEFAULT_TOPK, at most the classes
    batch_size: int
    workers: int
    seed: int
    split: str
    recipe: Recipe
    output: Output
    teacher: Teacher
    rank: int
    world: int
    progress: bool
    name: str

    @classmethod
    def check(  # long: every setting's name and default, once; each is checked in a line or two
        cls,
        check_source: Callable[[], Any],
        teacher: str | Sequence[str] | Teacher,
        out: str = "shards/out",
        recipe: str | Mapping[str, Any] | Recipe = "rrc",
        image_size: int | Sequence[int] | None = None,
        decode: str | None = None,
        rounds: int = 8,
        topk: int | None = None,
        batch_size: int = 256,
        workers: int | None = None,
        seed: int = 0,
        device: str = "auto",
        teacher_checkpoint: str | Sequence[str | None] | None = None,
        teacher_num_classes: int | None = None,
        pretrained: bool = False,
        progress: bool = True,
        name: str = "reinforced",
        split: str = "train",
    ) -> tuple[_Settings, Any]:
        """The checked settings, and what ``check_source()`` returns (checked after the numbers)."""
        rounds, batch_size, seed = (
            check_int("rounds", rounds),
            check_int("batch_size", batch_size),
            check_int("seed", seed, 0),
        )
        topk = None if topk is None else check_int("topk", topk)
        workers = default_workers() if workers is None else check_int("workers", workers, 0)  # None: half the cores
        check_split(split)
        if image_size is not None:
            try:
                check_size(image_size)
            except ValueError:
                raise UsageError(f"expected image_size a positive int or (height, width), got {image_size!r}") from None
        rank, world = dist_env()
        source = check_source()
        try:
            rcp = Recipe.from_spec(recipe, size=image_size, decode=decode)
        except ValueError as exc:
            raise UsageError(f"bad recipe: {exc}") from None
        output = open_output(out)
        tch = checked_teacher(teacher, teacher_checkpoint, teacher_num_classes, pretrained, device)
        settings = cls(rounds, topk, batch_size, workers, seed, split, rcp, output, tch, rank, world, progress, name)
        return settings, source

    def common(self, topk: int) -> dict[str, Any]:
        """The fields every producer job has (``teacher_job.TeacherJob``), with the top-k settled."""
        return {
            "teacher": self.teacher,
            "recipe": self.recipe,
            "output": self.output,
            "rounds": self.rounds,
            "topk": topk,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "workers": self.workers,
            "rank": self.rank,
            "world_size": self.world,
            "progress": self.progress,
            "name": self.name,
            "split": self.split,
        }


# The settings ``_Settings.check`` takes by name (``**settings`` of prepare_job and prepare_sidecar_job)
_SETTINGS = frozenset(inspect.signature(_Settings.check).parameters) - {"check_source", "teacher", "out"}


def _refuse_unknown(settings: Mapping[str, Any], function: str) -> None:
    unknown = sorted(set(settings) - _SETTINGS)
    if unknown:  # as Python says it for a named parameter
        raise TypeError(f"{function}() got an unexpected keyword argument {unknown[0]!r}")


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


def _class_names(src: Source, tch: Teacher, class_map: Any) -> tuple[list[str], list[int] | None]:
    """The data set's classes and, for a teacher over other classes, each one's teacher class id."""
    if class_map is not None:
        return list(src.class_names), _load_class_map(class_map, src, tch.num_classes)
    if isinstance(src, WebDatasetSource) and src.class_names == [str(i) for i in range(len(src.class_names))]:
        # Class names inferred from labels only: the teacher must cover every label seen.
        if tch.num_classes < len(src.class_names):
            raise UsageError(
                f"expected a teacher with at least {len(src.class_names)} classes for the source's labels, "
                f"got {tch.num_classes} (pass a class_map to map them)"
            )
        return [str(i) for i in range(tch.num_classes)], None
    if tch.num_classes != src.num_classes:
        raise UsageError(
            f"expected a teacher with the source's {src.num_classes} classes, got {tch.num_classes} "
            f"(pass a class_map from source classes to teacher classes)"
        )
    return list(src.class_names), None


def _open_source(source: str | Source) -> Source:
    try:
        return open_source(source)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def prepare_job(
    source: str | Source,
    teacher: str | Sequence[str] | Teacher,
    out: str = "shards/out",
    *,
    shard_size: int = 1000,
    class_map: str | Mapping[str, int] | None = None,
    shuffle: bool = True,
    **settings: Any,
) -> ReinforceJob:
    """Check every argument and build a self-contained job; nothing is written.

    ``settings`` are the producer's (recipe, image_size, decode, rounds, topk, batch_size,
    workers, seed, device, teacher_checkpoint, teacher_num_classes, pretrained, progress, name,
    split; see ``make_shards``).

    Raises:
        UsageError: a missing or empty source, an unknown recipe or teacher, a bad number,
            top-k above the class count, teacher classes that differ from the source's (without
            ``class_map``), an unwritable or foreign ``out``.
    """
    _refuse_unknown(settings, "prepare_job")
    shard_size = check_int("shard_size", shard_size)
    checked, src = _Settings.check(lambda: _open_source(source), teacher, out, **settings)
    class_names, cmap = _class_names(src, checked.teacher, class_map)
    k = min(DEFAULT_TOPK, len(class_names)) if checked.topk is None else checked.topk
    if k > len(class_names):
        raise UsageError(f"expected topk <= the {len(class_names)} classes, got {k}")
    checked.output.check_writable()
    job = ReinforceJob(
        source=src,
        shard_size=shard_size,
        class_names=class_names,
        class_map=cmap,
        shuffle=bool(shuffle),
        **checked.common(k),
    )
    job.check_existing()
    return job


def _sidecar_class_names(
    given: str | os.PathLike | Sequence[str] | None, urls: Sequence[str], classes: int
) -> tuple[list[str] | None, str]:
    """A sidecar set's class names, given or listed beside the image shards, and where from (None:
    none yet; the samples' json members may name them)."""
    if given is not None:
        if isinstance(given, (str, os.PathLike)):
            names, where = read_class_names(given), f"class_names file {str(given)!r}"
        else:
            names, where = [str(n) for n in given], "class_names"
        if len(names) != classes:
            raise UsageError(f"expected {where} to name the teacher's {classes} classes, got {len(names)} names")
        return names, where
    found = found_class_names(urls)
    if found is None:
        return None, ""
    names, url = found
    if len(names) != classes:
        raise UsageError(
            f"expected the {len(names)} class names of {url} to match the teacher's {classes} classes; "
            "pass class_names (a file of the teacher's class names, one per line)"
        )
    return names, url


def prepare_sidecar_job(
    source: str | Sequence[str],
    teacher: str | Sequence[str] | Teacher,
    out: str = "shards/out",
    *,
    round_group: int | None = None,
    class_names: str | os.PathLike | Sequence[str] | None = None,
    **settings: Any,
) -> SidecarSetJob:
    """Check every argument and build a sidecar-set job; nothing is written.

    ``source`` is plain webdataset image shards (a brace pattern or a list; local, http(s), s3);
    ``round_group`` G rounds go into each group (default: all ``rounds`` in one group), and
    ``rounds`` must be a multiple of G. ``class_names`` (a list, or a text file of one name per
    line) names the teacher's classes in the manifest; without them, the names listed beside the
    image shards (their ``manifest.json`` / ``_info.json``) or in their samples' ``json`` members
    (``class_name``), else ``"0" .. "N-1"``. ``settings`` are the producer's, as for ``prepare_job``.

    Raises:
        UsageError: bad arguments (also a producer option that has no meaning here), before any work.
    """
    for k in ("shuffle", "threads"):  # a choice the image shards already made; the caller's thread count
        settings.pop(k, None)
    # Other options (shard_size, class_map) mean something for self-contained shards only
    unused = {k: settings.pop(k) for k in sorted(set(settings) - _SETTINGS)}
    meaningless = [k for k, v in unused.items() if v not in (None, False)]
    if meaningless:
        raise UsageError(f"expected no {', '.join(meaningless)} with sidecar sets (the image shards stay as they are)")
    rounds = check_int("rounds", settings.get("rounds", 8))
    group = rounds if round_group is None else round_group
    if isinstance(group, bool) or not isinstance(group, int) or group < 1 or rounds % group:
        raise UsageError(f"expected round_group a positive divisor of rounds={rounds}, got {group!r}")
    checked, urls = _Settings.check(lambda: image_shard_urls(source), teacher, out, **settings)
    classes = checked.teacher.num_classes
    k = min(DEFAULT_TOPK, classes) if checked.topk is None else checked.topk
    if not 1 <= k <= classes:
        raise UsageError(f"expected topk in [1, {classes}] (the teacher's classes), got {k!r}")
    names, names_from = _sidecar_class_names(class_names, urls, classes)
    checked.output.check_writable()
    job = SidecarSetJob(
        image_urls=urls, group_rounds=group, class_names=names, names_from=names_from, **checked.common(k)
    )
    job.check_existing()
    return job


def make_shards(
    source: str | Source, teacher: str | Sequence[str] | Teacher, out: str = "shards/out", **kwargs: Any
) -> ProducerSummary:
    """Reinforce ``source`` with ``teacher`` into webdataset shards under ``out``.

    Args:
        source: a source spec (see ``wds_reinforce.produce.sources.open_source``) or a ``Source``;
            with ``sidecars_only=True``, plain webdataset image shards left where they are.
        teacher: ``"timm:NAME"``, comma-separated or a list for an ensemble, or a ``Teacher``.
        out: a folder or ``s3://bucket/prefix``.
        **kwargs: the other arguments of ``prepare_job`` (recipe, image_size, decode, rounds,
            topk, shard_size, batch_size (images, i.e. samples x rounds, per teacher call),
            workers, seed, device, teacher_checkpoint, teacher_num_classes, pretrained,
            class_map, progress, name, split, shuffle), or with ``sidecars_only=True`` those of
            ``prepare_sidecar_job`` (``round_group``, ``class_names``).

    Returns:
        A ``ProducerSummary``. Under torchrun (RANK / WORLD_SIZE set) each rank makes shards
        ``j % WORLD_SIZE == RANK``; rank 0 waits for all and writes the manifest.

    Raises:
        UsageError: bad arguments, before any work starts.
    """
    if kwargs.pop("sidecars_only", False):
        return prepare_sidecar_job(source, teacher, out, **kwargs).run()
    for name in ("round_group", "class_names"):
        if kwargs.get(name) is not None:
            raise UsageError(f"expected {name} only with sidecars_only=True (self-contained shards take the source's)")
        kwargs.pop(name, None)
    return prepare_job(source, teacher, out, **kwargs).run()
