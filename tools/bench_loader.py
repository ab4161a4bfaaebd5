"""Loader throughput: plain webdataset + torchvision v1 vs the reinforced loader, same workers, same run.

Makes ImageNet-like shards (photo-like ~500x375 JPEGs at quality 90, fake top-k teacher outputs
over 1000 classes, params from the real recipe sampling) in a temporary folder, then measures
images/s through a DataLoader:

  (a) ``wds.WebDataset(plain shards).decode("pil")`` + RandomResizedCrop(224) + flip + ToTensor + Normalize
  (b) ``ReinforcedDataset`` (round schedule, sidecar decode, replay, dense target) for the
      ``rrc`` recipe with full and with reduced (DCT-scaled) JPEG decoding.

Usage: python tools/bench_loader.py --json [--images 320 --workers 2 --rounds 400 --topk 10]
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import webdataset as wds  # noqa: E402
from torchvision import transforms as T  # noqa: E402

from wds_reinforce.augment import Recipe  # noqa: E402
from wds_reinforce.dataset import ReinforcedDataset  # noqa: E402
from wds_reinforce.decode import SourceImage  # noqa: E402
from wds_reinforce.demo import photo_like  # noqa: E402
from wds_reinforce.format import (  # noqa: E402
    Manifest,
    ShardInfo,
    Sidecar,
    check_topk,  # noqa: E402
    decode_sidecar,
    encode_sidecar,
)
from wds_reinforce.schedule import round_for  # noqa: E402
from wds_reinforce.targets import dense_row  # noqa: E402
from wds_reinforce.writer import write_tar  # noqa: E402

NUM_CLASSES = 1000


def _jpeg(arr: np.ndarray, quality: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def make_bench_shards(
    root: Path, images: int, shards: int, rounds: int, topk: int, quality: int, size: int = 224
) -> dict:
    """Plain shards (jpg, cls) and reinforced shards for the full and reduced rrc recipes."""
    recipes = {
        "full": Recipe.from_spec("rrc", size=size),
        "reduced": Recipe.from_spec("rrc", size=size, decode="reduced"),
    }
    rng = np.random.default_rng(0)
    jpegs = []
    for i in range(images):
        h, w = (375, 500) if i % 3 else (500, 375)
        jpegs.append(_jpeg(photo_like(h, w, seed=i, noise=20.0), quality))
    per = -(-images // shards)
    out = {"plain": [], "full": None, "reduced": None, "jpeg_kb": float(np.mean([len(j) for j in jpegs]) / 1024)}
    sidecar_bytes = []
    for kind in ("plain", "full", "reduced"):
        folder = root / kind
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
                    idx = np.stack([rng.choice(NUM_CLASSES, topk, replace=False) for _ in range(rounds)])
                    prob = rng.dirichlet(np.ones(topk) * 0.3, size=rounds) * 0.9
                    prob = -np.sort(-prob.astype(np.float16), axis=1)
                    data = encode_sidecar(Sidecar(recipe.fingerprint, idx, prob, cols))
                    sidecar_bytes.append(len(data))
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
        out[kind] = str(folder)
    out["sidecar_kb"] = float(np.mean(sidecar_bytes) / 1024)
    return out


def _v1_pipeline(urls: list[str], size: int) -> wds.WebDataset:
    transform = T.Compose(
        [
            T.RandomResizedCrop(size),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
        ]
    )
    return (
        wds.WebDataset(urls, shardshuffle=False, nodesplitter=None)
        .decode("pil")
        .to_tuple("jpg", "cls")
        .map_tuple(transform, lambda c: c)
    )


def _throughput(dataset, workers: int, batch_size: int, passes: int) -> float:
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, num_workers=workers, persistent_workers=workers > 0
    )
    best = 0.0
    for _ in range(passes):
        count, start = 0, time.perf_counter()
        for batch in loader:
            count += len(batch[0])
        best = max(best, count / (time.perf_counter() - start))
    return best


def _sidecar_share(folder: str, rounds: int) -> dict:
    """Per-sample cost of the sidecar work (decode, schedule, row check, densify) vs the whole sample, one process."""
    ds = ReinforcedDataset(folder)
    start = time.perf_counter()
    n = sum(1 for _ in ds)
    per_sample = (time.perf_counter() - start) / n
    raws = []
    for url in ds.urls:
        with tarfile.open(url) as tar:
            raws += [
                (m.name.split(".")[0], tar.extractfile(m).read()) for m in tar.getmembers() if m.name.endswith(".dr.mp")
            ]
    start = time.perf_counter()
    for key, raw in raws:
        sc = decode_sidecar(raw, key)
        r = round_for(0, key, 1, rounds)
        check_topk(sc.idx[r], sc.prob[r], NUM_CLASSES)
        dense_row(sc.idx[r], sc.prob[r], NUM_CLASSES, "smooth")
        sc.round_params(r)
    sidecar = (time.perf_counter() - start) / len(raws)
    return {"per_sample_ms": per_sample * 1e3, "sidecar_ms": sidecar * 1e3, "sidecar_share": sidecar / per_sample}


def run(
    images: int,
    shards: int,
    workers: int,
    batch_size: int,
    rounds: int,
    topk: int,
    passes: int,
    quality: int,
    size: int = 224,
    repeats: int = 3,
) -> dict:
    torch.set_num_threads(1)  # the DataLoader gives each worker one thread; keep the main process alike
    with tempfile.TemporaryDirectory() as tmp:
        made = make_bench_shards(Path(tmp), images, shards, rounds, topk, quality, size)
        result = {
            "images": images,
            "size": size,
            "workers": workers,
            "batch_size": batch_size,
            "rounds": rounds,
            "topk": topk,
            "jpeg_kb": round(made["jpeg_kb"], 1),
            "sidecar_kb": round(made["sidecar_kb"], 1),
            "cpu_count": os.cpu_count(),
        }
        rates = {}
        for _ in range(repeats):  # interleave so load from other processes hits all alike; keep the best of each
            for name, make in (
                ("plain_v1", lambda: _v1_pipeline(made["plain"], size)),
                ("reinforced_full", lambda: ReinforcedDataset(made["full"])),
                ("reinforced_reduced", lambda: ReinforcedDataset(made["reduced"])),
                ("reinforced_full_float", lambda: ReinforcedDataset(made["full"], output="float")),
            ):
                rates[name] = max(rates.get(name, 0.0), _throughput(make(), workers, batch_size, passes))
        result["images_per_s"] = {k: round(v, 1) for k, v in rates.items()}
        result["ratio_full"] = round(rates["reinforced_full"] / rates["plain_v1"], 3)
        result["ratio_reduced"] = round(rates["reinforced_reduced"] / rates["plain_v1"], 3)
        result["ratio_full_float"] = round(rates["reinforced_full_float"] / rates["plain_v1"], 3)
        result["targets"] = {
            "ratio_full>=1.0": result["ratio_full"] >= 1.0,
            "ratio_reduced>=1.5": result["ratio_reduced"] >= 1.5,
        }
        result["single_process_full"] = {k: round(v, 4) for k, v in _sidecar_share(made["full"], rounds).items()}
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=320)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=400)
    parser.add_argument("--topk", type=int, default=10)
    parser.add_argument("--passes", type=int, default=2, help="passes per measurement (the best counts)")
    parser.add_argument("--quality", type=int, default=90)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats of all pipelines (the best counts)")
    parser.add_argument("--size", type=int, default=224, help="output size of the crop (both pipelines)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    if args.shards < max(args.workers, 1):
        parser.error(f"expected --shards >= --workers, got {args.shards} < {args.workers}")
    result = run(
        args.images,
        args.shards,
        args.workers,
        args.batch_size,
        args.rounds,
        args.topk,
        args.passes,
        args.quality,
        args.size,
        args.repeats,
    )
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        for k, v in result.items():
            print(f"{k}: {v}")


if __name__ == "__main__":
    main()
