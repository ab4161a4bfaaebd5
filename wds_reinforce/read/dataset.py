"""``ReinforcedDataset``: reinforced shards from a manifest, as a webdataset pipeline of tuples.

It resolves the shard URLs and manifest (``layouts``, ``io.storage``), lists the shards (shuffled per epoch the
same way on every rank), splits them by node and worker, reads each shard's samples (counting
every lost sample against the manifest), optionally shuffles samples, and runs the loader's
``reinforce`` stage (see ``read.loader``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import random
import tarfile
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

import torch
from webdataset import filters as wds_filters
from webdataset.compat import FluidInterface
from webdataset.handlers import reraise_exception
from webdataset.pipeline import DataPipeline
from webdataset.shardlists import ResampledShards, expand_urls, split_by_node, split_by_worker
from webdataset.utils import pytorch_worker_info

from wds_reinforce.core.augment import Recipe
from wds_reinforce.core.errors import DataError, FormatError, SampleError, UsageError, error_text
from wds_reinforce.core.format import Manifest
from wds_reinforce.core.schedule import SharedEpoch
from wds_reinforce.io.retry import NetworkReadError
from wds_reinforce.io.storage import check_settings, dirname_url, join_url
from wds_reinforce.layouts import (
    MANIFEST_NAME,
    Layout,
    Unit,
    layout_of,
    manifest_url,
    no_manifest,
    read_manifest,
    read_unit,
)
from wds_reinforce.read.loader import LoaderOptions, ReplayPlan, reinforce
from wds_reinforce.read.places import ShardTally

__all__ = ["ReinforcedDataset", "DEFAULT_SHUFFLE"]

DEFAULT_SHUFFLE = 1000  # samples in the shuffle buffer of ``shuffle=True``


def _resolve(
    source: str | Sequence[str], manifest: Manifest | str | None, teacher: int | str = 0
) -> tuple[list[Unit], Manifest, Layout]:
    """The units to read, the manifest and its layout.

    ``source`` is a manifest URL, a directory, a brace pattern or a list of shard URLs (for
    sidecar sets: image shard URLs as the manifest lists them, or a subset).
    """
    urls, found, where = _resolve_manifest(source, manifest)
    layout = layout_of(found, where)
    units = layout.units(found, dirname_url(where), teacher)
    if urls is not None:
        return layout.select(units, urls), found, layout
    if not units:
        raise FormatError(f"manifest {where} lists no shards")
    return units, found, layout


_EXPECTED = (
    "expected a folder or URL prefix holding manifest.json, a manifest .json, "
    "or shards with manifest.json beside them (else pass manifest=)"
)


def _names_folder(source: str) -> bool:
    """A URL whose path's last part has no extension and no brace pattern (``s3://b/set``): a set's
    folder, slash or not. Query strings are not looked at; ``pipe:`` commands are never folders."""
    if "://" not in source or source.startswith("pipe:"):
        return False
    last = urlsplit(source).path.rstrip("/").rsplit("/", 1)[-1]
    return "." not in last and "{" not in last


def _resolve_manifest(
    source: str | Sequence[str], manifest: Manifest | str | None
) -> tuple[list[str] | None, Manifest, str]:
    """(shard URLs, or None when only a manifest was named; the manifest; the manifest's URL)."""
    folder = manifest is None and _names_folder(source) if isinstance(source, str) else False
    if isinstance(source, str) and (source.endswith((".json", "/")) or os.path.isdir(source) or folder):
        where, urls = manifest_url(source), None
    else:
        urls = expand_urls(source) if isinstance(source, str) else [str(u) for u in source]
        if not urls:
            raise UsageError(f"expected shard URLs, got none from {source!r}")
        where = join_url(dirname_url(urls[0]), MANIFEST_NAME)
    if isinstance(manifest, Manifest):
        return urls, manifest, where
    if manifest:
        return urls, read_manifest(manifest), manifest
    try:
        return urls, read_manifest(where), where
    except FileNotFoundError as exc:
        raise FileNotFoundError(no_manifest(source, urls, exc, _EXPECTED)) from None
    except NetworkReadError as exc:  # say what it was reading for: a set is read through its manifest
        beside = "the manifest beside the shards given" if urls is not None else "the set's manifest"
        raise NetworkReadError(
            f"{exc} (reading {beside}: a set is read through its manifest.json; pass manifest= when it lies elsewhere)",
            exc.url,
            exc.offset,
            exc.attempts,
            exc.cause,
        ) from exc


# What reading a missing, cut or damaged shard raises besides DataError (tario's tarfile errors,
# the URL openers' OSError and EOFError, ValueError from webdataset); anything else is a bug.
_SHARD_ERRORS = (OSError, EOFError, tarfile.TarError, ValueError)


def _read_shards(
    src: Iterable[dict],
    units: Mapping[str, Unit],
    handler: Callable[[BaseException], bool],
    group: Callable[[], int],
    skipped: frozenset[str] = frozenset(),
    check_counts: bool = True,
    group_rounds: int = 0,
) -> Iterator[dict]:
    """Shard URLs -> their samples, each checked against its place (``places.ShardTally``).

    A sample that is not this shard's at its place is refused (a ``DataError`` counting it as
    ``foreign``); a shard that cannot be read whole is one ``DataError`` that counts exactly the
    samples it lost against the manifest (a missing, empty or cut shard; a read that failed after
    the network layer's retries; positions never seen), so ``SkipCounter.samples`` is the number
    of samples the epoch did not yield. Shards the manifest does not list are not counted
    (``samples=1`` for a failure there). A unit's image shard is read in lockstep with its
    sidecar shards of this epoch's round group (``group()``, read once per iteration), whose
    first round is ``group() * group_rounds``.
    """
    g = group()
    for item in src:
        url = item["url"]
        unit = units[url]
        if not check_counts:
            unit = dataclasses.replace(unit, samples=None)
        tally, cause, error = ShardTally(unit, url, g * group_rounds), None, None
        admitted = _admitted(unit, g, skipped, tally)
        with contextlib.closing(admitted):
            while True:  # the handler is called outside the try: what it raises propagates
                try:
                    sample, refused = next(admitted, (None, None))
                except UsageError:
                    raise  # a malformed URL or setting: never skipped as bad data
                except DataError as exc:
                    cause, error = exc.message, exc
                    break
                except _SHARD_ERRORS as exc:
                    cause, error = error_text(exc), exc
                    break
                if sample is None:
                    break
                if refused is None:
                    yield sample
                elif not handler(refused):
                    return
        err = _shard_error(unit, url, tally, cause, error)
        if err is not None and not handler(err):
            return


def _admitted(unit: Unit, group: int, skipped: frozenset[str], tally: ShardTally) -> Iterator[tuple[dict, Any]]:
    """A unit's samples, each with None if it belongs at its place or the error refusing it."""
    reader = read_unit(unit.images, unit.sidecars(group), skipped)
    with contextlib.closing(reader):
        for sample in reader:
            yield from tally.admit(sample)
    yield from tally.finish()


def _shard_error(
    unit: Unit, url: str, tally: ShardTally, cause: str | None, error: BaseException | None
) -> SampleError | None:
    """The shard's error, if it broke or lost samples; named after the file that broke (a sidecar shard's own URL)."""
    lost = tally.lost()
    if cause is None and lost == 0:
        return None
    where = getattr(error, "url", None) or url
    if unit.samples is None:
        err = SampleError(f"cannot read the shard: {cause}", url=where)
    else:
        arrived = tally.good + tally.unread
        what = cause or tally.missing() or ("an empty shard" if arrived == 0 else "the shard is truncated or damaged")
        refused = f" (and {tally.foreign} refused as not its own)" if tally.foreign else ""
        message = f"expected {unit.samples} samples (per the manifest), got {arrived}{refused}: {what}"
        err = SampleError(message, url=where, samples=lost)
    err.__cause__ = error
    return err


class _ShardList(torch.utils.data.IterableDataset):
    """The shard URLs, shuffled identically on every rank per (seed, epoch), checked for splitting."""

    def __init__(
        self,
        urls: Sequence[str],
        shuffle: bool,
        seed: int,
        epoch: SharedEpoch,
        splits_nodes: bool,
        splits_workers: bool,
    ):
        super().__init__()
        self.urls, self.shuffle, self.seed, self.epoch = list(urls), shuffle, seed, epoch
        self.splits_nodes, self.splits_workers = splits_nodes, splits_workers

    def __iter__(self) -> Iterator[dict]:
        rank, world, worker, workers = pytorch_worker_info()
        parts = (world if self.splits_nodes else 1) * (workers if self.splits_workers else 1)
        if len(self.urls) < parts:
            raise UsageError(
                f"expected at least {parts} shards for {world} rank(s) x {workers} worker(s), got {len(self.urls)}: "
                "use fewer workers, more shards, or resampled=True with with_epoch(n)"
            )
        urls = list(self.urls)
        if self.shuffle:
            random.Random(f"{self.seed}:{self.epoch.get()}:shards").shuffle(urls)
        for url in urls:
            yield {"url": url}


def _epoch_group(layout: Layout, manifest: Manifest, seed: int, epoch: SharedEpoch) -> int:
    return layout.group(manifest, seed, epoch.get())


def _shuffle_samples(src: Iterable[dict], bufsize: int, seed: int, epoch: SharedEpoch) -> Iterator[dict]:
    rank, _, worker, _ = pytorch_worker_info()
    rng = random.Random(f"{seed}:{epoch.get()}:{rank}:{worker}:samples")
    yield from wds_filters._shuffle(iter(src), bufsize, min(bufsize, 100), rng=rng)


class ReinforcedDataset(DataPipeline, FluidInterface):
    """A webdataset pipeline over reinforced shards that yields ``(image, target)`` tuples.

    Args:
        source: the manifest (``.../manifest.json``), the shards' directory (a path or a URL
            ending in ``/``), a brace pattern (``.../shard-{000000..000099}.tar``) or a list of
            shard URLs; local paths, ``file:``, ``http(s)://`` and ``s3://`` all work.
        manifest: a ``Manifest`` or its URL, when it is not ``manifest.json`` beside the shards.
        seed: seeds the round schedule, the original-image coin and augmentation, and shuffling.
        epoch: the starting epoch; change it with ``set_epoch`` before each epoch.
        p: probability of a reinforced round; otherwise the original image with RRC + flip and a
            one-hot target (the paper uses 0.99 for some recipes; default 1.0).
        densify: ``smooth`` (paper), ``zeros``, or ``sparse`` (yield ``(image, idx, prob)`` and
            densify on the GPU with ``targets.densify``).
        label_smoothing: smoothing of the one-hot targets of original-image epochs.
        output: ``uint8`` (3, H, W) images (normalise on the GPU) or ``float`` (normalised here).
        mean, std: for ``output="float"``; None (default): the recipe's (``Recipe.mean``/``std``: ImageNet's
            unless the recipe names another, e.g. ``cifar100+``).
        shardshuffle: shuffle the shard order per epoch (the same order on every rank).
        shuffle: size of a sample shuffle buffer (0 or False: none; True: ``DEFAULT_SHUFFLE``, 1000):
            before decoding, or for mixing recipes (which pair samples in shard order) after mixing,
            on decoded images.
        resampled: draw shards with replacement forever (combine with ``with_epoch(n)``).
        nodesplitter, workersplitter: webdataset splitters (None to disable).
        handler: webdataset error policy for bad data; default raises with the key and URL;
            ``SkipCounter()`` skips bad samples and counts them.
        keys: sample fields of the output tuple; default ``("image", "target")``, or
            ``("image", "idx", "prob")`` for ``densify="sparse"``. Also available: ``__key__``,
            ``__url__``, ``cls``, ``round`` (-1 = original image), ``epoch``.
        fallback_recipe: the augmentation of original-image epochs.
        teacher: sidecar sets with more teachers (``Manifest.teacher_sets``): whose targets to
            use: 0 (the manifest's own teacher, default), k for teacher set k, or ``"mean"`` for
            the mean of all of them (see ``targets.mean_topk``).
        check_counts: compare each shard's sample count with the manifest, so that a missing, empty or
            cut shard is an error (through ``handler``) counting exactly the samples lost.

    Raises:
        UsageError: bad arguments. FormatError: an unreadable manifest, or a recipe this
            library version would replay differently. FileNotFoundError: no manifest.
    """

    def __init__(  # long: its keyword arguments, each passed on once
        self,
        source: str | Sequence[str],
        *,
        manifest: Manifest | str | None = None,
        seed: int = 0,
        epoch: int = 0,
        p: float = 1.0,
        densify: str = "smooth",
        label_smoothing: float = 0.0,
        output: str = "uint8",
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        shardshuffle: bool = False,
        shuffle: int | bool = 0,
        resampled: bool = False,
        nodesplitter: Callable | None = split_by_node,
        workersplitter: Callable | None = split_by_worker,
        handler: Callable[[BaseException], bool] = reraise_exception,
        keys: Sequence[str] | None = None,
        fallback_recipe: Recipe | None = None,
        check_counts: bool = True,
        teacher: int | str = 0,
    ):
        super().__init__()
        shuffle = _buffer_size(shuffle)
        self.options = LoaderOptions(
            seed=seed,
            p=p,
            densify=densify,
            label_smoothing=label_smoothing,
            output=output,
            mean=mean,
            std=std,
            fallback_recipe=fallback_recipe,
            teacher=teacher,
        )
        check_settings()  # a bad WDS_REINFORCE_* setting fails here, not later in a worker
        self.units, self.manifest, self.layout = _resolve(source, manifest, teacher)
        self.urls = [unit.images.url for unit in self.units]
        self.epoch = SharedEpoch(epoch)
        self.seed = seed
        plan = ReplayPlan.build(self.manifest, self.options)
        self.recipe = plan.recipe
        self._shard_stages(resampled, shardshuffle, nodesplitter, workersplitter)
        self.append(
            wds_filters.pipelinefilter(_read_shards)(
                units={unit.images.url: unit for unit in self.units},
                handler=handler,
                group=functools.partial(_epoch_group, self.layout, self.manifest, seed, self.epoch),
                skipped=self.layout.skipped(self.manifest),
                check_counts=check_counts,
                group_rounds=self.layout.group_rounds(self.manifest),
            )
        )
        shuffler = wds_filters.pipelinefilter(_shuffle_samples)(bufsize=shuffle, seed=seed, epoch=self.epoch)
        mixing = plan.recipe.mix is not None
        if shuffle and not mixing:
            self.append(shuffler)
        self.append(reinforce(plan=plan, epoch=self.epoch, handler=handler))
        if shuffle and mixing:  # mixing pairs samples of a window of the shard's order: shuffle after
            self.append(shuffler)
        if keys is None:
            keys = ("image", "idx", "prob") if densify == "sparse" else ("image", "target")
        self.append(wds_filters.to_tuple(*keys))

    def _shard_stages(
        self, resampled: bool, shardshuffle: bool, nodesplitter: Callable | None, workersplitter: Callable | None
    ) -> None:
        """The shard URLs of this epoch: drawn forever, or listed, shuffled and split by node and worker."""
        if resampled:
            # deterministic: draws seeded by (seed, worker), not by pid and time
            self.append(ResampledShards(self.urls, seed=self.seed, deterministic=True))
            return
        splits = (nodesplitter is not None, workersplitter is not None)
        self.append(_ShardList(self.urls, shardshuffle, self.seed, self.epoch, *splits))
        for splitter in (nodesplitter, workersplitter):
            if splitter is not None:
                self.append(splitter)
        self._warn_uneven(nodesplitter)

    def _warn_uneven(self, nodesplitter: Callable | None) -> None:
        rank, world, _, _ = pytorch_worker_info()
        if nodesplitter is None or world <= 1:
            return
        per_rank = [sum(unit.samples or 0 for unit in self.units[r::world]) for r in range(world)]
        if len(set(per_rank)) > 1:
            warnings.warn(
                f"ranks get unequal sample counts {per_rank}; DDP may hang at the end of an epoch: "
                "use a shard count divisible by the world size, or resampled=True with with_epoch(n)",
                stacklevel=4,
            )

    @property
    def num_samples(self) -> int:
        """Samples in the data set, per the manifest."""
        return self.layout.num_samples(self.manifest)

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch for the round schedule and shuffling; visible to all DataLoader workers."""
        self.epoch.set(epoch)


def _buffer_size(shuffle: int | bool) -> int:
    """A sample shuffle buffer size from an int (0: none), or as torch and webdataset users write it: a bool."""
    if isinstance(shuffle, bool):
        return DEFAULT_SHUFFLE if shuffle else 0
    if not isinstance(shuffle, int) or shuffle < 0:
        raise UsageError(f"expected shuffle a buffer size >= 0 (or True / False), got {shuffle!r}")
    return shuffle
