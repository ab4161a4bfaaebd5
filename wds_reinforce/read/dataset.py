"""``ReinforcedDataset``: reinforced shards from a manifest, as a webdataset pipeline of tuples.

It resolves the shard URLs and manifest (``storage``), lists the shards (shuffled per epoch the
same way on every rank), splits them by node and worker, reads each shard's samples (counting
every lost sample against the manifest), optionally shuffles samples, and runs the loader's
``reinforce`` stage (see ``loader``).
"""

from __future__ import annotations

import contextlib
import functools
import os
import random
import re
import tarfile
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from webdataset import filters as wds_filters
from webdataset.compat import FluidInterface
from webdataset.handlers import reraise_exception
from webdataset.pipeline import DataPipeline
from webdataset.shardlists import ResampledShards, expand_urls, split_by_node, split_by_worker
from webdataset.utils import pytorch_worker_info

from wds_reinforce.core.augment import IMAGENET_MEAN, IMAGENET_STD, Recipe
from wds_reinforce.core.errors import DataError, FormatError, SampleError, UsageError
from wds_reinforce.core.format import SIDECAR_EXT, Manifest
from wds_reinforce.core.schedule import SharedEpoch, group_for
from wds_reinforce.io.remote import RetryPolicy
from wds_reinforce.io.shards import samples
from wds_reinforce.io.storage import dirname_url, join_url, manifest_url, open_url, read_manifest, shard_urls
from wds_reinforce.read.loader import LoaderOptions, ReplayPlan, reinforce

__all__ = ["ReinforcedDataset", "aligned_samples"]


def _resolve(
    source: str | Sequence[str], manifest: Manifest | str | None, teacher: int | str = 0
) -> tuple[list[str], Manifest, dict[str, list[list[str]]]]:
    """Shard URLs, the manifest and (sidecar sets) each image shard's sidecar shard URLs per round
    group: the params set's, then the targets shards of the teacher sets ``teacher`` asks for.

    ``source`` is a manifest URL, a directory, a brace pattern or a list of shard URLs (for
    sidecar sets: image shard URLs as the manifest lists them, or a subset).
    """
    urls, found, base = _resolve_manifest(source, manifest)
    if not found.sidecar_sets:
        if teacher != 0:
            raise UsageError(f"expected teacher=0 for a self-contained data set (one teacher), got {teacher!r}")
        return urls, found, {}
    sets = _teacher_sets(found, teacher)
    listed = [s.name for s in found.image_shards]
    groups = {
        name: [
            [join_url(base, g.shards[i].name)] + [join_url(base, t.groups[n][i].name) for t in sets]
            for n, g in enumerate(found.round_groups)
        ]
        for i, name in enumerate(listed)
    }
    chosen = listed if urls is None else [_match(u, listed) for u in urls]
    return chosen, found, {u: groups[u] for u in chosen}


def _teacher_sets(manifest: Manifest, teacher: int | str) -> list[Any]:
    """The extra teacher sets to read besides the params set (the manifest's teacher, set 0)."""
    if teacher == "mean":
        sets = manifest.teacher_sets
    elif teacher == 0:
        return []
    elif isinstance(teacher, int) and 1 <= teacher <= len(manifest.teacher_sets):
        sets = [manifest.teacher_sets[teacher - 1]]
    else:
        names = ["0 (the manifest's teacher)"] + [f"{n + 1} ({t.name})" for n, t in enumerate(manifest.teacher_sets)]
        raise UsageError(f"expected teacher 'mean' or one of {', '.join(names)}, got {teacher!r}")
    short = [t.name for t in sets if len(t.groups) < len(manifest.round_groups)]
    if short:
        raise UsageError(
            f"teacher set(s) {short} cover fewer round groups than the data set: add them for the new rounds"
        )
    return sets


def _match(url: str, names: Sequence[str]) -> str:
    for name in names:
        if url == name or url.endswith("/" + name.lstrip("/")) or name.endswith("/" + url.lstrip("/")):
            return name
    raise UsageError(f"expected image shards the manifest lists, got {url!r}")


def _resolve_manifest(
    source: str | Sequence[str], manifest: Manifest | str | None
) -> tuple[list[str] | None, Manifest, str]:
    """(shard URLs, or None when only a manifest was named; the manifest; the manifest's folder URL)."""
    if isinstance(source, str) and (source.endswith((".json", "/")) or os.path.isdir(source)):
        manifest_url_, urls = manifest_url(source), None
    else:
        urls = expand_urls(source) if isinstance(source, str) else [str(u) for u in source]
        if not urls:
            raise UsageError(f"expected shard URLs, got none from {source!r}")
        manifest_url_ = join_url(dirname_url(urls[0]), "manifest.json")
    if isinstance(manifest, Manifest):
        found = manifest
    else:
        manifest_url_ = manifest or manifest_url_
        found = read_manifest(manifest_url_)
    if urls is None and not found.sidecar_sets:
        urls = shard_urls(manifest_url_, found)
        if not urls:
            raise FormatError(f"manifest {manifest_url_} lists no shards")
    return urls, found, dirname_url(manifest_url_)


def _expected_counts(urls: Sequence[str], manifest: Manifest) -> dict[str, int]:
    """url -> samples, for the URLs the manifest lists (matched by trailing path).

    For sidecar sets: the samples of the image shard that have sidecars (its skipped ones have none).
    """
    if manifest.sidecar_sets:
        by_name = {im.name: side for im, side in zip(manifest.image_shards, manifest.round_groups[0].shards)}
    else:
        by_name = {s.name: s for s in manifest.shards}
    out = {}
    for url in urls:
        parts = url.split("/")
        for i in range(len(parts)):
            shard = by_name.get("/".join(parts[i:]))
            if shard is not None:
                out[url] = shard.samples
                break
    return out


# What reading a missing, cut or damaged shard raises (tarfile, the URL openers, webdataset's
# key grouping); anything else is a bug and propagates.
_SHARD_ERRORS = (OSError, EOFError, tarfile.TarError, ValueError)


def _plain(url: str) -> Iterator[dict]:
    with open_url(url) as stream:
        yield from samples(stream, url)


def _lockstep(url: str, sidecar_urls: Sequence[str], skipped: frozenset[str] = frozenset()) -> Iterator[dict]:
    """The samples of image shard ``url``, each with its ``dr.mp`` from the aligned sidecar shard
    ``sidecar_urls[0]`` (and ``dr.mp.1``, ... from the targets shards of other teacher sets after it).

    Samples the producer skipped (listed in the manifest, no sidecar) are passed over.

    Raises:
        FormatError: a key that differs between the image shard and a sidecar shard, or a sidecar
            shard longer than its image shard (naming both URLs).
    """
    with contextlib.ExitStack() as stack:
        images = stack.enter_context(open_url(url))
        sides = [samples(stack.enter_context(open_url(u)), u) for u in sidecar_urls]
        for sample in samples(images, url):
            if sample["__key__"] in skipped:
                continue
            for n, (side, side_url) in enumerate(zip(sides, sidecar_urls)):
                other = next(side, None)
                if other is None or other["__key__"] != sample["__key__"]:
                    got = "its end" if other is None else f"key {other['__key__']!r}"
                    raise FormatError(
                        f"image shard has key {sample['__key__']!r} where sidecar shard {side_url} has {got}: "
                        "the shards are not aligned"
                    )
                sample[SIDECAR_EXT if n == 0 else f"{SIDECAR_EXT}.{n}"] = other.get(SIDECAR_EXT)
            yield sample
        for side, side_url in zip(sides, sidecar_urls):
            extra = next(side, None)
            if extra is not None:
                raise FormatError(f"sidecar shard {side_url} has key {extra['__key__']!r} after the image shard ends")


def _read_shards(
    src: Iterable[dict],
    expected: Mapping[str, int],
    handler: Callable[[BaseException], bool],
    sidecars: Mapping[str, Sequence[str]] | None = None,
    group: Callable[[], int] | None = None,
    skipped: frozenset[str] = frozenset(),
) -> Iterator[dict]:
    """Shard URLs -> their samples; a shard that cannot be read whole is one ``DataError``.

    The error counts exactly the samples the shard lost against the manifest (a missing, empty
    or cut shard; a read that failed after the network layer's retries), so ``SkipCounter.samples``
    is the number of samples the epoch did not yield. Shards the manifest does not list are not
    counted (``samples=1`` for a failure there). With sidecar sets, image shard i is read in
    lockstep with shard i of this epoch's round group (``group()``, read once per iteration).
    """
    g = group() if group is not None else 0
    for item in src:
        url = item["url"]
        want, count, cause, error = expected.get(url), 0, None, None
        try:
            reader = _lockstep(url, sidecars[url][g], skipped) if sidecars else _plain(url)
            with contextlib.closing(reader):
                for sample in reader:
                    sample["__position__"] = count  # in the shard: mixing recipes' pairing windows count it
                    count += 1
                    yield sample
        except UsageError:
            raise  # a malformed URL or setting: never skipped as bad data
        except DataError as exc:
            cause, error = exc.message, exc
        except _SHARD_ERRORS as exc:
            cause, error = f"{type(exc).__name__}: {_first_line(exc)}", exc
        if cause is None and (want is None or count == want):
            continue
        if want is None:
            err = SampleError(f"cannot read the shard: {cause}", url=url)
        else:
            what = cause or ("an empty shard" if count == 0 else "the shard is truncated or damaged")
            err = SampleError(
                f"expected {want} samples (per the manifest), got {count}: {what}",
                url=url,
                samples=max(want - count, 0),
            )
        err.__cause__ = error
        if not handler(err):
            return


def _first_line(exc: BaseException) -> str:
    text = str(exc.args[0]) if exc.args and isinstance(exc.args[0], str) else str(exc)
    return re.sub(r" at 0x[0-9a-fA-F]+", "", text.splitlines()[0] if text else type(exc).__name__)


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


def _epoch_group(seed: int, epoch: SharedEpoch, rounds: int, group_rounds: int) -> int:
    return group_for(seed, epoch.get(), rounds, group_rounds)


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
        mean, std: for ``output="float"``.
        shardshuffle: shuffle the shard order per epoch (the same order on every rank).
        shuffle: size of a sample shuffle buffer (0: none): before decoding, or for mixing recipes
            (which pair samples in shard order) after mixing, on decoded images.
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

    def __init__(
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
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        shardshuffle: bool = False,
        shuffle: int = 0,
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
        if isinstance(shuffle, bool) or not isinstance(shuffle, int) or shuffle < 0:
            raise UsageError(f"expected shuffle a buffer size >= 0, got {shuffle!r}")
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
        RetryPolicy.from_env()  # a bad WDS_REINFORCE_* setting fails here, not later in a worker
        self.urls, self.manifest, sidecars = _resolve(source, manifest, teacher)
        self.epoch = SharedEpoch(epoch)
        self.seed = seed
        plan = ReplayPlan.build(self.manifest, self.options)
        self.recipe = plan.recipe
        if resampled:
            # deterministic: draws seeded by (seed, worker), not by pid and time
            self.append(ResampledShards(self.urls, seed=seed, deterministic=True))
        else:
            self.append(
                _ShardList(
                    self.urls, shardshuffle, seed, self.epoch, nodesplitter is not None, workersplitter is not None
                )
            )
            if nodesplitter is not None:
                self.append(nodesplitter)
            if workersplitter is not None:
                self.append(workersplitter)
            self._warn_uneven(nodesplitter)
        expected = _expected_counts(self.urls, self.manifest) if check_counts else {}
        group = None
        if sidecars:
            group = functools.partial(_epoch_group, seed, self.epoch, self.manifest.rounds, self.manifest.group_rounds)
        self.append(
            wds_filters.pipelinefilter(_read_shards)(
                expected=expected,
                handler=handler,
                sidecars=sidecars,
                group=group,
                skipped=frozenset(s.key for s in self.manifest.skipped) if sidecars else frozenset(),
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

    def _warn_uneven(self, nodesplitter: Callable | None) -> None:
        rank, world, _, _ = pytorch_worker_info()
        if nodesplitter is None or world <= 1:
            return
        counts = _expected_counts(self.urls, self.manifest)
        per_rank = [sum(counts.get(u, 0) for u in self.urls[r::world]) for r in range(world)]
        if len(set(per_rank)) > 1:
            warnings.warn(
                f"ranks get unequal sample counts {per_rank}; DDP may hang at the end of an epoch: "
                "use a shard count divisible by the world size, or resampled=True with with_epoch(n)",
                stacklevel=3,
            )

    @property
    def num_samples(self) -> int:
        """Samples in the data set, per the manifest."""
        return self.manifest.num_samples

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch for the round schedule and shuffling; visible to all DataLoader workers."""
        self.epoch.set(epoch)


def aligned_samples(url: str, sidecar_urls: Sequence[str], skipped: frozenset[str] = frozenset()) -> Iterator[dict]:
    """Image shard ``url``'s samples with the sidecars of the aligned shards (see ``_lockstep``)."""
    return _lockstep(url, sidecar_urls, skipped)
