"""The round schedule: which stored round a sample uses per epoch, and the shared epoch."""

from __future__ import annotations

import collections

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from wds_reinforce.core.errors import UsageError
from wds_reinforce.core.schedule import (
    SharedEpoch,
    WindowCutter,
    epoch_value,
    key_word,
    original_rng,
    pairing_windows,
    round_for,
)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 12), st.integers(0, 2**40), st.text(min_size=1, max_size=8), st.integers(0, 3))
def test_round_for_uses_every_round_once_per_cycle(rounds, seed, key, cycle):
    picked = [round_for(seed, key, cycle * rounds + e, rounds) for e in range(rounds)]
    assert sorted(picked) == list(range(rounds))
    assert picked == [round_for(seed, key, cycle * rounds + e, rounds) for e in range(rounds)]


def test_round_for_varies_with_key_and_cycle():
    orders = {tuple(round_for(0, f"k{i}", e, 8) for e in range(8)) for i in range(20)}
    assert len(orders) > 10
    assert [round_for(0, "k", e, 8) for e in range(8)] != [round_for(0, "k", e, 8) for e in range(8, 16)]
    with pytest.raises(ValueError, match="expected epoch a non-negative int, got -1"):
        round_for(0, "k", -1, 3)
    with pytest.raises(ValueError, match="expected rounds a positive int, got 0"):
        round_for(0, "k", 0, 0)


def test_shared_epoch_reaches_workers():
    epoch = SharedEpoch(3)
    epoch.set(5)
    assert epoch.get() == 5
    with pytest.raises(ValueError, match="expected epoch a non-negative int"):
        epoch.set(-2)


@pytest.mark.parametrize("rounds", [2, 7, 12, 16, 97, 400])
def test_every_round_once_per_cycle_for_many_keys(rounds):
    for i in range(50):
        for cycle in (0, 1, 5):
            picked = [round_for(3, f"key{i}", cycle * rounds + e, rounds) for e in range(rounds)]
            assert sorted(picked) == list(range(rounds)), (i, cycle)


def test_rounds_are_equally_likely_over_samples():
    """Each epoch's round is uniform over samples (chi-square at a fixed seed, far from the limit)."""
    rounds, samples = 8, 4000
    for epoch in (0, 3, 11):
        counts = collections.Counter(round_for(0, f"img{i:06d}", epoch, rounds) for i in range(samples))
        expected = samples / rounds
        chi2 = sum((counts[r] - expected) ** 2 / expected for r in range(rounds))
        assert chi2 < 30, (epoch, counts)  # 7 degrees of freedom: p < 1e-4 at 30


def test_schedule_depends_on_seed_and_is_a_pure_function():
    a = [round_for(0, "k", e, 16) for e in range(32)]
    assert a == [round_for(0, "k", e, 16) for e in range(32)]  # a restart replays the same choices
    assert a != [round_for(1, "k", e, 16) for e in range(32)]
    assert round_for(2**70, "k", 0, 16) == round_for(2**70 & (2**64 - 1), "k", 0, 16)


def test_one_round_is_always_round_zero():
    assert {round_for(5, f"k{i}", e, 1) for i in range(5) for e in range(5)} == {0}


def test_bad_arguments_are_usage_errors():
    with pytest.raises(UsageError, match="expected rounds a positive int, got True"):
        round_for(0, "k", 0, True)
    with pytest.raises(UsageError, match="expected epoch a non-negative int, got 1.5"):
        round_for(0, "k", 1.5, 3)
    with pytest.raises(UsageError, match="expected epoch a non-negative int, got -1"):
        epoch_value(lambda: -1)


def test_epoch_values_and_original_rng():
    shared = SharedEpoch(2)
    assert epoch_value(shared) == 2 and epoch_value(4) == 4 and epoch_value(lambda: 6) == 6
    assert repr(shared) == "SharedEpoch(2)"
    a, b = original_rng(0, "k", 1).random(3), original_rng(0, "k", 1).random(3)
    assert np.array_equal(a, b) and not np.array_equal(a, original_rng(0, "k", 2).random(3))
    assert key_word("k") == key_word("k") != key_word("k2")


def _read_epoch(shared: SharedEpoch, out) -> None:
    out.put(shared.get())


def test_shared_epoch_is_seen_by_a_spawned_process():
    ctx = torch.multiprocessing.get_context("spawn")
    shared, out = SharedEpoch(1), ctx.Queue()
    shared.set(7)
    proc = ctx.Process(target=_read_epoch, args=(shared, out))
    proc.start()
    try:
        assert out.get(timeout=60) == 7
    finally:
        proc.join(60)


def _windows(items, width, positions=True):
    shard, position = (lambda s: s[0]), (lambda s: s[1]) if positions else None
    return [[pos for _, pos in w] for w in pairing_windows(items, width, shard_of=shard, position_of=position)]


def test_pairing_windows_cut_each_shard_by_position():
    items = [("a", i) for i in range(7)] + [("b", i) for i in range(5)]
    assert _windows(items, 3) == [[0, 1, 2], [3, 4, 5], [6], [0, 1, 2], [3, 4]]
    assert _windows(items, 3, positions=False) == _windows(items, 3)  # counted from each shard's start
    assert _windows(items, 1) == [[pos] for _, pos in items]


def test_a_lost_sample_costs_only_its_own_window():
    kept = [("a", i) for i in (0, 1, 2, 3, 5, 6, 7, 8, 9)]  # position 4 lost
    assert _windows(kept, 4) == [[0, 1, 2, 3], [5, 6, 7], [8, 9]]
    # without positions the loss shifts every later window of the shard
    assert _windows(kept, 4, positions=False) == [[0, 1, 2, 3], [5, 6, 7, 8], [9]]


def test_a_sample_can_complete_two_windows():
    cutter = WindowCutter(4)
    assert cutter.add("p0", 0) == [] and cutter.add("p1", 1) == []
    assert cutter.add("p7", 7) == [["p0", "p1"], ["p7"]]  # positions 2..6 lost
    assert cutter.close() is None
    cutter.add("q0", 0)
    assert cutter.close() == ["q0"]
    with pytest.raises(UsageError, match="expected a pairing window width >= 1, got 0"):
        WindowCutter(0)
