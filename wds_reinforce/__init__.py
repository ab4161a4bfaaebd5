"""wds_reinforce: Dataset Reinforcement on WebDataset.

Reinforced shards keep the original image bytes and add, per sample, a msgpack sidecar with
every round's augmentation parameters and the teacher's sparse (top-k) outputs.

``import wds_reinforce`` loads the format, augmentations, targets and the streaming loader
(``storage`` registers an ``s3://`` scheme in webdataset). The producer's names (``make_shards``,
``load_teacher``, ...) load on first use, so a training job never imports teacher code.
"""

from __future__ import annotations

import importlib
from typing import Any

from .augment import OPS, RECIPES, Recipe, normalize, replay, round_rng
from .dataset import ReinforcedDataset
from .decode import SourceImage
from .errors import DataError, DecodeError, FormatError, MismatchError, SampleError, UsageError, VersionError
from .format import FORMAT_VERSION, Manifest, ShardInfo, Sidecar, SkippedInput, decode_sidecar, encode_sidecar
from .loader import (
    LoaderOptions,
    SkipCounter,
    decode_sidecars,
    make_targets,
    pick_rounds,
    reinforce_stages,
    replay_images,
)
from .schedule import SharedEpoch, round_for
from .storage import manifest_url, read_manifest, read_url, register_s3_scheme, shard_urls
from .targets import DENSIFY, dense_row, densify, kl_div_loss, one_hot, soft_cross_entropy, sparse_one_hot, topk

__version__ = "0.1.0"

# Producer API, imported lazily (see the module docstring): name -> submodule.
_LAZY = {
    "make_shards": "producer",
    "import_mldr": "mldr_import",
    "prepare_job": "producer",
    "ProducerSummary": "writer",
    "open_source": "sources",
    "Source": "sources",
    "SourceSample": "sources",
    "SOURCES": "sources",
    "Teacher": "teacher",
    "load_teacher": "teacher",
    "verify_shards": "verify",
    "draw_rounds": "picture",
}

__all__ = [
    "__version__",
    # errors
    "DataError",
    "DecodeError",
    "FormatError",
    "MismatchError",
    "SampleError",
    "UsageError",
    "VersionError",
    # format
    "FORMAT_VERSION",
    "Manifest",
    "ShardInfo",
    "Sidecar",
    "SkippedInput",
    "decode_sidecar",
    "encode_sidecar",
    # decode and augment
    "SourceImage",
    "OPS",
    "RECIPES",
    "Recipe",
    "normalize",
    "replay",
    "round_rng",
    # targets
    "DENSIFY",
    "dense_row",
    "densify",
    "kl_div_loss",
    "one_hot",
    "soft_cross_entropy",
    "sparse_one_hot",
    "topk",
    # schedule and storage
    "SharedEpoch",
    "round_for",
    "manifest_url",
    "read_manifest",
    "read_url",
    "register_s3_scheme",
    "shard_urls",
    # loader
    "LoaderOptions",
    "ReinforcedDataset",
    "SkipCounter",
    "decode_sidecars",
    "make_targets",
    "pick_rounds",
    "reinforce_stages",
    "replay_images",
    # producer and tools (lazy)
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{module}", __name__), name)
