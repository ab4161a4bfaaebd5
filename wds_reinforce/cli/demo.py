"""The offline demo behind ``python tools/make_shards.py`` with no arguments (and ``tools/demo.py``).

It needs no network and no downloaded weights: it draws a small image-classification set
(shapes of random colour, size and position on textured backgrounds, where crops and flips
matter), trains a small timm teacher on it from random initialisation, and reinforces the set
into shards. Every stage is cached under ``shards/demo/``: a second run reuses the images and
the teacher, and verifies and reuses the finished shards. ``tools/demo.py --epochs N`` trains
the teacher for N epochs; ``--quick`` is a short run into its own folder (see ``QUICK``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter

from wds_reinforce.core.progress import eta, format_duration

__all__ = [
    "DEMO_CLASSES",
    "DEMO_SIZE",
    "QUICK",
    "photo_like",
    "make_demo_images",
    "train_demo_teacher",
    "run_demo",
    "build_parser",
    "main",
]

DEMO_CLASSES = ("circle", "square", "triangle", "cross", "ring", "stripes")
DEMO_SIZE = 64  # reinforced output size (and the teacher's training size)
_SOURCE_SIZE = 80  # stored JPEGs are larger than the output, as in real data
_MODEL = "resnet10t"
_EPOCHS = 12  # the teacher's epochs (a checkpoint without a note of its own was trained for these)
# --quick: a smoke run of every stage (a weak teacher), in its own folder so the full demo's cache stays.
QUICK = {"root": "shards/demo-quick", "per_class": 100, "rounds": 4, "epochs": 2}
# What the printed next commands take and give (measured; see README "Training on reinforced shards").
_NEXT_EXPECTED = "~1 minute on 2 CPU cores; after 2 epochs ~40 % val top-1 on the teacher's targets, ~36 % on labels"


def photo_like(height: int, width: int, seed: int, noise: float = 6.0) -> np.ndarray:
    """A smooth, textured RGB uint8 image (gradients, blobs, grain): decodes like a photo, not like noise.

    Benchmarks use ``noise=20``: about 100 kB at 500x375, quality 90, ImageNet's average JPEG
    (decode cost grows with the bytes).
    """
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    img = np.zeros((height, width, 3), np.float32)
    for c in range(3):
        img[..., c] = 120 + 80 * np.sin(x / rng.uniform(20, 80) + rng.uniform(0, 6)) * np.cos(y / rng.uniform(20, 80))
    for _ in range(6):
        cy, cx, r = rng.uniform(0, height), rng.uniform(0, width), rng.uniform(10, max(height, width) / 3)
        mask = (y - cy) ** 2 + (x - cx) ** 2 < r * r
        img[mask] = img[mask] * 0.4 + rng.uniform(0, 255, 3) * 0.6
    img += rng.normal(0, noise, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def _draw(cls: str, rng: np.random.Generator, size: int) -> Image.Image:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    c0, c1 = rng.uniform(30, 225, 3), rng.uniform(30, 225, 3)
    angle = rng.uniform(0, 2 * math.pi)
    t = (np.cos(angle) * xx + np.sin(angle) * yy + 1) / 2
    bg = c0 * (1 - t[..., None]) + c1 * t[..., None]
    bg += rng.normal(0, 10, (size, size, 3))  # texture the classifier must look past
    img = Image.fromarray(np.clip(bg, 0, 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(0.7))
    draw = ImageDraw.Draw(img)
    # Contrasting with the background, so the shape (not the colour) is what tells classes apart.
    colour = tuple(int(v) for v in np.clip(255 - (c0 + c1) / 2 + rng.normal(0, 40, 3), 0, 255))
    r = rng.uniform(0.18, 0.36) * size
    cx, cy = rng.uniform(r, size - r), rng.uniform(r, size - r)
    rot = rng.uniform(0, 2 * math.pi)
    if cls == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
    elif cls == "ring":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=colour, width=max(2, int(r / 3)))
    elif cls in ("square", "triangle"):
        n = 4 if cls == "square" else 3
        pts = [
            (cx + r * math.cos(rot + 2 * math.pi * i / n), cy + r * math.sin(rot + 2 * math.pi * i / n))
            for i in range(n)
        ]
        draw.polygon(pts, fill=colour)
    elif cls == "cross":
        w = max(2, int(r / 2.5))
        for a in (rot, rot + math.pi / 2):
            dx, dy = r * math.cos(a), r * math.sin(a)
            draw.line([(cx - dx, cy - dy), (cx + dx, cy + dy)], fill=colour, width=w)
    else:  # stripes: a patch of parallel bars
        w = max(2, int(r / 4))
        for k in range(-2, 3):
            ox, oy = k * 2 * w * math.cos(rot + math.pi / 2), k * 2 * w * math.sin(rot + math.pi / 2)
            dx, dy = r * math.cos(rot), r * math.sin(rot)
            draw.line([(cx + ox - dx, cy + oy - dy), (cx + ox + dx, cy + oy + dy)], fill=colour, width=w)
    return img


def make_demo_images(root: str | os.PathLike, per_class: int, seed: int = 0, size: int = _SOURCE_SIZE) -> Path:
    """Write ``per_class`` JPEGs per class in ImageFolder layout under ``root`` (cached by a marker)."""
    root = Path(root)
    marker = root / ".complete.json"
    spec = {"classes": list(DEMO_CLASSES), "per_class": per_class, "seed": seed, "size": size, "style": 3}
    if marker.is_file() and json.loads(marker.read_text()) == spec:
        return root
    shutil.rmtree(root, ignore_errors=True)  # images of another spec would linger under new names
    for ci, cls in enumerate(DEMO_CLASSES):
        folder = root / cls
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            rng = np.random.default_rng([seed, ci, i])
            _draw(cls, rng, size).save(folder / f"{i:05d}.jpg", "JPEG", quality=90)
    marker.write_text(json.dumps(spec))
    return root


def _load_images(root: Path) -> tuple[torch.Tensor, torch.Tensor]:
    from wds_reinforce.core.decode import SourceImage
    from wds_reinforce.produce.sources import ImageFolderSource

    src = ImageFolderSource(root)
    images = torch.stack([SourceImage(src[i].data).decode() for i in range(len(src))])
    labels = torch.tensor([src[i].label for i in range(len(src))])
    return images, labels


def train_demo_teacher(
    train_root: Path,
    val_root: Path,
    path: Path,
    epochs: int = _EPOCHS,
    batch_size: int = 64,
    seed: int = 0,
    log: Any = print,
) -> float:
    """Train a random-init timm resnet10t on the demo images; save its state_dict; return val accuracy."""
    import timm

    from wds_reinforce.core.augment import Recipe, normalize, replay

    torch.manual_seed(seed)
    images, labels = _load_images(train_root)
    val_images, val_labels = _load_images(val_root)
    model = timm.create_model(_MODEL, pretrained=False, num_classes=len(DEMO_CLASSES))
    cfg = model.pretrained_cfg
    train_recipe = Recipe.from_spec({"size": DEMO_SIZE, "ops": [{"op": "rrc", "scale": [0.35, 1.0]}, {"op": "flip"}]})
    val_recipe = Recipe.from_spec({"size": DEMO_SIZE, "ops": [{"op": "center", "crop_pct": 1.0}]})
    per_epoch = max(1, len(images) // batch_size)
    steps = epochs * per_epoch
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps, pct_start=0.15)
    rng = np.random.default_rng(seed)
    start = time.perf_counter()
    for epoch in range(epochs):
        model.train()
        order = rng.permutation(len(images))
        for b in range(per_epoch):
            idx = order[b * batch_size : (b + 1) * batch_size]
            batch = torch.stack(
                [replay(images[i], train_recipe.sample(rng, tuple(images[i].shape[1:])), train_recipe) for i in idx]
            )
            loss = torch.nn.functional.cross_entropy(
                model(normalize(batch, cfg["mean"], cfg["std"])), labels[idx], label_smoothing=0.1
            )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        acc = _accuracy(model, val_images, val_labels, val_recipe, cfg)
        log(_epoch_line(epoch, epochs, loss.item(), acc, time.perf_counter() - start))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(model.state_dict(), tmp)
    os.replace(tmp, path)
    return acc


def _epoch_line(epoch: int, epochs: int, loss: float, acc: float, elapsed: float) -> str:
    return (
        f"  teacher epoch {epoch + 1}/{epochs}: loss {loss:.3f}, val acc {acc:.1%} "
        f"(elapsed {format_duration(elapsed)}, ETA {eta(epoch + 1, epochs, elapsed)})"
    )


def _cached_teacher(ckpt: Path, epochs: int, images_cached: bool) -> bool:
    """Whether ``ckpt`` is a teacher of these images and ``epochs`` (else it is removed)."""
    note = ckpt.with_suffix(".json")
    trained = json.loads(note.read_text())["epochs"] if note.is_file() else _EPOCHS
    if ckpt.is_file() and images_cached and trained == epochs:
        return True
    ckpt.unlink(missing_ok=True)
    note.unlink(missing_ok=True)
    return False


@torch.inference_mode()
def _accuracy(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, recipe: Any, cfg: dict) -> float:
    from wds_reinforce.core.augment import normalize, replay

    model.eval()
    views = torch.stack([replay(img, {}, recipe) for img in images])
    correct = 0
    for b in range(0, len(views), 256):
        logits = model(normalize(views[b : b + 256], cfg["mean"], cfg["std"]))
        correct += int((logits.argmax(1) == labels[b : b + 256]).sum())
    return correct / len(views)


def _clear_shards(root: Path) -> None:
    for old in [*root.glob("train-*.tar"), root / "manifest.json", root / "_info.json"]:
        old.unlink(missing_ok=True)
    shutil.rmtree(root / ".done", ignore_errors=True)


def _next_steps(root: Path, log: Any, full: bool) -> None:
    """What to run next on the demo's shards (the expected figures are the full demo's)."""
    val = root / "source" / "val"
    expected = _NEXT_EXPECTED if full else f"on the full demo: {_NEXT_EXPECTED}; these settings give other figures"
    log(
        "next: train a student on the teacher's soft targets, and the same student on one-hot labels "
        f"(each {expected}):"
    )
    log(f"  python tools/train.py --data {root} --val {val} --epochs 2")
    log(f"  python tools/train.py --data {root} --val {val} --epochs 2 --targets labels")
    log("or read the shards like any webdataset:")
    log(
        f'  python -c "import webdataset as wds; '
        f"s = next(iter(wds.WebDataset('{root}/train-000000.tar', shardshuffle=False)"
        ".decode())); print(s['__key__'], s['cls'], sorted(s['dr.mp']))\""
    )


def run_demo(
    root: str | os.PathLike = "shards/demo",
    per_class: int = 400,
    rounds: int = 8,
    epochs: int = _EPOCHS,
    log: Any = print,
) -> Any:
    """Generate, train (cached) and reinforce the demo set; print what was written and what to run next."""
    from wds_reinforce.core.threads import default_threads, default_workers
    from wds_reinforce.produce.jobs import OtherJobError
    from wds_reinforce.produce.make import make_shards

    workers = default_workers()
    # The teacher trains alone in this process (all the cores), then runs next to the workers.
    torch.set_num_threads(default_threads(0))
    root = Path(root)
    t0 = time.perf_counter()
    log(
        f"[1/3] demo images: {per_class} x {len(DEMO_CLASSES)} classes ({', '.join(DEMO_CLASSES)}), "
        f"{_SOURCE_SIZE} px JPEG"
    )
    marker = root / "source" / "train" / ".complete.json"
    before = marker.read_text() if marker.is_file() else None
    train_root = make_demo_images(root / "source" / "train", per_class, seed=0)
    cached = before == marker.read_text()
    val_root = make_demo_images(root / "source" / "val", max(per_class // 8, 10), seed=1)
    ckpt = root / f"teacher_{_MODEL}.pt"
    # A teacher of other images or other epochs is not this run's.
    if _cached_teacher(ckpt, epochs, cached):
        log(f"[2/3] teacher: reusing {ckpt} ({epochs} epochs)")
    else:
        log(f"[2/3] teacher: training timm:{_MODEL} from random init at {DEMO_SIZE} px ({epochs} epochs)")
        _clear_shards(root)  # shards of an earlier teacher are another job's
        train_demo_teacher(train_root, val_root, ckpt, epochs=epochs, log=log)
        ckpt.with_suffix(".json").write_text(json.dumps({"epochs": epochs}))
    torch.set_num_threads(default_threads(workers))
    log(f"[3/3] reinforcing: recipe rrc at {DEMO_SIZE} px, {rounds} rounds, top-3 -> {root}/")
    job = dict(
        teacher_checkpoint=str(ckpt),
        recipe="rrc",
        image_size=DEMO_SIZE,
        rounds=rounds,
        topk=3,
        shard_size=600,
        batch_size=256,
        workers=workers,
        seed=0,
        name="demo",
    )
    try:
        summary = make_shards(str(train_root), f"timm:{_MODEL}", out=str(root), **job)
    except OtherJobError:
        # Shards of an older demo (another version or setting): the demo folder is ours to redo.
        log("  the demo shards are from another job: remaking them")
        _clear_shards(root)
        summary = make_shards(str(train_root), f"timm:{_MODEL}", out=str(root), **job)
    log(summary.format())
    log(f"demo done in {time.perf_counter() - t0:.0f} s: shards {root}/train-*.tar, manifest {root}/manifest.json")
    _next_steps(root, log, full=(per_class, rounds, epochs) == (400, 8, _EPOCHS))
    return summary


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="demo.py",
        description="The offline demo (the same as make_shards.py without arguments): demo images, a teacher "
        "trained here, reinforced shards. Every stage is cached; a rerun reuses it.",
    )
    p.add_argument("--epochs", type=int, help=f"teacher epochs (default: {_EPOCHS}, or {QUICK['epochs']} with --quick)")
    p.add_argument(
        "--quick",
        action="store_true",
        help=f"a short run of every stage into {QUICK['root']}: {QUICK['per_class']} images per class, "
        f"{QUICK['epochs']} teacher epochs, {QUICK['rounds']} rounds (a weak teacher; ~1 minute on 2 idle cores)",
    )
    p.add_argument("--root", help="the demo folder (default: shards/demo, or the --quick one)")
    return p


def main(argv: list[str] | None = None) -> int:
    import sys

    args = build_parser().parse_args(argv)
    settings: dict[str, Any] = dict(QUICK) if args.quick else {}
    if args.epochs is not None:
        if args.epochs < 1:
            print(f"demo.py: error: expected --epochs >= 1, got {args.epochs}", file=sys.stderr)
            return 2
        settings["epochs"] = args.epochs
    if args.root:
        settings["root"] = args.root
    try:
        run_demo(**settings)
    except KeyboardInterrupt:
        print("demo.py: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    return 0
