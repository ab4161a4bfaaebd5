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

__all__ = ["TRANSFORMS", "PARAM_TRANSFORMS", "GEOMETRY", "MIXING", "MldrConfig"]

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
# Their transforms that set the image's size, in their order (the last one sets the output size).
GEOMETRY = ("resize", "center_crop", "random_crop", "random_resized_crop")
# Arguments each transform may carry in their config (anything else: refused).
_ARGS = {
    "uint8": (),
    "to_tensor": (),
    "normalize": ("mean", "std", "inplace"),
    "resize": ("size", "interpolation", "max_size", "antialias"),
    "center_crop": ("size",),
    "random_crop": ("size", "padding", "pad_if_needed", "fill", "padding_mode"),
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


def _size(value: Any, transform: str, name: str) -> tuple[int, int]:
    if type(value) is int and value > 0:
        return value, value
    if isinstance(value, (list, tuple)) and len(value) == 1:
        return _size(value[0], transform, name)
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(type(v) is int and v > 0 for v in value):
        return int(value[0]), int(value[1])
    raise UsageError(f"{name}: expected {transform} size an int or [height, width], got {value!r}")


def _interpolation(value: Any, default: str, what: str, name: str) -> str:
    if value is None:
        return default
    key = value.lower() if isinstance(value, str) else value
    if key not in _INTERPOLATIONS:
        raise UsageError(f"{name}: expected {what} interpolation one of nearest, bilinear, bicubic, got {value!r}")
    return _INTERPOLATIONS[key]


# Their config holds a few hundred values. A pickle can refer to one list many times over, and
# what walks the config here (the manifest's JSON, comparing two configs) walks each reference.
_MAX_CONFIG_VALUES = 100_000


def _bounded(config: Mapping[str, Any], name: str) -> None:
    """UsageError when walking ``config`` reference by reference visits more than ``_MAX_CONFIG_VALUES``."""
    stack: list[Any] = [config]
    left = _MAX_CONFIG_VALUES
    while stack:
        value = stack.pop()
        left -= 1
        if left < 0:
            raise UsageError(f"{name}: expected their config, got one of more than {_MAX_CONFIG_VALUES} values")
        if isinstance(value, Mapping):
            stack.extend(value.keys())
            stack.extend(value.values())
        elif isinstance(value, (list, tuple)):
            stack.extend(value)


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
        _bounded(config, name)
        reinforce = config["reinforce"]
        num_samples = _positive_int(reinforce.get("num_samples"), "reinforce.num_samples", name)
        topk = _positive_int(reinforce.get("topk"), "reinforce.topk", name)
        if reinforce.get("compress", True) is not True:
            raise UsageError(
                f"{name}: reinforce.compress is off (params stored as dicts); only compressed params are read"
            )
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
            _args(transforms, t, name)
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
        """The paper's name of the variant: ``RRC``, ``RRC+RA/RE``, ``RRC+M*``, ``RRC+RA/RE+M*`` (or a mix);
        CIFAR-100+'s is ``Resize+RandomCrop+RA/RE``, and one without any crop or resize ``NoCrop+...``."""
        names = {
            "resize": "Resize",
            "center_crop": "CenterCrop",
            "random_crop": "RandomCrop",
            "random_resized_crop": "RRC",
        }
        geometry = "+".join(n for t, n in names.items() if t in self.transforms) or "NoCrop"
        extra = "/".join(n for t, n in (("rand_augment", "RA"), ("random_erase", "RE")) if t in self.transforms)
        return geometry + (f"+{extra}" if extra else "") + ("+M*" if self.mixing else "")

    @property
    def geometry(self) -> tuple[str, ...]:
        """Their transforms that set the image's size, in their order; none: the teacher saw each image whole."""
        return tuple(t for t in GEOMETRY if t in self.transforms)

    def position(self, transform: str) -> int:
        """Where ``transform``'s entry sits in a round's ``params`` list."""
        return self.layout.index(transform)

    @functools.cached_property
    def recipe(self) -> Recipe:
        """The recipe that describes their augmentation: same ops, arguments and order as theirs."""
        name = "config.pth.tar"
        ops, size = _geometry_ops(self.transforms, name)
        if not ops:
            skipped = f" (their code skipped {', '.join(self.ignored)}: not a name it knows)" if self.ignored else ""
            raise UsageError(
                f"{name}: their augmentation has no crop or resize{skipped}, so each view keeps its image's own "
                "size; a recipe here makes views of one size, so these rounds cannot be replayed as they were made"
            )
        ops += _pixel_ops(self.transforms, name)
        # A recorded recipe without a kernel set: torchvision's kernels, the library they used.
        desc: dict[str, Any] = {"name": f"mldr-{self.variant.lower()}", "decode": "full", "ops": ops}
        if size is not None:
            desc["size"] = list(size)
        if "normalize" in self.transforms:  # outside the fingerprint: the loader's float output uses theirs
            norm = self.transforms["normalize"]
            desc["normalize"] = {"mean": norm.get("mean"), "std": norm.get("std")}
        try:
            return Recipe.from_dict(desc)
        except ValueError as exc:
            what = f" ({', '.join(self.geometry)} set the size)" if self.geometry else " (no crop or resize)"
            raise UsageError(f"{name}: their augmentation{what} does not make a recipe here: {exc}") from None

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
            "ignored_note": self.ignored_note(),
        }

    def ignored_note(self) -> str:
        """What their code did with configured transforms it does not know (``""`` when none)."""
        if not self.ignored:
            return ""
        return (
            f"their config names {', '.join(self.ignored)}, which their code does not know (not in its "
            "TRANSFORMATION_TO_NAME): ignored when their rounds were drawn, so not applied and not stored"
        )


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


# ----------------------------------------------------------------------------------------
# Their transforms -> our ops (torchvision's defaults where their config gives none)


def _geometry_ops(t: Mapping[str, Mapping[str, Any]], name: str) -> tuple[list[dict[str, Any]], Any]:
    """The ops of their transforms that set the size, in their order, and the output size (None: per image)."""
    ops: list[dict[str, Any]] = []
    size: tuple[int, int] | None = None
    for transform in GEOMETRY:
        if transform not in t:
            continue
        args = t[transform]
        if "size" not in args:
            raise UsageError(f"{name}: expected {transform} to have a size")
        if transform == "resize":
            if args.get("max_size") is not None:
                raise UsageError(f"{name}: resize max_size={args['max_size']!r}; only the default (None) imports")
            value = args["size"]
            value = value[0] if isinstance(value, (list, tuple)) and len(value) == 1 else value
            pair = None if isinstance(value, int) and not isinstance(value, bool) else _size(value, transform, name)
            size = pair  # an int resizes the shorter side: the size then depends on the image
            # They resize a PIL image (their datasets give PIL images), which always antialiases.
            interpolation = _interpolation(args.get("interpolation"), "bilinear", transform, name)
            resize = value if pair is None else list(pair)
            ops.append({"op": "resize", "size": resize, "interpolation": interpolation, "antialias": True})
        elif transform == "center_crop":
            size = _size(args["size"], transform, name)
            ops.append({"op": "center_crop", "size": list(size)})
        elif transform == "random_crop":
            size = _size(args["size"], transform, name)
            ops.append({"op": "random_crop", "size": list(size), **_crop_padding(args, name)})
        else:
            size = _size(args["size"], transform, name)
            ops.append(
                {
                    "op": "rrc",
                    "scale": _pair(args.get("scale"), (0.08, 1.0), "random_resized_crop scale", name),
                    "ratio": _pair(args.get("ratio"), (3 / 4, 4 / 3), "random_resized_crop ratio", name),
                    "interpolation": _interpolation(args.get("interpolation"), "bilinear", transform, name),
                    # They crop a PIL image, whose resize always antialiases.
                    "antialias": True,
                }
            )
    return ops, size


_PADDING_MODES = ("constant", "edge", "reflect", "symmetric")


def _crop_padding(args: Mapping[str, Any], name: str) -> dict[str, Any]:
    """torchvision RandomCrop's padding arguments, checked (padding None is 0)."""
    padding = args.get("padding") or 0
    ok = (type(padding) is int and padding >= 0) or (
        isinstance(padding, (list, tuple))
        and len(padding) in (1, 2, 4)
        and all(type(v) is int and v >= 0 for v in padding)
    )
    if not ok:
        raise UsageError(f"{name}: expected random_crop padding an int or 1, 2 or 4 ints >= 0, got {padding!r}")
    mode = args.get("padding_mode", "constant")
    if mode not in _PADDING_MODES:
        raise UsageError(f"{name}: expected random_crop padding_mode one of {list(_PADDING_MODES)}, got {mode!r}")
    fill = args.get("fill", 0)
    if not (
        type(fill) in (int, float) or (isinstance(fill, (list, tuple)) and all(type(v) in (int, float) for v in fill))
    ):
        raise UsageError(f"{name}: expected random_crop fill a number or one per channel, got {fill!r}")
    return {
        "padding": padding if type(padding) is int else list(padding),
        "fill": fill if type(fill) in (int, float) else list(fill),
        "padding_mode": mode,
        "pad_if_needed": bool(args.get("pad_if_needed", False)),
    }


def _pixel_ops(t: Mapping[str, Mapping[str, Any]], name: str) -> list[dict[str, Any]]:
    """The ops of their flip, RandAugment and RandomErasing, in their order."""
    ops: list[dict[str, Any]] = []
    if "random_horizontal_flip" in t:
        ops.append({"op": "flip", "p": float(t["random_horizontal_flip"].get("p", 0.5))})
    if "rand_augment" in t:
        ra = t["rand_augment"]
        if ra.get("fill") is not None:
            raise UsageError(f"{name}: rand_augment fill={ra['fill']!r}; only the default fill (None) imports")
        op = {
            "op": "ra",
            "num_ops": ra.get("num_ops", 2),
            "magnitude": ra.get("magnitude", 9),
            "num_magnitude_bins": ra.get("num_magnitude_bins", 31),
            "interpolation": _interpolation(ra.get("interpolation"), "nearest", "rand_augment", name),
        }
        p = ra.get("p", 1.0)
        if type(p) not in (int, float) or not 0 <= p <= 1:
            raise UsageError(f"{name}: expected rand_augment p a probability, got {p!r}")
        if p != 1:  # absent when 1: the recipe (and its fingerprint) of every p=1 import stays as it was
            op["p"] = float(p)
        ops.append(op)
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
    return ops
