"""Augmentations: ops, kernel sets, mixing, recipes and the one ``replay`` both sides call.

``ops`` (sample parameters, check them, apply them), ``crops`` (resize, random_crop,
center_crop), ``randaugment`` (its op table), ``kernels``
(the pixel code behind the ops, one set per version), ``mixing`` (MixUp/CutMix within pairing
windows) and ``recipe`` (ops in order, presets, ``replay``).
"""

from wds_reinforce.core.augment.crops import PlainCenterCrop, RandomCrop, Resize
from wds_reinforce.core.augment.kernels import CURRENT_KERNELS, KERNELS, LEGACY_KERNELS, Kernels
from wds_reinforce.core.augment.mixing import Mixing
from wds_reinforce.core.augment.ops import (
    OPS,
    CenterCrop,
    GeometryOp,
    HorizontalFlip,
    Op,
    RandAugment,
    RandomErasing,
    RandomResizedCrop,
    register_op,
)
from wds_reinforce.core.augment.randaugment import RANDAUGMENT_SPACE
from wds_reinforce.core.augment.recipe import (
    CIFAR100_MEAN,
    CIFAR100_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    RECIPES,
    Recipe,
    normalize,
    replay,
    round_rng,
)

__all__ = [
    "OPS",
    "RECIPES",
    "RANDAUGMENT_SPACE",
    "KERNELS",
    "CURRENT_KERNELS",
    "LEGACY_KERNELS",
    "Kernels",
    "Op",
    "GeometryOp",
    "register_op",
    "RandomResizedCrop",
    "CenterCrop",
    "Resize",
    "RandomCrop",
    "PlainCenterCrop",
    "HorizontalFlip",
    "RandAugment",
    "RandomErasing",
    "Recipe",
    "Mixing",
    "round_rng",
    "replay",
    "normalize",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "CIFAR100_MEAN",
    "CIFAR100_STD",
]
