"""wds_reinforce: Dataset Reinforcement on WebDataset.

Reinforced shards keep the original image bytes and add, per sample, a msgpack sidecar with
every round's augmentation parameters and the teacher's sparse (top-k) outputs.

``import wds_reinforce`` loads the format, augmentations, targets and the streaming loader
(``io.storage`` puts its URL schemes, ``s3://`` among them, in webdataset's table). The
producer's names (``make_shards``, ``load_teacher``, ...) load on first use, so a training job
never imports teacher code.
"""

from __future__ import annotations

import importlib
from typing import Any

from wds_reinforce.core.augment import OPS, RECIPES, Recipe, normalize, replay, round_rng
from wds_reinforce.core.decode import SourceImage
from wds_reinforce.core.errors import (
    DataError,
    DecodeError,
    FormatError,
    MismatchError,
    SampleError,
    UsageError,
    VersionError,
)
from wds_reinforce.core.format import (
    FORMAT_VERSION,
    Manifest,
    ShardInfo,
    Sidecar,
    SkippedInput,
    decode_sidecar,
    encode_sidecar,
)
from wds_reinforce.core.schedule import SharedEpoch, round_for
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
from wds_reinforce.core.version import __version__
from wds_reinforce.io.storage import read_url
from wds_reinforce.layouts import manifest_url, read_manifest, shard_urls
from wds_reinforce.read.dataset import ReinforcedDataset
from wds_reinforce.read.loader import (
    LoaderOptions,
    SkipCounter,
    decode_sidecars,
    make_targets,
    pick_rounds,
    reinforce_stages,
    replay_images,
)

# Producer API, imported lazily (see the module docstring): name -> submodule.
_LAZY = {
    "make_shards": "produce.make",
    "import_mldr": "importers.mldr",
    "prepare_job": "produce.make",
    "ProducerSummary": "produce.teacher_job",
    "open_source": "produce.sources",
    "Source": "produce.sources",
    "SourceSample": "produce.sources",
    "SOURCES": "produce.sources",
    "Teacher": "produce.teacher",
    "load_teacher": "produce.teacher",
    "verify_shards": "read.verify",
    "draw_rounds": "read.picture",
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
