"""The loader's per-sample steps: sidecar, round, image, target; and a mixing recipe's pairing windows.

``reinforce_sample`` runs them all for one sample. A mixing recipe (``Recipe.mix``) is
reinforced a pairing window at a time (``reinforce_windows``): W consecutive samples of a shard
(``schedule.pairing_windows``), each sidecar's window checksum checked, the window's round of
each sample replayed once and mixed with its partner's view. Bad data raises ``DataError``
(located by the stage that runs the step); nothing here writes or touches the network.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import numpy as np
import torch

from wds_reinforce.core.augment import Recipe, normalize, replay
from wds_reinforce.core.augment.mixing import check_window, mix_row, window_crc
from wds_reinforce.core.decode import SourceImage
from wds_reinforce.core.errors import DataError, FormatError, MismatchError, UsageError, VersionError
from wds_reinforce.core.format import FORMAT_VERSION, SIDECAR_EXT, Sidecar, check_topk, crc32c, decode_sidecar
from wds_reinforce.core.schedule import group_for, original_rng, pairing_windows, round_in_group
from wds_reinforce.core.targets import dense_row, mean_topk, sparse_one_hot
from wds_reinforce.io.shards import image_bytes, members_of
from wds_reinforce.read.options import ReplayPlan

__all__ = ["reinforce_sample", "reinforce_windows", "no_mixing"]


# ----------------------------------------------------------------------------------------
# The per-sample steps


def sample_sidecar(sample: dict, plan: ReplayPlan, first: bool) -> Sidecar:
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
    if sidecar.label_crc is not None and crc32c(sample.get("cls") or b"") != sidecar.label_crc:
        raise FormatError("the label member 'cls' does not match the sidecar's checksum: the label is damaged")
    if plan.rounds is not None and sidecar.rounds not in (plan.rounds, 0):  # 0: the original image every epoch
        raise FormatError(f"sidecar has {sidecar.rounds} rounds, the manifest says {plan.rounds}")
    if not sidecar.rounds and plan.recipe is not None and plan.recipe.mix is not None:
        raise FormatError("sidecar has no rounds, which a mixing recipe's pairing window cannot do without")
    if plan.topk is not None and sidecar.topk != plan.topk:
        raise FormatError(f"sidecar has top-{sidecar.topk}, the manifest says top-{plan.topk}")
    if plan.recipe is not None and sidecar.rounds:  # no rounds: no parameters to replay
        plan.recipe.check_columns(sidecar.ops)
    extras = []
    for n in itertools.count(1):
        raw = sample.get(f"{SIDECAR_EXT}.{n}")
        if raw is None:
            break
        other = decode_sidecar(raw)
        same = (other.fingerprint, other.rounds, other.topk) == (sidecar.fingerprint, sidecar.rounds, sidecar.topk)
        bound = all(  # the same place (shard, position, round group) and image, where both record them
            None in (mine, theirs) or mine == theirs
            for mine, theirs in ((sidecar.place, other.place), (sidecar.image_crc, other.image_crc))
        )
        if not (same and bound) or other.ops:
            raise FormatError(f"teacher set {n}'s sidecar does not hold targets for this sample's stored rounds")
        extras.append(other)
    sample["teacher_sidecars"] = extras
    return sidecar


def choose_round(
    plan: ReplayPlan, key: str, epoch: int, rounds: int, schedule_key: str | None = None
) -> tuple[int, int]:
    """(row in the sidecar, round of the data set) this epoch, or (-1, -1) for the original image.

    The coin has probability 1 - p; a sidecar of no ``rounds`` gives the original image every
    epoch. With sidecar sets the sidecar holds this epoch's round
    group (``schedule.group_for``) and the row is the sample's round within it. The round is
    scheduled by ``schedule_key`` (default ``key``): mixing recipes give every sample of a
    pairing window its first key, so the whole window plays one round; the coin stays per sample.
    """
    opts = plan.options
    if not rounds or opts.p < 1.0 and original_rng(opts.seed, key, epoch).random() >= opts.p:
        return -1, -1
    key = schedule_key or key
    total = plan.total_rounds or rounds  # one group of all the rounds: round_for's round, group 0
    r = round_in_group(opts.seed, key, epoch, total, rounds)
    return r, group_for(opts.seed, epoch, total, rounds) * rounds + r


def sample_source(sample: Mapping[str, Any], sidecar: Sidecar) -> SourceImage:
    """The sample's image (not yet decoded), checked against the sidecar's checksum."""
    data = image_bytes(sample)
    if sidecar.image_crc is not None and crc32c(data) != sidecar.image_crc:
        raise FormatError("image bytes do not match the sidecar's checksum: the image member is damaged")
    return SourceImage(data)


def sample_image(
    sample: dict, plan: ReplayPlan, r: int, sidecar: Sidecar, epoch: int, seed: int, image: SourceImage | None = None
) -> torch.Tensor:
    """Round ``r``'s pixels, or for r = -1 the original image under the fallback recipe
    (its parameters drawn after the coin of ``original_rng(seed, key, epoch)``)."""
    image = image if image is not None else sample_source(sample, sidecar)
    if r >= 0:
        img = replay(image, sidecar.round_params(r), plan.recipe)
    else:
        rng = original_rng(seed, sample["__key__"], epoch)
        rng.random()  # the coin, drawn by _choose_round: the parameters follow it in the stream
        img = replay(image, plan.fallback.sample(rng, image.size), plan.fallback)
    opts = plan.options
    return normalize(img, opts.mean, opts.std) if opts.output == "float" else img


def set_target(sample: dict, plan: ReplayPlan, r: int, sidecar: Sidecar) -> None:
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


def no_mixing(recipe: Recipe | None) -> None:  # the per-sample steps cannot pair samples
    if recipe is not None and recipe.mix is not None:
        raise UsageError(
            "a mixing recipe is replayed a pairing window at a time: use the reinforce stage "
            "(reinforce_stages or ReinforcedDataset), not the per-sample steps"
        )


def reinforce_sample(sample: dict, plan: ReplayPlan, epoch: int, first: bool = False) -> dict:
    """All steps for one sample: sidecar, round, image, target (see the module docstring).

    Raises:
        UsageError: a mixing recipe, whose samples are reinforced a pairing window at a time
            (the ``reinforce`` stage).
    """
    no_mixing(plan.recipe)
    sidecar = sample_sidecar(sample, plan, first)
    r, sample["round"] = choose_round(plan, sample["__key__"], epoch, sidecar.rounds)
    sample["sidecar"], sample["epoch"] = sidecar, epoch
    sample["image"] = sample_image(sample, plan, r, sidecar, epoch, plan.options.seed)
    set_target(sample, plan, r, sidecar)
    return sample


# ----------------------------------------------------------------------------------------
# Mixing recipes: one pairing window at a time


class _Window:
    """One pairing window's samples and sidecars, whose images are decoded and views replayed once
    each, whoever needs them first (a sample, or its partner). ``state["first"]`` is True until a
    sidecar passes (mismatches show there)."""

    def __init__(self, samples: list[dict], plan: ReplayPlan, state: dict):
        self.samples, self.plan = samples, plan
        self.keys = [s.get("__key__") for s in samples]
        crc = window_crc(self.keys)
        self.sidecars: list[Sidecar | None] = []
        self.failed: dict[int, DataError] = {}
        for i, sample in enumerate(samples):
            try:
                sidecar = sample_sidecar(sample, plan, state["first"])
                state["first"] = False
                check_window(sidecar.window_crc, crc)
            except MismatchError:
                raise
            except DataError as exc:
                sidecar, self.failed[i] = None, exc
            self.sidecars.append(sidecar)
        self._sources: dict[int, SourceImage] = {}
        self._views: dict[tuple[int, int], torch.Tensor] = {}

    def source(self, i: int) -> SourceImage:
        if i not in self._sources:
            self._sources[i] = sample_source(self.samples[i], self.sidecars[i])
        return self._sources[i]

    def view(self, i: int, r: int) -> torch.Tensor:
        if (i, r) not in self._views:
            self._views[i, r] = replay(self.source(i), self.sidecars[i].round_params(r), self.plan.recipe)
        return self._views[i, r]

    def image(self, i: int, r: int) -> torch.Tensor:
        """Sample i's view of round r, mixed with its partner's as stored."""
        opts, mix = self.plan.options, self.plan.recipe.mix
        row = mix_row(self.sidecars[i].ops, r)
        mix.check(row, i, len(self.samples), self.plan.recipe.size)
        img, partner = self.view(i, r), int(row["mixp"][0]) - 1
        if partner >= 0:
            if self.sidecars[partner] is None:
                raise FormatError(f"its mixing partner {self.keys[partner]!r} is unreadable")
            try:
                other = self.view(partner, r)
            except DataError as exc:  # the partner's fault: say so, under this sample's key
                raise FormatError(f"its mixing partner {self.keys[partner]!r}: {exc.message}") from None
            img = mix.apply(img, other, row)
        elif opts.output == "uint8":
            img = img.clone()  # the cached view is a later sample's partner: hand out a copy
        return normalize(img, opts.mean, opts.std) if opts.output == "float" else img


def _mix_window(samples: list[dict], plan: ReplayPlan, epoch: int, state: dict) -> Iterator[dict | DataError]:
    """Every sample of one pairing window reinforced (its round mixed as stored), or its DataError."""
    window, seed = _Window(samples, plan, state), plan.options.seed
    for i, (sample, sidecar) in enumerate(zip(samples, window.sidecars)):
        if sidecar is None:
            yield window.failed[i]
            continue
        try:
            # The whole window plays its first key's round; the original-image coin stays per sample.
            r, sample["round"] = choose_round(plan, window.keys[i], epoch, sidecar.rounds, window.keys[0])
            sample["sidecar"], sample["epoch"] = sidecar, epoch
            if r < 0:
                sample["image"] = sample_image(sample, plan, r, sidecar, epoch, seed, window.source(i))
            else:
                sample["image"] = window.image(i, r)
            set_target(sample, plan, r, sidecar)
        except MismatchError:
            raise
        except DataError as exc:
            yield exc
            continue
        yield sample


def reinforce_windows(
    src: Iterable[dict], plan: ReplayPlan, epoch: int, handler: Callable[[BaseException], bool]
) -> Iterator[dict]:
    state = {"first": True}
    # A window is W samples of one shard by their position in it (``__position__``, set where shards are read).
    url, position = (lambda s: s.get("__url__")), (lambda s: s.get("__position__"))
    for window in pairing_windows(src, plan.recipe.pairing_window, shard_of=url, position_of=position):
        for sample, out in zip(window, _mix_window(window, plan, epoch, state)):
            if isinstance(out, DataError):
                if handler(out.located(sample.get("__key__"), sample.get("__url__"))):
                    continue
                return
            yield out
