"""Model checkpoints that say what they hold: ``tools/train.py`` writes them, the producer reads them.

A checkpoint is a plain mapping of tensors, strings, numbers and lists, read back with
``torch.load(..., weights_only=True)`` (no pickle of objects, ever):
``{"format", "arch": "timm:NAME", "num_classes", "class_names", "image_size", "recipe", "state_dict"}``.
``tools/make_shards.py --teacher-checkpoint teacher.pt`` takes it as it is, the model included;
a bare state_dict (timm's, torchvision's, or one saved by hand) still loads, with ``--teacher``.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch

__all__ = ["CHECKPOINT_FORMAT", "save_checkpoint", "checkpoint_info"]

CHECKPOINT_FORMAT = "wds_reinforce.checkpoint/1"


def save_checkpoint(
    path: str | os.PathLike,
    state_dict: Mapping[str, torch.Tensor],
    arch: str,
    class_names: Sequence[str],
    image_size: Sequence[int],
    recipe: Mapping[str, Any] | None = None,
    **extra: Any,
) -> None:
    """Write ``state_dict`` with what it is (``arch`` like ``timm:resnet18``, its classes, its input size).

    Written to a temporary name and renamed: the file is whole or absent.
    """
    data = {
        "format": CHECKPOINT_FORMAT,
        "arch": arch,
        "num_classes": len(class_names),
        "class_names": [str(c) for c in class_names],
        "image_size": [int(v) for v in image_size],
        "recipe": dict(recipe) if recipe is not None else None,
        **extra,
        "state_dict": {k: v.detach().cpu() for k, v in state_dict.items()},
    }
    path = os.fspath(path)
    tmp = f"{path}.tmp"
    torch.save(data, tmp)
    os.replace(tmp, path)


def checkpoint_info(path: str | os.PathLike) -> dict[str, Any]:
    """What a checkpoint says of itself (everything but its tensors); ``{}`` for a bare state_dict.

    Raises:
        ValueError: a missing file or one ``torch.load(weights_only=True)`` cannot read.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"expected a checkpoint file, got {path!r} (not found)")
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            try:
                data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:  # not a zip-format file: mmap is impossible, a plain read may work
                data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - arbitrary bytes fail in many ways; see teacher._load_state
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ValueError(
            f"expected a torch checkpoint at {path!r} (loaded with weights_only=True), got {type(exc).__name__}: "
            f"{first}"
        ) from None
    if not isinstance(data, dict) or data.get("format") != CHECKPOINT_FORMAT:
        return {}
    return {k: v for k, v in data.items() if k != "state_dict"}
