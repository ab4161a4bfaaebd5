"""Top-k, NLL and ECE against values computed by hand on a small fixed set (issue 22, item 1)."""

from __future__ import annotations

import math

import pytest
import torch

from wds_reinforce.cli.metrics import as_json, describe, ece, nll, summarize, topk_accuracy

# Five samples, six classes. Confidence (largest probability), its 15-bin bin, right or wrong:
#   s0 0.90 bin 13 right | s1 0.50 bin 7 wrong | s2 0.62 bin 9 right | s3 0.55 bin 8 wrong | s4 0.92 bin 13 wrong
PROBS = torch.tensor(
    [
        [0.90, 0.02, 0.02, 0.02, 0.02, 0.02],
        [0.50, 0.30, 0.10, 0.05, 0.03, 0.02],
        [0.05, 0.05, 0.62, 0.08, 0.10, 0.10],
        [0.01, 0.04, 0.10, 0.10, 0.20, 0.55],
        [0.92, 0.04, 0.01, 0.01, 0.01, 0.01],
    ],
    dtype=torch.float64,
)
LABELS = torch.tensor([0, 1, 2, 0, 1])


def test_topk_by_hand():
    assert topk_accuracy(PROBS, LABELS, 1) == pytest.approx(2 / 5)  # s0, s2
    assert topk_accuracy(PROBS, LABELS, 5) == pytest.approx(4 / 5)  # all but s3 (its label is the least likely)


def test_nll_by_hand():
    by_hand = -(math.log(0.90) + math.log(0.30) + math.log(0.62) + math.log(0.01) + math.log(0.04)) / 5
    assert by_hand == pytest.approx(1.922283, abs=1e-6)
    assert nll(PROBS, LABELS) == pytest.approx(by_hand, abs=1e-12)


def test_ece_by_hand_bins_not_samples():
    # Bin 13 holds s0 and s4: confidence 0.91, accuracy 0.5 -> 2/5 * 0.41; the others alone:
    # s1 |0.50 - 0|, s2 |0.62 - 1|, s3 |0.55 - 0|, each 1/5.
    by_hand = 2 / 5 * 0.41 + (0.50 + 0.38 + 0.55) / 5
    assert by_hand == pytest.approx(0.45)
    assert ece(PROBS, LABELS) == pytest.approx(by_hand, abs=1e-12)
    # Per sample (no bins) it would be 0.49: the bins matter.
    assert ece(PROBS, LABELS) != pytest.approx(0.49)


def test_ece_full_confidence_is_in_the_last_bin_and_a_perfect_model_scores_zero():
    certain = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    assert ece(certain, torch.tensor([0, 1])) == pytest.approx(0.5)
    assert ece(certain, torch.tensor([0, 0])) == 0.0
    assert nll(certain, torch.tensor([0, 1])) == pytest.approx(-math.log(torch.finfo(torch.float64).tiny) / 2)


def test_summary_has_top5_only_above_five_classes_and_json_is_percent():
    metrics = summarize(PROBS, LABELS)
    assert metrics["top5"] == pytest.approx(0.8)
    assert summarize(PROBS[:, :5] / PROBS[:, :5].sum(1, keepdim=True), LABELS)["top5"] is None
    fields = as_json(metrics)
    assert fields == {"top1": 40.0, "top5": 80.0, "nll": 1.9223, "ece": 45.0}
    assert describe(metrics) == "top-1 40.00%, top-5 80.00%, NLL 1.9223, ECE 45.00%"
    assert as_json(None) == {"top1": None, "top5": None, "nll": None, "ece": None}


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match=r"expected probabilities \(N, C\) and labels \(N,\)"):
        ece(PROBS, LABELS[:3])
