"""MixUp and CutMix between samples of one pairing window: sampling, pixels, and the window.

A mixing recipe (``Recipe.mix``) pairs each round of a sample with a partner from its
**pairing window**: W consecutive samples of its shard (positions ``w·W .. w·W + W − 1`` in the
shard's order; the last window may be shorter). The partner's view is its own stored
augmentation of the same round, so mixing stores no pixels and no partner parameters: a loader
that reads a shard in order holds one window (at most W decoded images) and decodes each image
once per epoch. Every sample of a window plays the same round in an epoch: the window's round,
scheduled by the key of its first sample (``window_key``), so every partner's view of that round
is the one the loader makes anyway.

Per round, with the paper's ImageNet+ settings (``mode: both``), MixUp happens with p = 0.5 and
CutMix with p = 0.5, independently; a round can have none, either, or both, MixUp first, then
CutMix pastes a box of the partner's (unmixed) view onto the result. ``mode: one`` applies at
most one of them (timm-style "switch"), MixUp with its p and CutMix with its p.

**The convention stored.** MixUp's weight is the partner's: ``out = (1 − w)·own + w·partner``
with ``w = Beta(alpha, alpha) · max`` (``max`` 0.5 = ml-dr's ``div_by`` 2), so a sample stays
the larger part of its own mixed view. ml-dr's code computes ``lam·x + (1 − lam)·x2`` with
``lam = Beta/div_by``, the opposite of what its docstring says (the partner dominates there);
with a uniformly drawn partner both give the same distribution of mixed pairs, and this one
keeps "sample k's view is mostly sample k" true for pictures and one-hot fallbacks.

Columns (docs/FORMAT.md): ``mixp`` partner position in the window + 1 (0 = round not mixed),
``mixl`` the MixUp weight w as ``round(w·256)`` clamped to [1, 255] (0 = no MixUp),
``mixb`` the CutMix box (top, left, height, width) in output pixels (zeros = no CutMix), all
``sparse``: with the column names and ``mw``, 3.7 bytes per round at 400 rounds, 5.6 at 16.
Pixels use integer arithmetic only (16-bit: ``(own·(256 − q) + partner·q + 128) >> 8``), so
producer and loader agree bit for bit on any machine, at about 0.06 ms per 224 px MixUp on one core.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from wds_reinforce.core.errors import FormatError
from wds_reinforce.core.format import COLUMNS, crc32c
from wds_reinforce.core.schedule import key_word

__all__ = [
    "MIX_COLUMNS",
    "MIX_WIDTHS",
    "WEIGHT_SCALE",
    "Mixing",
    "mix_rng",
    "mix_pixels",
    "mix_kind",
    "mix_row",
    "mixed_views",
    "window_crc",
    "check_window",
]

MIX_COLUMNS = ("mixp", "mixl", "mixb")
MIX_WIDTHS = {name: COLUMNS.get(name).width for name in MIX_COLUMNS}  # values per round of each
WEIGHT_SCALE = 256  # MixUp weights are q / 256, q in 1..255
MIX_MODES = ("both", "one")
_MIX_TAG = 0x4D4958  # "MIX": the mixing stream is independent of the ops' round_rng stream


def _probability(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(f"expected mix {name} a probability in [0, 1], got {value!r}")
    return float(value)


def _positive(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (value > 0 and math.isfinite(value)):
        raise ValueError(f"expected mix {name} a positive number, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class Mixing:
    """A recipe's mixing settings (its ``mix`` entry).

    Attributes:
        window: W, samples per pairing window (2..4096); a loader holds one window per worker.
        mode: ``both`` (independent coins, the paper's) or ``one`` (at most one per round;
            then ``mixup_p + cutmix_p`` must be at most 1).
        mixup_p, mixup_alpha, mixup_max: MixUp's probability; the partner weight is
            ``Beta(alpha, alpha) · max`` (max in (0, 1]; 0.5 is ml-dr's ``div_by: 2``).
        cutmix_p, cutmix_alpha: CutMix's probability; the box's area fraction is Beta(alpha, alpha).
    """

    window: int = 16
    mode: str = "both"
    mixup_p: float = 0.5
    mixup_alpha: float = 1.0
    mixup_max: float = 0.5
    cutmix_p: float = 0.5
    cutmix_alpha: float = 1.0

    def __post_init__(self) -> None:
        if isinstance(self.window, bool) or not isinstance(self.window, int) or not 2 <= self.window <= 4096:
            raise ValueError(f"expected mix window an integer in [2, 4096], got {self.window!r}")
        if self.mode not in MIX_MODES:
            raise ValueError(f"expected mix mode in {list(MIX_MODES)}, got {self.mode!r}")
        object.__setattr__(self, "mixup_p", _probability("mixup p", self.mixup_p))
        object.__setattr__(self, "cutmix_p", _probability("cutmix p", self.cutmix_p))
        object.__setattr__(self, "mixup_alpha", _positive("mixup alpha", self.mixup_alpha))
        object.__setattr__(self, "cutmix_alpha", _positive("cutmix alpha", self.cutmix_alpha))
        if not 0.0 < _positive("mixup max", self.mixup_max) <= 1.0:
            raise ValueError(f"expected mix mixup max in (0, 1], got {self.mixup_max!r}")
        object.__setattr__(self, "mixup_max", float(self.mixup_max))
        if self.mode == "one" and self.mixup_p + self.cutmix_p > 1.0 + 1e-12:
            raise ValueError(f"expected mixup p + cutmix p <= 1 with mode 'one', got {self.mixup_p + self.cutmix_p}")

    # -- description

    def to_dict(self) -> dict[str, Any]:
        return {
            "window": self.window,
            "mode": self.mode,
            "mixup": {"p": self.mixup_p, "alpha": self.mixup_alpha, "max": self.mixup_max},
            "cutmix": {"p": self.cutmix_p, "alpha": self.cutmix_alpha},
        }

    @classmethod
    def from_dict(cls, desc: Mapping[str, Any]) -> Mixing:
        """The settings a recipe's ``mix`` entry describes (``to_dict``); missing entries get defaults."""
        if not isinstance(desc, Mapping):
            raise ValueError(f"expected the recipe's mix entry to be a mapping, got {desc!r}")
        unknown = set(desc) - {"window", "mode", "mixup", "cutmix"}
        if unknown:
            raise ValueError(f"unknown mix field(s) {sorted(unknown)}; expected window, mode, mixup, cutmix")
        mixup, cutmix = desc.get("mixup", {}), desc.get("cutmix", {})
        for name, part, allowed in (("mixup", mixup, {"p", "alpha", "max"}), ("cutmix", cutmix, {"p", "alpha"})):
            if not isinstance(part, Mapping) or set(part) - allowed:
                raise ValueError(f"expected mix {name} a mapping of {sorted(allowed)}, got {part!r}")
        d = cls()
        return cls(
            window=desc.get("window", d.window),
            mode=desc.get("mode", d.mode),
            mixup_p=mixup.get("p", d.mixup_p),
            mixup_alpha=mixup.get("alpha", d.mixup_alpha),
            mixup_max=mixup.get("max", d.mixup_max),
            cutmix_p=cutmix.get("p", d.cutmix_p),
            cutmix_alpha=cutmix.get("alpha", d.cutmix_alpha),
        )

    # -- sampling

    def sample(
        self, rng: np.random.Generator, position: int, members: int, size: tuple[int, int]
    ) -> dict[str, np.ndarray]:
        """One round's mixing rows for the sample at ``position`` of a window of ``members``.

        Always draws the same numbers in the same order (so each draw means one thing), then
        decides; a window of one sample has no partner and the round is not mixed.
        """
        u_mixup, u_cutmix = rng.random(), rng.random()
        partner = int(rng.integers(max(members - 1, 1)))
        weight = rng.beta(self.mixup_alpha, self.mixup_alpha) * self.mixup_max
        area = rng.beta(self.cutmix_alpha, self.cutmix_alpha)
        cy, cx = int(rng.integers(size[0])), int(rng.integers(size[1]))
        if self.mode == "both":
            mixup, cutmix = u_mixup < self.mixup_p, u_cutmix < self.cutmix_p
        else:
            mixup = u_mixup < self.mixup_p
            cutmix = not mixup and u_mixup < self.mixup_p + self.cutmix_p
        box = _box(area, cy, cx, size) if cutmix else (0, 0, 0, 0)
        cutmix = box[2] > 0
        rows = {name: np.zeros(width, np.int64) for name, width in MIX_WIDTHS.items()}
        if members < 2 or not (mixup or cutmix):
            return rows
        rows["mixp"][0] = 1 + (partner if partner < position else partner + 1)
        if mixup:
            rows["mixl"][0] = min(max(round(weight * WEIGHT_SCALE), 1), WEIGHT_SCALE - 1)
        rows["mixb"][:] = box
        return rows

    def sample_rounds(
        self, seed: int, keys: Sequence[str], position: int, rounds: Sequence[int], size: tuple[int, int]
    ) -> dict[str, np.ndarray]:
        """Mixing columns (len(rounds), width) of the sample at ``position`` of the window ``keys``."""
        per = [self.sample(mix_rng(seed, keys[position], r), position, len(keys), size) for r in rounds]
        return {name: np.stack([p[name] for p in per]) for name in MIX_COLUMNS}

    # -- checks and pixels

    def check(self, row: Mapping[str, np.ndarray], position: int, members: int, size: tuple[int, int]) -> None:
        """Raise ``FormatError`` unless one round's mixing rows can be right for the sample at
        ``position`` of a window of ``members`` with outputs of ``size``. The loader's check, per
        sample: plain ints, no numpy calls."""
        box = [int(v) for v in row["mixb"]]
        for broken, why in _violations(int(row["mixp"][0]), int(row["mixl"][0]), box, position, members, size):
            if broken:
                raise FormatError(why)

    def check_columns(self, ops: Mapping[str, np.ndarray], position: int, members: int, size: tuple[int, int]) -> None:
        """``check`` for every round of a sidecar's columns at once (verify's); the error names the round."""
        partner, q = ops["mixp"][:, 0].astype(np.int64), ops["mixl"][:, 0].astype(np.int64)
        box = [ops["mixb"][:, i].astype(np.int64) for i in range(4)]
        for broken, why in _violations(partner, q, box, position, members, size):
            if broken.any():
                raise FormatError(f"round {int(np.argmax(broken))}: {why}")

    def apply(self, own: torch.Tensor, partner: torch.Tensor, row: Mapping[str, np.ndarray]) -> torch.Tensor:
        """The mixed view of one round (``mix_pixels``)."""
        return mix_pixels(own, partner, row)

    def mix_window(
        self, seed: int, keys: Sequence[str], views: Sequence[torch.Tensor], rounds: Sequence[int]
    ) -> tuple[list[torch.Tensor], list[dict[str, np.ndarray]], int]:
        """The producer's step: every window member's mixing columns, its views mixed by them, and
        the window's key checksum.

        Args:
            seed: the job's seed.
            keys: the window's sample keys, in shard order.
            views: per member, its unmixed views (len(rounds), 3, H, W) uint8 of ``rounds``.
            rounds: the data set's round numbers the views are of (their draws depend on them).

        Returns:
            Per member the views the teacher sees (``mixed_views``) and the mixing columns
            ``mixp``/``mixl``/``mixb`` as (len(rounds), width) arrays; and ``window_crc(keys)``, the
            sidecars' ``mw``.
        """
        size = (int(views[0].shape[-2]), int(views[0].shape[-1]))
        columns = [self.sample_rounds(seed, keys, i, rounds, size) for i in range(len(keys))]
        return mixed_views(views, columns), columns, window_crc(keys)


def _box(area: float, cy: int, cx: int, size: tuple[int, int]) -> tuple[int, int, int, int]:
    """A box of ``area`` (a fraction) of the image around (cy, cx), clipped to the image."""
    h, w = size
    cut_h, cut_w = round(h * math.sqrt(area)), round(w * math.sqrt(area))
    top, left = max(cy - cut_h // 2, 0), max(cx - cut_w // 2, 0)
    bottom, right = min(cy - cut_h // 2 + cut_h, h), min(cx - cut_w // 2 + cut_w, w)
    if bottom <= top or right <= left:
        return (0, 0, 0, 0)
    return (top, left, bottom - top, right - left)


def mix_rng(seed: int, key: str, round_index: int) -> np.random.Generator:
    """The generator of one (seed, sample key, round)'s mixing draws; independent of the ops' stream."""
    return np.random.default_rng([seed & 0xFFFFFFFFFFFFFFFF, key_word(key), round_index, _MIX_TAG])


def window_crc(keys: Sequence[str]) -> int:
    """CRC-32C of a window's keys joined by newlines: what each of its sidecars records (``mw``)."""
    return crc32c("\n".join(keys).encode())


def check_window(recorded: int | None, crc: int) -> None:
    """Raise ``FormatError`` unless a sidecar's ``mw`` (``recorded``) fits its window, whose keys give ``crc``."""
    if recorded is None:
        raise FormatError("a mixing recipe's sidecar without a pairing-window checksum 'mw'")
    if recorded != crc:
        raise FormatError(
            "the sample's pairing window differs from the one it was mixed in (samples lost, reordered "
            "or shuffled before the mixing stage)"
        )


def mix_kind(row: Mapping[str, np.ndarray]) -> str:
    """``none``, ``mixup``, ``cutmix`` or ``both``: what one round's mixing rows do."""
    mixup, cutmix = int(row["mixl"][0]) > 0, int(row["mixb"][2]) > 0
    return "both" if mixup and cutmix else "mixup" if mixup else "cutmix" if cutmix else "none"


def mix_row(ops: Mapping[str, np.ndarray], r: int) -> dict[str, np.ndarray]:
    """Round ``r``'s mixing rows of a sidecar's (or ``sample_rounds``') columns."""
    return {name: ops[name][r] for name in MIX_COLUMNS}


def _violations(partner: Any, q: Any, box: Sequence[Any], position: int, members: int, size: tuple[int, int]):
    """The rules mixing rows obey, as (broken, why) pairs: of Python ints for one round, or of
    numpy arrays for all rounds at once (the operators are the same)."""
    top, left, h, w = box
    return (
        ((partner == 0) & ((q > 0) | (h > 0) | (w > 0)), "mixing rows without a partner"),
        (partner > members, f"a mixing partner outside its window of {members} samples"),
        (partner == position + 1, "the sample is its own mixing partner"),
        (q >= WEIGHT_SCALE, f"a MixUp weight not below {WEIGHT_SCALE}"),
        (((h == 0) != (w == 0)) | (top + h > size[0]) | (left + w > size[1]), "a CutMix box outside the output"),
        ((partner > 0) & (q == 0) & (h == 0), "a mixing partner with neither MixUp nor CutMix"),
    )


def mix_pixels(own: torch.Tensor, partner: torch.Tensor, row: Mapping[str, np.ndarray]) -> torch.Tensor:
    """The mixed uint8 (3, H, W) view: MixUp of ``own`` with ``partner``, then CutMix from ``partner``.

    Integer arithmetic only, in uint16 (``(own·(256 − q) + partner·q + 128) >> 8``, at most
    255·256 + 128 < 2**16), so every machine gives the same bytes.
    """
    out = own
    q = int(row["mixl"][0])
    if q:
        mixed = own.numpy().astype(np.uint16)
        mixed *= WEIGHT_SCALE - q
        theirs = partner.numpy().astype(np.uint16)
        theirs *= q
        mixed += theirs
        mixed += WEIGHT_SCALE // 2
        mixed >>= 8
        out = torch.from_numpy(mixed.astype(np.uint8))
    top, left, h, w = (int(v) for v in row["mixb"])
    if h:
        out = out.clone() if out is own else out
        out[:, top : top + h, left : left + w] = partner[:, top : top + h, left : left + w]
    return out


def mixed_views(views: Sequence[torch.Tensor], columns: Sequence[Mapping[str, np.ndarray]]) -> list[torch.Tensor]:
    """A window's views as stored mixing columns mix them (what the teacher saw).

    ``views[i]`` is member i's unmixed (T, 3, H, W) views of T rounds, ``columns[i]`` its mixing
    columns of the same rounds (a sidecar's ``ops``, or ``Mixing.sample_rounds``).
    """
    mixed = []
    for i, cols in enumerate(columns):
        out = list(views[i])
        for t in range(len(out)):
            row = mix_row(cols, t)
            partner = int(row["mixp"][0])
            if partner:
                out[t] = mix_pixels(views[i][t], views[partner - 1][t], row)
        mixed.append(torch.stack(out) if out else views[i])
    return mixed
