#!/usr/bin/env python
"""Producer throughput vs the teacher alone on the same batches (same model, batch size, device).

The producer's cost should be the teacher: decode, augment, top-k, sidecar, tar and hash hide
behind it. Prints images x rounds per second of both and their ratio (target >= 0.9).

    python tools/bench_producer.py --json
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

__all__ = ["bench", "build_parser", "main"]


def _photo(height: int, width: int, seed: int) -> bytes:
    """A smooth, textured photo-like JPEG (gradients, blobs, noise) of ~quality 90."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    img = np.stack(
        [
            120 + 80 * np.sin(x / rng.uniform(20, 80) + rng.uniform(0, 6)) * np.cos(y / rng.uniform(20, 80))
            for _ in range(3)
        ],
        -1,
    )
    for _ in range(6):
        cy, cx, r = rng.uniform(0, height), rng.uniform(0, width), rng.uniform(10, max(height, width) / 3)
        mask = (y - cy) ** 2 + (x - cx) ** 2 < r * r
        img[mask] = img[mask] * 0.4 + rng.uniform(0, 255, 3) * 0.6
    img += rng.normal(0, 6, img.shape)
    buf = io.BytesIO()
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _write_source(folder: str, count: int, height: int, width: int) -> str:
    from wds_reinforce.produce.jobs import write_tar

    path = os.path.join(folder, "source.tar")
    members = []
    for i in range(count):
        members += [(f"img{i:06d}.jpg", _photo(height, width, i)), (f"img{i:06d}.cls", b"0")]
    with open(path, "wb") as f:
        write_tar(f, iter(members))
    return path


def bench(
    teacher: str = "timm:resnet18",
    images: int = 64,
    rounds: int = 4,
    image_size: int = 224,
    batch_size: int = 64,
    workers: int = 1,
    device: str = "auto",
    recipe: str = "rrc",
    source_size: tuple[int, int] = (375, 500),
    repeat: int = 2,
) -> dict:
    """Time the teacher alone, then the whole producer, on the same images, rounds and batches."""
    from wds_reinforce.produce.make import prepare_job
    from wds_reinforce.produce.self_contained import ReplayDataset
    from wds_reinforce.produce.teacher import load_teacher

    tmp = tempfile.mkdtemp(prefix="bench_producer_")
    src = _write_source(tmp, images, *source_size)
    model = load_teacher(teacher, device=device)

    def job(i: int):
        return prepare_job(
            src,
            model,
            out=os.path.join(tmp, f"out{i}"),
            recipe=recipe,
            image_size=image_size,
            rounds=rounds,
            topk=10,
            shard_size=images,
            batch_size=batch_size,
            workers=workers,
            progress=False,
        )

    first = job(0)
    # The exact batches the producer will feed the teacher, replayed up front (not timed).
    ds = ReplayDataset(first.source, range(len(first.source)), first.recipe, first.seed, rounds)
    pixels = torch.cat([ds[i]["images"] for i in range(len(ds))])
    batches = [b.clone() for b in torch.split(pixels, batch_size)]  # own memory, as the producer's stacked batches
    for b in batches:
        model.predict(b)  # warm-up: allocator, kernels, autotuning, page cache
    teacher_s, producer_s = [], []
    # Alternate the two so drift (clocks, other load) hits both alike; report the best of each.
    for i in range(repeat):
        t0 = time.perf_counter()
        for b in batches:
            model.predict(b)  # returns on the CPU, so it synchronises
        teacher_s.append(time.perf_counter() - t0)
        j = first if i == 0 else job(i)
        t0 = time.perf_counter()
        summary = j.run()
        producer_s.append(time.perf_counter() - t0)
    shutil.rmtree(tmp, ignore_errors=True)
    n = images * rounds
    return {
        "teacher": teacher,
        "device": str(model.device),
        "images": images,
        "rounds": rounds,
        "image_size": image_size,
        "batch_size": batch_size,
        "workers": workers,
        "threads": torch.get_num_threads(),
        "repeat": repeat,
        "teacher_alone_img_per_s": round(n / min(teacher_s), 2),
        "producer_img_per_s": round(n / min(producer_s), 2),
        "ratio": round(min(teacher_s) / min(producer_s), 3),
        "teacher_alone_runs_s": [round(t, 2) for t in teacher_s],
        "producer_runs_s": [round(t, 2) for t in producer_s],
        "sidecar_bytes_per_round": round(summary.sidecar_bytes_per_round, 1),
    }


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="bench_producer.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--teacher", default="timm:resnet18", help="timm:NAME, random weights (default timm:resnet18)")
    p.add_argument("--images", type=int, default=64, help="source images, each replayed --rounds times (default 64)")
    p.add_argument("--rounds", type=int, default=4, help="augmentation rounds per image (default 4)")
    p.add_argument("--image-size", type=int, default=224, help="side of the teacher's views in pixels (default 224)")
    p.add_argument("--batch-size", type=int, default=64, help="teacher batch size, both runs (default 64)")
    p.add_argument("--workers", type=int, default=1, help="DataLoader workers that decode and augment (default 1)")
    p.add_argument("--device", default="auto", help="teacher device: auto (default), cpu, cuda")
    p.add_argument("--recipe", default="rrc", help="augmentation preset or recipe file (default rrc)")
    p.add_argument("--repeat", type=int, default=2, help="alternating timed runs of each; the best counts (default 2)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    return p


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    result = bench(
        args.teacher,
        args.images,
        args.rounds,
        args.image_size,
        args.batch_size,
        args.workers,
        args.device,
        args.recipe,
        repeat=args.repeat,
    )
    if args.json:
        print(json.dumps(result))
    else:
        for k, v in result.items():
            print(f"{k:>26}: {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
