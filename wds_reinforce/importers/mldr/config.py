"""apple/ml-dr's ``config.pth.tar``, checked, and the ``Recipe`` that describes their augmentation.

Their reinforce script composes torchvision transforms from the config's
``reinforce.image_augmentation`` in a fixed order (``TRANSFORMS``) and stores, per round, the
parameters of those that draw any, in that order (``PARAM_TRANSFORMS``), after the mixing
partner's index in mixing variants. ``MldrConfig`` reads that layout and builds the recipe (their
RandomErasing fills with 0; their RandAugment magnitudes are torchvision v1's).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from wds_reinforce.core.augment import Recipe
from wds_reinforce.core.errors import UsageError

__all__ = ["TRANSFORMS", "PARAM_TRANSFORMS", "MIXING", "MldrConfig"]

# Their transforms in the order they compose them (dr/transforms.py), and those of them that
# store parameters, in the order of a round's compressed ``params`` list.
TRANSFORMS = (
    "uint8",
    "resize",
    "center_crop",
    "random_crop",
    "random_resized_crop",
    "random_horizontal_flip",
    "rand_augment",
    "to_tensor",
    "random_erase",
    "normalize",
    "mixup",
    "cutmix",
)
PARAM_TRANSFORMS = (
    "resize",
    "random_crop",
    "random_resized_crop",
    "random_horizontal_flip",
    "rand_augment",
    "random_erase",
    "mixup",
    "cutmix",
)
MIXING = ("mixup", "cutmix")
# Transforms with an effect but no op here yet (CIFAR-100+ resizes to 224 and pads-and-crops).
_UNSUPPORTED = ("resize", "center_crop", "random_crop")
# Arguments each supported transform may carry in their config (anything else: refused).
_ARGS = {
    "uint8": (),
    "to_tensor": (),
    "normalize": ("mean", "std", "inplace"),
    "random_resized_crop": ("size", "scale", "ratio", "interpolation", "antialias"),
    "random_horizontal_flip": ("p",),
    "rand_augment": ("p", "num_ops", "magnitude", "num_magnitude_bins", "interpolation", "fill"),
    "random_erase": ("p", "scale", "ratio", "value", "inplace"),
    "mixup": ("alpha", "p", "div_by"),
    "cutmix": ("alpha", "p"),
}
_INTERPOLATIONS = {
    "nearest": "nearest",
    0: "nearest",
    "bilinear": "bilinear",
    2: "bilinear",
    "bicubic": "bicubic",
    3: "bicubic",
}
# torchvision's default classes per dataset name of their configs (their data.py).
_NUM_CLASSES = {"imagenet": 1000, "cifar100": 100, "food101": 101, "flowers102": 102}
# ----------------------------------------------------------------------------------------
# Their config -> our recipe


def _args(config: Mapping[str, Any], transform: str, name: str) -> dict[str, Any]:
    args = config[transform]
    if not isinstance(args, Mapping):
        raise UsageError(f"{name}: expected the arguments of {transform!r} as a mapping, got {args!r}")
    unknown = sorted(set(args) - set(_ARGS[transform]))
    if unknown:
        raise UsageError(
            f"{name}: {transform} has argument(s) {unknown} this importer does not know the meaning of; "
            f"expected some of {list(_ARGS[transform])}"
        )
    return dict(args)


def _pair(value: Any, default: tuple[float, float], what: str, name: str) -> list[float]:
    if value is None:
        return list(default)
    try:
        a, b = (float(v) for v in value)
    except (TypeError, ValueError):
        raise UsageError(f"{name}: expected {what} as a pair of numbers, got {value!r}") from None
    return [a, b]


def _size(value: Any, name: str) -> tuple[int, int]:
    if isinstance(value, int) and not isinstance(value, bool):
        return value, value
    if isinstance(value, (list, tuple)) and len(value) == 1:
        return _size(value[0], name)
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(type(v) is int for v in value):
        return int(value[0]), int(value[1])
    raise UsageError(f"{name}: expected random_resized_crop size an int or [height, width], got {value!r}")


def _interpolation(value: Any, default: str, what: str, name: str) -> str:
    if value is None:
        return default
    key = value.lower() if isinstance(value, str) else value
    if key not in _INTERPOLATIONS:
        raise UsageError(f"{name}: expected {what} interpolation one of nearest, bilinear, bicubic, got {value!r}")
    return _INTERPOLATIONS[key]


def _positive_int(value: Any, what: str, name: str) -> int:
    if type(value) is not int or value < 1:
        raise UsageError(f"{name}: expected {what} a positive integer, got {value!r}")
    return value


@dataclass(frozen=True)
class MldrConfig:
    """Their ``config.pth.tar``, checked, and what it means here.

    Attributes:
        raw: the config as read (plain values).
        dataset: their dataset name (``imagenet``, ``cifar100``, ...), or None.
        num_samples: NS, rounds per image.
        topk: k, teacher classes kept per round.
        teachers: the teacher ensemble's member names (timm), possibly empty.
        num_classes: the teacher's classes, when the config says (else None).
        transforms: their enabled transforms, name -> arguments, in their composition order.
        ignored: configured transform names their code does not know (and so never applied).
    """

    raw: Mapping[str, Any]
    dataset: str | None
    num_samples: int
    topk: int
    teachers: tuple[str, ...]
    num_classes: int | None
    transforms: Mapping[str, Mapping[str, Any]]
    ignored: tuple[str, ...] = ()
    layout: tuple[str, ...] = field(default=(), repr=False)

    @classmethod
    def from_dict(cls, config: Any, name: str = "config.pth.tar") -> MldrConfig:
        """Check their config and build it; ``UsageError`` (naming ``name``) for anything unexpected."""
        if not isinstance(config, Mapping) or not isinstance(config.get("reinforce"), Mapping):
            raise UsageError(f"{name}: expected their config, a dict with a 'reinforce' section")
        reinforce = config["reinforce"]
        num_samples = _positive_int(reinforce.get("num_samples"), "reinforce.num_samples", name)
        topk = _positive_int(reinforce.get("topk"), "reinforce.topk", name)
        if reinforce.get("compress", True) is not True:
            raise UsageError(
                f"{name}: reinforce.compress is off (params stored as dicts); only compressed params are read"
            )
        if reinforce.get("joblib", False):
            raise UsageError(f"{name}: reinforce.joblib is on (files are joblib dumps); only torch.save files are read")
        augmentation = reinforce.get("image_augmentation")
        if not isinstance(augmentation, Mapping):
            raise UsageError(f"{name}: expected reinforce.image_augmentation to be a mapping")
        enabled = {}
        for key, args in augmentation.items():
            args = dict(args) if isinstance(args, Mapping) else args
            if isinstance(args, dict) and not args.pop("enable", True):
                continue  # their clean_config drops disabled transforms
            enabled[key] = args
        ignored = tuple(sorted(k for k in enabled if k not in TRANSFORMS))
        transforms = {t: enabled[t] for t in TRANSFORMS if t in enabled}
        for t in transforms:
            if t in _UNSUPPORTED:
                raise UsageError(
                    f"{name}: their recipe uses {t!r} ({sorted(transforms)}), which has no op here yet: only "
                    "random_resized_crop, random_horizontal_flip, rand_augment, random_erase (and mixing, "
                    "dropped) import"
                )
            _args(transforms, t, name)
        if "random_resized_crop" not in transforms:
            raise UsageError(f"{name}: expected random_resized_crop among their transforms, got {sorted(transforms)}")
        teacher = config.get("teacher")
        names = teacher.get("name") if isinstance(teacher, Mapping) else None
        teachers = tuple(n.strip() for n in names.split(",") if n.strip()) if isinstance(names, str) else ()
        dataset = config.get("dataset") if isinstance(config.get("dataset"), str) else None
        num_classes = config.get("num_classes")
        if type(num_classes) is not int or num_classes < 1:
            num_classes = _NUM_CLASSES.get(dataset or "")
        layout = (("id2",) if any(t in transforms for t in MIXING) else ()) + tuple(
            t for t in PARAM_TRANSFORMS if t in transforms
        )
        built = cls(config, dataset, num_samples, topk, teachers, num_classes, transforms, ignored, layout)
        built.recipe  # noqa: B018  (builds and checks the recipe now: bad arguments fail before any work)
        return built

    @property
    def mixing(self) -> bool:
        """True for the +M* variants (MixUp / CutMix with a partner image from anywhere in the data)."""
        return any(t in self.transforms for t in MIXING)

    @property
    def variant(self) -> str:
        """The paper's name of the variant: ``RRC``, ``RRC+RA/RE``, ``RRC+M*``, ``RRC+RA/RE+M*`` (or a mix)."""
        extra = "/".join(n for t, n in (("rand_augment", "RA"), ("random_erase", "RE")) if t in self.transforms)
        return "RRC" + (f"+{extra}" if extra else "") + ("+M*" if self.mixing else "")

    def position(self, transform: str) -> int:
        """Where ``transform``'s entry sits in a round's ``params`` list."""
        return self.layout.index(transform)

    @functools.cached_property
    def recipe(self) -> Recipe:
        """The recipe that describes their augmentation: same ops, arguments and order as theirs."""
        t, name = self.transforms, "config.pth.tar"
        rrc = t["random_resized_crop"]
        if "size" not in rrc:
            raise UsageError(f"{name}: expected random_resized_crop to have a size")
        size = _size(rrc["size"], name)
        ops: list[dict[str, Any]] = [
            {
                "op": "rrc",
                "scale": _pair(rrc.get("scale"), (0.08, 1.0), "random_resized_crop scale", name),
                "ratio": _pair(rrc.get("ratio"), (3 / 4, 4 / 3), "random_resized_crop ratio", name),
                "interpolation": _interpolation(rrc.get("interpolation"), "bilinear", "random_resized_crop", name),
                # They crop a PIL image, whose resize always antialiases.
                "antialias": True,
            }
        ]
        if "random_horizontal_flip" in t:
            ops.append({"op": "flip", "p": float(t["random_horizontal_flip"].get("p", 0.5))})
        if "rand_augment" in t:
            ra = t["rand_augment"]
            if float(ra.get("p", 1.0)) != 1.0:
                raise UsageError(f"{name}: rand_augment p={ra['p']} (skipped rounds) has no counterpart here; only p=1")
            if ra.get("fill") is not None:
                raise UsageError(f"{name}: rand_augment fill={ra['fill']!r}; only the default fill (None) imports")
            ops.append(
                {
                    "op": "ra",
                    "num_ops": ra.get("num_ops", 2),
                    "magnitude": ra.get("magnitude", 9),
                    "num_magnitude_bins": ra.get("num_magnitude_bins", 31),
                    "interpolation": _interpolation(ra.get("interpolation"), "nearest", "rand_augment", name),
                }
            )
        if "random_erase" in t:
            er = t["random_erase"]
            ops.append(
                {
                    "op": "re",
                    "p": float(er.get("p", 0.5)),
                    "scale": _pair(er.get("scale"), (0.02, 0.33), "random_erase scale", name),
                    "ratio": _pair(er.get("ratio"), (0.3, 3.3), "random_erase ratio", name),
                    # Their RandomErasing writes zeros into the [0, 1] image before Normalize,
                    # whatever its configured value: black pixels.
                    "value": 0,
                }
            )
        # A recorded recipe without a kernel set: torchvision's kernels, the library they used.
        desc = {"name": f"mldr-{self.variant.lower()}", "size": list(size), "decode": "full", "ops": ops}
        try:
            return Recipe.from_dict(desc)
        except ValueError as exc:
            raise UsageError(f"{name}: their augmentation does not make a recipe here: {exc}") from None

    def describe(self) -> dict[str, Any]:
        """What the manifest records about their config."""
        reinforce = self.raw["reinforce"]
        return {
            "dataset": self.dataset,
            "variant": self.variant,
            "num_samples": self.num_samples,
            "topk": self.topk,
            "teachers": list(self.teachers),
            "num_classes": self.num_classes,
            "image_augmentation": _jsonable(reinforce.get("image_augmentation")),
            "ignored_transforms": list(self.ignored),
        }


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value
