"""Sparse teacher outputs -> training targets, and the losses that consume them.

A reinforced sample stores, per round, the teacher's top-k class ids and fp16 probabilities.
``densify`` turns a batch of those rows into dense (B, C) targets on any device, so a loader
can ship the small sparse rows and let the GPU expand them. Two methods are registered:

- ``smooth`` (the paper's setting): the top-k probabilities where they are, and the leftover
  mass ``1 - sum(prob)`` spread uniformly over the classes not in the row (a row that covers
  every class is renormalised instead);
- ``zeros``: the top-k probabilities renormalised to sum to one, zeros elsewhere.

Rows may repeat an id with probability 0 (the loader pads one-hot rows that way); both
methods count a repeated id once. Everything here is pure torch/numpy: no I/O.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from wds_reinforce.core.errors import UsageError
from wds_reinforce.core.registry import Registry

__all__ = [
    "DENSIFY",
    "topk",
    "dense_row",
    "mean_topk",
    "densify",
    "densify_smooth",
    "densify_zeros",
    "one_hot",
    "sparse_one_hot",
    "soft_cross_entropy",
    "kl_div_loss",
]

DensifyFn = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]
DENSIFY: Registry[DensifyFn] = Registry("densify method")


def _as_tensors(idx, prob) -> tuple[torch.Tensor, torch.Tensor]:
    # Copies of numpy input: sidecar arrays are read-only views, and uint16/uint32 cannot index.
    if not isinstance(idx, torch.Tensor):
        idx = np.asarray(idx)
        if idx.dtype.kind not in "iu":
            raise ValueError(f"expected integer class ids, got {idx.dtype}")
        idx = torch.from_numpy(np.array(idx, np.int64, ndmin=1))
    prob = prob if isinstance(prob, torch.Tensor) else torch.from_numpy(np.array(prob, np.float32, ndmin=1))
    prob = prob.to(idx.device)
    if idx.shape != prob.shape or idx.ndim not in (1, 2):
        raise ValueError(
            f"expected idx and prob of one shape (k,) or (B, k), got {tuple(idx.shape)} and {tuple(prob.shape)}"
        )
    if idx.dtype.is_floating_point or idx.dtype == torch.bool:
        raise ValueError(f"expected integer class ids, got {idx.dtype}")
    return idx.long(), prob.float()


@DENSIFY.register("smooth")
def densify_smooth(idx: torch.Tensor, prob: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(B, k) ids and probabilities -> (B, C): leftover mass spread over the classes not in the row."""
    batch = idx.shape[0]
    mask = torch.zeros(batch, num_classes, dtype=torch.bool, device=idx.device)
    mask.scatter_(1, idx, True)
    covered = mask.sum(1, keepdim=True)
    leftover = (1.0 - prob.sum(1, keepdim=True)).clamp_(min=0.0)
    fill = leftover / (num_classes - covered).clamp(min=1)
    dense = torch.where(mask, torch.zeros((), device=idx.device), fill)
    dense.scatter_add_(1, idx, prob)
    # A row that covers every class has nowhere to put the leftover: renormalise it instead.
    full = covered == num_classes
    return torch.where(full, dense / dense.sum(1, keepdim=True).clamp(min=torch.finfo(dense.dtype).tiny), dense)


@DENSIFY.register("zeros")
def densify_zeros(idx: torch.Tensor, prob: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(B, k) ids and probabilities -> (B, C): the top-k renormalised to sum to one, zeros elsewhere."""
    dense = torch.zeros(idx.shape[0], num_classes, dtype=prob.dtype, device=idx.device)
    dense.scatter_add_(1, idx, prob)
    total = dense.sum(1, keepdim=True)
    return dense / total.clamp(min=torch.finfo(prob.dtype).tiny)


def densify(idx, prob, num_classes: int, method: str = "smooth") -> torch.Tensor:
    """Dense float32 targets from sparse top-k rows, on the device of ``idx``.

    Args:
        idx: class ids, (k,) or (B, k); a tensor (any device) or array of any integer dtype.
        prob: matching probabilities (fp16 or fp32).
        num_classes: C, the width of the dense target.
        method: a name in ``DENSIFY``: ``smooth`` or ``zeros``.

    Returns:
        float32 (C,) or (B, C) targets, each row summing to one (up to rounding).

    Raises:
        ValueError: mismatched shapes, non-integer ids, ids outside [0, C), an unknown method.
    """
    fn = DENSIFY.get(method)
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"expected num_classes a positive int, got {num_classes!r}")
    idx, prob = _as_tensors(idx, prob)
    single = idx.ndim == 1
    if single:
        idx, prob = idx[None], prob[None]
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= num_classes):
        raise ValueError(f"expected class ids in [0, {num_classes}), got {int(idx.min())}..{int(idx.max())}")
    out = fn(idx, prob, num_classes)
    return out[0] if single else out


def mean_topk(rows: Sequence[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """The mean of several teachers' sparse top-k rows of one round: (ids, probabilities), falling.

    Each id of the union gets the sum of the probabilities the teachers stored for it divided by
    the number of teachers, a teacher that did not keep the id counting 0. This is the mean of
    the teachers' softmax outputs (the paper's ensemble) wherever every teacher kept the id, and
    at most (T-1)/T of the smallest kept probability too low where some did not; densifying with
    ``smooth`` then spreads the mass no teacher kept evenly over the other classes.
    """
    ids = np.concatenate([np.asarray(i, np.int64) for i, _ in rows])
    probs = np.concatenate([np.asarray(p, np.float32) for _, p in rows]) / len(rows)
    union, inverse = np.unique(ids, return_inverse=True)
    total = np.zeros(union.size, np.float32)
    np.add.at(total, inverse, probs)
    order = np.argsort(-total, kind="stable")
    return union[order], total[order]


def dense_row(idx: np.ndarray, prob: np.ndarray, num_classes: int, method: str = "smooth") -> torch.Tensor:
    """One sparse row (k,) -> dense float32 (C,), in numpy: ``densify`` for one row, cheaper per sample.

    Equals ``densify(idx, prob, num_classes, method)`` for rows without repeated ids (the loader
    checks rows with ``format.check_topk`` first); ids must lie in [0, C).
    """
    p = prob.astype(np.float32)
    if method == "smooth" and idx.size < num_classes:
        fill = max(0.0, 1.0 - float(p.sum())) / max(num_classes - idx.size, 1)
        out = np.full(num_classes, fill, np.float32)
        out[idx] = p
    elif method in ("smooth", "zeros"):
        out = np.zeros(num_classes, np.float32)
        out[idx] = p / max(float(p.sum()), np.finfo(np.float32).tiny)
    else:
        DENSIFY.get(method)  # raises for an unknown name, listing the valid ones
        raise UsageError(f"dense_row implements 'smooth' and 'zeros', got {method!r}: use densify()")
    return torch.from_numpy(out)


def topk(probs: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(idx, prob) of the ``k`` most probable classes per row, falling; ids uint32, probs float16.

    Ties are broken toward the smaller class id so the choice never depends on the kernel.
    """
    if not 1 <= k <= probs.shape[1]:
        raise UsageError(f"expected top-k in [1, {probs.shape[1]}], got {k}")
    p = probs.float().numpy()
    # stable argsort on -p: equal probabilities keep ascending class id order.
    idx = np.argsort(-p, axis=1, kind="stable")[:, :k]
    val = np.take_along_axis(p, idx, axis=1).astype(np.float16)
    return idx.astype(np.uint32), val


def one_hot(label, num_classes: int, smoothing: float = 0.0) -> torch.Tensor:
    """float32 one-hot targets of an int label or (B,) labels, with optional label smoothing.

    With smoothing ε the label gets ``1 - ε + ε / C`` and every other class ``ε / C``
    (the usual definition, as in ``torch.nn.CrossEntropyLoss(label_smoothing=ε)``).
    """
    if not 0.0 <= smoothing < 1.0:
        raise ValueError(f"expected smoothing in [0, 1), got {smoothing!r}")
    labels = torch.as_tensor(label)
    if labels.dtype.is_floating_point:
        raise ValueError(f"expected integer labels, got {labels.dtype}")
    out = F.one_hot(labels.long(), num_classes).float()
    if smoothing:
        out = out * (1.0 - smoothing) + smoothing / num_classes
    return out


def sparse_one_hot(label: int, num_classes: int, topk: int, smoothing: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """A one-hot label as a sparse row of width ``topk`` (padded with the label at probability 0).

    ``densify(..., method="smooth")`` of the row equals ``one_hot(label, num_classes, smoothing)``.
    """
    idx = np.full(topk, label, np.int64)
    prob = np.zeros(topk, np.float32)
    prob[0] = 1.0 - smoothing + smoothing / num_classes
    return idx, prob


def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of ``logits`` (B, C) against soft targets (B, C): ``-sum(t * log_softmax(z))``."""
    if logits.shape != target.shape:
        raise ValueError(
            f"expected logits and target of one shape, got {tuple(logits.shape)} and {tuple(target.shape)}"
        )
    loss = -(target * F.log_softmax(logits.float(), dim=-1)).sum(-1)
    return _reduce(loss, reduction)


def kl_div_loss(
    logits: torch.Tensor, target: torch.Tensor, temperature: float = 1.0, reduction: str = "mean"
) -> torch.Tensor:
    """KL(target || softmax(logits / T)) per sample, times T² (knowledge-distillation scaling).

    Equals ``soft_cross_entropy`` minus the target's entropy, so both have the same gradient
    at T = 1; the KL is zero when the student matches the teacher.
    """
    if logits.shape != target.shape:
        raise ValueError(
            f"expected logits and target of one shape, got {tuple(logits.shape)} and {tuple(target.shape)}"
        )
    if temperature <= 0:
        raise ValueError(f"expected temperature > 0, got {temperature!r}")
    logq = F.log_softmax(logits.float() / temperature, dim=-1)
    target = target.float()
    loss = (torch.special.xlogy(target, target) - target * logq).sum(-1) * temperature**2
    return _reduce(loss, reduction)


def _reduce(loss: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    if reduction == "none":
        return loss
    raise ValueError(f"expected reduction 'mean', 'sum' or 'none', got {reduction!r}")
