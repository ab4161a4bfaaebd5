"""wds_reinforce: Dataset Reinforcement on WebDataset.

Reinforced shards keep the original image bytes and add, per sample, a msgpack sidecar with
every round's augmentation parameters and the teacher's sparse (top-k) outputs.
"""

from __future__ import annotations

from .augment import OPS, RECIPES, DecodeError, Recipe, SourceImage, normalize, replay, round_rng
from .format import (
    FORMAT_VERSION,
    FormatError,
    Manifest,
    ShardInfo,
    Sidecar,
    SkippedInput,
    decode_sidecar,
    encode_sidecar,
)

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "FORMAT_VERSION",
    "FormatError",
    "Manifest",
    "ShardInfo",
    "Sidecar",
    "SkippedInput",
    "decode_sidecar",
    "encode_sidecar",
    "OPS",
    "RECIPES",
    "DecodeError",
    "Recipe",
    "SourceImage",
    "normalize",
    "replay",
    "round_rng",
]
