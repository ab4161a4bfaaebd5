"""Teachers for the producer: one timm model or an ensemble, batched inference, top-k.

A member is named ``timm:MODEL``; several members (repeated or comma-separated) form an
ensemble whose output is the mean of the members' softmax probabilities. Weights are random
unless a checkpoint is given (``torch.load(..., weights_only=True)``; never pickle) or
``pretrained=True`` is asked for explicitly. Input normalisation comes from timm's pretrained
config of each member, or from the checkpoint where it records the one its weights were trained
with (``train.py --save`` does). The loader never imports this module.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch

from wds_reinforce.core.augment import Recipe, normalize
from wds_reinforce.core.registry import Registry
from wds_reinforce.core.targets import topk
from wds_reinforce.produce.checkpoint import CHECKPOINT_FORMAT

__all__ = ["TEACHERS", "Teacher", "parse_teacher_spec", "load_teacher", "TeacherBatcher", "Views"]

# kind -> builder(name, num_classes | None, pretrained) -> torch.nn.Module
TEACHERS: Registry[Callable[[str, int | None, bool], torch.nn.Module]] = Registry("teacher kind")


def _build_timm(name: str, num_classes: int | None, pretrained: bool) -> torch.nn.Module:
    import timm

    if not timm.is_model(name):
        raise ValueError(f"unknown teacher 'timm:{name}'; expected a timm model name (see timm.list_models())")
    kwargs: dict[str, Any] = {} if num_classes is None else {"num_classes": num_classes}
    return timm.create_model(name, pretrained=pretrained, **kwargs)


TEACHERS.register("timm", _build_timm)


def parse_teacher_spec(spec: str | Sequence[str]) -> list[tuple[str, str]]:
    """``"timm:a,timm:b"`` or ``["timm:a", "timm:b"]`` -> ``[("timm", "a"), ("timm", "b")]``.

    Raises:
        ValueError: an empty spec, a member without ``KIND:``, or an unknown kind.
    """
    items = [spec] if isinstance(spec, str) else list(spec)
    members = [m.strip() for item in items for m in str(item).split(",") if m.strip()]
    if not members:
        raise ValueError(f"expected at least one teacher like 'timm:resnet50', got {spec!r}")
    out = []
    for member in members:
        kind, sep, name = member.partition(":")
        if not sep or not name:
            raise ValueError(f"expected a teacher like 'timm:resnet50', got {member!r}")
        TEACHERS.get(kind)
        out.append((kind, name))
    return out


def _classifier_out(state: dict[str, torch.Tensor], model: torch.nn.Module) -> int | None:
    """The class count a checkpoint's classifier was trained for, if it can be told."""
    head = getattr(model, "pretrained_cfg", {}).get("classifier")
    heads = [head] if isinstance(head, str) else list(head or [])
    for h in heads:
        for suffix in (".weight", ".fc.weight"):
            w = state.get(h + suffix)
            if w is not None and w.ndim >= 1:
                return int(w.shape[0])
    return None


def _load_reason(exc: BaseException) -> str:
    """The informative first line of a ``torch.load`` error (its weights-only preamble skipped)."""
    text = str(exc)
    marker = "WeightsUnpickler error:"
    if marker in text:
        text = text.split(marker, 1)[1]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0] if lines else "unreadable"


def _load_state(path: str, member: str | None = None) -> tuple[dict[str, torch.Tensor], dict[str, list] | None]:
    """The state_dict in ``path`` and the normalisation a ``train.py --save`` checkpoint says it was trained with.

    ``member`` (``kind:name``) must match the model a checkpoint names.
    """
    if not os.path.isfile(path):
        raise ValueError(f"expected a teacher checkpoint file, got {path!r} (not found)")
    try:
        with warnings.catch_warnings():
            # "Detected pickle protocol N": noise on stderr; a file it cannot read fails below.
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001
        # Not a checkpoint (text, random bytes, a foreign zip, a truncated file) or one that
        # needs pickle: a bad argument, said on one line, never a traceback. Broad on purpose:
        # on arbitrary bytes torch.load's unpickler raises UnpicklingError, EOFError, KeyError,
        # IndexError, UnicodeDecodeError, struct.error, AssertionError, RuntimeError... and the
        # path is known to be a file, so what fails here is the file's content (or reading it).
        raise ValueError(
            f"expected a torch state_dict checkpoint at {path!r} (loaded with weights_only=True), "
            f"got {type(exc).__name__}: {_load_reason(exc)}"
        ) from None
    arch = state.get("arch") if isinstance(state, dict) and state.get("format") == CHECKPOINT_FORMAT else None
    if member is not None and isinstance(arch, str) and arch != member:
        raise ValueError(f"expected a checkpoint of {member}, got one of {arch} in {path!r} (saved by train.py)")
    trained = _trained_normalization(state, path) if arch is not None else None
    for wrapper in ("state_dict", "model", "state_dict_ema"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
            break
    if not isinstance(state, dict):
        raise ValueError(f"expected a state_dict in {path!r}, got {type(state).__name__}")
    # Checkpoints saved from DDP or torch.compile wrap every name.
    for prefix in ("module.", "_orig_mod."):
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    return state, trained


def _trained_normalization(ckpt: dict[str, Any], path: str) -> dict[str, list] | None:
    """A checkpoint's ``normalize`` (``{"mean": [3], "std": [3]}``, the one it was trained with), or None."""
    norm = ckpt.get("normalize")
    if norm is None:
        return None
    try:
        mean, std = ([float(v) for v in norm[k]] for k in ("mean", "std"))
    except (TypeError, ValueError, KeyError):
        mean = std = []
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise ValueError(f"expected normalize {{'mean': [3 floats], 'std': [3 positive floats]}} in {path!r}")
    return {"mean": mean, "std": std}


def _weights_digest(model: torch.nn.Module) -> str:
    """16 hex digits of sha256 over the state_dict (names, dtypes, shapes, values): the teacher's identity."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def _pick_device(device: str | torch.device | None) -> torch.device:
    if device is None or str(device) == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"expected device auto, cpu, cuda or cuda:N, got {device!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"expected device auto or cpu (CUDA is not available), got {device!r}")
    return dev


class Teacher:
    """A teacher ensemble on one device: uint8 image batches in, class probabilities out.

    Args:
        members: ``(kind, name)`` pairs (see ``parse_teacher_spec``) or the spec string.
        checkpoints: one path (or None) per member, or one path for every member.
        num_classes: classifier size for members without a checkpoint (default: the model's,
            e.g. 1000); members with a checkpoint take the checkpoint's.
        pretrained: load timm's pretrained weights (needs them cached or a network).
        device: ``auto`` (CUDA if present, at ``LOCAL_RANK``), ``cpu``, ``cuda:1``...
        amp: bf16 autocast on CUDA (default: on for CUDA).
    """

    def __init__(
        self,
        members: str | Sequence[str] | Sequence[tuple[str, str]],
        checkpoints: Sequence[str | None] | str | None = None,
        num_classes: int | None = None,
        pretrained: bool = False,
        device: str | torch.device | None = "auto",
        amp: bool | None = None,
    ):

        if isinstance(members, str) or (members and isinstance(list(members)[0], str)):
            pairs = parse_teacher_spec(members)  # type: ignore[arg-type]
        else:
            pairs = [tuple(m) for m in members]  # type: ignore[misc]
        if checkpoints is None or isinstance(checkpoints, str):
            checkpoints = [checkpoints] * len(pairs)
        checkpoints = list(checkpoints)
        if len(checkpoints) == 1 and len(pairs) > 1:
            checkpoints = checkpoints * len(pairs)
        if len(checkpoints) != len(pairs):
            raise ValueError(f"expected one teacher checkpoint per member ({len(pairs)}), got {len(checkpoints)}")
        if num_classes is not None and (not isinstance(num_classes, int) or num_classes < 1):
            raise ValueError(f"expected num_classes a positive integer, got {num_classes!r}")
        self.pretrained = bool(pretrained)
        self.device = _pick_device(device)
        self.amp = self.device.type == "cuda" if amp is None else bool(amp)
        self.members = pairs
        self.checkpoints = checkpoints
        self.models: list[torch.nn.Module] = []
        self.configs: list[dict[str, Any]] = []
        self.weights: list[str] = []
        for (kind, name), ckpt in zip(pairs, checkpoints):
            model, cfg = self._member(kind, name, ckpt, num_classes)
            self.models.append(model)
            self.configs.append(cfg)
            self.weights.append(_weights_digest(model))
        counts = {int(m.num_classes) for m in self.models}
        if len(counts) != 1:
            raise ValueError(f"expected ensemble members with one class count, got {sorted(counts)}")
        self.num_classes = counts.pop()

    def _member(self, kind: str, name: str, ckpt: str | None, num_classes: int | None) -> tuple[Any, dict[str, Any]]:
        """One member on this teacher's device, and its data config (a checkpoint's normalisation wins)."""
        import timm.data

        builder, trained = TEACHERS.get(kind), None
        if ckpt:
            state, trained = _load_state(ckpt, f"{kind}:{name}")
            probe = builder(name, num_classes, False)
            n = _classifier_out(state, probe) or num_classes
            model = probe if n is None or n == probe.num_classes else builder(name, n, False)
            missing, unexpected = model.load_state_dict(state, strict=False)
            if missing or unexpected:
                raise ValueError(
                    f"checkpoint {ckpt!r} does not fit timm:{name}: missing {missing[:3]}, unexpected {unexpected[:3]}"
                )
        else:
            # Random weights (tests, benchmarks) are seeded so that reruns give the same shards.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                model = builder(name, num_classes, self.pretrained)
        model.eval().requires_grad_(False).to(self.device)
        if self.device.type == "cuda":
            model = model.to(memory_format=torch.channels_last)
        cfg = timm.data.resolve_data_config({}, model=model)
        # A train.py checkpoint names the normalisation its weights learnt with (a recipe's, maybe not timm's).
        return model, ({**cfg, **trained} if trained else cfg)

    def describe(self, recipe: Recipe | None = None) -> dict[str, Any]:
        """The teacher description stored in the manifest.

        Args:
            recipe: the recipe whose replayed pixels the teacher is run on. Its output size, crop
                and interpolation are what the teacher saw, and are recorded as the members'
                input; timm's pretrained config (e.g. 176 px, crop 0.875, bicubic) is not, since
                the teacher never sees that view here. ``crop`` is the geometry op that sets the
                size (the last; without its interpolation), ``interpolation`` the first one a
                geometry op names; a chain of several geometry ops (``resize``, ``random_crop``)
                is also recorded whole, in order, as ``geometry`` (absent: ``[crop]``, so that a
                one-op recipe is described as before). Without a recipe, no input is recorded.
                The normalisation (mean, std) is the members' own, as used.
        """
        seen: dict[str, Any] = {}
        if recipe is not None:
            chain = [op.to_dict() for op in recipe.ops if op.geometry]
            seen = {
                "input_size": [3, *recipe.size],
                "crop": {k: v for k, v in chain[-1].items() if k != "interpolation"},
                "interpolation": next((op["interpolation"] for op in chain if "interpolation" in op), None),
            }
            if len(chain) > 1:  # absent for one op: the descriptions (and job identities) made before chains
                seen["geometry"] = chain
        return {
            "members": [
                {
                    "kind": kind,
                    "name": name,
                    "checkpoint": os.path.basename(ckpt) if ckpt else None,
                    "weights_sha256": digest,
                    "pretrained": bool(ckpt is None and self.pretrained),
                    **seen,
                    "mean": list(cfg["mean"]),
                    "std": list(cfg["std"]),
                }
                for (kind, name), ckpt, cfg, digest in zip(self.members, self.checkpoints, self.configs, self.weights)
            ],
            "ensemble": "mean of softmax",
            "num_classes": self.num_classes,
            "amp": "bf16" if self.amp else None,
        }

    @torch.inference_mode()
    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """Mean softmax probabilities of the members, float32 (B, num_classes) on the CPU.

        Args:
            images: uint8 (B, 3, H, W) pixels as replayed; each member normalises them with its
                own mean and std.
        """
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"expected uint8 images (B, 3, H, W), got {images.dtype} {tuple(images.shape)}")
        x8 = images.to(self.device, non_blocking=True)
        total: torch.Tensor | None = None
        for model, cfg in zip(self.models, self.configs):
            x = normalize(x8, cfg["mean"], cfg["std"])
            if self.device.type == "cuda":
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
                logits = model(x)
            probs = torch.softmax(logits.float(), dim=1)
            total = probs if total is None else total + probs
        assert total is not None
        return (total / len(self.models)).cpu()


def load_teacher(
    spec: str | Sequence[str],
    checkpoints: Sequence[str | None] | str | None = None,
    num_classes: int | None = None,
    pretrained: bool = False,
    device: str | None = "auto",
) -> Teacher:
    """Build a ``Teacher`` from a spec like ``"timm:resnet50,timm:convnext_tiny"``."""
    return Teacher(spec, checkpoints, num_classes=num_classes, pretrained=pretrained, device=device)


# ----------------------------------------------------------------------------------------
# Batching: views of many samples in, each view's top-k back to its sample


class Views:
    """One sample's views awaiting the teacher: (T, 3, H, W) uint8 pixels, and the (T, k) top-k rows
    that fill in as batches run. ``item`` is the job's own record of the sample."""

    __slots__ = ("images", "idx", "prob", "left", "item")

    def __init__(self, images: torch.Tensor, topk: int, item: Any = None):
        self.images: torch.Tensor | None = images
        self.idx = np.zeros((len(images), topk), np.uint32)
        self.prob = np.zeros((len(images), topk), np.float16)
        self.left = len(images)
        self.item = item


class TeacherBatcher:
    """Runs a teacher on the views of many samples, ``batch_size`` views per call, in the order they
    come; each view's top-k goes back to its sample's ``Views``.

    Batches are whole (``batch_size``) until ``flush``, which runs the rest: a job flushes at
    the end of each shard, so that a shard's bytes never depend on what was made before it.
    ``ready()`` hands back, in order, the samples the teacher has seen every view of.

    Args:
        teacher: the ``Teacher``.
        topk: classes kept per view.
        batch_size: views per teacher call.
        class_map: for a teacher over a larger label space, the teacher's class id of each of the
            data's classes: probabilities are restricted to those and renormalised.
    """

    def __init__(self, teacher: Teacher, topk: int, batch_size: int, class_map: Sequence[int] | None = None):
        self.teacher, self.topk, self.batch_size, self.class_map = teacher, topk, batch_size, class_map
        self._queue: deque[tuple[Views, int]] = deque()
        self._pending: deque[Views] = deque()
        self.views = 0  # views run through the teacher so far

    def add(self, images: torch.Tensor, item: Any = None) -> Views:
        """Queue one sample's views (T, 3, H, W); full batches run at once."""
        views = Views(images, self.topk, item)
        self._pending.append(views)
        self._queue.extend((views, t) for t in range(len(images)))
        while len(self._queue) >= self.batch_size:
            self._run(self.batch_size)
        return views

    def flush(self) -> None:
        """Run every queued view (the last batch may be short)."""
        while self._queue:
            self._run(min(self.batch_size, len(self._queue)))

    def ready(self) -> Iterator[Views]:
        """The samples whose every view the teacher has seen, in the order they were added."""
        while self._pending and self._pending[0].left == 0:
            yield self._pending.popleft()

    def _run(self, count: int) -> None:
        batch = [self._queue.popleft() for _ in range(count)]
        probs = self.teacher.predict(torch.stack([views.images[t] for views, t in batch]))
        if self.class_map is not None:  # a teacher over a larger label space: keep the data's classes
            probs = probs[:, list(self.class_map)]
            probs = probs / probs.sum(dim=1, keepdim=True).clamp_min(1e-12)
        idx, prob = topk(probs, self.topk)
        for row, (views, t) in enumerate(batch):
            views.idx[t], views.prob[t] = idx[row], prob[row]
            views.left -= 1
            if not views.left:
                views.images = None  # the teacher has seen every view: free the pixels
        self.views += count
