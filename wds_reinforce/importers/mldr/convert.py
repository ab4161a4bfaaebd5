"""Read apple/ml-dr's released reinforcement metadata safely and map it to this package's columns.

The paper's authors released ImageNet+ (and CIFAR-100+, Food-101+, Flowers-102+) as a ``.tar.gz``
holding one file per training image, ``{index}.pth.tar``, and ``config.pth.tar``. ``index`` is the
image's position in torchvision's ``ImageFolder`` order of the train split. Each image file is
``torch.save((index, rounds), pickle_protocol=4)`` where ``rounds`` is a list of NS dicts
``{"params": [...], "prob": (values, ids)}``: ``params`` holds one entry per random transform in
their fixed order (``PARAM_TRANSFORMS``), preceded by the mixing partner's index in mixing
variants; ``values``/``ids`` are the teacher's top-k in argpartition order (not sorted).

Nothing here runs their pickles. ``load_torch_save`` opens torch.save's zip container and
unpickles ``data.pkl`` with an unpickler that resolves no globals (the standard C unpickler, so
protocol 4 with FRAME is read; ``torch.load(weights_only=True)`` rejects these files). Any global
is refused with the file name, except the few names numpy uses for a scalar, which become inert
placeholders that are themselves refused wherever a value is used: mixing rounds hold CutMix
boxes as numpy integers, and ``--drop-mixing`` must be able to skip those rounds.

``MldrConfig`` turns their config into the ``Recipe`` that describes their augmentation (their
RandomErasing fills with 0; their RandAugment magnitudes are torchvision v1's), and
``convert_rounds`` maps one image's rounds to sidecar columns: RandAugment magnitudes to signed
bins (a magnitude that is no bin is refused), probabilities sorted descending. ``mldr_import``
runs the import job.
"""

from __future__ import annotations

import functools
import gc
import io
import itertools
import pickle
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from wds_reinforce.core.augment import Recipe
from wds_reinforce.core.augment.randaugment import RANDAUGMENT_SPACE, SIGNED
from wds_reinforce.core.errors import DataError, UsageError
from wds_reinforce.core.format import check_topk

__all__ = [
    "MetadataError",
    "IndexMismatchError",
    "PARAM_TRANSFORMS",
    "restricted_loads",
    "load_torch_save",
    "check_plain",
    "MldrConfig",
    "Rounds",
    "convert_rounds",
    "v1_magnitudes",
]

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
_MIXING = ("mixup", "cutmix")
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
_MAX_PICKLE = 256 << 20  # the largest data.pkl read (8000 rounds of top-10 are ~3 MB)
_MAX_NODES = 50_000_000  # values visited by check_plain


class MetadataError(DataError):
    """A metadata file that cannot be read, or holds something other than their format's plain values."""


class IndexMismatchError(UsageError):
    """The metadata and the images disagree: a count, an index outside the split, a file missing."""


# ----------------------------------------------------------------------------------------
# Safe unpickling


class _Inert:
    """What one of the few allowed global names becomes: a placeholder that does nothing.

    No module is imported and no attribute looked up: calling it (REDUCE) gives another
    placeholder, ``__setstate__`` (BUILD) ignores its state, and ``check_plain`` and
    ``convert_rounds`` refuse it wherever it turns up in data that is used.
    """

    __slots__ = ("name",)

    def __init__(self, name: str):
        self.name = name

    def __call__(self, *args: Any, **kwargs: Any) -> _Inert:
        return _Inert(f"{self.name}(...)")

    def __setstate__(self, state: Any) -> None:
        pass

    def __repr__(self) -> str:
        return f"<{self.name}>"


# numpy scalars pickle as multiarray.scalar(dtype(...), bytes); their mixing rounds hold some.
_INERT_NAMES = frozenset(
    {("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"), ("numpy", "dtype")}
)


class _NoGlobals(pickle.Unpickler):
    def __init__(self, data: bytes, name: str):
        super().__init__(io.BytesIO(data))
        self._name = name

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _INERT_NAMES:
            return _Inert(f"{module}.{name}")
        raise MetadataError(
            f"refused: the pickle needs the global {module}.{name}; their metadata holds only tuples, lists, "
            "dicts, numbers, strings, booleans and None, and nothing is unpickled beyond that",
            url=self._name,
        )

    def persistent_load(self, pid: Any) -> Any:
        raise MetadataError(
            "refused: the pickle refers to a persistent object (a tensor storage?); their metadata holds only "
            "plain values",
            url=self._name,
        )


# What the C unpickler raises for malformed or hostile input: all of it is bad data here.
_PICKLE_ERRORS = (
    pickle.UnpicklingError,
    EOFError,
    ValueError,
    TypeError,
    AttributeError,
    IndexError,
    KeyError,
    OverflowError,
    RecursionError,
)


def restricted_loads(data: bytes, name: str) -> Any:
    """Unpickle ``data`` (any protocol up to 5) resolving no globals; ``name`` is the file, for errors.

    Raises:
        MetadataError: a global other than numpy's scalar names (which become inert placeholders),
            a persistent id, or a malformed pickle.
    """
    # Tens of thousands of small acyclic containers per file: the cyclic collector would run
    # many times over them for nothing (a quarter of an import's time).
    collecting = gc.isenabled()
    gc.disable()
    try:
        return _NoGlobals(data, name).load()
    except MetadataError:
        raise
    except _PICKLE_ERRORS as exc:
        raise MetadataError(f"refused: not a readable pickle ({type(exc).__name__}: {exc})", url=name) from None
    finally:
        if collecting:
            gc.enable()


def load_torch_save(data: bytes, name: str) -> Any:
    """The object in a ``torch.save`` file (its zip container's ``data.pkl``), read by ``restricted_loads``.

    Raises:
        MetadataError: not a torch.save zip container, no single ``*/data.pkl``, or a refused pickle.
    """
    if data[:4] != b"PK\x03\x04":
        raise MetadataError("not a torch.save zip container (torch >= 1.6); other formats are not read", url=name)
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            found = [i for i in zf.infolist() if i.filename.endswith("/data.pkl") and i.filename.count("/") == 1]
            if len(found) != 1:
                raise MetadataError(f"expected one */data.pkl in the torch.save container, got {len(found)}", url=name)
            if found[0].file_size > _MAX_PICKLE:
                raise MetadataError(f"data.pkl of {found[0].file_size} bytes is over the {_MAX_PICKLE} limit", url=name)
            raw = zf.read(found[0])
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError, NotImplementedError) as exc:
        if isinstance(exc, MetadataError):
            raise
        raise MetadataError(f"not a readable torch.save container ({type(exc).__name__}: {exc})", url=name) from None
    return restricted_loads(raw, name)


_LEAVES = (int, float, str, bool, type(None))


def _what(value: Any) -> str:
    return value.name if isinstance(value, _Inert) else type(value).__name__


def check_plain(obj: Any, name: str) -> None:
    """Raise ``MetadataError`` unless ``obj`` holds only tuples, lists, dicts, numbers, strings, bools, None."""
    stack, seen, count = [obj], set(), 0
    while stack:
        value = stack.pop()
        count += 1
        if count > _MAX_NODES:
            raise MetadataError(f"refused: more than {_MAX_NODES} values", url=name)
        kind = type(value)
        if kind in (tuple, list, dict):
            if id(value) in seen:
                continue
            seen.add(id(value))
            if kind is dict:
                stack.extend(value.keys())
                stack.extend(value.values())
            else:
                stack.extend(value)
        elif kind not in _LEAVES:
            raise MetadataError(f"refused: holds a {_what(value)}, not a plain value", url=name)


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
        layout = (("id2",) if any(t in transforms for t in _MIXING) else ()) + tuple(
            t for t in PARAM_TRANSFORMS if t in transforms
        )
        built = cls(config, dataset, num_samples, topk, teachers, num_classes, transforms, ignored, layout)
        built.recipe  # noqa: B018  (builds and checks the recipe now: bad arguments fail before any work)
        return built

    @property
    def mixing(self) -> bool:
        """True for the +M* variants (MixUp / CutMix with a partner image from anywhere in the data)."""
        return any(t in self.transforms for t in _MIXING)

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


# ----------------------------------------------------------------------------------------
# One image's rounds -> sidecar columns


@functools.lru_cache(maxsize=16)
def v1_magnitudes(bins: int, height: int, width: int) -> np.ndarray:
    """torchvision v1 RandAugment's magnitudes, (14, bins) float64 of the float32 values, in op-id order.

    Their magnitudes are ``float(magnitudes[bin])`` of this space (Solarize on the 0-255 scale).
    Ops without a magnitude (Identity, AutoContrast, Equalize) have a row of zeros.
    """
    lin = lambda hi: torch.linspace(0.0, hi, bins)  # noqa: E731
    rows = {
        "ShearX": lin(0.3),
        "ShearY": lin(0.3),
        "TranslateX": lin(150.0 / 331.0 * width),
        "TranslateY": lin(150.0 / 331.0 * height),
        "Rotate": lin(30.0),
        "Brightness": lin(0.9),
        "Color": lin(0.9),
        "Contrast": lin(0.9),
        "Sharpness": lin(0.9),
        "Posterize": 8 - (torch.arange(bins) / ((bins - 1) / 4)).round().int(),
        "Solarize": torch.linspace(255.0, 0.0, bins),
    }
    table = np.zeros((len(RANDAUGMENT_SPACE), bins), np.float64)
    for op_id, (name, _, _) in enumerate(RANDAUGMENT_SPACE):
        if name in rows:
            table[op_id] = rows[name].double().numpy()
    table.flags.writeable = False
    return table


_SIGNED = np.array(SIGNED)


def _ra_bins(ops: np.ndarray, mags: np.ndarray, recipe_ra: Any, size: tuple[int, int], name: str) -> np.ndarray:
    """(R, n) op ids and float magnitudes -> (R, 2n) (op id, signed bin) pairs, or MetadataError."""
    if ops.size and (ops.min() < 0 or ops.max() >= len(RANDAUGMENT_SPACE)):
        raise MetadataError(f"RandAugment op index outside [0, {len(RANDAUGMENT_SPACE)})", url=name)
    bins, preferred = recipe_ra.num_magnitude_bins, recipe_ra.magnitude
    table = v1_magnitudes(bins, *size)[ops]  # (R, n, bins)
    magnitude = np.abs(mags)[..., None]
    # Exact in intent: their value is a float32 table entry; 1e-6 relative allows for a linspace rounding change.
    match = np.abs(table - magnitude) <= 1e-6 * np.maximum(1.0, table)
    found = match.any(axis=-1)
    if not found.all():
        r, i = (int(v) for v in np.argwhere(~found)[0])
        op = RANDAUGMENT_SPACE[int(ops[r, i])][0]
        raise MetadataError(
            f"round {r}: RandAugment {op} magnitude {float(mags[r, i])!r} is none of the {bins} magnitude bins of "
            f"torchvision's space at {size[0]}x{size[1]}",
            url=name,
        )
    # Several bins can share a value (Posterize; the ops without magnitude): the configured one wins.
    b = np.where(match[..., preferred], preferred, match.argmax(axis=-1))
    negative = mags < 0
    if (negative & ~_SIGNED[ops]).any():
        r, i = (int(v) for v in np.argwhere(negative & ~_SIGNED[ops])[0])
        op = RANDAUGMENT_SPACE[int(ops[r, i])][0]
        raise MetadataError(f"round {r}: RandAugment {op} has a negative magnitude {float(mags[r, i])!r}", url=name)
    out = np.empty((ops.shape[0], 2 * ops.shape[1]), np.int64)
    out[:, 0::2] = ops
    out[:, 1::2] = np.where(negative, -b, b)
    return out


@dataclass
class Rounds:
    """One image's kept rounds in this package's layout.

    Attributes:
        idx: (R, k) class ids, uint32, each row by falling probability.
        prob: (R, k) float16.
        ops: sidecar column name -> (R, fields) int64.
        total: rounds in their file (NS).
    """

    idx: np.ndarray
    prob: np.ndarray
    ops: dict[str, np.ndarray]
    total: int

    @property
    def kept(self) -> int:
        return int(self.idx.shape[0])


def _entries(params: Sequence[list], pos: int) -> list[Any]:
    return [p[pos] for p in params]


def _flat(values: list[Any], width: int, types: tuple[type, ...], what: str, name: str) -> list[Any]:
    """Rows of ``width`` values of exactly ``types``, flattened; MetadataError otherwise."""
    # Checked with C-level map()s first: this runs for every value of 1.28 M files.
    if not (set(map(type, values)) <= {tuple, list} and set(map(len, values)) <= {width}):
        for r, row in enumerate(values):
            if type(row) not in (tuple, list) or len(row) != width:
                raise MetadataError(f"round {r}: expected {what} as {width} values, got {_short(row)}", url=name)
    flat = list(itertools.chain.from_iterable(values))
    bad = set(map(type, flat)) - set(types)
    if bad:
        raise MetadataError(
            f"expected {what} of type {'/'.join(t.__name__ for t in types)}, got "
            f"{sorted(k.__name__ if k is not _Inert else 'a numpy value' for k in bad)}",
            url=name,
        )
    return flat


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def convert_rounds(
    obj: Any,
    index: int,
    config: MldrConfig,
    name: str,
    image_size: tuple[int, int] | None = None,
    drop_mixing: bool = False,
) -> Rounds:
    """Map one image's file content ``(index, rounds)`` to sidecar columns.

    Args:
        obj: the unpickled file content.
        index: the index the file name gives; the content must agree.
        config: their config (layout of ``params``, NS, k, the recipe).
        name: the file name, for errors.
        image_size: (height, width) of the image; crop boxes must fit it.
        drop_mixing: keep only rounds without a mixing partner (mixing configs); otherwise a
            mixing round is an error.

    Raises:
        MetadataError: anything that is not exactly their format, a crop box that does not fit
            the image, a RandAugment magnitude that is no bin.
    """
    if type(obj) not in (tuple, list) or len(obj) != 2:
        raise MetadataError(f"expected (index, rounds), got {_short(obj)}", url=name)
    got, rounds = obj
    if type(got) is not int or got != index:
        raise MetadataError(f"holds index {_short(got)}, but its name says {index}", url=name)
    if type(rounds) is not list or len(rounds) != config.num_samples:
        n = len(rounds) if type(rounds) is list else type(rounds).__name__
        raise MetadataError(
            f"expected a list of {config.num_samples} rounds (reinforce.num_samples), got {n}", url=name
        )
    for r, rnd in enumerate(rounds):
        if type(rnd) is not dict or len(rnd) != 2 or "params" not in rnd or "prob" not in rnd:
            raise MetadataError(f"round {r}: expected a dict with 'params' and 'prob', got {_short(rnd)}", url=name)
    width = len(config.layout)
    params = [rnd["params"] for rnd in rounds]
    for r, p in enumerate(params):
        if type(p) is not list or len(p) != width:
            raise MetadataError(
                f"round {r}: expected params as a list of {width} ({config.layout}), got {_short(p)}", url=name
            )
    keep = range(len(rounds))
    if config.mixing:
        keep = [r for r, p in enumerate(params) if p[0] is None]
        if len(keep) < len(rounds) and not drop_mixing:
            raise MetadataError("holds mixing rounds (a partner image per round): import with drop_mixing", url=name)
        for pos in (config.position(t) for t in _MIXING if t in config.transforms):
            if any(params[r][pos] is not None for r in keep):
                raise MetadataError("a round without a mixing partner has MixUp/CutMix parameters", url=name)
    params = [params[r] for r in keep]
    probs = [rounds[r]["prob"] for r in keep]
    recipe, out_size = config.recipe, config.recipe.size
    ops: dict[str, np.ndarray] = {}
    rows = len(params)

    box = np.array(_flat(_entries(params, config.position("random_resized_crop")), 4, (int,), "crop boxes", name))
    box = box.reshape(rows, 4).astype(np.int64)
    if rows:
        top, left, h, w = box.T
        bad = (h < 1) | (w < 1) | (top < 0) | (left < 0)
        if image_size is not None:
            bad |= (top + h > image_size[0]) | (left + w > image_size[1])
        if bad.any():
            r = int(np.argmax(bad))
            where = f" the {image_size[0]}x{image_size[1]} image" if image_size else " an image"
            raise MetadataError(f"round {r}: crop box {box[r].tolist()} does not fit{where}", url=name)
    ops["rrc"] = box
    if "random_horizontal_flip" in config.transforms:
        flips = _entries(params, config.position("random_horizontal_flip"))
        if set(map(type, flips)) - {bool}:
            raise MetadataError("expected flips as booleans", url=name)
        ops["flip"] = np.array(flips, np.int64).reshape(rows, 1)
    if "rand_augment" in config.transforms:
        op = next(o for o in recipe.ops if o.name == "ra")
        pairs = _entries(params, config.position("rand_augment"))
        if any(p is None for p in pairs):
            raise MetadataError("a round without RandAugment parameters, though their p is 1", url=name)
        flat_pairs = _flat(pairs, op.num_ops, (tuple, list), "RandAugment ops", name)
        flat = _flat(flat_pairs, 2, (int, float), "RandAugment (op, magnitude) pairs", name)
        ids, mags = flat[0::2], flat[1::2]
        if set(map(type, ids)) - {int} or set(map(type, mags)) - {float}:
            raise MetadataError("expected RandAugment pairs of (int op index, float magnitude)", url=name)
        ids_arr = np.array(ids, np.int64).reshape(rows, op.num_ops)
        mags_arr = np.array(mags, np.float64).reshape(rows, op.num_ops)
        ops["ra"] = _ra_bins(ids_arr, mags_arr, op, out_size, name)
    if "random_erase" in config.transforms:
        erases = _entries(params, config.position("random_erase"))
        present = [r for r, e in enumerate(erases) if e is not None]
        rows_re = np.zeros((rows, 4), np.int64)
        if present:
            got_re = np.array(_flat([erases[r] for r in present], 4, (int,), "erase boxes", name), np.int64)
            got_re = got_re.reshape(len(present), 4)
            # Their forward skips a box whose top is -1; zeros are "not applied" here.
            got_re[got_re[:, 0] == -1] = 0
            top, left, h, w = got_re.T
            bad = (top < 0) | (left < 0) | (h < 0) | (w < 0) | (top + h > out_size[0]) | (left + w > out_size[1])
            if bad.any():
                r = present[int(np.argmax(bad))]
                raise MetadataError(f"round {r}: erase box {list(erases[r])} does not fit {out_size}", url=name)
            rows_re[present] = got_re
        ops["re"] = rows_re
    ops = {c: ops[c] for c in recipe.columns}

    k = config.topk
    for r, p in enumerate(probs):
        if type(p) not in (tuple, list) or len(p) != 2:
            raise MetadataError(f"round {r}: expected prob as (values, ids), got {_short(p)}", url=name)
    values = np.array(_flat([p[0] for p in probs], k, (float,), "top-k probabilities", name), np.float64)
    ids = np.array(_flat([p[1] for p in probs], k, (int,), "top-k class ids", name), np.int64)
    values, ids = values.reshape(rows, k), ids.reshape(rows, k)
    if rows:
        if not np.isfinite(values).all() or values.min() < 0 or values.max() > 1 + 1e-6:
            raise MetadataError("top-k probabilities must be finite and within [0, 1]", url=name)
        limit = config.num_classes if config.num_classes is not None else 1 << 32
        if ids.min() < 0 or ids.max() >= limit:
            raise MetadataError(f"a top-k class id is outside [0, {limit})", url=name)
    # Falling probability; equal probabilities by class id, so the order is theirs-independent.
    order = np.lexsort((ids, -values), axis=1)
    idx = np.take_along_axis(ids, order, axis=1).astype(np.uint32)
    prob = np.minimum(np.take_along_axis(values, order, axis=1), 1.0).astype(np.float16)
    try:
        check_topk(idx, prob, config.num_classes)
    except DataError as exc:
        raise MetadataError(exc.message, url=name) from None
    return Rounds(idx, prob, ops, total=len(rounds))
