"""The training behind ``tools/train.py``: data, model, optimiser, the loop, evaluation.

It reads reinforced shards (``read.ReinforcedDataset``: the teacher's soft targets of one stored
round per epoch) or, for plain labels, an ImageFolder or plain webdataset shards
(``LabelledImages``: fresh random augmentations every epoch, one-hot targets, or an online
teacher's softmax of the same views), trains a timm model (random init or ``--init``) with
soft-target cross entropy and a warm-up + cosine schedule, and evaluates it on a held-out split
with a center crop (``metrics``: top-1, top-5, NLL, ECE). Under torchrun it trains with DDP.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.utils.data

from wds_reinforce.cli.finetune import initial_model
from wds_reinforce.cli.metrics import summarize
from wds_reinforce.core.augment import IMAGENET_MEAN, IMAGENET_STD, RECIPES, Recipe, normalize, replay
from wds_reinforce.core.decode import SourceImage
from wds_reinforce.core.errors import DataError
from wds_reinforce.core.format import Manifest
from wds_reinforce.core.progress import StepProgress
from wds_reinforce.core.targets import soft_cross_entropy
from wds_reinforce.core.threads import default_threads, default_workers
from wds_reinforce.layouts import layout_of, load_manifest
from wds_reinforce.produce.sources import Source, open_source
from wds_reinforce.read.dataset import ReinforcedDataset

__all__ = [
    "TrainData",
    "load_data",
    "loader_for",
    "Trainer",
    "workers_and_threads",
    "start_distributed",
    "lr_factor",
    "device_of",
    "val_views",
    "evaluate",
    "recipe_label",
    "resolve_recipe",
    "EpochSampler",
    "LabelledImages",
    "normalization_for",
]

_PROG = "train.py"


def lr_factor(step: int, total: int, warmup: float) -> float:
    """LR multiplier at ``step`` of ``total``: linear warm-up over the first ``warmup`` fraction, then cosine to 0.

    A fraction (not epochs) so that a 1-epoch run decays and a 2-epoch run does not spend half
    its steps warming up.
    """
    warm = int(warmup * total)
    if step < warm:
        return (step + 1) / warm
    return 0.5 * (1 + math.cos(math.pi * min(step - warm, total - warm) / max(1, total - warm)))


def device_of(name: str) -> Any:

    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cpu")
    return torch.device(name)


def val_views(spec: str | Source, recipe_size: tuple[int, int], crop_pct: float) -> tuple[Any, Any]:
    """The held-out images (uint8, center-cropped at the input size) and their labels."""
    source = open_source(spec) if isinstance(spec, str) else spec
    view = Recipe([{"op": "center", "crop_pct": crop_pct}], size=recipe_size)
    images = torch.stack([replay(source[i].data, {}, view) for i in range(len(source))])
    labels = torch.tensor([source[i].label for i in range(len(source))])
    return images, labels


def evaluate(model: Any, images: Any, labels: Any, mean: Any, std: Any, device: Any) -> dict[str, Any]:
    """The model's metrics on held-out images (``metrics.summarize``: top-1, top-5, NLL, ECE)."""
    model.eval()
    probs = []
    with torch.inference_mode():
        for b in range(0, len(images), 256):
            x = normalize(images[b : b + 256].to(device), mean, std)
            probs.append(torch.softmax(model(x).double(), dim=1).cpu())
    return summarize(torch.cat(probs), labels)


def recipe_label(recipe: Any) -> str:
    """``rrc(scale 0.08-1) + flip at 64x64 px``: what an arm's augmentation is, in one line."""
    parts = []
    for op in recipe.to_dict()["ops"]:
        if op["op"] in ("rrc", "re") and "scale" in op:
            parts.append(f"{op['op']}(scale {op['scale'][0]:g}-{op['scale'][1]:g})")
        else:
            parts.append(op["op"])
    h, w = recipe.size
    return f"{recipe.name}: {' + '.join(parts)} at {h}x{w} px"


def resolve_recipe(spec: str | None, size: int | None, default_size: tuple[int, int] | None) -> Any:
    """A recipe from a preset, a file, or reinforced shards (theirs), at ``size`` if given."""
    if spec is not None and _names_nothing(spec):
        raise FileNotFoundError(
            f"expected --recipe a preset ({', '.join(RECIPES.names())}), a YAML/JSON recipe file or reinforced "
            f"shards (a folder or URL holding manifest.json), got {spec!r}: no such preset, file or folder"
        )
    if spec is not None and _names_shards(spec):
        recipe = Recipe.from_dict(load_manifest(spec)[1].recipe)
        recipe.name = f"{recipe.name} (from {spec})"
        return Recipe.from_spec(recipe, size=size) if size else recipe
    return Recipe.from_spec(spec or "rrc", size=size or default_size)


class EpochSampler:
    """This rank's share of a seeded permutation per epoch, as ``epoch * n + index`` (so workers know the epoch)."""

    def __init__(self, n: int, seed: int, rank: int, world: int):
        self.n, self.seed, self.rank, self.world = n, seed, rank, world
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n // self.world

    def __iter__(self):

        order = np.random.default_rng([self.seed, self.epoch, 0x53414D50]).permutation(self.n)
        mine = order[self.rank :: self.world][: len(self)]
        return iter((self.epoch * self.n + mine).tolist())


class LabelledImages:
    """A source (ImageFolder or plain shards) as training samples: fresh augmentations, one-hot targets.

    Item ``epoch * len + i`` is sample i augmented with parameters seeded by (seed, epoch, i).
    An image that cannot be read or decoded gives None: dropped from its batch, and said once on stderr.
    """

    def __init__(self, source: Any, recipe: Any, seed: int, num_classes: int, label_smoothing: float):
        self.source, self.recipe, self.seed = source, recipe, seed
        self.num_classes, self.label_smoothing = num_classes, label_smoothing
        self._reported: set[int] = set()  # said once per process, not every epoch

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, item: int) -> Any:

        epoch, index = divmod(item, len(self.source))
        try:
            sample = self.source[index]
            src = SourceImage(sample.data)
            params = self.recipe.sample(np.random.default_rng([self.seed, epoch, index]), src.size)
            image = replay(src, params, self.recipe)
        except (DataError, OSError) as exc:
            if index not in self._reported:
                self._reported.add(index)
                print(f"{_PROG}: skipped sample {self.source.key(index)}: {exc}", file=sys.stderr)
            return None
        target = torch.full((self.num_classes,), self.label_smoothing / self.num_classes)
        target[sample.label] += 1.0 - self.label_smoothing
        return image, target


def _collate(batch: list[Any]) -> Any:

    kept = [b for b in batch if b is not None]
    return torch.utils.data.default_collate(kept) if kept else None


def _names_shards(spec: str) -> bool:
    """Whether a --recipe spec names reinforced shards (a URL, a manifest, or a folder holding one)."""
    return "://" in spec or os.path.basename(spec) == "manifest.json" or os.path.isdir(spec)


def _names_nothing(spec: str) -> bool:
    """Whether a --recipe spec is no preset and no URL, and names no file or folder here."""
    return spec not in RECIPES and "://" not in spec and not os.path.exists(spec)


# ----------------------------------------------------------------------------------------
# A run: its data, its loader, its model and the loop


@dataclass
class TrainData:
    """What a run trains and evaluates on.

    Attributes:
        reinforced: train on the shards' teacher targets (else one-hot labels).
        recipe: the shards' recipe (for a folder: the labels arm's); its size is the input size.
        fresh: the labels arm's augmentation (fresh draws each epoch): by default the shards' own,
            so both arms of a comparison see the same augmentation distribution.
        class_names: the classes, in label order.
        samples: samples in the training set.
        units: the units a reader splits among its workers (None: read by index, any number).
        manifest: the shards' manifest (None for a folder or plain shards).
        source: the folder or plain shards (None for reinforced shards).
        val: held-out (images, labels) at the input size, center-cropped; None without ``--val``.
    """

    reinforced: bool
    recipe: Recipe
    fresh: Recipe
    class_names: list[str]
    samples: int
    units: int | None
    manifest: Manifest | None
    source: Source | None
    val: tuple[torch.Tensor, torch.Tensor] | None


def load_data(args: argparse.Namespace, kind: str) -> TrainData:
    """The run's data from its arguments; ``kind`` is ``reinforced``, ``folder`` or ``shards``.

    Raises:
        FileNotFoundError, FormatError, ValueError: data or a recipe that cannot be read.
    """
    reinforced = args.targets == "reinforced"
    if kind == "reinforced":
        manifest = load_manifest(args.data)[1]
        recipe = Recipe.from_dict(manifest.recipe)
        # Labels arm: fresh augmentations (p=0 never uses a stored round).
        fresh = resolve_recipe(args.recipe, None, recipe.size) if args.recipe else recipe
        class_names = list(manifest.class_names) or [str(i) for i in range(manifest.num_classes)]
        layout = layout_of(manifest)  # every worker of every rank needs a shard to read: one of the set's units
        samples, units, source = layout.num_samples(manifest), len(layout.units(manifest, "")), None
    else:
        manifest, source = None, open_source(args.data)
        recipe = fresh = resolve_recipe(args.recipe, args.image_size, None)
        class_names, samples, units = list(source.class_names), len(source), None
    val = val_views(args.val, recipe.size, args.eval_crop_pct) if args.val else None
    return TrainData(reinforced, recipe, fresh, class_names, samples, units, manifest, source, val)


def workers_and_threads(args: argparse.Namespace, data: TrainData, world: int) -> tuple[int, int]:
    """DataLoader workers (at most the units each rank reads) and the main process's torch threads."""
    workers = args.workers
    if workers is None:
        workers = default_workers()
        if data.units is not None:  # every worker of every rank needs a shard
            workers = min(workers, max(0, data.units // world))
    return workers, args.threads or default_threads(workers)


def loader_for(
    data: TrainData, args: argparse.Namespace, rank: int, world: int, workers: int
) -> tuple[Any, Any, torch.utils.data.DataLoader]:
    """(dataset, epoch sampler or None, DataLoader) of the run."""
    persistent = workers > 0
    if data.source is None:
        dataset = ReinforcedDataset(
            args.data,
            manifest=data.manifest,
            seed=args.seed,
            p=args.p if data.reinforced else 0.0,
            densify=args.densify,
            label_smoothing=args.label_smoothing,
            fallback_recipe=data.fresh,
            shardshuffle=True,
            shuffle=1000,
        )
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=args.batch_size, num_workers=workers, persistent_workers=persistent, drop_last=True
        )
        return dataset, None, loader
    dataset = LabelledImages(data.source, data.fresh, args.seed, len(data.class_names), args.label_smoothing)
    sampler = EpochSampler(len(data.source), args.seed, rank, world)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=args.batch_size,
        sampler=sampler,
        num_workers=workers,
        persistent_workers=persistent,
        drop_last=True,
        collate_fn=_collate,
    )
    return dataset, sampler, loader


def normalization_for(recipe: Recipe | None, init: str | None, model: Any) -> tuple[tuple, tuple, str]:
    """(mean, std, whose) a run trains and evaluates with: ``recipe``, ``checkpoint`` or ``model``.

    The data's recipe's ``normalize`` where it names one, with or without ``--init``: apple/ml-dr's
    CIFAR-100+ fine-tuning config (``configs/cifar100/ft_plus.yaml``, meant for an ImageNet-pretrained
    resnet50d) normalises with CIFAR-100's mean and std, its Flowers-102+ and Food-101+ ones with
    ImageNet's, as their recipes name them. Else the one an ``--init`` checkpoint was trained with
    (``train.py --save`` records it); else the model's timm config (a pretrained ``--init timm:NAME``'s own).
    """
    if recipe is not None and recipe.normalization is not None:
        return *recipe.normalization, "recipe"
    if init is not None and not init.startswith("timm:"):
        from wds_reinforce.produce.checkpoint import checkpoint_info

        norm = checkpoint_info(init).get("normalize")
        if isinstance(norm, dict):
            return tuple(norm["mean"]), tuple(norm["std"]), "checkpoint"
    cfg = model.pretrained_cfg
    return tuple(cfg.get("mean", IMAGENET_MEAN)), tuple(cfg.get("std", IMAGENET_STD)), "model"


class Trainer:
    """A timm model (random init, or ``--init``'s weights), its optimiser and warm-up + cosine schedule, the loop.

    ``targets``, if given, replaces each batch's targets by its output on the batch's uint8
    images (the online-distillation arm: the teacher's softmax). Images are normalised as
    ``normalization_for`` says (``recipe``: the data's).
    """

    def __init__(
        self,
        args: argparse.Namespace,
        classes: int,
        device: torch.device,
        steps: int,
        distributed: bool,
        targets: Any = None,
        recipe: Recipe | None = None,
    ):
        self.args, self.device, self.steps, self.distributed = args, device, steps, distributed
        self.targets = targets
        init = getattr(args, "init", None)
        model = initial_model(init, args.model, classes).to(device)
        if device.type == "cuda":
            model = model.to(memory_format=torch.channels_last)
        self.mean, self.std, self.normalized_by = normalization_for(recipe, init, model)
        self.model = model
        self.train_model = torch.nn.parallel.DistributedDataParallel(model) if distributed else model
        if args.opt == "sgd":
            self.opt = torch.optim.SGD(
                model.parameters(), lr=args.lr, momentum=0.9, weight_decay=args.weight_decay, nesterov=True
            )
        else:
            self.opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
        total = args.epochs * steps
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda step: lr_factor(step, total, args.warmup))
        self.step = 0
        # Lines within an epoch (rank 0 only), so that a slow run and a stalled one look different.
        quiet = distributed and dist.get_rank() != 0
        every = getattr(args, "progress_every", 30.0)
        self.progress = StepProgress(args.epochs, steps, say=(lambda line: None) if quiet else None, every=every)

    def epoch(self, epoch: int, loader: torch.utils.data.DataLoader) -> list[float]:
        """One epoch of at most ``steps`` steps; the losses."""
        self.train_model.train()
        losses = []
        self.progress.start(epoch)
        # Under DDP a rank whose shards run out first must not leave the others waiting in an
        # all-reduce: join() shadows its missing steps.
        with self.train_model.join() if self.distributed else contextlib.nullcontext():
            for batch in loader:
                if batch is None:
                    continue  # every image of the batch unreadable (each said so)
                images, target = batch
                if self.step >= (epoch + 1) * self.steps:
                    break  # at most the same iterations per epoch on every rank
                if self.targets is not None:
                    target = self.targets(images)
                x = normalize(images.to(self.device, non_blocking=True), self.mean, self.std)
                loss = soft_cross_entropy(self.train_model(x), target.to(self.device, non_blocking=True))
                self.opt.zero_grad(set_to_none=True)
                loss.backward()
                self.opt.step()
                self.sched.step()
                losses.append(loss.item())
                self.step += 1
                self.progress.step()
        return losses

    def evaluate(self, val: tuple[torch.Tensor, torch.Tensor] | None) -> dict[str, Any] | None:
        return evaluate(self.model, *val, self.mean, self.std, self.device) if val is not None else None

    @property
    def lr(self) -> float:
        return float(self.opt.param_groups[0]["lr"])


def start_distributed(device: torch.device) -> tuple[bool, int, int]:
    """(distributed, rank, world) under torchrun (``WORLD_SIZE``), with the process group started."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        if device.type == "cuda":
            torch.cuda.set_device(device)
    return world > 1, dist.get_rank() if world > 1 else 0, world


def timed(fn: Any) -> tuple[Any, float]:
    """``fn()`` and the seconds it took."""
    began = time.perf_counter()
    return fn(), time.perf_counter() - began
