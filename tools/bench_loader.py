"""Loader throughput: every preset recipe against plain webdataset + torchvision on the same JPEGs.

Makes ImageNet-like shards in a temporary folder: photo-like ~500x375 JPEGs (quality 90, ~96 kB),
once as plain shards (jpg, cls) and once per recipe as reinforced shards (fake top-k teacher
outputs over 1000 classes, parameters from the recipe's own sampling). The plain pipelines
read the plain shards, the reinforced loader its own; the JPEG bytes are the same.

Per core (one process, one thread for torch and OpenCV, process CPU time per image, the arms
interleaved, the median of --repeats passes over all images):

  decode_{simplejpeg,pil,torchvision}  decoding the in-memory JPEGs; the fastest is "decode"
  plain_v1         webdataset .decode("pil") + RandomResizedCrop(224) + flip + ToTensor + Normalize
  plain_v1_rare    plain_v1 + RandAugment(2, 9) before ToTensor + RandomErasing(0.25) after Normalize
  plain_v1_center  webdataset .decode("pil") + Resize(256) + CenterCrop(224) + ToTensor + Normalize
  plain_v2         webdataset + torchvision.io.decode_jpeg + v2 RandomResizedCrop(224, antialias) + flip, uint8
  plain_v2_rare    plain_v2 + v2 RandAugment(2, 9) + RandomErasing(0.25), uint8
  <recipe>         ReinforcedDataset over that preset's shards, uint8 (kernel set 2)
  <recipe>@k1      the same recipe with kernel set 1 (torchvision's tensor kernels; shards made before sets)
  rrc_no_antialias the rrc preset with antialias: false (OpenCV's bilinear resize throughout)
  rrc_unbound      the rrc preset's shards with sidecars written before places and label checksums

DataLoader (--workers workers, batch --batch-size, wall clock, median of --dl-repeats measurements
of at least 256 images each, after a warm-up pass): plain_v1, plain_v1_rare, plain_v2, rrc, rrc+ra/re.

"ratios" names each comparison: rrc_vs_decode (the fastest decoder), rrc_vs_decode_pil, rrc_vs_v1,
rrc_vs_v2, rarerc_vs_v1_rare, rarerc_vs_v2_rare, center_vs_v1_center, dl_* for the DataLoader
figures, and mix_cost_rrc / mix_cost_rarerc: time per image of rrc+mix / rrc and rrc+ra/re+mix /
rrc+ra/re (mixing's cost; "mixing_bytes_per_round" its sidecar bytes), binding_cost_rrc: time per
image of rrc / rrc_unbound, and binding_share_rrc: "binding_us_per_sample" (the place and label checks
alone) as a share of rrc's time per image; "targets" says which of
the issue's targets a run meets. "ops_ms" is the cost of each op
on a 224x224 uint8 image with kernel set 1, kernel set 2 and Pillow (Pillow's without the
array <-> Image conversion a tensor pipeline adds, ~0.05 ms).

Usage: python tools/bench_loader.py --json [--quick] [--images 256 --rounds 16 --workers 2]
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import cv2
import numpy as np
import simplejpeg
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torchvision  # noqa: E402
import webdataset as wds  # noqa: E402
from torchvision import transforms as T  # noqa: E402
from torchvision.transforms import v2  # noqa: E402

from wds_reinforce.cli.demo import photo_like  # noqa: E402
from wds_reinforce.core.augment import RECIPES, Recipe  # noqa: E402
from wds_reinforce.core.augment.kernels import KERNELS  # noqa: E402
from wds_reinforce.core.augment.mixing import window_crc  # noqa: E402
from wds_reinforce.core.augment.randaugment import RANDAUGMENT_SPACE, magnitude_of  # noqa: E402
from wds_reinforce.core.decode import SourceImage  # noqa: E402
from wds_reinforce.core.format import Manifest, RoundGroup, ShardInfo, Sidecar, crc32c, encode_sidecar  # noqa: E402
from wds_reinforce.io.shards import samples  # noqa: E402
from wds_reinforce.io.storage import count_reads  # noqa: E402
from wds_reinforce.layouts import Part, Unit, read_manifest  # noqa: E402
from wds_reinforce.produce.jobs import write_tar  # noqa: E402
from wds_reinforce.read.dataset import ReinforcedDataset  # noqa: E402
from wds_reinforce.read.places import ShardTally  # noqa: E402

NUM_CLASSES = 1000
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _jpeg(arr: np.ndarray, quality: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def make_bench_shards(
    root: Path, images: int, shards: int, rounds: int, topk: int, quality: int, recipes: dict[str, Recipe]
) -> dict:
    """Plain shards (jpg, cls) and, per recipe, reinforced shards with a manifest; returns their places."""
    rng = np.random.default_rng(0)
    jpegs = []
    for i in range(images):
        h, w = (375, 500) if i % 3 else (500, 375)
        jpegs.append(_jpeg(photo_like(h, w, seed=i, noise=20.0), quality))
    per = -(-images // shards)
    out: dict = {"jpegs": jpegs, "jpeg_kb": float(np.mean([len(j) for j in jpegs]) / 1024), "reinforced": {}}
    sidecar_bytes: dict[str, list[int]] = {kind: [] for kind in recipes}
    for kind in ["plain", *recipes]:
        folder = root / kind.replace("/", "_").replace("+", "_").replace("@", "_")
        folder.mkdir(parents=True)
        infos = []
        for s in range(shards):
            keys = [f"img{i:06d}" for i in range(s * per, min(images, (s + 1) * per))]
            members = []
            for key in keys:
                i = int(key[3:])
                members += [(f"{key}.jpg", jpegs[i]), (f"{key}.cls", str(i % NUM_CLASSES).encode())]
                if kind != "plain":
                    recipe = recipes[kind]
                    cols = recipe.sample_rounds(0, key, rounds, SourceImage(jpegs[i]).size)
                    window = None
                    if recipe.mix is not None:  # the producer's mixing draws, for the shard's windows
                        pos, width = keys.index(key), recipe.mix.window
                        mates = keys[pos - pos % width : pos - pos % width + width]
                        cols.update(recipe.mix.sample_rounds(0, mates, pos % width, range(rounds), recipe.size))
                        window = window_crc(mates)
                    idx = np.stack([rng.choice(NUM_CLASSES, topk, replace=False) for _ in range(rounds)])
                    prob = rng.dirichlet(np.ones(topk) * 0.3, size=rounds) * 0.9
                    prob = -np.sort(-prob.astype(np.float16), axis=1)
                    # bound as the producer writes them: place and label checksum (not for rrc_unbound)
                    bound = kind != "rrc_unbound"
                    place = (s, keys.index(key), 0) if bound else None
                    label = crc32c(str(i % NUM_CLASSES).encode()) if bound else None
                    sidecar = Sidecar(recipe.fingerprint, idx, prob, cols, crc32c(jpegs[i]), window, place, label)
                    data = encode_sidecar(sidecar)
                    sidecar_bytes[kind].append(len(data))
                    members.append((f"{key}.dr.mp", data))
            buf = io.BytesIO()
            write_tar(buf, iter(members))
            data = buf.getvalue()
            name = f"shard-{s:06d}.tar"
            (folder / name).write_bytes(data)
            infos.append(ShardInfo(name, len(keys), len(data), hashlib.sha256(data).hexdigest(), keys[0], keys[-1]))
        if kind == "plain":
            out["plain"] = [str(folder / i.name) for i in infos]
            continue
        recipe = recipes[kind]
        manifest = Manifest(
            recipe.to_dict(), recipe.fingerprint.hex(), {"name": "fake"}, NUM_CLASSES, rounds, topk, 0, shards=infos
        )
        (folder / "manifest.json").write_text(manifest.to_json())
        out["reinforced"][kind] = str(folder)
    every = [n for sizes in sidecar_bytes.values() for n in sizes]
    out["sidecar_kb"] = float(np.mean(every) / 1024) if every else 0.0
    out["bytes_per_round"] = {kind: float(np.mean(sizes)) / rounds for kind, sizes in sidecar_bytes.items() if sizes}
    return out


# ----------------------------------------------------------------------------------------
# The plain pipelines: what a user without reinforced shards runs on the same JPEGs


def _plain(urls: list[str]) -> wds.WebDataset:
    return wds.WebDataset(urls, shardshuffle=False, nodesplitter=None, workersplitter=wds.split_by_worker)


def plain_v1(urls: list[str], size: int, rare: bool = False) -> wds.WebDataset:
    ops: list = [T.RandomResizedCrop(size), T.RandomHorizontalFlip()]
    if rare:
        ops.append(T.RandAugment(2, 9))
    ops += [T.ToTensor(), T.Normalize(MEAN, STD)]
    if rare:
        ops.append(T.RandomErasing(0.25))
    return _plain(urls).decode("pil").to_tuple("jpg", "cls").map_tuple(T.Compose(ops), int)


def plain_v1_center(urls: list[str], size: int) -> wds.WebDataset:
    transform = T.Compose([T.Resize(int(size / 0.875)), T.CenterCrop(size), T.ToTensor(), T.Normalize(MEAN, STD)])
    return _plain(urls).decode("pil").to_tuple("jpg", "cls").map_tuple(transform, int)


def _decode_jpeg(data: bytes) -> torch.Tensor:
    return torchvision.io.decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8))


def plain_v2(urls: list[str], size: int, rare: bool = False) -> wds.WebDataset:
    ops: list = [v2.RandomResizedCrop(size, antialias=True), v2.RandomHorizontalFlip()]
    if rare:
        ops += [v2.RandAugment(2, 9), v2.RandomErasing(0.25)]
    return _plain(urls).to_tuple("jpg", "cls").map_tuple(_decode_jpeg, int).map_tuple(v2.Compose(ops), lambda c: c)


# ----------------------------------------------------------------------------------------
# Measurement


def _one_thread() -> None:
    torch.set_num_threads(1)
    cv2.setNumThreads(1)


def _cpu_ms(run: Callable[[], int]) -> float:
    """Process CPU time per image of one pass (ms)."""
    start = time.process_time()
    n = run()
    return (time.process_time() - start) / max(n, 1) * 1e3


def _count(make: Callable[[], Iterable]) -> Callable[[], int]:
    return lambda: sum(1 for _ in make())


def _decoders(jpegs: list[bytes]) -> dict[str, Callable[[], int]]:
    def simple() -> int:
        for j in jpegs:
            simplejpeg.decode_jpeg(j, "RGB", fastdct=False, fastupsample=False)
        return len(jpegs)

    def pil() -> int:
        for j in jpegs:
            np.asarray(Image.open(io.BytesIO(j)).convert("RGB"))
        return len(jpegs)

    def tv() -> int:
        for j in jpegs:
            _decode_jpeg(j)
        return len(jpegs)

    return {"decode_simplejpeg": simple, "decode_pil": pil, "decode_torchvision": tv}


def _per_core(arms: dict[str, Callable[[], int]], repeats: int) -> dict[str, float]:
    """img/s per core of each arm: the median over ``repeats`` interleaved passes (plus one warm-up)."""
    times: dict[str, list[float]] = {name: [] for name in arms}
    for r in range(repeats + 1):
        for name, run in arms.items():
            ms = _cpu_ms(run)
            if r:
                times[name].append(ms)
    return {name: 1e3 / statistics.median(v) for name, v in times.items()}


def _dataloaders(
    arms: dict[str, Callable[[], Iterable]], workers: int, batch: int, repeats: int, epochs: int = 1
) -> dict[str, float]:
    """img/s through a DataLoader (wall clock): the median over ``repeats`` measurements of ``epochs``
    passes each, after a warm-up, interleaved."""
    loaders = {
        name: torch.utils.data.DataLoader(make(), batch_size=batch, num_workers=workers, persistent_workers=workers > 0)
        for name, make in arms.items()
    }
    rates: dict[str, list[float]] = {name: [] for name in arms}
    for r in range(repeats + 1):
        for name, loader in loaders.items():
            start, count = time.perf_counter(), 0
            for _ in range(epochs):
                for batch_ in loader:
                    count += len(batch_[0])
            if r:
                rates[name].append(count / (time.perf_counter() - start))
    del loaders
    return {name: statistics.median(v) for name, v in rates.items()}


def op_costs(repeats: int = 5, n: int = 200) -> dict[str, dict[str, float]]:
    """ms per op on a 224x224 uint8 image: kernel set 1 (torchvision tensors), set 2, and Pillow."""
    from PIL import ImageEnhance, ImageOps

    arr = photo_like(224, 224, seed=1, noise=20.0)
    chw = torch.from_numpy(arr).permute(2, 0, 1)
    tensor = chw.contiguous()
    pil = Image.fromarray(arr)
    k1, k2 = KERNELS.get(1), KERNELS.get(2)
    big = photo_like(375, 500, seed=2, noise=20.0)
    big_t = torch.from_numpy(big).permute(2, 0, 1)
    big_pil = Image.fromarray(big)
    box = (40, 60, 280, 300)  # a typical RandomResizedCrop box: a 1.3x downscale
    pil_ops = {
        "ShearX": lambda: pil.transform((224, 224), Image.AFFINE, (1, 0.27, 0, 0, 1, 0), Image.NEAREST),
        "TranslateX": lambda: pil.transform((224, 224), Image.AFFINE, (1, 0, -30, 0, 1, 0), Image.NEAREST),
        "Rotate": lambda: pil.rotate(20.0, Image.NEAREST),
        "Brightness": lambda: ImageEnhance.Brightness(pil).enhance(1.3),
        "Color": lambda: ImageEnhance.Color(pil).enhance(1.3),
        "Contrast": lambda: ImageEnhance.Contrast(pil).enhance(1.3),
        "Sharpness": lambda: ImageEnhance.Sharpness(pil).enhance(1.3),
        "Posterize": lambda: ImageOps.posterize(pil, 5),
        "Solarize": lambda: ImageOps.solarize(pil, 180),
        "AutoContrast": lambda: ImageOps.autocontrast(pil),
        "Equalize": lambda: ImageOps.equalize(pil),
    }

    def timed(fn: Callable[[], object]) -> float:
        fn()
        runs = []
        for _ in range(repeats):
            start = time.process_time()
            for _ in range(n):
                fn()
            runs.append((time.process_time() - start) / n * 1e3)
        return round(statistics.median(runs), 4)

    out: dict[str, dict[str, float]] = {}
    for op_id, (name, _, _) in enumerate(RANDAUGMENT_SPACE):
        if name == "Identity" or name.endswith("Y"):
            continue
        m = magnitude_of(op_id, 31, 9, 224, 224)
        out[name] = {
            "kernels1": timed(lambda op_id=op_id, m=m: k1.randaugment(tensor, op_id, m, "nearest", None)),
            "kernels2": timed(lambda op_id=op_id, m=m: k2.randaugment(chw, op_id, m, "nearest", None)),
            "pillow": timed(pil_ops[name]),
        }
    out["flip"] = {
        "kernels1": timed(lambda: k1.hflip(tensor)),
        "kernels2": timed(lambda: k2.hflip(chw)),
        "pillow": timed(lambda: pil.transpose(Image.FLIP_LEFT_RIGHT)),
    }
    out["erase"] = {
        "kernels1": timed(lambda: k1.erase(tensor, (20, 30, 100, 60), (124, 116, 104))),
        "kernels2": timed(lambda: k2.erase(chw, (20, 30, 100, 60), (124, 116, 104))),
    }
    top, left, h, w = box
    out["rrc_resize_aa"] = {
        "kernels1": timed(lambda: k1.resized_crop(big_t, box, (224, 224), "bilinear", True)),
        "kernels2": timed(lambda: k2.resized_crop(big_t, box, (224, 224), "bilinear", True)),
        "pillow": timed(lambda: big_pil.resize((224, 224), Image.BILINEAR, box=(left, top, left + w, top + h))),
        "opencv_area": timed(lambda: cv2.resize(big[top : top + h, left : left + w], (224, 224), interpolation=3)),
    }
    out["rrc_resize_no_aa"] = {
        "kernels1": timed(lambda: k1.resized_crop(big_t, box, (224, 224), "bilinear", False)),
        "kernels2": timed(lambda: k2.resized_crop(big_t, box, (224, 224), "bilinear", False)),
    }
    return out


def run(
    images: int,
    shards: int,
    workers: int,
    batch_size: int,
    rounds: int,
    topk: int,
    quality: int,
    repeats: int,
    dl_repeats: int,
    size: int = 224,
    legacy: bool = True,
    ops: bool = True,
) -> dict:
    _one_thread()
    presets = RECIPES.names()  # center, rrc, rrc+mix, rrc+ra/re, rrc+ra/re+mix
    recipes = {name: Recipe.from_spec(name, size=size) for name in presets}
    if legacy:
        recipes.update(
            {f"{name}@k1": Recipe.from_spec(name, size=size, kernels=1) for name in presets if "mix" not in name}
        )
        no_aa = Recipe.from_spec("rrc", size=size).to_dict()
        no_aa["ops"][0]["antialias"] = False
        recipes["rrc_no_antialias"] = Recipe.from_spec(no_aa)
    recipes["rrc_unbound"] = recipes["rrc"]  # sidecars without place and label checksum: the binding's cost
    with tempfile.TemporaryDirectory() as tmp:
        made = make_bench_shards(Path(tmp), images, shards, rounds, topk, quality, recipes)
        plain = made["plain"]
        result: dict = {
            "images": images,
            "size": size,
            "rounds": rounds,
            "topk": topk,
            "jpeg_kb": round(made["jpeg_kb"], 1),
            "sidecar_kb": round(made["sidecar_kb"], 2),
            "sidecar_bytes_per_round": {k: round(v, 2) for k, v in made["bytes_per_round"].items()},
            "mixing_bytes_per_round": {
                name: round(made["bytes_per_round"][f"{name}+mix"] - made["bytes_per_round"][name], 2)
                for name in ("rrc", "rrc+ra/re")
            },
            "workers": workers,
            "batch_size": batch_size,
            "cpu_count": os.cpu_count(),
            "repeats": repeats,
        }
        arms = dict(_decoders(made["jpegs"]))
        arms.update(
            {
                "plain_v1": _count(lambda: plain_v1(plain, size)),
                "plain_v1_rare": _count(lambda: plain_v1(plain, size, rare=True)),
                "plain_v1_center": _count(lambda: plain_v1_center(plain, size)),
                "plain_v2": _count(lambda: plain_v2(plain, size)),
                "plain_v2_rare": _count(lambda: plain_v2(plain, size, rare=True)),
            }
        )
        for name, folder in made["reinforced"].items():
            arms[name] = _count(lambda folder=folder: ReinforcedDataset(folder))
        per_core = _per_core(arms, repeats)
        decode = max(per_core[k] for k in per_core if k.startswith("decode_"))
        per_core["decode"] = decode
        result["per_core_img_s"] = {k: round(v, 1) for k, v in per_core.items()}
        result["binding_us_per_sample"] = round(binding_us(made["reinforced"]["rrc"], repeats), 2)

        dl_arms = {
            "plain_v1": lambda: plain_v1(plain, size),
            "plain_v1_rare": lambda: plain_v1(plain, size, rare=True),
            "plain_v2": lambda: plain_v2(plain, size),
            "rrc": lambda: ReinforcedDataset(made["reinforced"]["rrc"]),
            "rrc+ra/re": lambda: ReinforcedDataset(made["reinforced"]["rrc+ra/re"]),
        }
        dl = _dataloaders(dl_arms, workers, batch_size, dl_repeats, epochs=-(-256 // images))  # >= 256 images
        result["dataloader_img_s"] = {k: round(v, 1) for k, v in dl.items()}

    pc = per_core
    ratios = {
        "rrc_vs_decode": pc["rrc"] / decode,
        "rrc_vs_decode_pil": pc["rrc"] / pc["decode_pil"],
        "rrc_vs_v1": pc["rrc"] / pc["plain_v1"],
        "rrc_vs_v2": pc["rrc"] / pc["plain_v2"],
        "rarerc_vs_v1_rare": pc["rrc+ra/re"] / pc["plain_v1_rare"],
        "rarerc_vs_v2_rare": pc["rrc+ra/re"] / pc["plain_v2_rare"],
        "center_vs_v1_center": pc["center"] / pc["plain_v1_center"],
        "dl_rrc_vs_v1": dl["rrc"] / dl["plain_v1"],
        "dl_rrc_vs_v2": dl["rrc"] / dl["plain_v2"],
        "dl_rarerc_vs_v1_rare": dl["rrc+ra/re"] / dl["plain_v1_rare"],
        # Costs (time per image), mixing vs the same recipe without: the issue's <= 1.15.
        "mix_cost_rrc": pc["rrc"] / pc["rrc+mix"],
        "mix_cost_rarerc": pc["rrc+ra/re"] / pc["rrc+ra/re+mix"],
        # The binding (place and label checks): whole loader, bound vs unbound shards; and its
        # own time per sample against rrc's time per sample (the issue's < 2 %).
        "binding_cost_rrc": pc["rrc_unbound"] / pc["rrc"],
        "binding_share_rrc": result["binding_us_per_sample"] * pc["rrc"] / 1e6,
    }
    if legacy:
        ratios.update(
            {
                "rrc_k1_vs_v1": pc["rrc@k1"] / pc["plain_v1"],
                "rarerc_k1_vs_v1_rare": pc["rrc+ra/re@k1"] / pc["plain_v1_rare"],
                "rrc_vs_rrc_k1": pc["rrc"] / pc["rrc@k1"],
                "rrc_no_antialias_vs_decode": pc["rrc_no_antialias"] / decode,
                "rarerc_vs_rarerc_k1": pc["rrc+ra/re"] / pc["rrc+ra/re@k1"],
            }
        )
    result["ratios"] = {k: round(v, 3) for k, v in ratios.items()}
    result["targets"] = {
        "rarerc_vs_v1_rare>=1.5": ratios["rarerc_vs_v1_rare"] >= 1.5,
        "rrc_vs_decode>=0.8": ratios["rrc_vs_decode"] >= 0.8,
        "rrc_vs_v2>=1.1": ratios["rrc_vs_v2"] >= 1.1,
        "dl_rrc_vs_v1>=1.8": ratios["dl_rrc_vs_v1"] >= 1.8,
        "mix_cost_rrc<=1.15": ratios["mix_cost_rrc"] <= 1.15,
        "mix_cost_rarerc<=1.15": ratios["mix_cost_rarerc"] <= 1.15,
        "binding_share_rrc<0.02": ratios["binding_share_rrc"] < 0.02,
    }
    if ops:
        result["ops_ms"] = op_costs(repeats=3 if repeats < 5 else 5)
    return result


def binding_us(folder: str, repeats: int) -> float:
    """Process CPU µs per sample of the binding checks alone, on a reinforced set's first shard:
    ``ShardTally.admit`` (the sidecar's place, read under its checksum) and the label's CRC-32C."""
    manifest = read_manifest(f"{folder}/manifest.json")
    url = f"{folder}/{manifest.shards[0].name}"
    with open(url, "rb") as f:
        rows = list(samples(f, url))
    unit = Unit(Part(url, manifest.shards[0]), (), len(rows), 0)
    times = []
    for _ in range(max(repeats, 3)):
        start = time.process_time()
        for _ in range(20):
            tally = ShardTally(unit, url)
            for sample in rows:
                assert tally.admit(sample)[-1][1] is None  # admitted
                crc32c(sample["cls"])
        times.append((time.process_time() - start) / (20 * len(rows)))
    return statistics.median(times) * 1e6


def _info(name, data, keys):
    return ShardInfo(name, len(keys), len(data), hashlib.sha256(data).hexdigest(), keys[0], keys[-1])


def bytes_per_epoch(root, images=64, shards=2, rounds=400, topk=10, group=10, classes=1000):
    """Bytes read in one epoch / bytes of the image shards, for a self-contained set ("whole") and a
    sidecar set of the same data ("sets": round groups of ``group``), counted as read (storage.count_reads);
    also the integrity checks' share of the loader's per-sample CPU time."""
    root = Path(root)
    rng = np.random.default_rng(0)
    recipe = Recipe.from_spec("rrc+ra/re")
    per = images // shards
    jpgs = {}
    for i in range(images):
        buf = io.BytesIO()
        Image.fromarray(photo_like(375, 500, seed=i, noise=20.0)).save(buf, "JPEG", quality=90)
        jpgs[f"img{i:06d}"] = buf.getvalue()
    side = {}
    for key, jpg in jpgs.items():
        cols = recipe.sample_rounds(0, key, rounds, SourceImage(jpg).size)
        idx = np.stack([rng.choice(classes, topk, replace=False) for _ in range(rounds)])
        prob = -np.sort(-(rng.dirichlet(np.ones(topk) * 0.3, size=rounds) * 0.9).astype(np.float16), axis=1)
        side[key] = (cols, idx, prob, crc32c(jpg))

    def sc(key, lo, hi):
        cols, idx, prob, crc = side[key]
        return encode_sidecar(
            Sidecar(recipe.fingerprint, idx[lo:hi], prob[lo:hi], {c: v[lo:hi] for c, v in cols.items()}, crc)
        )

    for d in ("plain", "whole", "sets"):
        (root / d).mkdir(parents=True, exist_ok=True)
    keys_of = [list(jpgs)[s * per : (s + 1) * per] for s in range(shards)]
    plain, whole, groups = [], [], [[] for _ in range(rounds // group)]
    for s, keys in enumerate(keys_of):
        for kind in ("plain", "whole"):
            buf = io.BytesIO()
            members = [
                m
                for k in keys
                for m in [(f"{k}.jpg", jpgs[k]), (f"{k}.cls", b"1")]
                + ([(f"{k}.dr.mp", sc(k, 0, rounds))] if kind == "whole" else [])
            ]
            write_tar(buf, iter(members))
            data = buf.getvalue()
            (root / kind / f"s-{s:06d}.tar").write_bytes(data)
            (plain if kind == "plain" else whole).append(
                _info(str(root / kind / f"s-{s:06d}.tar") if kind == "plain" else f"s-{s:06d}.tar", data, keys)
            )
        for g in range(rounds // group):
            buf = io.BytesIO()
            write_tar(buf, iter([(f"{k}.dr.mp", sc(k, g * group, (g + 1) * group)) for k in keys]))
            data = buf.getvalue()
            name = f"rounds-{g * group:05d}-{(g + 1) * group - 1:05d}/train-{s:06d}.tar"
            (root / "sets" / name).parent.mkdir(parents=True, exist_ok=True)
            (root / "sets" / name).write_bytes(data)
            groups[g].append(_info(name, data, keys))
    base = dict(
        recipe=recipe.to_dict(),
        fingerprint=recipe.fingerprint.hex(),
        teacher={},
        num_classes=classes,
        rounds=rounds,
        topk=topk,
        seed=0,
    )
    (root / "whole" / "manifest.json").write_text(Manifest(**base, shards=whole).to_json())
    (root / "sets" / "manifest.json").write_text(
        Manifest(
            **base,
            layout="sidecar-sets",
            image_shards=plain,
            round_groups=[RoundGroup(g * group, group, groups[g]) for g in range(rounds // group)],
        ).to_json()
    )
    image_bytes = sum(s.bytes for s in plain)
    out = {"images": images, "rounds": rounds, "topk": topk, "round_group": group, "image_shard_bytes": image_bytes}
    for kind in ("whole", "sets"):
        ds = ReinforcedDataset(str(root / kind), keys=("__key__",))
        with count_reads() as c:
            n = sum(1 for _ in ds)
        assert n == images
        out[f"{kind}_bytes_per_epoch"] = c.bytes
        out[f"{kind}_ratio"] = round(c.bytes / image_bytes, 4)
    per_sample = _cpu_ms(_count(lambda: ReinforcedDataset(str(root / "whole"), keys=("__key__",))))
    sidecars = {k: sc(k, 0, rounds) for k in jpgs}
    crc_ms = _cpu_ms(lambda: sum(1 for k in jpgs if crc32c(jpgs[k]) | crc32c(sidecars[k]) >= 0))
    out["integrity_us_per_sample"] = round(crc_ms * 1e3, 2)
    out["integrity_share_of_sample"] = round(crc_ms / per_sample, 4)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=16)
    parser.add_argument("--topk", type=int, default=10)
    parser.add_argument("--quality", type=int, default=90)
    parser.add_argument("--repeats", type=int, default=5, help="interleaved per-core passes (the median counts)")
    parser.add_argument("--dl-repeats", type=int, default=3, help="interleaved DataLoader passes (the median counts)")
    parser.add_argument("--size", type=int, default=224, help="output size of the crop (all pipelines)")
    parser.add_argument("--no-legacy", action="store_true", help="skip the kernel set 1 and antialias=false rows")
    parser.add_argument("--no-ops", action="store_true", help="skip the per-op table")
    parser.add_argument("--quick", action="store_true", help="64 images, 3 repeats, no legacy rows: under 2 minutes")
    parser.add_argument(
        "--bytes",
        action="store_true",
        help="only the layout measurement: bytes read per epoch / image shard bytes, self-contained vs sidecar "
        "sets (64 images, 400 rounds of top-10, rrc+ra/re, round groups of 10), and the integrity checks' cost",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    if args.bytes:
        _one_thread()
        with tempfile.TemporaryDirectory() as tmp:
            print(json.dumps(bytes_per_epoch(tmp)))
        return
    if args.quick:
        args.images, args.repeats, args.dl_repeats, args.no_legacy = min(args.images, 64), 3, 2, True
    if args.shards < max(args.workers, 1):
        parser.error(f"expected --shards >= --workers, got {args.shards} < {args.workers}")
    result = run(
        args.images,
        args.shards,
        args.workers,
        args.batch_size,
        args.rounds,
        args.topk,
        args.quality,
        args.repeats,
        args.dl_repeats,
        args.size,
        legacy=not args.no_legacy,
        ops=not args.no_ops,
    )
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        for k, v in result.items():
            print(f"{k}: {v}")


if __name__ == "__main__":
    main()
