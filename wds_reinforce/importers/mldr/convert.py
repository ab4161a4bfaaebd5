"""One image's rounds of apple/ml-dr's metadata -> this package's sidecar columns.

Each image file is ``torch.save((index, rounds))`` where ``rounds`` is a list of NS dicts
``{"params": [...], "prob": (values, ids)}``: ``params`` holds one entry per random transform in
their fixed order (``config.PARAM_TRANSFORMS``), preceded by the mixing partner's index in
mixing variants; ``values``/``ids`` are the teacher's top-k in argpartition order (not sorted).
``convert_rounds`` maps them to sidecar columns: RandAugment magnitudes to signed bins (a
magnitude that is no bin is refused), probabilities sorted descending.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from wds_reinforce.core.augment.randaugment import RANDAUGMENT_SPACE, SIGNED
from wds_reinforce.core.errors import DataError
from wds_reinforce.core.format import check_topk
from wds_reinforce.importers import MetadataError, Rounds
from wds_reinforce.importers.mldr.config import MIXING, MldrConfig
from wds_reinforce.importers.mldr.unpickle import Inert

__all__ = ["convert_rounds", "v1_magnitudes"]


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
            f"{sorted(k.__name__ if k is not Inert else 'a numpy value' for k in bad)}",
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
    rounds = _rounds(obj, index, config, name)
    params, probs = _kept(rounds, config, name, drop_mixing)
    sizes = _sizes(config, image_size)
    ops = {}
    for transform, convert in _CONVERTERS.items():
        if transform in config.transforms:
            out = convert(_entries(params, config.position(transform)), config, name, sizes)
            if out is not None:
                ops[out[0]] = out[1]
    idx, prob = _topk(probs, config, name)
    return Rounds(idx, prob, {c: ops[c] for c in config.recipe.columns}, total=len(rounds))


def _rounds(obj: Any, index: int, config: MldrConfig, name: str) -> list[dict]:
    """The file's rounds, each a dict of ``params`` (a list of the config's layout) and ``prob``."""
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
    width = len(config.layout)
    for r, rnd in enumerate(rounds):
        if type(rnd) is not dict or len(rnd) != 2 or "params" not in rnd or "prob" not in rnd:
            raise MetadataError(f"round {r}: expected a dict with 'params' and 'prob', got {_short(rnd)}", url=name)
        if type(rnd["params"]) is not list or len(rnd["params"]) != width:
            raise MetadataError(
                f"round {r}: expected params as a list of {width} ({config.layout}), got {_short(rnd['params'])}",
                url=name,
            )
    return rounds


def _kept(rounds: list[dict], config: MldrConfig, name: str, drop_mixing: bool) -> tuple[list[list], list[Any]]:
    """The params and probs of the rounds kept: all, or (mixing variants) those without a partner."""
    params = [rnd["params"] for rnd in rounds]
    keep = range(len(rounds))
    if config.mixing:
        keep = [r for r, p in enumerate(params) if p[0] is None]
        if len(keep) < len(rounds) and not drop_mixing:
            raise MetadataError("holds mixing rounds (a partner image per round): import with drop_mixing", url=name)
        for pos in (config.position(t) for t in MIXING if t in config.transforms):
            if any(params[r][pos] is not None for r in keep):
                raise MetadataError("a round without a mixing partner has MixUp/CutMix parameters", url=name)
    return [params[r] for r in keep], [rounds[r]["prob"] for r in keep]


def _sizes(config: MldrConfig, image_size: tuple[int, int] | None) -> dict[str, tuple[int, int] | None]:
    """The (height, width) each of their transforms gets, and "out", what the ops after the geometry get
    (None where it depends on an image size not given)."""
    size, sizes = image_size, {}
    for transform in config.geometry:
        sizes[transform] = size
        args = config.transforms[transform]
        if transform == "resize":
            value = args["size"]
            value = value[0] if isinstance(value, (list, tuple)) and len(value) == 1 else value
            if not isinstance(value, int):
                size = (int(value[0]), int(value[1]))
            elif size is not None:  # torchvision's Resize(int): the shorter side becomes value, the ratio kept
                short, long = sorted(size)
                new = (value, int(value * long / short))
                size = new if size[0] <= size[1] else new[::-1]
        else:  # a crop: its size, whatever it gets
            value = args["size"]
            size = (value, value) if isinstance(value, int) else (int(value[0]), int(value[-1]))
    sizes["out"] = size
    return sizes


def _resize_sizes(entries: list[Any], config: MldrConfig, name: str, sizes: Any) -> None:
    """Their Resize stores its size in every round; it must be the configured one (no column here)."""
    value = config.transforms["resize"]["size"]
    allowed = [value, [value], list(value)] if not isinstance(value, int) else [value, [value], [value, value]]
    allowed = [v if isinstance(v, int) else list(v) for v in allowed]
    for r, e in enumerate(entries):
        got = list(e) if type(e) in (tuple, list) else e
        if got not in allowed or (type(got) is list and set(map(type, got)) - {int}):
            raise MetadataError(f"round {r}: expected resize's size {value!r}, got {_short(e)}", url=name)
    return None


def _crop_offsets(entries: list[Any], config: MldrConfig, name: str, sizes: Any) -> tuple[str, np.ndarray]:
    """Their RandomCrop's (top, left) in the padded image: the ``random_crop`` rows as they are."""
    rows = len(entries)
    offsets = np.array(_flat(entries, 2, (int,), "random_crop offsets", name), np.int64).reshape(rows, 2)
    size, crop = sizes["random_crop"], config.recipe.size
    if rows and size is not None:
        args = next(o for o in config.recipe.to_dict()["ops"] if o["op"] == "random_crop")
        limit = np.array(_padded(size, args)) - np.array(crop)
        bad = (offsets < 0).any(axis=1) | (offsets > limit).any(axis=1)
        if bad.any():
            r = int(np.argmax(bad))
            raise MetadataError(
                f"round {r}: random_crop offset {offsets[r].tolist()} does not fit a {list(crop)} crop of the "
                f"{size[0]}x{size[1]} image padded to {list(map(int, limit + np.array(crop)))}",
                url=name,
            )
    return "random_crop", offsets


def _padded(size: tuple[int, int], args: dict[str, Any]) -> tuple[int, int]:
    """torchvision RandomCrop's padded (height, width) of a ``size`` input."""
    pad = args["padding"]
    pad = [pad] * 4 if isinstance(pad, int) else pad * 4 if len(pad) == 1 else pad * 2 if len(pad) == 2 else pad
    left, top, right, bottom = pad
    h, w = size[0] + top + bottom, size[1] + left + right
    ch, cw = args["size"]
    if args["pad_if_needed"]:  # it pads both sides by what is missing
        w += 2 * max(cw - w, 0)
        h += 2 * max(ch - h, 0)
    return h, w


def _crop_boxes(entries: list[Any], config: MldrConfig, name: str, sizes: Any) -> tuple[str, np.ndarray]:
    image_size = sizes["random_resized_crop"]
    rows = len(entries)
    box = np.array(_flat(entries, 4, (int,), "crop boxes", name)).reshape(rows, 4).astype(np.int64)
    if rows:
        top, left, h, w = box.T
        bad = (h < 1) | (w < 1) | (top < 0) | (left < 0)
        if image_size is not None:
            bad |= (top + h > image_size[0]) | (left + w > image_size[1])
        if bad.any():
            r = int(np.argmax(bad))
            where = f" the {image_size[0]}x{image_size[1]} image" if image_size else " an image"
            raise MetadataError(f"round {r}: crop box {box[r].tolist()} does not fit{where}", url=name)
    return "rrc", box


def _flips(entries: list[Any], config: MldrConfig, name: str, sizes: Any) -> tuple[str, np.ndarray]:
    if set(map(type, entries)) - {bool}:
        raise MetadataError("expected flips as booleans", url=name)
    return "flip", np.array(entries, np.int64).reshape(len(entries), 1)


def _randaugment(entries: list[Any], config: MldrConfig, name: str, sizes: Any) -> tuple[str, np.ndarray]:
    op = next(o for o in config.recipe.ops if o.name == "ra")
    applied = [r for r, e in enumerate(entries) if e is not None]
    if len(applied) < len(entries) and float(getattr(op, "p", 1.0)) == 1.0:
        raise MetadataError("a round without RandAugment parameters, though their p is 1", url=name)
    out = np.zeros((len(entries), 2 * op.num_ops), np.int64)  # all zeros: not applied (op 0 is Identity)
    if applied:
        out[applied] = _ra_rows([entries[r] for r in applied], op, sizes, name)
    return "ra", out


def _ra_rows(entries: list[Any], op: Any, sizes: Any, name: str) -> np.ndarray:
    rows, size = len(entries), sizes["out"]
    if size is None:
        raise MetadataError("RandAugment's magnitudes depend on the image size, which is not known here", url=name)
    flat_pairs = _flat(entries, op.num_ops, (tuple, list), "RandAugment ops", name)
    flat = _flat(flat_pairs, 2, (int, float), "RandAugment (op, magnitude) pairs", name)
    ids, mags = flat[0::2], flat[1::2]
    if set(map(type, ids)) - {int} or set(map(type, mags)) - {float}:
        raise MetadataError("expected RandAugment pairs of (int op index, float magnitude)", url=name)
    ids_arr = np.array(ids, np.int64).reshape(rows, op.num_ops)
    mags_arr = np.array(mags, np.float64).reshape(rows, op.num_ops)
    return _ra_bins(ids_arr, mags_arr, op, size, name)


def _erase_boxes(entries: list[Any], config: MldrConfig, name: str, sizes: Any) -> tuple[str, np.ndarray]:
    out_size = sizes["out"]
    present = [r for r, e in enumerate(entries) if e is not None]
    boxes = np.zeros((len(entries), 4), np.int64)
    if present:
        got = np.array(_flat([entries[r] for r in present], 4, (int,), "erase boxes", name), np.int64)
        got = got.reshape(len(present), 4)
        got[got[:, 0] == -1] = 0  # their forward skips a box whose top is -1; zeros are "not applied" here
        top, left, h, w = got.T
        bad = (top < 0) | (left < 0) | (h < 0) | (w < 0)
        if out_size is not None:
            bad |= (top + h > out_size[0]) | (left + w > out_size[1])
        if bad.any():
            r = present[int(np.argmax(bad))]
            raise MetadataError(f"round {r}: erase box {list(entries[r])} does not fit {out_size}", url=name)
        boxes[present] = got
    return "re", boxes


# Their transforms that store parameters -> (our column, its rows) or None (checked, no column), in their order.
_CONVERTERS = {
    "resize": _resize_sizes,
    "random_crop": _crop_offsets,
    "random_resized_crop": _crop_boxes,
    "random_horizontal_flip": _flips,
    "rand_augment": _randaugment,
    "random_erase": _erase_boxes,
}


def _topk(probs: list[Any], config: MldrConfig, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Their (values, ids) of each round as (R, k) rows by falling probability (ties by class id)."""
    k, rows = config.topk, len(probs)
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
    return idx, prob
