"""Streaming reader of reinforced shards: webdataset stages and a ``ReinforcedDataset``.

Each sample goes through one per-sample function, ``steps.reinforce_sample``: decode and check the
sidecar, choose this epoch's round (or the original image), replay the stored augmentation,
build the target. It runs in one webdataset-style map stage whose ``handler=`` sees only data
errors (``core.errors.DataError``, located with the sample key and shard URL); usage errors and bugs
propagate. The steps are also available as separate stages for custom pipelines (each curried
with ``webdataset.filters.pipelinefilter``, so ``stage(**options)`` takes the sample iterator):

``decode_sidecars`` -> ``pick_rounds`` -> ``replay_images`` -> ``make_targets``

(per-shard sample counts are checked where shards are read: ``read.dataset``)

A mixing recipe (``Recipe.mix``, see ``core.augment.mixing``) is reinforced a pairing window at
a time (``steps.reinforce_windows``): the ``reinforce`` stage cuts the stream into windows of W consecutive
samples of a shard (``core.schedule.pairing_windows``), checks each sidecar's window checksum,
replays the window's round of each sample once and mixes it with its partner's view; the
per-sample steps refuse such recipes.
Anything that reorders samples (a shuffle buffer) must come after it.

``read.dataset.ReinforcedDataset`` wires them to a shard list read from the manifest. This module
never imports the teacher, and never writes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from webdataset import filters as wds_filters
from webdataset.handlers import reraise_exception

from wds_reinforce.core.augment import Recipe
from wds_reinforce.core.errors import UsageError
from wds_reinforce.core.format import Manifest
from wds_reinforce.core.schedule import SharedEpoch, epoch_value
from wds_reinforce.read.options import LoaderOptions, ReplayPlan, SkipCounter, apply_each, fallback_recipe
from wds_reinforce.read.steps import (
    choose_round,
    no_mixing,
    reinforce_sample,
    reinforce_windows,
    sample_image,
    sample_sidecar,
    set_target,
)

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


# ----------------------------------------------------------------------------------------
# Stages


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
        yield from reinforce_windows(src, plan, e, handler)
        return
    yield from apply_each(src, _first_flagged(lambda s, first: reinforce_sample(s, plan, e, first)), handler)


def _decode_sidecars(
    src: Iterable[dict],
    fingerprint: bytes | None = None,
    rounds: int | None = None,
    topk: int | None = None,
    recipe: Recipe | None = None,
    handler: Callable = reraise_exception,
) -> Iterator[dict]:
    """Decode ``{key}.dr.mp`` into ``sample["sidecar"]``, checked against the manifest's values given."""
    no_mixing(recipe)
    plan = ReplayPlan(LoaderOptions(), recipe, fingerprint=fingerprint, rounds=rounds, topk=topk)

    def step(sample: dict, first: bool) -> dict:
        sample["sidecar"] = sample_sidecar(sample, plan, first)
        return sample

    yield from apply_each(src, _first_flagged(step), handler)


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
        sample["round"] = choose_round(plan, sample["__key__"], e, sample["sidecar"].rounds)[0]
        yield sample


def _replay_images(
    src: Iterable[dict],
    recipe: Recipe,
    fallback: Recipe | None = None,
    output: str = "uint8",
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    handler: Callable = reraise_exception,
) -> Iterator[dict]:
    """Replay ``sample["round"]`` into ``sample["image"]`` (round -1: ``fallback``, default RRC + flip)."""
    no_mixing(recipe)
    options = LoaderOptions(output=output, mean=mean, std=std, fallback_recipe=fallback)
    plan = ReplayPlan(options, recipe, fallback_recipe(options, recipe))

    def step(sample: dict) -> dict:
        r, sidecar = sample["round"], sample["sidecar"]  # set by earlier stages: missing = a bug, not data
        sample["image"] = sample_image(sample, plan, r, sidecar, sample["epoch"], sample["__seed__"])
        return sample

    yield from apply_each(src, step, handler)


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
        set_target(sample, plan, sample["round"], sample["sidecar"])  # missing keys = a stage-order bug
        return sample

    yield from apply_each(src, step, handler)


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
