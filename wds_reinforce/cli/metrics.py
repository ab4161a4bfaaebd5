"""Evaluation metrics of class probabilities: top-1, top-5, negative log-likelihood, calibration error.

Every function takes probabilities (N, C) (a model's softmax, or an ensemble's mean of softmax)
and integer labels (N,). The paper's calibration claim (a student trained on reinforced data is
better calibrated) is measured with the expected calibration error over 15 equal-width
confidence bins (Guo et al., 2017): a sample's confidence is its largest probability, bin b
holds the confidences in (b/15, (b+1)/15], and ECE = sum_b |B_b| / N * |accuracy(B_b) - confidence(B_b)|.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["topk_accuracy", "nll", "ece", "summarize", "describe", "as_json", "ECE_BINS"]

ECE_BINS = 15


def _check(probs: torch.Tensor, labels: torch.Tensor) -> None:
    if probs.ndim != 2 or labels.ndim != 1 or len(probs) != len(labels) or not len(labels):
        raise ValueError(
            f"expected probabilities (N, C) and labels (N,) with N >= 1, got {tuple(probs.shape)} and "
            f"{tuple(labels.shape)}"
        )


def topk_accuracy(probs: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    """The fraction of samples whose label is among their ``k`` most probable classes."""
    _check(probs, labels)
    top = probs.topk(min(k, probs.shape[1]), dim=1).indices
    return float((top == labels[:, None]).any(dim=1).double().mean())


def nll(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean negative log-likelihood of the labels, in nats (a zero probability counts as the smallest float64)."""
    _check(probs, labels)
    p = probs.double().gather(1, labels[:, None].long()).squeeze(1)
    return float(-p.clamp_min(torch.finfo(torch.float64).tiny).log().mean())


def ece(probs: torch.Tensor, labels: torch.Tensor, bins: int = ECE_BINS) -> float:
    """Expected calibration error over ``bins`` equal-width confidence bins (a fraction, not percent)."""
    _check(probs, labels)
    confidence, predicted = probs.double().max(dim=1)
    correct = (predicted == labels).double()
    # Bin b holds (b/bins, (b+1)/bins]: ceil(c * bins) - 1 (a confidence of exactly 0 in bin 0).
    # |B| * |accuracy(B) - confidence(B)| is |sum of confidences - hits| over the bin.
    which = (confidence * bins).ceil().long().sub(1).clamp(0, bins - 1)
    conf_sum = torch.zeros(bins, dtype=torch.float64).index_add_(0, which, confidence)
    hit_sum = torch.zeros(bins, dtype=torch.float64).index_add_(0, which, correct)
    return float((conf_sum - hit_sum).abs().sum() / len(labels))


def summarize(probs: torch.Tensor, labels: torch.Tensor) -> dict[str, Any]:
    """``{"top1", "top5", "nll", "ece"}``: fractions (top-5 None for 5 classes or fewer), NLL in nats."""
    probs, labels = probs.detach().cpu(), labels.detach().cpu()
    return {
        "top1": topk_accuracy(probs, labels, 1),
        "top5": topk_accuracy(probs, labels, 5) if probs.shape[1] > 5 else None,
        "nll": nll(probs, labels),
        "ece": ece(probs, labels),
    }


def describe(metrics: dict[str, Any]) -> str:
    """``top-1 40.00%, top-5 90.00%, NLL 1.2345, ECE 5.67%``: the metrics in one line."""
    parts = [f"top-1 {metrics['top1']:.2%}"]
    if metrics.get("top5") is not None:
        parts.append(f"top-5 {metrics['top5']:.2%}")
    parts += [f"NLL {metrics['nll']:.4f}", f"ECE {metrics['ece']:.2%}"]
    return ", ".join(parts)


def as_json(metrics: dict[str, Any] | None) -> dict[str, Any]:
    """The ``--json`` fields: ``top1``, ``top5``, ``ece`` in percent (2 decimals), ``nll`` in nats (4); None without."""
    if metrics is None:
        return {"top1": None, "top5": None, "nll": None, "ece": None}
    percent = {k: None if metrics[k] is None else round(100 * metrics[k], 2) for k in ("top1", "top5", "ece")}
    return {**percent, "nll": round(metrics["nll"], 4)}
