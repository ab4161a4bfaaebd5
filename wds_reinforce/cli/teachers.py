"""Teachers from checkpoints inside ``tools/train.py``: ``--evaluate`` and the online-distillation arm.

``--evaluate T.pt [--evaluate T2.pt ...]`` reports a checkpoint's (or an ensemble's: mean of
softmax) metrics on ``--val`` without training. ``--targets online --teacher-checkpoint T.pt``
runs the teacher on every training batch, as FunMatch-style online distillation does, and
trains on its full softmax; ``OnlineTargets`` counts what that costs. Both load through the
producer's ``Teacher`` (``weights_only``, the model a ``--save`` checkpoint names).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch

from wds_reinforce.core.errors import UsageError

__all__ = ["load_checkpoints", "check_classes", "OnlineTargets", "evaluate_checkpoints"]


def load_checkpoints(paths: Sequence[str], flag: str, device: Any, bare_model: str | None = None) -> tuple[Any, list]:
    """(``Teacher`` of the checkpoints, each one's ``checkpoint_info``) on ``device``.

    A ``train.py --save`` checkpoint names its model; a bare state_dict is taken as ``bare_model``
    (``--model``), or refused when there is none.

    Raises:
        UsageError: a checkpoint that cannot be read or does not fit its model, naming ``flag``.
    """
    from wds_reinforce.produce.checkpoint import checkpoint_info
    from wds_reinforce.produce.make import checked_teacher

    members, infos = [], []
    for path in paths:
        try:
            info = checkpoint_info(path)
        except ValueError as exc:
            raise UsageError(f"{flag}: {exc}") from None
        arch = info.get("arch") if isinstance(info.get("arch"), str) else None
        if arch is None and bare_model is None:
            raise UsageError(f"expected {flag} a checkpoint of train.py --save (it names its model), got {path!r}")
        members.append(arch or f"timm:{bare_model}")
        infos.append(info)
    try:
        return checked_teacher(members, list(paths), device=str(device)), infos
    except UsageError as exc:
        raise UsageError(f"{flag}: {exc}") from None


def check_classes(teacher: Any, infos: list, class_names: Sequence[str], flag: str, data_flag: str) -> None:
    """Refuse a teacher whose classes are not the data's (count, and names where the checkpoint has them)."""
    if teacher.num_classes != len(class_names):
        raise UsageError(
            f"expected {flag} with the {len(class_names)} classes of {data_flag}, got {teacher.num_classes}"
        )
    for info in infos:
        names = info.get("class_names")
        if names and list(names) != [str(c) for c in class_names]:
            raise UsageError(
                f"expected {flag} trained on the classes of {data_flag} in its order, got {list(names)[:5]}... "
                f"for {list(class_names)[:5]}..."
            )


class OnlineTargets:
    """The teacher's softmax on each training batch (uint8 images as replayed), with its cost counted.

    Attributes:
        forwards: images times members run through the teacher so far.
        seconds: wall time spent in the teacher (its output copied back, so a GPU has finished).
    """

    def __init__(self, teacher: Any, device: Any):
        self.teacher, self.device = teacher, device
        self.forwards, self.seconds = 0, 0.0

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        began = time.perf_counter()
        probs = self.teacher.predict(images)
        self.seconds += time.perf_counter() - began
        self.forwards += len(images) * len(self.teacher.models)
        probs = probs.to(self.device, non_blocking=True)
        # predict() runs in inference mode: its tensors cannot enter autograd's graph of the loss.
        return probs.clone() if probs.is_inference() else probs


def evaluate_checkpoints(args: Any) -> dict[str, Any]:
    """``--evaluate``: the checkpoints' (ensemble) metrics on ``--val``, and what was evaluated.

    The input size is ``--image-size``, else the one the checkpoints were trained at (they must
    agree), else the model's pretrained input size; the view is ``--eval-crop-pct`` center crop.
    """
    from wds_reinforce.cli.metrics import summarize
    from wds_reinforce.cli.training import device_of, val_views
    from wds_reinforce.produce.sources import open_source

    teacher, infos = load_checkpoints(args.evaluate, "--evaluate", device_of(args.device), bare_model=args.model)
    size = _input_size(args.image_size, infos, teacher)
    try:
        source = open_source(args.val)
    except ValueError as exc:  # a missing, empty or unreadable source
        raise UsageError(f"--val: {str(exc).splitlines()[0]}") from None
    check_classes(teacher, infos, source.class_names, "--evaluate", "--val")
    began = time.perf_counter()
    images, labels = val_views(source, size, args.eval_crop_pct)
    probs = torch.cat([teacher.predict(images[b : b + 256]) for b in range(0, len(images), 256)])
    return {
        "evaluate": list(args.evaluate),
        "teacher": [f"{kind}:{name}" for kind, name in teacher.members],
        "image_size": list(size),
        "images": len(labels),
        "metrics": summarize(probs, labels),
        "seconds": time.perf_counter() - began,
    }


def _input_size(given: int | None, infos: list, teacher: Any) -> tuple[int, int]:
    if given:
        return (given, given)
    sizes = {tuple(info["image_size"]) for info in infos if info.get("image_size")}
    if len(sizes) > 1:
        raise UsageError(f"expected --image-size: the --evaluate checkpoints were trained at {sorted(sizes)}")
    if sizes:
        h, w = sizes.pop()
        return (int(h), int(w))
    _, h, w = teacher.configs[0]["input_size"]
    return (int(h), int(w))
