"""Fine-tuning for ``tools/train.py --init``: start from timm's pretrained weights or a ``--save`` checkpoint.

``--init timm:NAME`` loads timm's pretrained weights for NAME only when they are already on this
machine (the Hugging Face hub cache or torch hub's checkpoints folder): nothing is downloaded.
``--init checkpoint.pt`` loads a checkpoint written by ``train.py --save`` (or a bare state_dict)
with ``torch.load(weights_only=True)``, through the producer's teacher loader. Either way the
classifier is then replaced for the run's class count (timm's ``reset_classifier``), so a
backbone trained on one data set (e.g. ImageNet+ shards) fine-tunes on another.
"""

from __future__ import annotations

import os
from typing import Any

from wds_reinforce.core.errors import UsageError

__all__ = ["DEFAULT_MODEL", "resolve_model", "cached_timm_weights", "initial_model"]

DEFAULT_MODEL = "resnet10t"


def resolve_model(init: str | None, model: str | None) -> str:
    """The timm model a run trains: ``--model``, or the one ``--init`` names (they must agree).

    Raises:
        UsageError: an ``--init`` that is neither ``timm:NAME`` nor a checkpoint file, one that
            cannot be read, or a ``--model`` other than the one ``--init`` holds.
    """
    if init is None:
        return model or DEFAULT_MODEL
    if init.startswith("timm:"):
        named = init[len("timm:") :]
        if not named:
            raise UsageError(f"expected --init timm:NAME or a checkpoint file, got {init!r}")
        cached_timm_weights(named)  # before any data is read
    else:
        named = _checkpoint_model(init)
        if named is None:  # a bare state_dict: --model says what it holds
            return model or DEFAULT_MODEL
    if model is not None and model != named.split(".")[0] and model != named:
        raise UsageError(f"expected --model {named.split('.')[0]} as --init {init} holds, got --model {model}")
    return named


def _checkpoint_model(path: str) -> str | None:
    from wds_reinforce.produce.checkpoint import checkpoint_info

    if not os.path.isfile(path):
        raise UsageError(f"expected --init timm:NAME or a checkpoint file, got {path!r} (not found)")
    try:
        arch = checkpoint_info(path).get("arch")
    except ValueError as exc:
        raise UsageError(f"--init: {exc}") from None
    if isinstance(arch, str) and not arch.startswith("timm:"):
        raise UsageError(f"expected --init a checkpoint of a timm model, got one of {arch} in {path!r}")
    return arch[len("timm:") :] if isinstance(arch, str) else None


def cached_timm_weights(name: str) -> str:
    """The local file of timm's pretrained weights for ``name`` (``resnet50`` or ``resnet50.a1_in1k``).

    Raises:
        UsageError: timm has no pretrained weights for it, or they are not in the local caches
            (the message says where it looked and how to fetch them).
    """
    from timm.models import get_pretrained_cfg

    try:
        cfg = get_pretrained_cfg(name)
    except RuntimeError:  # timm: "Invalid pretrained tag"
        cfg = None
    if cfg is None or not (cfg.hf_hub_id or cfg.url):
        raise UsageError(f"expected --init timm:NAME of a model with pretrained weights, got timm:{name}")
    looked: list[str] = []
    if cfg.hf_hub_id:
        from huggingface_hub import try_to_load_from_cache
        from huggingface_hub.constants import HF_HUB_CACHE

        repo, _, revision = cfg.hf_hub_id.partition("@")
        for filename in [cfg.hf_hub_filename] if cfg.hf_hub_filename else ["model.safetensors", "pytorch_model.bin"]:
            found = try_to_load_from_cache(repo, filename, cache_dir=HF_HUB_CACHE, revision=revision or None)
            if isinstance(found, str) and os.path.isfile(found):
                return found
        looked.append(f"{HF_HUB_CACHE} (hf {repo})")
    if cfg.url:
        import urllib.parse

        import torch.hub

        path = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(urllib.parse.urlparse(cfg.url).path))
        if os.path.isfile(path):
            return path
        looked.append(path)
    raise UsageError(
        f"no cached pretrained weights for --init timm:{name} (looked in {' and '.join(looked)}; nothing is "
        f"downloaded): fetch them once where there is a network with "
        f"python -c \"import timm; timm.create_model('{name}', pretrained=True)\" and copy the cache here "
        f"(HF_HUB_CACHE, TORCH_HOME)"
    )


def initial_model(init: str | None, model: str, classes: int) -> Any:
    """The run's model on the CPU: random (no ``--init``), or ``--init``'s weights with a new ``classes`` head.

    Raises:
        UsageError: weights that cannot be found, read or do not fit ``model``.
    """
    import timm

    if init is None:
        return timm.create_model(model, pretrained=False, num_classes=classes)
    if init.startswith("timm:"):
        path = cached_timm_weights(init[len("timm:") :])
        try:
            net = timm.create_model(model, pretrained=True, pretrained_cfg_overlay={"file": path})
        except (RuntimeError, ValueError, OSError) as exc:
            raise UsageError(f"--init {init}: cannot load {path}: {str(exc).splitlines()[0]}") from None
    else:
        from wds_reinforce.produce.make import checked_teacher

        try:  # the producer's loader: weights_only, wrappers and prefixes undone, must fit the model
            net = checked_teacher([f"timm:{model}"], [init], device="cpu").models[0]
        except UsageError as exc:
            raise UsageError(f"--init: {exc}") from None
        net.requires_grad_(True)
    net.reset_classifier(classes)
    return net.train()
