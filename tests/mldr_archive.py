"""Metadata archives of apple/ml-dr's released structure, written with ``torch.save``, for tests and a benchmark.

``write_metadata`` draws every round the way their reinforce.py does (torchvision's
``RandomResizedCrop.get_params`` and ``RandomErasing.get_params``, a flip coin, RandAugment ops
with torchvision v1 magnitudes at bin 9, MixUp / CutMix with numpy draws, a partner index for
mixed rounds), compresses the params into their list layout, takes an unsorted top-k with
argpartition, and saves ``(index, rounds)`` with ``torch.save(..., pickle_protocol=4)`` into
``reinforced_data/{index}.pth.tar`` of a ``.tar.gz`` (members in a shuffled order, the config
among them) or of a folder.

    python -m tests.mldr_archive --images 1000 --rounds 400   # benchmark: import speed and bytes per round
    python -m tests.mldr_archive --layout sidecar-sets        # the same, the split as plain shards: a sidecar set
    python -m tests.mldr_archive --closeness                 # our replay vs their teacher's pixels
"""

from __future__ import annotations

import argparse
import functools
import io
import json
import os
import random
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torchvision import transforms as T

from tests.conftest import encode, photo_like

__all__ = [
    "config_dict",
    "make_folder",
    "write_plain_shards",
    "write_metadata",
    "draw_rounds",
    "their_teacher_pixels",
    "closeness",
    "RA_OPS",
]

RA_OPS = (
    "Identity",
    "ShearX",
    "ShearY",
    "TranslateX",
    "TranslateY",
    "Rotate",
    "Brightness",
    "Color",
    "Contrast",
    "Sharpness",
    "Posterize",
    "Solarize",
    "AutoContrast",
    "Equalize",
)


def config_dict(
    variant: str = "rrc+ra/re", rounds: int = 8, topk: int = 3, size: int = 64, num_classes: int = 3
) -> dict[str, Any]:
    """Their saved config (reinforce.py's ``config``): ``rrc``, ``rrc+ra/re``, ``mix``, ``rrc+ra/re+mix``."""
    aug: dict[str, Any] = {
        "uint8": {"enable": True},
        "random_resized_crop": {"enable": True, "size": size},
        "random_horizontal_flip": {"enable": True, "p": 0.5},
    }
    if "ra/re" in variant:
        aug["rand_augment"] = {"enable": True, "p": 1.0}
    aug["to_tensor"] = {"enable": True}
    aug["normalize"] = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    if "ra/re" in variant:
        aug["random_erase"] = {"enable": True, "p": 0.25}
    if "mix" in variant:
        aug["mixup"] = {"enable": True, "alpha": 1.0, "div_by": 2.0, "p": 0.5}
        aug["cutmix"] = {"enable": True, "alpha": 1.0, "p": 0.5}
    return {
        "dataset": "imagenet",
        "teacher": {"timm_ensemble": True, "name": "ig_resnext101_32x8d,ig_resnext101_32x16d"},
        "batch_size": 32,
        "seed": None,
        "num_classes": num_classes,
        "world_size": 1,
        "distributed": True,
        "data_path": "",
        "reinforce": {
            "num_samples": rounds,
            "num_candidates": None,
            "topk": topk,
            "compress": True,
            "joblib": False,
            "gzip": True,
            "image_augmentation": aug,
        },
    }


def make_folder(root: Path, sizes: list[list[tuple[int, int]]], seed: int = 0) -> Path:
    """An ImageFolder: class ``c{ci}`` holds one photo-like image per (height, width) of ``sizes[ci]``."""
    for ci, class_sizes in enumerate(sizes):
        (root / f"c{ci}").mkdir(parents=True, exist_ok=True)
        for i, (h, w) in enumerate(class_sizes):
            arr = photo_like(h, w, seed=seed + 100 * ci + i)
            if i == 1:
                (root / f"c{ci}" / f"img_{i:03d}.png").write_bytes(encode(arr, "PNG"))
            else:
                (root / f"c{ci}" / f"img_{i:03d}.jpg").write_bytes(encode(arr, quality=90))
    return root


def write_plain_shards(folder: Path, out: Path, shard_size: int) -> str:
    """The ImageFolder as plain webdataset shards (keys ``class/file``, a ``cls`` label), as a user's
    ImageNet shards are; returns their brace pattern."""
    from torchvision.datasets import ImageFolder

    samples = ImageFolder(str(folder)).samples
    out.mkdir(parents=True, exist_ok=True)
    count = -(-len(samples) // shard_size)
    for s in range(count):
        with tarfile.open(out / f"train-{s:06d}.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
            for path, label in samples[s * shard_size : (s + 1) * shard_size]:
                key = os.path.splitext(os.path.relpath(path, folder))[0].replace(os.sep, "/")
                for name, data in (
                    (key + os.path.splitext(path)[1], Path(path).read_bytes()),
                    (f"{key}.cls", b"%d" % label),
                ):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return str(out / f"train-{{000000..{count - 1:06d}}}.tar")


@functools.cache
def _v1_magnitude(op: str, size: int) -> tuple[float, bool]:
    magnitudes, signed = T.RandAugment()._augmentation_space(31, (size, size))[op]
    return (float(magnitudes[9].item()) if magnitudes.ndim > 0 else 0.0), signed


@functools.cache
def _probe(height: int, width: int) -> torch.Tensor:
    return torch.empty(3, height, width, dtype=torch.uint8)  # get_params reads only the shape


def _own_params(image_size: tuple[int, int], config: dict, size: int) -> list[Any]:
    """One image's params for one round, in their compressed order (no mixing)."""
    aug = config["reinforce"]["image_augmentation"]
    params: list[Any] = []
    probe = _probe(*image_size)
    params.append(tuple(T.RandomResizedCrop.get_params(probe, [0.08, 1.0], [3 / 4, 4 / 3])))
    params.append(torch.rand(1).item() < 0.5)
    if "rand_augment" in aug:
        ops = []
        for _ in range(2):
            op_index = int(torch.randint(14, (1,)).item())
            magnitude, signed = _v1_magnitude(RA_OPS[op_index], size)
            if signed and torch.randint(2, (1,)):
                magnitude *= -1.0
            ops.append((op_index, magnitude))
        params.append(ops)
    if "random_erase" in aug:
        if torch.rand(1) > 0.25:
            params.append(None)
        else:
            x, y, h, w, _ = T.RandomErasing.get_params(_probe(size, size), (0.02, 0.33), (0.3, 3.3), [0])
            params.append((x, y, h, w))
    return params


def _base_logits(rng: np.random.Generator, label: int, num_classes: int) -> np.ndarray:
    """A teacher's view of one image: its label and a few look-alikes on top (as tools/bench_format.py)."""
    base = rng.normal(0, 1.0, num_classes)
    base[label] += 7.0
    base[rng.choice(num_classes, min(6, num_classes), replace=False)] += 4.0
    return base


def _topk(rng: np.random.Generator, base: np.ndarray, k: int) -> tuple[list[float], list[int]]:
    logits = (base + rng.normal(0, 1.0, base.shape)).astype(np.float32)  # each round's view shifts it
    prob = np.exp(logits - logits.max())
    prob = (prob / prob.sum()).astype(np.float32)
    ids = np.argpartition(prob, -k)[-k:]  # their sparsify: unsorted
    return prob[ids].tolist(), ids.tolist()


def draw_rounds(
    index: int, image_size: tuple[int, int], label: int, config: dict, count: int, seed: int
) -> tuple[int, list[dict]]:
    """``(index, rounds)`` of one image, drawn as their reinforce.py draws them."""
    rein = config["reinforce"]
    aug, size, k = rein["image_augmentation"], rein["image_augmentation"]["random_resized_crop"]["size"], rein["topk"]
    num_classes = config["num_classes"]
    rng = np.random.default_rng([seed, index])
    torch.manual_seed(seed * 100_003 + index)
    np.random.seed((seed * 100_003 + index) % 2**32)
    mixing = "mixup" in aug
    base = _base_logits(rng, label, num_classes)
    rounds = []
    for _ in range(rein["num_samples"]):
        own = _own_params(image_size, config, size)
        if not mixing:
            params = own
        else:
            partner = _own_params(image_size, config, size)  # their partner is another image; shape is what counts
            mixup = None if torch.rand(1) > 0.5 else np.random.beta(1.0, 1.0) / 2.0
            cutmix = None
            if torch.rand(1) <= 0.5:
                lam = np.random.beta(1.0, 1.0)
                cut = np.sqrt(1.0 - lam)
                ch, cw = int(size * cut), int(size * cut)
                cx, cy = np.random.randint(size), np.random.randint(size)
                box = [np.clip(cx - ch // 2, 0, size), np.clip(cy - cw // 2, 0, size)]
                box += [np.clip(cx + ch // 2, 0, size), np.clip(cy + cw // 2, 0, size)]
                cutmix = [lam] + box  # numpy int64 coordinates, as np.clip returns them
            if mixup is None and cutmix is None:
                params = [None, *own, None, None]
            else:
                params = [random.Random(index).randrange(count), *[[a, b] for a, b in zip(own, partner)], mixup, cutmix]
        rounds.append({"params": params, "prob": _topk(rng, base, k)})
    return index, rounds


def their_teacher_pixels(data: bytes, params: list, config: dict) -> torch.Tensor:
    """The uint8 pixels their teacher saw for one round's own ``params`` (their datagen path, emulated).

    Their reinforce.py decodes with PIL, crops and resizes the PIL image (RandomResizedCrop),
    converts to a float tensor and back to uint8, flips, runs torchvision v1 RandAugment on the
    uint8 tensor, converts to float, writes zeros for RandomErasing, then normalises.
    """
    from PIL import Image
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as F1
    from torchvision.transforms.autoaugment import _apply_op

    aug = config["reinforce"]["image_augmentation"]
    size = aug["random_resized_crop"]["size"]
    img = Image.open(io.BytesIO(data)).convert("RGB")
    top, left, h, w = params[0]
    x = (F1.to_tensor(F1.resized_crop(img, top, left, h, w, [size, size], InterpolationMode.BILINEAR)) * 255).to(
        torch.uint8
    )
    if params[1]:
        x = F1.hflip(x)
    if "rand_augment" in aug:
        for op, magnitude in params[2]:
            x = _apply_op(x, RA_OPS[op], magnitude, interpolation=InterpolationMode.NEAREST, fill=None)
    x = x.float() / 255.0
    if "random_erase" in aug and params[3] is not None:
        top, left, h, w = params[3]
        x[:, top : top + h, left : left + w] = 0
    return (x * 255).round().to(torch.uint8)


def closeness(variant: str, images: int = 12, rounds: int = 100, size: int = 224) -> dict[str, Any]:
    """How far our replay of imported rounds is from their teacher's pixels, on photo-like 500x375 JPEGs."""
    from wds_reinforce.core.augment import replay
    from wds_reinforce.importers.mldr import MldrConfig, convert_rounds

    config = config_dict(variant, rounds=rounds, topk=3, size=size, num_classes=3)
    mldr = MldrConfig.from_dict(config)
    diffs = []
    for i in range(images):
        data = encode(photo_like(375, 500, seed=i), quality=90)
        obj = draw_rounds(i, (375, 500), 0, config, images, seed=1)
        ours = convert_rounds(obj, i, mldr, f"{i}.pth.tar", (375, 500))
        for r, rnd in enumerate(obj[1]):
            theirs = their_teacher_pixels(data, rnd["params"], config).int()
            mine = replay(data, {c: v[r] for c, v in ours.ops.items()}, mldr.recipe).int()
            diffs.append((theirs - mine).abs().flatten())
    d = torch.cat(diffs).numpy()
    return {
        "variant": variant,
        "rounds": images * rounds,
        "identical_pct": round(100 * float((d == 0).mean()), 2),
        "over_1_level_pct": round(100 * float((d > 1).mean()), 3),
        "p99_99": float(np.percentile(d, 99.99)),
        "max": int(d.max()),
        "mean": round(float(d.mean()), 4),
    }


def _saved(obj: Any, name: str, work: Path) -> bytes:
    path = work / name  # torch.save names the zip's folder after the file, as in their files
    torch.save(obj, path, pickle_protocol=4)
    data = path.read_bytes()
    path.unlink()
    return data


def write_metadata(
    out: Path,
    folder: Path,
    config: dict,
    seed: int = 0,
    as_dir: bool = False,
    edit: Any = None,
) -> list[tuple[int, list[dict]]]:
    """Their metadata for the ImageFolder ``folder``: ``out`` is a ``.tar.gz`` (or a folder with ``as_dir``).

    ``edit(index, obj) -> obj | bytes | None`` may change (or drop, with None) an image's content
    before it is saved; bytes are stored as the file itself. Returns each image's ``(index, rounds)``.
    """
    from PIL import Image
    from torchvision.datasets import ImageFolder

    samples = ImageFolder(str(folder)).samples
    objs = []
    files: list[tuple[str, bytes]] = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for index, (path, label) in enumerate(samples):
            with Image.open(path) as im:
                image_size = (im.height, im.width)
            obj = draw_rounds(index, image_size, label, config, len(samples), seed)
            objs.append(obj)
            content = edit(index, obj) if edit is not None else obj
            if content is None:
                continue
            data = content if isinstance(content, bytes) else _saved(content, f"{index}.pth.tar", work)
            files.append((f"{index}.pth.tar", data))
        files.append(("config.pth.tar", _saved(config, "config.pth.tar", work)))
    random.Random(seed).shuffle(files)  # readdir order: the config anywhere among them
    if as_dir:
        (out / "reinforced_data").mkdir(parents=True, exist_ok=True)
        for name, data in files:
            (out / "reinforced_data" / name).write_bytes(data)
    else:
        with tarfile.open(out, "w:gz") as tar:
            info = tarfile.TarInfo("reinforced_data")
            info.type = tarfile.DIRTYPE
            tar.addfile(info)
            for name, data in files:
                info = tarfile.TarInfo(f"reinforced_data/{name}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return objs


def _bench(args: argparse.Namespace) -> dict[str, Any]:
    from wds_reinforce.importers.mldr import import_mldr

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        per_class = -(-args.images // args.classes)
        rng = np.random.default_rng(0)
        sizes = [[(int(rng.integers(300, 500)), int(rng.integers(300, 500))) for _ in range(per_class)]]
        sizes = sizes * args.classes
        folder = make_folder(root / "train", sizes)
        config = config_dict(args.variant, rounds=args.rounds, topk=args.topk, size=224, num_classes=args.classes)
        t0 = time.perf_counter()
        write_metadata(root / "meta.tar.gz", folder, config)
        made = time.perf_counter() - t0
        images: str | Path = folder
        if args.layout == "sidecar-sets":  # the split as plain shards: the import writes a sidecar set beside them
            images = write_plain_shards(folder, root / "plain", args.shard_size)
        kwargs = {"shard_size": args.shard_size, "group_rounds": args.group_rounds}
        t0 = time.perf_counter()
        summary = import_mldr(root / "meta.tar.gz", images, root / "out", **kwargs)
        seconds = time.perf_counter() - t0
        with tarfile.open(root / "meta.tar.gz") as tar:  # --config: no pass looking for it
            (root / "config.pth.tar").write_bytes(tar.extractfile("reinforced_data/config.pth.tar").read())
        t0 = time.perf_counter()
        import_mldr(root / "meta.tar.gz", images, root / "out2", config=root / "config.pth.tar", **kwargs)
        seconds_config = time.perf_counter() - t0
        n = args.classes * per_class
        result = {
            "images": n,
            "rounds": args.rounds,
            "topk": args.topk,
            "variant": args.variant,
            "layout": summary.layout,
            "archive_bytes": os.path.getsize(root / "meta.tar.gz"),
            "archive_bytes_per_round": round(os.path.getsize(root / "meta.tar.gz") / (n * args.rounds), 1),
            "sidecar_bytes_per_round": round(summary.sidecar_bytes_per_round, 1),
            "import_images_per_s": round(n / seconds, 1),
            "import_seconds": round(seconds, 2),
            "import_with_config_images_per_s": round(n / seconds_config, 1),
            "archive_write_seconds": round(made, 1),
        }
        if args.layout == "sidecar-sets":  # what the set adds beside the images: sidecar shards, tar headers included
            tars = sum(p.stat().st_size for p in (root / "out").rglob("*.tar"))
            plain = sum(p.stat().st_size for p in (root / "plain").glob("*.tar"))
            result.update(
                round_groups=summary.groups,
                sidecar_set_bytes_per_round=round(tars / (n * args.rounds), 1),
                sidecar_set_bytes=tars,
                image_shard_bytes=plain,
            )
        return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=1000, help="images in the synthetic train split (default 1000)")
    parser.add_argument("--classes", type=int, default=1000, help="class folders, each non-empty (default 1000)")
    parser.add_argument("--rounds", type=int, default=400, help="rounds per image, NS (default 400)")
    parser.add_argument("--topk", type=int, default=10, help="top-k (default 10)")
    parser.add_argument("--variant", default="rrc+ra/re", help="rrc or rrc+ra/re (default rrc+ra/re)")
    parser.add_argument("--shard-size", type=int, default=100, help="images per output shard (default 100)")
    parser.add_argument(
        "--layout",
        choices=["self-contained", "sidecar-sets"],
        default="self-contained",
        help="import an ImageFolder into self-contained shards, or plain shards of it into a sidecar set",
    )
    parser.add_argument("--group-rounds", type=int, help="sidecar sets: rounds per round group (default all)")
    parser.add_argument(
        "--closeness",
        action="store_true",
        help="instead: compare our replay with their teacher's pixels (rrc, rrc+ra/re)",
    )
    args = parser.parse_args(argv)
    if args.closeness:
        for variant in ("rrc", "rrc+ra/re"):
            print(json.dumps(closeness(variant)), flush=True)
        return 0
    print(json.dumps(_bench(args)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
