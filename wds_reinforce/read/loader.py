"""Streaming reader of reinforced shards: webdataset stages and a ``ReinforcedDataset``.

Each sample goes through one per-sample function, ``reinforce_sample``: decode and check the
sidecar, choose this epoch's round (or the original image), replay the stored augmentation,
build the target. It runs in one webdataset-style map stage whose ``handler=`` sees only data
errors (``errors.DataError``, located with the sample key and shard URL); usage errors and bugs
propagate. The steps are also available as separate stages for custom pipelines (each curried
with ``webdataset.filters.pipelinefilter``, so ``stage(**options)`` takes the sample iterator):

``decode_sidecars`` -> ``pick_rounds`` -> ``replay_images`` -> ``make_targets``

(per-shard sample counts are checked where shards are read: ``dataset``)

A mixing recipe (``Recipe.mix``, see ``mixing``) is reinforced a pairing window at a time
(``_reinforce_windows``): the ``reinforce`` stage cuts the stream into windows of W consecutive
samples of a shard (``schedule.pairing_windows``), checks each sidecar's window checksum,
replays the window's round of each sample once and mixes it with its partner's view; the
per-sample steps refuse such recipes.
Anything that reorders samples (a shuffle buffer) must come after it.

``dataset.ReinforcedDataset`` wires them to a shard list read from the manifest. This module
never imports the teacher, and never writes.
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from webdataset import filters as wds_filters
from webdataset.handlers import reraise_exception

from wds_reinforce.core.augment import IMAGENET_MEAN, IMAGENET_STD, Recipe, normalize, replay
from wds_reinforce.core.augment.mixing import check_window, mix_row, window_crc
from wds_reinforce.core.decode import SourceImage
from wds_reinforce.core.errors import DataError, FormatError, MismatchError, UsageError, VersionError
from wds_reinforce.core.format import FORMAT_VERSION, SIDECAR_EXT, Manifest, Sidecar, check_topk, crc32c, decode_sidecar
from wds_reinforce.core.schedule import (
    SharedEpoch,
    epoch_value,
    group_for,
    original_rng,
    pairing_windows,
    round_for,
    round_in_group,
)
from wds_reinforce.core.targets import dense_row, mean_topk, sparse_one_hot
from wds_reinforce.io.shards import image_bytes, members_of
from wds_reinforce.layouts import layout_of

__all__ = [
    "LoaderOptions",
    "SkipCounter",
    "decode_sidecars",
    "pick_rounds",
    "replay_images",
    "make_targets",
    "reinforce",
    "reinforce_sample",
    "reinforce_stages",
    "ReplayPlan",
]

TARGET_MODES = ("smooth", "zeros", "sparse")
OUTPUT_MODES = ("uint8", "float")


# ----------------------------------------------------------------------------------------
# Errors and handlers


class SkipCounter:
    """A ``handler=`` that skips bad data and counts it, across DataLoader workers.

    It returns True (skip and continue) for ``DataError`` and re-raises everything else: a
    ``UsageError``, ``TypeError`` or ``RuntimeError`` is a bug or a bad argument, not bad data.
    ``count`` is the number of errors handled; ``samples`` adds up ``DataError.samples`` (so a
    shard truncated by n samples counts n). Counts live in shared memory (one slot per worker,
    so no locks), and work with forked, spawned and persistent workers; each rank counts its
    own. ``last`` (the last message) is per process.
    """

    _SLOTS = 256

    def __init__(self, warn: bool = False):
        self.warn = warn
        self._counts = torch.zeros(self._SLOTS, 2, dtype=torch.int64).share_memory_()
        self.last: str | None = None

    def __call__(self, exn: BaseException) -> bool:
        if not isinstance(exn, DataError):
            raise exn
        info = torch.utils.data.get_worker_info()
        slot = (info.id + 1) % self._SLOTS if info is not None else 0
        self._counts[slot, 0] += 1
        self._counts[slot, 1] += exn.samples
        self.last = f"{type(exn).__name__}: {exn}"[:1000]
        if self.warn:
            warnings.warn(f"skipping bad data: {self.last}", stacklevel=2)
        return True

    @property
    def count(self) -> int:
        return int(self._counts[:, 0].sum())

    @property
    def samples(self) -> int:
        return int(self._counts[:, 1].sum())


def _map(src: Iterable[dict], fn: Callable[[dict], dict], handler: Callable[[BaseException], bool]) -> Iterator[dict]:
    """Apply ``fn`` to each sample; a ``DataError`` goes to ``handler`` (True: skip, False: stop).

    ``MismatchError`` (the whole data set is not what the manifest says) and anything that is
    not a ``DataError`` (a bug, a bad argument) propagate whatever the handler.
    """
    for sample in src:
        try:
            out = fn(sample)
        except MismatchError:
            raise
        except DataError as exc:
            if handler(exc.located(sample.get("__key__"), sample.get("__url__"))):
                continue
            return
        yield out


# ----------------------------------------------------------------------------------------
# Options, checked once


@dataclass(frozen=True)
class LoaderOptions:
    """How samples become ``(image, target)``; checked once, shared by every stage.

    Attributes:
        seed: seeds the round schedule and the original-image coin and augmentation.
        p: probability of a reinforced round; otherwise the original image with
            ``fallback_recipe`` (default RRC + flip) and a one-hot target.
        densify: ``smooth`` (the paper's), ``zeros``, or ``sparse`` (``idx``/``prob`` per sample,
            densified later on the GPU with ``targets.densify``).
        label_smoothing: smoothing of the one-hot targets of original-image epochs.
        output: ``uint8`` (3, H, W) images or ``float`` (normalised with ``mean``/``std``).
        fallback_recipe: the augmentation of original-image epochs.
        teacher: whose targets, for sidecar sets with more teachers: 0 (the manifest's), k (its
            teacher set k) or ``"mean"`` (all of them, ``targets.mean_topk``; not with ``sparse``).
    """

    seed: int = 0
    p: float = 1.0
    densify: str = "smooth"
    label_smoothing: float = 0.0
    output: str = "uint8"
    mean: Sequence[float] = IMAGENET_MEAN
    std: Sequence[float] = IMAGENET_STD
    fallback_recipe: Recipe | None = None
    teacher: int | str = 0

    def __post_init__(self) -> None:
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise UsageError(f"expected seed an int, got {self.seed!r}")
        if isinstance(self.p, bool) or not isinstance(self.p, (int, float)) or not 0.0 <= self.p <= 1.0:
            raise UsageError(f"expected p a probability in [0, 1], got {self.p!r}")
        if self.densify not in TARGET_MODES:
            raise UsageError(f"expected densify in {list(TARGET_MODES)}, got {self.densify!r}")
        if not isinstance(self.label_smoothing, (int, float)) or not 0.0 <= self.label_smoothing < 1.0:
            raise UsageError(f"expected label_smoothing in [0, 1), got {self.label_smoothing!r}")
        if self.output not in OUTPUT_MODES:
            raise UsageError(f"expected output in {list(OUTPUT_MODES)}, got {self.output!r}")
        for name in ("mean", "std"):
            value = getattr(self, name)
            try:
                ok = len(value) == 3 and all(np.isfinite(float(v)) for v in value)
            except (TypeError, ValueError):
                ok = False
            if not ok or (name == "std" and min(float(v) for v in value) <= 0):
                raise UsageError(
                    f"expected {name} three finite numbers{' > 0' if name == 'std' else ''}, got {value!r}"
                )
        mean_ok = self.teacher == "mean" and self.densify != "sparse"
        if not mean_ok and (isinstance(self.teacher, bool) or not isinstance(self.teacher, int) or self.teacher < 0):
            raise UsageError(f"expected teacher an index >= 0 or 'mean' (with dense targets), got {self.teacher!r}")
        if self.fallback_recipe is not None and not isinstance(self.fallback_recipe, Recipe):
            raise UsageError(f"expected fallback_recipe a Recipe, got {type(self.fallback_recipe).__name__}")
        object.__setattr__(self, "p", float(self.p))
        object.__setattr__(self, "mean", tuple(self.mean))
        object.__setattr__(self, "std", tuple(self.std))


@dataclass(frozen=True)
class ReplayPlan:
    """What every sample is checked against and replayed with: built once from the manifest
    (``ReplayPlan.build``) and shared by the stages.

    A stage used on its own gets a partial plan (None: not checked / not needed by that stage).
    """

    options: LoaderOptions
    recipe: Recipe | None = None
    fallback: Recipe | None = None
    fingerprint: bytes | None = None
    rounds: int | None = None  # rounds per sidecar (a round group's, for sidecar sets)
    topk: int | None = None
    num_classes: int | None = None
    total_rounds: int | None = None  # rounds of the data set (more than ``rounds`` for sidecar sets)

    @classmethod
    def build(cls, manifest: Manifest, options: LoaderOptions) -> ReplayPlan:
        recipe, fingerprint = _manifest_recipe(manifest)
        fallback = options.fallback_recipe
        if fallback is not None and fallback.size != recipe.size:
            raise UsageError(f"expected a fallback recipe of the shards' size {recipe.size}, got {fallback.size}")
        return cls(
            options=options,
            recipe=recipe,
            fallback=_fallback(options, recipe),
            fingerprint=fingerprint,
            rounds=layout_of(manifest).group_rounds(manifest),
            topk=manifest.topk,
            num_classes=manifest.num_classes,
            total_rounds=manifest.rounds,
        )


def _fallback(options: LoaderOptions, recipe: Recipe) -> Recipe:
    return options.fallback_recipe or Recipe.from_spec("rrc", size=recipe.size, decode=recipe.decode)


def _manifest_recipe(manifest: Manifest) -> tuple[Recipe, bytes]:
    """The manifest's recipe and fingerprint, refusing a recipe this library would replay differently."""
    recipe = Recipe.from_dict(manifest.recipe)
    try:
        fingerprint = bytes.fromhex(manifest.fingerprint)
    except (TypeError, ValueError):
        raise FormatError(f"fingerprint must be 16 hex digits, got {manifest.fingerprint!r}", "manifest") from None
    if recipe.fingerprint != fingerprint:
        raise FormatError(
            f"the manifest's recipe has fingerprint {recipe.fingerprint.hex()} under this wds_reinforce version, "
            f"but the manifest records {manifest.fingerprint}: replay would not match the teacher's view",
            "manifest",
        )
    return recipe, fingerprint


# ----------------------------------------------------------------------------------------
# The per-sample steps


def _sidecar(sample: dict, plan: ReplayPlan, first: bool) -> Sidecar:
    """Decode ``{key}.dr.mp`` and check it against the manifest (rounds, top-k, op columns).

    At the first sample of a stream a version or fingerprint mismatch is a ``MismatchError``.
    """
    raw = sample.get(SIDECAR_EXT)
    if raw is None:
        raise FormatError(f"no '{SIDECAR_EXT}' member (members: {members_of(sample)})")
    key, url = sample.get("__key__"), sample.get("__url__")
    try:
        sidecar = decode_sidecar(raw)
    except VersionError as exc:
        if not first or not isinstance(exc.version, int):
            raise  # one odd sample, or garbage without a version: bad data, not a mismatch
        raise MismatchError(
            f"sidecar format version {exc.version!r}, this reader knows {FORMAT_VERSION}: "
            "upgrade wds_reinforce or remake the shards",
            key,
            url,
        ) from exc
    if plan.fingerprint is not None and sidecar.fingerprint != plan.fingerprint:
        raise (MismatchError if first else FormatError)(
            f"recipe fingerprint {sidecar.fingerprint.hex()} differs from the manifest's {plan.fingerprint.hex()}: "
            "the shards were made with another recipe (or another manifest)",
            key,
            url,
        )
    if plan.rounds is not None and sidecar.rounds != plan.rounds:
        raise FormatError(f"sidecar has {sidecar.rounds} rounds, the manifest says {plan.rounds}")
    if plan.topk is not None and sidecar.topk != plan.topk:
        raise FormatError(f"sidecar has top-{sidecar.topk}, the manifest says top-{plan.topk}")
    if plan.recipe is not None:
        plan.recipe.check_columns(sidecar.ops)
    extras = []
    for n in itertools.count(1):
        raw = sample.get(f"{SIDECAR_EXT}.{n}")
        if raw is None:
            break
        other = decode_sidecar(raw)
        if (other.fingerprint, other.rounds, other.topk) != (
            sidecar.fingerprint,
            sidecar.rounds,
            sidecar.topk,
        ) or other.ops:
            raise FormatError(f"teacher set {n}'s sidecar does not hold targets for this sample's stored rounds")
        extras.append(other)
    sample["teacher_sidecars"] = extras
    return sidecar


def _choose_round(
    plan: ReplayPlan, key: str, epoch: int, rounds: int, schedule_key: str | None = None
) -> tuple[int, int]:
    """(row in the sidecar, round of the data set) this epoch, or (-1, -1) for the original image.

    The coin has probability 1 - p. With sidecar sets the sidecar holds this epoch's round
    group (``schedule.group_for``) and the row is the sample's round within it. The round is
    scheduled by ``schedule_key`` (default ``key``): mixing recipes give every sample of a
    pairing window its first key, so the whole window plays one round; the coin stays per sample.
    """
    opts = plan.options
    if opts.p < 1.0 and original_rng(opts.seed, key, epoch).random() >= opts.p:
        return -1, -1
    key = schedule_key or key
    total = plan.total_rounds or rounds
    if total == rounds:
        r = round_for(opts.seed, key, epoch, rounds)
        return r, r
    r = round_in_group(opts.seed, key, epoch, total, rounds)
    return r, group_for(opts.seed, epoch, total, rounds) * rounds + r


def _source(sample: Mapping[str, Any], sidecar: Sidecar) -> SourceImage:
    """The sample's image (not yet decoded), checked against the sidecar's checksum."""
    data = image_bytes(sample)
    if sidecar.image_crc is not None and crc32c(data) != sidecar.image_crc:
        raise FormatError("image bytes do not match the sidecar's checksum: the image member is damaged")
    return SourceImage(data)


def _image(
    sample: dict, plan: ReplayPlan, r: int, sidecar: Sidecar, epoch: int, seed: int, image: SourceImage | None = None
) -> torch.Tensor:
    """Round ``r``'s pixels, or for r = -1 the original image under the fallback recipe
    (its parameters drawn after the coin of ``original_rng(seed, key, epoch)``)."""
    image = image if image is not None else _source(sample, sidecar)
    if r >= 0:
        img = replay(image, sidecar.round_params(r), plan.recipe)
    else:
        rng = original_rng(seed, sample["__key__"], epoch)
        rng.random()  # the coin, drawn by _choose_round: the parameters follow it in the stream
        img = replay(image, plan.fallback.sample(rng, image.size), plan.fallback)
    opts = plan.options
    return normalize(img, opts.mean, opts.std) if opts.output == "float" else img


def _target(sample: dict, plan: ReplayPlan, r: int, sidecar: Sidecar) -> None:
    """Set ``target`` (dense float32 (C,)) or ``idx``/``prob`` (sparse) of round ``r``.

    Round -1 (original image) gets a one-hot of ``{key}.cls`` smoothed by ``label_smoothing``;
    sparse one-hot rows are padded with the label at probability 0, so densifying them with
    ``smooth`` reproduces label smoothing.
    """
    opts, num_classes = plan.options, plan.num_classes
    if r >= 0:
        extras = sample.get("teacher_sidecars") or []
        sets = [sidecar, *extras] if opts.teacher == "mean" else extras[:1] or [sidecar]
        for sc in sets:
            check_topk(sc.idx[r], sc.prob[r], num_classes)
        idx, prob = (
            mean_topk([(sc.idx[r], sc.prob[r]) for sc in sets]) if len(sets) > 1 else (sets[0].idx[r], sets[0].prob[r])
        )
    else:
        try:
            label = int(sample["cls"])
        except (KeyError, ValueError):
            raise FormatError(f"no integer 'cls' label (members: {members_of(sample)})") from None
        if not 0 <= label < num_classes:
            raise FormatError(f"label {label} is not in [0, {num_classes})")
        idx, prob = sparse_one_hot(label, num_classes, sidecar.topk, opts.label_smoothing)
    if opts.densify == "sparse":
        sample["idx"] = torch.from_numpy(idx.astype(np.int64))
        sample["prob"] = torch.from_numpy(prob.astype(np.float32))
    elif r >= 0 or opts.densify == "smooth":
        sample["target"] = dense_row(
            idx if r >= 0 else idx[:1], prob if r >= 0 else prob[:1], num_classes, opts.densify
        )
    else:  # zeros would renormalise the smoothing away; a one-hot keeps it
        out = np.full(num_classes, opts.label_smoothing / num_classes, np.float32)
        out[idx[0]] = prob[0]
        sample["target"] = torch.from_numpy(out)


def reinforce_sample(sample: dict, plan: ReplayPlan, epoch: int, first: bool = False) -> dict:
    """All steps for one sample: sidecar, round, image, target (see the module docstring).

    Raises:
        UsageError: a mixing recipe, whose samples are reinforced a pairing window at a time
            (the ``reinforce`` stage).
    """
    _no_mixing(plan.recipe)
    sidecar = _sidecar(sample, plan, first)
    r, sample["round"] = _choose_round(plan, sample["__key__"], epoch, sidecar.rounds)
    sample["sidecar"], sample["epoch"] = sidecar, epoch
    sample["image"] = _image(sample, plan, r, sidecar, epoch, plan.options.seed)
    _target(sample, plan, r, sidecar)
    return sample


# ----------------------------------------------------------------------------------------
# Mixing recipes: one pairing window at a time


def _mix_window(window: list[dict], plan: ReplayPlan, epoch: int, state: dict) -> Iterator[dict | DataError]:
    """Every sample of one pairing window reinforced (its round mixed as stored), or its DataError.

    Each image is decoded once; a partner's view of the window's round is replayed once and
    shared. ``state["first"]`` is True until a sidecar passes (mismatches show there).
    """
    keys = [s.get("__key__") for s in window]
    crc = window_crc(keys)
    sidecars: list[Sidecar | None] = []
    failed: dict[int, DataError] = {}
    for i, sample in enumerate(window):
        try:
            sidecar = _sidecar(sample, plan, state["first"])
            state["first"] = False
            check_window(sidecar.window_crc, crc)
        except MismatchError:
            raise
        except DataError as exc:
            sidecar, failed[i] = None, exc
        sidecars.append(sidecar)
    sources: dict[int, SourceImage] = {}
    views: dict[tuple[int, int], torch.Tensor] = {}

    def source(i: int) -> SourceImage:  # checked and decoded once, whoever needs it first
        if i not in sources:
            sources[i] = _source(window[i], sidecars[i])
        return sources[i]

    def view(i: int, r: int) -> torch.Tensor:
        if (i, r) not in views:
            views[i, r] = replay(source(i), sidecars[i].round_params(r), plan.recipe)
        return views[i, r]

    opts, mix = plan.options, plan.recipe.mix
    for i, (sample, sidecar) in enumerate(zip(window, sidecars)):
        if sidecar is None:
            yield failed[i]
            continue
        try:
            r, sample["round"] = _choose_round(plan, keys[i], epoch, sidecar.rounds, keys[0])
            sample["sidecar"], sample["epoch"] = sidecar, epoch
            if r < 0:
                sample["image"] = _image(sample, plan, r, sidecar, epoch, opts.seed, source(i))
            else:
                row = mix_row(sidecar.ops, r)
                mix.check(row, i, len(window), plan.recipe.size)
                img, partner = view(i, r), int(row["mixp"][0]) - 1
                if partner >= 0:
                    if sidecars[partner] is None:
                        raise FormatError(f"its mixing partner {keys[partner]!r} is unreadable")
                    try:
                        other = view(partner, r)
                    except DataError as exc:  # the partner's fault: say so, under this sample's key
                        raise FormatError(f"its mixing partner {keys[partner]!r}: {exc.message}") from None
                    img = mix.apply(img, other, row)
                elif opts.output == "uint8":
                    img = img.clone()  # the cached view is a later sample's partner: hand out a copy
                sample["image"] = normalize(img, opts.mean, opts.std) if opts.output == "float" else img
            _target(sample, plan, r, sidecar)
        except MismatchError:
            raise
        except DataError as exc:
            yield exc
            continue
        yield sample


def _reinforce_windows(
    src: Iterable[dict], plan: ReplayPlan, epoch: int, handler: Callable[[BaseException], bool]
) -> Iterator[dict]:
    state = {"first": True}
    # A window is W samples of one shard by their position in it (``__position__``, set where shards are read).
    url, position = (lambda s: s.get("__url__")), (lambda s: s.get("__position__"))
    for window in pairing_windows(src, plan.recipe.mix.window, shard_of=url, position_of=position):
        for sample, out in zip(window, _mix_window(window, plan, epoch, state)):
            if isinstance(out, DataError):
                if handler(out.located(sample.get("__key__"), sample.get("__url__"))):
                    continue
                return
            yield out


# ----------------------------------------------------------------------------------------
# Stages


def _no_mixing(recipe: Recipe | None) -> None:  # the per-sample steps cannot pair samples
    if recipe is not None and recipe.mix is not None:
        raise UsageError(
            "a mixing recipe is replayed a pairing window at a time: use the reinforce stage "
            "(reinforce_stages or ReinforcedDataset), not the per-sample steps"
        )


def _first_flagged(fn: Callable[[dict, bool], dict]) -> Callable[[dict], dict]:
    """``fn(sample, first)`` with ``first`` True until a sample passes (mismatches show there)."""
    state = {"first": True}

    def call(sample: dict) -> dict:
        out = fn(sample, state["first"])
        state["first"] = False
        return out

    return call


def _reinforce(
    src: Iterable[dict], plan: ReplayPlan, epoch: Any = 0, handler: Callable = reraise_exception
) -> Iterator[dict]:
    e = epoch_value(epoch)  # read once per iteration: workers see the epoch set before iter()
    if plan.recipe is not None and plan.recipe.mix is not None:
        yield from _reinforce_windows(src, plan, e, handler)
        return
    yield from _map(src, _first_flagged(lambda s, first: reinforce_sample(s, plan, e, first)), handler)


def _decode_sidecars(
    src: Iterable[dict],
    fingerprint: bytes | None = None,
    rounds: int | None = None,
    topk: int | None = None,
    recipe: Recipe | None = None,
    handler: Callable = reraise_exception,
) -> Iterator[dict]:
    """Decode ``{key}.dr.mp`` into ``sample["sidecar"]``, checked against the manifest's values given."""
    _no_mixing(recipe)
    plan = ReplayPlan(LoaderOptions(), recipe, fingerprint=fingerprint, rounds=rounds, topk=topk)

    def step(sample: dict, first: bool) -> dict:
        sample["sidecar"] = _sidecar(sample, plan, first)
        return sample

    yield from _map(src, _first_flagged(step), handler)


def _pick_rounds(src: Iterable[dict], seed: int = 0, epoch: Any = 0, p: float = 1.0) -> Iterator[dict]:
    """Set ``sample["round"]`` to this epoch's round (``round_for``), or -1 for the original image.

    Not for mixing recipes, whose rounds are scheduled per pairing window (``reinforce``).

    ``sample["epoch"]`` and ``sample["__seed__"]`` go along for ``replay_images``, which draws an
    original image's augmentation from the same seeded stream as the coin.
    """
    plan = ReplayPlan(LoaderOptions(seed=seed, p=p))
    e = epoch_value(epoch)
    for sample in src:
        sample["epoch"], sample["__seed__"] = e, seed
        sample["round"] = _choose_round(plan, sample["__key__"], e, sample["sidecar"].rounds)[0]
        yield sample


def _replay_images(
    src: Iterable[dict],
    recipe: Recipe,
    fallback: Recipe | None = None,
    output: str = "uint8",
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    handler: Callable = reraise_exception,
) -> Iterator[dict]:
    """Replay ``sample["round"]`` into ``sample["image"]`` (round -1: ``fallback``, default RRC + flip)."""
    _no_mixing(recipe)
    options = LoaderOptions(output=output, mean=mean, std=std, fallback_recipe=fallback)
    plan = ReplayPlan(options, recipe, _fallback(options, recipe))

    def step(sample: dict) -> dict:
        r, sidecar = sample["round"], sample["sidecar"]  # set by earlier stages: missing = a bug, not data
        sample["image"] = _image(sample, plan, r, sidecar, sample["epoch"], sample["__seed__"])
        return sample

    yield from _map(src, step, handler)


def _make_targets(
    src: Iterable[dict],
    num_classes: int,
    densify: str = "smooth",
    label_smoothing: float = 0.0,
    handler: Callable = reraise_exception,
) -> Iterator[dict]:
    """Set ``sample["target"]`` (or ``idx``/``prob`` for ``densify="sparse"``) of this epoch's round."""
    options = LoaderOptions(densify=densify, label_smoothing=label_smoothing)
    plan = ReplayPlan(options, num_classes=num_classes)

    def step(sample: dict) -> dict:
        _target(sample, plan, sample["round"], sample["sidecar"])  # missing keys = a stage-order bug
        return sample

    yield from _map(src, step, handler)


decode_sidecars = wds_filters.pipelinefilter(_decode_sidecars)
pick_rounds = wds_filters.pipelinefilter(_pick_rounds)
replay_images = wds_filters.pipelinefilter(_replay_images)
make_targets = wds_filters.pipelinefilter(_make_targets)
reinforce = wds_filters.pipelinefilter(_reinforce)


def reinforce_stages(
    manifest: Manifest,
    options: LoaderOptions | None = None,
    *,
    epoch: int | SharedEpoch | Callable[[], int] = 0,
    handler: Callable = reraise_exception,
    **option_args: Any,
) -> list[Callable[[Iterable[dict]], Iterator[dict]]]:
    """The stages that turn raw sample dicts into ``image`` + ``target`` (or ``idx``/``prob``).

    Example::

        ds = wds.WebDataset(urls, shardshuffle=False).compose(*reinforce_stages(manifest, epoch=shared))

    Args:
        manifest: the shards' manifest.
        options: a ``LoaderOptions``; or give its fields as keyword arguments (``seed=``, ``p=``, ...).
        epoch: an int, a ``SharedEpoch`` or a callable, read when iteration starts.
        handler: error policy for bad data (see ``SkipCounter``); default raises.
    """
    if options is None:
        options = LoaderOptions(**option_args)
    elif option_args:
        raise UsageError(f"expected options or option arguments, got both ({sorted(option_args)})")
    return [reinforce(plan=ReplayPlan.build(manifest, options), epoch=epoch, handler=handler)]
