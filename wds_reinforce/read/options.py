"""How the loader turns samples into ``(image, target)``, checked once: options, the replay plan,
and the error policy (``SkipCounter``) a ``handler=`` applies to bad data.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch

from wds_reinforce.core.augment import IMAGENET_MEAN, IMAGENET_STD, Recipe
from wds_reinforce.core.errors import DataError, FormatError, MismatchError, UsageError
from wds_reinforce.core.format import Manifest
from wds_reinforce.layouts import layout_of

__all__ = ["TARGET_MODES", "OUTPUT_MODES", "SkipCounter", "LoaderOptions", "ReplayPlan", "apply_each"]

TARGET_MODES = ("smooth", "zeros", "sparse")
OUTPUT_MODES = ("uint8", "float")


# ----------------------------------------------------------------------------------------
# Errors and handlers


class SkipCounter:
    """A ``handler=`` that skips bad data and counts it, across DataLoader workers.

    It returns True (skip and continue) for ``DataError`` and re-raises everything else: a
    ``UsageError``, ``TypeError`` or ``RuntimeError`` is a bug or a bad argument, not bad data.
    ``count`` is the number of errors handled; ``samples`` adds up ``DataError.samples`` (so a
    shard truncated by n samples counts n): the data set's samples the epoch did not yield;
    ``foreign`` adds up ``DataError.foreign``: samples read but refused because they were not
    the ones their place should hold. Counts live in shared memory (one slot per worker,
    so no locks), and work with forked, spawned and persistent workers; each rank counts its
    own. ``last`` (the last message) is per process.
    """

    _SLOTS = 256

    def __init__(self, warn: bool = False):
        self.warn = warn
        self._counts = torch.zeros(self._SLOTS, 3, dtype=torch.int64).share_memory_()
        self.last: str | None = None

    def __call__(self, exn: BaseException) -> bool:
        if not isinstance(exn, DataError):
            raise exn
        info = torch.utils.data.get_worker_info()
        slot = (info.id + 1) % self._SLOTS if info is not None else 0
        self._counts[slot, 0] += 1
        self._counts[slot, 1] += exn.samples
        self._counts[slot, 2] += getattr(exn, "foreign", 0)
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

    @property
    def foreign(self) -> int:
        return int(self._counts[:, 2].sum())


def apply_each(
    src: Iterable[dict], fn: Callable[[dict], dict], handler: Callable[[BaseException], bool]
) -> Iterator[dict]:
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
        output: ``uint8`` (3, H, W) images or ``float`` (normalised with ``mean``/``std``; None: the
            recipe's ``normalize``, ImageNet's unless the recipe names another).
        fallback_recipe: the augmentation of original-image epochs.
        teacher: whose targets, for sidecar sets with more teachers: 0 (the manifest's), k (its
            teacher set k) or ``"mean"`` (all of them, ``targets.mean_topk``; not with ``sparse``).
    """

    seed: int = 0
    p: float = 1.0
    densify: str = "smooth"
    label_smoothing: float = 0.0
    output: str = "uint8"
    mean: Sequence[float] | None = None  # None: the recipe's (``Recipe.mean``)
    std: Sequence[float] | None = None
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
            if value is None:
                continue
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
        for name in ("mean", "std"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, tuple(getattr(self, name)))


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

    def __post_init__(self) -> None:
        # Normalisation not given: the recipe's (``Recipe.mean``/``std``: ImageNet's unless it says).
        opts = self.options
        if opts.mean is None or opts.std is None:
            mean, std = (self.recipe.mean, self.recipe.std) if self.recipe else (IMAGENET_MEAN, IMAGENET_STD)
            object.__setattr__(self, "options", replace(opts, mean=opts.mean or mean, std=opts.std or std))

    @classmethod
    def build(cls, manifest: Manifest, options: LoaderOptions) -> ReplayPlan:
        recipe, fingerprint = _manifest_recipe(manifest)
        fallback = options.fallback_recipe
        if fallback is not None and fallback.size != recipe.size:
            raise UsageError(f"expected a fallback recipe of the shards' size {recipe.size}, got {fallback.size}")
        return cls(
            options=options,
            recipe=recipe,
            fallback=fallback_recipe(options, recipe),
            fingerprint=fingerprint,
            rounds=layout_of(manifest).group_rounds(manifest),
            topk=manifest.topk,
            num_classes=manifest.num_classes,
            total_rounds=manifest.rounds,
        )


def fallback_recipe(options: LoaderOptions, recipe: Recipe) -> Recipe:
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
