"""Densify, one-hot and the soft losses."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from wds_reinforce.core.targets import (
    DENSIFY,
    dense_row,
    densify,
    kl_div_loss,
    one_hot,
    soft_cross_entropy,
    sparse_one_hot,
    topk,
)


@st.composite
def sparse_rows(draw):
    num_classes = draw(st.integers(2, 40))
    topk = draw(st.integers(1, num_classes))
    batch = draw(st.integers(1, 4))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    idx = np.stack([rng.choice(num_classes, topk, replace=False) for _ in range(batch)])
    mass = draw(st.floats(0.05, 1.0))
    prob = rng.dirichlet(np.ones(topk), size=batch) * mass
    prob = -np.sort(-prob.astype(np.float16), axis=1)
    return idx.astype(np.uint16), prob, num_classes


@settings(max_examples=60, deadline=None)
@given(sparse_rows())
def test_smooth_keeps_topk_and_spreads_the_rest(rows):
    idx, prob, num_classes = rows
    dense = densify(idx, prob, num_classes, "smooth")
    assert dense.shape == (idx.shape[0], num_classes) and dense.dtype == torch.float32
    torch.testing.assert_close(dense.sum(1), torch.ones(idx.shape[0]), atol=2e-3, rtol=0)
    for b in range(idx.shape[0]):
        row = dense[b].numpy()
        p = prob[b].astype(np.float32)
        if idx.shape[1] < num_classes:
            np.testing.assert_array_equal(row[idx[b].astype(int)], p)
        else:  # nowhere to spread the leftover: renormalised
            np.testing.assert_allclose(row[idx[b].astype(int)], p / p.sum(), rtol=1e-6)
        others = np.delete(row, idx[b].astype(int))
        if others.size:
            assert np.allclose(others, others[0]) and others[0] >= 0
        # the loader's per-sample numpy path agrees with the batched one
        np.testing.assert_allclose(dense_row(idx[b], prob[b], num_classes, "smooth").numpy(), row, atol=1e-7)


@settings(max_examples=60, deadline=None)
@given(sparse_rows())
def test_zeros_renormalises_topk(rows):
    idx, prob, num_classes = rows
    dense = densify(torch.from_numpy(idx.astype(np.int64)), torch.from_numpy(prob), num_classes, "zeros")
    torch.testing.assert_close(dense.sum(1), torch.ones(idx.shape[0]))
    p = prob.astype(np.float32)
    for b in range(idx.shape[0]):
        expect = np.zeros(num_classes, np.float32)
        expect[idx[b].astype(int)] = p[b] / p[b].sum()
        np.testing.assert_allclose(dense[b].numpy(), expect, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(
            dense_row(idx[b], prob[b], num_classes, "zeros").numpy(), expect, rtol=1e-6, atol=1e-7
        )


def test_densify_single_row_and_leftover_clamped():
    out = densify([3, 1], [0.75, 0.5], 5)  # fp16 rounding can push a sum past 1: no negative fill
    assert out.shape == (5,)
    assert out.min() >= 0 and out[3] == 0.75 and out[1] == 0.5


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_sparse_one_hot_densifies_to_smoothed_one_hot(smoothing):
    idx, prob = sparse_one_hot(2, 7, topk=4, smoothing=smoothing)
    torch.testing.assert_close(densify(idx, prob, 7, "smooth"), one_hot(2, 7, smoothing))
    expect = F.one_hot(torch.tensor(2), 7).float() * (1 - smoothing) + smoothing / 7
    torch.testing.assert_close(one_hot(2, 7, smoothing), expect)


def test_densify_errors():
    with pytest.raises(ValueError, match="unknown densify method 'nope'; expected one of: smooth, zeros"):
        densify([1], [1.0], 3, "nope")
    with pytest.raises(ValueError, match="expected class ids in \\[0, 3\\)"):
        densify([3], [1.0], 3)
    with pytest.raises(ValueError, match="expected idx and prob of one shape"):
        densify([[1, 2]], [1.0], 3)
    with pytest.raises(ValueError, match="expected integer class ids"):
        densify([1.0], [1.0], 3)
    with pytest.raises(ValueError, match="already registered"):
        DENSIFY.register("smooth", lambda *a: None)


def test_soft_cross_entropy_matches_torch_for_one_hot_and_soft_targets():
    torch.manual_seed(0)
    logits = torch.randn(6, 9)
    labels = torch.randint(0, 9, (6,))
    torch.testing.assert_close(soft_cross_entropy(logits, one_hot(labels, 9)), F.cross_entropy(logits, labels))
    torch.testing.assert_close(
        soft_cross_entropy(logits, one_hot(labels, 9, 0.1)), F.cross_entropy(logits, labels, label_smoothing=0.1)
    )
    target = torch.softmax(torch.randn(6, 9), -1)
    torch.testing.assert_close(soft_cross_entropy(logits, target), F.cross_entropy(logits, target))


def test_kl_is_ce_minus_entropy_and_zero_at_the_teacher():
    torch.manual_seed(1)
    logits = torch.randn(5, 8)
    target = densify(torch.tensor([[1, 2], [0, 7], [3, 4], [5, 6], [2, 1]]), torch.tensor([[0.6, 0.2]] * 5), 8)
    entropy = -(target * target.log()).sum(-1).mean()
    torch.testing.assert_close(kl_div_loss(logits, target), soft_cross_entropy(logits, target) - entropy)
    torch.testing.assert_close(kl_div_loss(target.log(), target), torch.tensor(0.0), atol=1e-6, rtol=0)
    ref = F.kl_div(F.log_softmax(logits / 2, -1), target, reduction="batchmean") * 4
    torch.testing.assert_close(kl_div_loss(logits, target, temperature=2.0), ref)
    # zeros in the target (densify "zeros") are fine: 0 log 0 = 0
    sparse = densify(torch.tensor([[1, 2]]), torch.tensor([[0.6, 0.2]]), 8, "zeros")
    assert torch.isfinite(kl_div_loss(logits[:1], sparse))
    assert kl_div_loss(logits, target, reduction="none").shape == (5,)
    with pytest.raises(ValueError, match="expected reduction"):
        kl_div_loss(logits, target, reduction="avg")
    with pytest.raises(ValueError, match="expected logits and target of one shape"):
        soft_cross_entropy(logits, target[:, :3])


def test_topk_sorted_fp16_and_ties_by_class_id():
    probs = torch.tensor([[0.1, 0.4, 0.1, 0.4], [0.7, 0.1, 0.1, 0.1]])
    idx, prob = topk(probs, 3)
    assert idx.tolist() == [[1, 3, 0], [0, 1, 2]]
    assert prob.dtype == np.float16 and np.all(np.diff(prob.astype(np.float32), axis=1) <= 0)
    with pytest.raises(ValueError, match="top-k"):
        topk(probs, 5)
