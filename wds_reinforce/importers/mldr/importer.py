"""Import apple/ml-dr's released reinforcements: the importer behind tools/import_mldr.py.

The paper's authors released ImageNet+ (and CIFAR-100+, Food-101+, Flowers-102+) as a ``.tar.gz``
holding one file per training image, ``{index}.pth.tar`` (``torch.save``, or ``joblib.dump``), and
``config.pth.tar``. ``index`` is the image's position in torchvision's ``ImageFolder`` order of the
train split (ImageNet) or in torchvision's dataset (the others). ``MldrImporter``
is what the shared import job (``importers.job``) needs from them: the archive as a stream
(``metadata``), which image each file is, and each file's rounds as ``Rounds`` (read without
running their pickles, ``unpickle``; mapped by ``convert``). ``import_mldr`` checks the
arguments and their config, then runs the job.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import posixpath
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from wds_reinforce.core.augment import Recipe
from wds_reinforce.core.errors import UsageError
from wds_reinforce.importers import MetadataError, Rounds
from wds_reinforce.importers.datasets import DATASETS, open_dataset
from wds_reinforce.importers.images import ImageIndex, ShardImages, open_images
from wds_reinforce.importers.job import ImportSummary, check_settings, run_import
from wds_reinforce.importers.mldr.config import MldrConfig
from wds_reinforce.importers.mldr.convert import convert_rounds
from wds_reinforce.importers.mldr.metadata import CONFIG_NAME, INDEX_NAME, MetadataSource
from wds_reinforce.importers.mldr.unpickle import check_plain, load_record

__all__ = ["MldrImporter", "import_mldr", "load_config"]


def load_config(data: bytes, name: str) -> MldrConfig:
    """Their ``config.pth.tar``'s bytes, read without running code, as a checked ``MldrConfig``."""
    obj = load_record(data, name)
    check_plain(obj, name)
    return MldrConfig.from_dict(obj, name)


@dataclasses.dataclass
class MldrImporter:
    """apple/ml-dr's metadata for the import job (``importers.Importer``).

    Attributes:
        meta: their archive or its extracted folder.
        config: their config, checked (``num_classes`` filled in where theirs does not say).
        drop_mixing: keep only rounds without a mixing partner (mixing variants).
        config_source: a config file given apart from the archive, which must equal the archive's own.
    """

    meta: MetadataSource
    config: MldrConfig
    drop_mixing: bool = False
    config_source: str = ""

    @property
    def label(self) -> str:
        return self.config.variant

    @property
    def notes(self) -> list[str]:
        return [self.config.ignored_note()] if self.config.ignored else []

    @property
    def recipe(self) -> Recipe:
        return self.config.recipe

    @property
    def topk(self) -> int:
        return self.config.topk

    @property
    def num_classes(self) -> int:
        return int(self.config.num_classes)

    @property
    def total_rounds(self) -> int:
        return self.config.num_samples

    @property
    def variable(self) -> bool:
        return self.config.mixing  # images keep the rounds without a partner: their number varies

    @property
    def bytes(self) -> int:
        return self.meta.bytes

    @property
    def sha256(self) -> str | None:
        return self.meta.sha256

    def identity(self) -> dict[str, Any]:
        return {
            "metadata": self.meta.listing_sha256 or [self.meta.path.name, self.meta.bytes],
            "config": hashlib.sha256(json.dumps(self.config.describe(), sort_keys=True).encode()).hexdigest(),
            "drop_mixing": self.drop_mixing,
        }

    # Record names are ``meta.where``'s (``ARCHIVE: MEMBER`` or the file's path), so that every
    # message naming a record says where it is.

    def listing(self) -> list[str] | None:
        return [self.meta.where(name) for name in self.meta.names()] if self.meta.is_dir else None

    def index_of(self, name: str) -> int | None:
        base = posixpath.basename(name.removeprefix(self.meta.where("")))
        if base == CONFIG_NAME:
            return None
        m = INDEX_NAME.fullmatch(base)
        if m is None:
            raise MetadataError(
                f"unexpected file in the metadata (expected INDEX.pth.tar or INDEX.jb, and {CONFIG_NAME})", url=name
            )
        return int(m.group(1))

    def record_name(self, index: int) -> str:
        return f"{index}.pth.tar in {self.meta.root if self.meta.is_dir else self.meta.path}"

    def stream(self) -> Iterator[tuple[str, Callable[[], bytes]]]:
        for name, read in self.meta.members():
            where = self.meta.where(name)
            if posixpath.basename(name) == CONFIG_NAME:
                if self.config_source and dict(load_config(read(), where).raw) != dict(self.config.raw):
                    raise UsageError(f"{self.config_source} differs from the metadata's own {where}")
                continue
            yield where, read

    def convert(self, read: Callable[[], bytes], index: int, name: str, size: tuple[int, int]) -> Rounds:
        return convert_rounds(load_record(read(), name), index, self.config, name, size, self.drop_mixing)

    def too_few(self, where: str, index: int, kept: int, keep: int) -> str:
        return f"image {where} ({self.record_name(index)}) has {kept} rounds without a mixing partner, " + (
            f"fewer than the {keep} to keep of every image (--rounds)"
            if keep >= 1
            else "and neither has any other image: nothing to import"
        )

    def teacher(self, rounds_kept: int, kept: Mapping[str, float], imported: Mapping[str, Any]) -> dict[str, Any]:
        cfg, meta = self.config, self.meta
        described = {
            "from": "apple/ml-dr",
            **cfg.describe(),
            "rounds_kept": rounds_kept,
            "mixing": (
                "dropped: the first rounds_kept rounds without a mixing partner of each image are kept; an image "
                "without any has none (images_without_rounds), and the loader gives it its original image and label"
                if cfg.mixing
                else "none"
            ),
            "non_mixing_rounds": dict(kept),
            "images_without_rounds": imported["images_without_rounds"],
            "index_rule": imported["index_rule"],
            "images": imported["images"],
            "images_copied": imported["images_copied"],
            "metadata": {
                "name": meta.path.name,
                "bytes": meta.bytes,
                "sha256": imported["sha256"],
                "listing_sha256": meta.listing_sha256,
                "sha256_of": "the archive file" if not meta.is_dir else None,
            },
            "probabilities": "their float32 top-k, sorted descending (ties by class id), rounded to fp16",
            "seed": "their parameters were drawn unseeded; the manifest's seed only orders the shards",
        }
        members = [
            {"kind": "timm", "name": t, "checkpoint": None, "weights_sha256": None, "pretrained": True}
            for t in cfg.teachers
        ]
        return {
            "members": members,
            "ensemble": "mean of softmax",
            "num_classes": self.num_classes,
            "amp": None,
            "imported": described,
        }

    def kept_note(self, rounds: int, low: int, high: int) -> str:
        if not self.config.mixing:
            return ""
        return (
            f"mixing dropped: kept the first {rounds} of each image's rounds without a mixing partner "
            f"(images had {low} to {high} such rounds of {self.config.num_samples})"
        )


def _importer(
    meta: MetadataSource, config: str | os.PathLike | None, drop_mixing: bool, progress: Any, classes: int
) -> MldrImporter:
    """The importer of their metadata: its config (the file given, or the archive's own), checked."""
    if config is not None:
        if not os.path.isfile(config):
            raise UsageError(f"expected their {CONFIG_NAME} file, got {str(config)!r} (not found)")
        data, where = Path(config).read_bytes(), str(config)
    else:
        data, where = meta.config(progress)
    try:
        cfg = load_config(data, where)
    except MetadataError as exc:
        raise UsageError(str(exc)) from None
    if cfg.mixing and not drop_mixing:
        raise UsageError(
            f"{where}: {cfg.variant} is a mixing variant: each mixed round needs a partner image from anywhere in the "
            "data set, which a stream cannot fetch; rerun with --drop-mixing to import only its rounds without a "
            "partner (about a quarter of them with MixUp and CutMix at p=0.5)"
        )
    if cfg.num_classes is None:  # their config does not say: the split's classes (ids are checked against them)
        cfg = dataclasses.replace(cfg, num_classes=classes)
    return MldrImporter(meta, cfg, drop_mixing, str(config) if config is not None else "")


def _images(spec: str | os.PathLike, rule: str, copy_images: bool) -> ImageIndex:
    """The train split: ``cifar100:ROOT`` and the like (``importers.datasets``), else ``open_images``."""
    name, sep, root = str(spec).partition(":")
    if sep and name in DATASETS and not os.path.exists(str(spec)):
        if rule != "imagefolder":
            raise UsageError(f"index rule {rule!r} is for webdataset shards; {name} is indexed as torchvision does")
        return open_dataset(name, root)
    return open_images(spec, rule, keep_keys=not copy_images)


def import_mldr(  # long: its arguments and their documentation; the body is short
    metadata: str | os.PathLike,
    images: str | os.PathLike,
    out: str | os.PathLike,
    *,
    config: str | os.PathLike | None = None,
    drop_mixing: bool = False,
    rounds: int | None = None,
    shard_size: int = 1000,
    seed: int = 0,
    shuffle: bool = True,
    index_rule: str = "imagefolder",
    split: str = "train",
    name: str = "reinforced",
    spool: str | os.PathLike | None = None,
    progress: Callable[[str], None] | None = None,
    progress_every: float = 10.0,
    copy_images: bool = False,
    group_rounds: int | None = None,
    wait_timeout: float | None = None,
) -> ImportSummary:
    """Import their metadata for the train split ``images`` into ``out``.

    An ImageFolder becomes self-contained shards (images copied in). Plain webdataset shards get
    a sidecar set in ``out`` beside them (sidecar shards aligned with the input shards, their keys,
    no image copied; the manifest lists the input shards by absolute path), or with
    ``copy_images`` self-contained shards as for a folder.

    Args:
        metadata: their ``.tar.gz`` (or ``.tar``), or its extracted folder.
        images: the train split they reinforced: an ImageFolder directory, ``cifar100:ROOT``,
            ``flowers102:ROOT`` or ``food101:ROOT`` (``importers.datasets``), or webdataset shards.
        out: output folder or ``s3://bucket/prefix``.
        config: their ``config.pth.tar`` as a file, to skip finding it in the archive.
        drop_mixing: for +M* variants, keep only rounds without a mixing partner (refused otherwise).
        rounds: keep the first ``rounds`` (kept) rounds of each image; default all of them, or with
            ``drop_mixing`` the most that every image has (single process only).
        shard_size: images per output shard (ImageFolder; shards keep the input's sharding).
        seed, shuffle: the ImageFolder's shard order (a seeded permutation, as the producer's).
        index_rule: for shards: ``imagefolder`` or ``key`` (see ``importers.images.ShardImages``).
        split, name: the manifest's split (shard names ``{split}-NNNNNN.tar``) and dataset name.
        spool: local folder for converted sidecars between reading and writing (default: in ``out``).
        progress: called with a line of progress now and then.
        copy_images: for shards: write self-contained shards (sanitised keys) instead of a sidecar set.
        group_rounds: for a sidecar set: rounds per round group (a divisor of the rounds kept;
            default all in one group, so each epoch reads one sidecar of every round).

    Raises:
        UsageError: bad arguments, config or output; ``IndexMismatchError`` when metadata and images
            disagree. Both before any output is written.
        MetadataError: a metadata file that is refused (not their plain format) or does not fit its image.
    """
    shard_size, rounds, group_rounds = check_settings(shard_size, rounds, seed, split, group_rounds)
    index = _images(images, index_rule, copy_images)
    sidecar_set = not copy_images and isinstance(index, ShardImages)
    if group_rounds is not None and not sidecar_set:
        raise UsageError("expected group_rounds only for a sidecar set (webdataset shards as images, no copy_images)")
    importer = _importer(MetadataSource(metadata), config, drop_mixing, progress, len(index.class_names))
    dataset = getattr(index, "name", None)
    if dataset is not None and importer.config.dataset not in (None, dataset):
        raise UsageError(f"their config is for {importer.config.dataset}, the images are {index.spec}")
    return run_import(
        importer,
        index,
        out,
        sidecar_set=sidecar_set,
        rounds=rounds,
        shard_size=shard_size,
        seed=seed,
        shuffle=shuffle,
        split=split,
        name=name,
        spool=spool,
        progress=progress,
        progress_every=progress_every,
        group_rounds=group_rounds,
        wait_timeout=wait_timeout,
    )
