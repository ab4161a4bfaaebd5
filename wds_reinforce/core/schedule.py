"""Which stored round a sample uses in an epoch, and the epoch number DataLoader workers share.

Everything here is a function of (seed, sample key, epoch): never of worker ids, ranks, the
order samples arrive in, or time, so a restarted or re-sharded run makes the same choices.

A mixing recipe pairs samples within **pairing windows** (``pairing_windows``, ``WindowCutter``):
W consecutive samples of a shard, window w holding the shard's positions ``w·W .. w·W + W − 1``
(the last may be shorter), where a sample's position counts the shard's samples that have a
sidecar. The producers, the loader, verify and the rounds picture all cut windows here.

``round_for`` walks a per-sample permutation of the R rounds per cycle of R epochs, so every
round is used once before any repeats. The permutation is affine, ``r = (a * pos + b) mod R``
with ``a`` coprime to R, both drawn from a 64-bit hash of (seed, key, cycle): a bijection on
``range(R)`` for a few microseconds (a numpy ``Generator`` per call cost 13-47 µs). Over samples
and epochs each round is equally likely and samples are independent; within one sample the
order is one of the ``phi(R) * R`` affine orders, which is all a replay schedule needs.
"""

from __future__ import annotations

import functools
import hashlib
import math
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Generic, TypeVar

import numpy as np
import torch

from wds_reinforce.core.errors import UsageError

__all__ = [
    "SharedEpoch",
    "key_word",
    "round_for",
    "group_for",
    "round_in_group",
    "epoch_value",
    "original_rng",
    "check_epoch",
    "WindowCutter",
    "pairing_windows",
]

_U64 = 0xFFFFFFFFFFFFFFFF
_SCHEDULE_TAG = 0x5343484544  # "SCHED": keeps the schedule's stream apart from round_rng's
_ORIGINAL_TAG = 0x4F524947  # "ORIG": the coin and parameters of a non-reinforced epoch
_GROUP_TAG = 0x47524F5550  # "GROUP": the order round groups are visited in


def key_word(key: str) -> int:
    """A stable 64-bit number for a sample key, for seeding generators from (seed, key, ...)."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little")


def _mix64(x: int) -> int:
    """splitmix64's finaliser: a bijective avalanche of 64-bit words."""
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9 & _U64
    x = (x ^ (x >> 27)) * 0x94D049BB133111EB & _U64
    return x ^ (x >> 31)


@functools.lru_cache(maxsize=64)
def _units(rounds: int) -> tuple[int, ...]:
    """The strides coprime to ``rounds``: each gives a bijection ``pos -> a * pos mod rounds``."""
    return tuple(a for a in range(1, rounds) if math.gcd(a, rounds) == 1)


def round_for(seed: int, key: str, epoch: int, rounds: int) -> int:
    """The round a sample uses in an epoch: a function of (seed, key, epoch) only.

    Epochs ``c*R .. c*R + R-1`` use a permutation of ``range(R)`` seeded by (seed, key, c), so
    every round is used once before any repeats, whatever the world size, worker count,
    shuffling or restarts.
    """
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise UsageError(f"expected rounds a positive int, got {rounds!r}")
    cycle, pos = divmod(check_epoch(epoch), rounds)
    if rounds == 1:
        return 0
    return _affine(_mix64((seed & _U64) ^ _mix64(key_word(key) ^ _mix64(cycle ^ _SCHEDULE_TAG))), pos, rounds)


def _affine(h: int, pos: int, n: int) -> int:
    """Position ``pos`` of the permutation of ``range(n)`` that the 64-bit hash ``h`` picks."""
    if n == 1:
        return 0
    units = _units(n)
    return (units[(h >> 32) % len(units)] * pos + (h & 0xFFFFFFFF) % n) % n


def _check_groups(rounds: int, group_rounds: int) -> int:
    if isinstance(group_rounds, bool) or not isinstance(group_rounds, int) or group_rounds < 1:
        raise UsageError(f"expected group_rounds a positive int, got {group_rounds!r}")
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1 or rounds % group_rounds:
        raise UsageError(f"expected rounds a positive multiple of group_rounds={group_rounds}, got {rounds!r}")
    return rounds // group_rounds


def group_for(seed: int, epoch: int, rounds: int, group_rounds: int) -> int:
    """The round group every sample reads in an epoch (sidecar sets: one group per epoch).

    Over each cycle of R epochs each of the R/G groups is visited G times, interleaved in a
    per-(seed, cycle) order; the same group for every sample, so an epoch reads one group's
    shards. With one group it is always 0.
    """
    groups = _check_groups(rounds, group_rounds)
    cycle, pos = divmod(check_epoch(epoch), rounds)
    if groups == 1:  # every round in one group (self-contained sets): no hash on the loader's per-sample path
        return 0
    return _affine(_mix64((seed & _U64) ^ _mix64(cycle ^ _GROUP_TAG)), pos % groups, groups)


def round_in_group(seed: int, key: str, epoch: int, rounds: int, group_rounds: int) -> int:
    """The round, within this epoch's group (``group_for``), that a sample uses.

    Together with ``group_for``: every one of the R rounds once per cycle of R epochs, per sample.
    With one group (``group_rounds == rounds``) it equals ``round_for(seed, key, epoch, rounds)``.
    """
    groups = _check_groups(rounds, group_rounds)
    if groups == 1:
        return round_for(seed, key, epoch, rounds)  # what the line below gives, one divmod sooner
    cycle, pos = divmod(check_epoch(epoch), rounds)
    return round_for(seed, key, cycle * group_rounds + pos // groups, group_rounds)


def original_rng(seed: int, key: str, epoch: int) -> np.random.Generator:
    """The generator of a sample's original-image coin (and its augmentation) in one epoch."""
    return np.random.default_rng([seed & _U64, key_word(key), epoch, _ORIGINAL_TAG])


class SharedEpoch:
    """An epoch number in shared memory: set in the main process, read by DataLoader workers.

    Works with forked, spawned and persistent workers: workers read it each time they start
    iterating, so call ``set`` (or ``ReinforcedDataset.set_epoch``) before iterating the loader.
    """

    def __init__(self, epoch: int = 0):
        # A tensor in shared memory, not multiprocessing.Value: its lock is bound to one start
        # method, and DataLoader workers may be forked or spawned.
        self._value = torch.tensor([check_epoch(epoch)], dtype=torch.int64).share_memory_()

    def set(self, epoch: int) -> None:
        self._value[0] = check_epoch(epoch)

    def get(self) -> int:
        return int(self._value[0])

    def __repr__(self) -> str:
        return f"SharedEpoch({self.get()})"


def check_epoch(epoch: Any) -> int:
    if isinstance(epoch, bool) or not isinstance(epoch, (int, np.integer)) or epoch < 0:
        raise UsageError(f"expected epoch a non-negative int, got {epoch!r}")
    return int(epoch)


def epoch_value(epoch: int | SharedEpoch | Callable[[], int]) -> int:
    """The current value of an epoch given as an int, a ``SharedEpoch`` or a callable."""
    if isinstance(epoch, SharedEpoch):
        return epoch.get()
    if callable(epoch):
        return check_epoch(epoch())
    return check_epoch(epoch)


# ----------------------------------------------------------------------------------------
# Pairing windows (mixing recipes): the one rule, for producers, the loader, verify and pictures

T = TypeVar("T")


class WindowCutter(Generic[T]):
    """Cuts one shard's samples, fed in shard order, into pairing windows of ``width``.

    Window w holds the positions ``w·W .. w·W + W − 1``. ``add`` returns the windows a sample
    completes: the open one when the sample starts another window, and its own once the sample
    fills its last place; ``close`` returns the open window at the shard's end (its last,
    shorter one). A sample's ``position`` is its place among the shard's samples with sidecars;
    without one the samples fed are counted, so a sample lost on the way shifts every later
    window of the shard, while with positions it costs only its own window.
    """

    def __init__(self, width: int):
        if isinstance(width, bool) or not isinstance(width, int) or width < 1:
            raise UsageError(f"expected a pairing window width >= 1, got {width!r}")
        self.width = width
        self._open: list[T] = []
        self._slot = -1
        self._count = 0

    def add(self, item: T, position: int | None = None) -> list[list[T]]:
        """Feed the next sample; the windows it completes, in order (none, one or two)."""
        position = self._count if position is None else position
        self._count = position + 1
        done = []
        if self._open and position // self.width != self._slot:
            done.append(self._open)
            self._open = []
        self._slot = position // self.width
        self._open.append(item)
        if position % self.width == self.width - 1:
            done.append(self._open)
            self._open = []
        return done

    def close(self) -> list[T] | None:
        """The open window at the shard's end, if any; the cutter then starts a new shard."""
        window, self._open, self._slot, self._count = self._open or None, [], -1, 0
        return window


def pairing_windows(
    items: Iterable[T],
    width: int,
    shard_of: Callable[[T], Any] | None = None,
    position_of: Callable[[T], int | None] | None = None,
) -> Iterator[list[T]]:
    """The pairing windows of samples in shard order (``WindowCutter``), a shard ending where
    ``shard_of`` changes; ``position_of`` gives a sample's position in its shard (None: counted)."""
    cutter: WindowCutter[T] = WindowCutter(width)
    shard: Any = object()
    for item in items:
        here = shard_of(item) if shard_of is not None else None
        if here != shard:
            last = cutter.close()
            if last:
                yield last
            shard = here
        yield from cutter.add(item, position_of(item) if position_of is not None else None)
    last = cutter.close()
    if last:
        yield last
