"""Readers of source datasets for the producer: ImageFolder trees, webdataset shards, torchvision sets.

A source is a random-access, deterministically ordered list of samples
``SourceSample(key, data, label, ext)``: ``data`` is the encoded image exactly as stored
(never re-encoded; only CIFAR's raw arrays are stored losslessly as PNG). Because sample i is
the same on every machine, output shard j is a pure function of the source's j-th slice.

Sources are chosen by a spec string (see ``open_source``): a directory (ImageFolder layout),
a tar path or brace pattern (webdataset shards), or ``NAME:ROOT`` for a registered source.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from wds_reinforce.core.errors import DataError, UsageError
from wds_reinforce.core.registry import Registry
from wds_reinforce.io.shards import (
    IMAGE_EXTS,
    LABEL_EXTS,
    Span,
    image_ext,
    image_member,
    local_shards,
    members_of,
    sample_label,
    samples,
    sanitize_key,
    unique_keys,
)
from wds_reinforce.produce.datasets import open_dataset

__all__ = [
    "SOURCES",
    "sample_order",
    "SourceSample",
    "SourceSampleError",
    "unique_keys",
    "Source",
    "ImageFolderSource",
    "WebDatasetSource",
    "TorchvisionSource",
    "open_source",
    "sanitize_key",
]

# ustar names hold 100 bytes; a key plus ".dr.mp" must fit, with room to spare.


@dataclass(frozen=True)
class SourceSample:
    """One source input: a dot-free unique ``key``, the encoded image bytes, the label, the extension."""

    key: str
    data: bytes
    label: int
    ext: str


class SourceSampleError(DataError):
    """A listed sample whose image cannot be had (e.g. a webdataset sample with no image member).

    Carries the sample's ``key`` and a ``reason`` so the producer can list it as skipped
    rather than drop it silently or stop the run.
    """

    def __init__(self, key: str, reason: str, where: str = ""):
        super().__init__(f"{reason} (sample {key!r}{f' in {where}' if where else ''})")
        self.key, self.url = key, where or None
        self.reason = reason


class Source:
    """A deterministically ordered, random-access list of ``SourceSample``.

    Subclasses implement ``__len__`` and ``__getitem__`` and set ``class_names`` and ``spec``.
    Instances are pickled into DataLoader workers only by fork (no pickle of data on disk).
    """

    spec: str = ""
    class_names: list[str]

    def __len__(self) -> int:
        raise NotImplementedError

    def __getitem__(self, index: int) -> SourceSample:
        """Sample ``index``; raises ``SourceSampleError`` (or ``OSError``) for one whose image cannot be read."""
        raise NotImplementedError

    def key(self, index: int) -> str:
        """Sample ``index``'s key from the listing, without reading its image."""
        return self._keys[index] if hasattr(self, "_keys") else self[index].key

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def slice(self, start: int, stop: int) -> Iterator[SourceSample]:
        """Samples ``start`` .. ``stop - 1`` in order."""
        for i in range(start, min(stop, len(self))):
            yield self[i]

    def index_digest(self) -> str:
        """16 hex digits over the ordered keys and labels: changes when the listing changes.

        Subclasses that keep ``_keys`` and ``_labels`` get this without reading any image.
        """
        h = hashlib.sha256()
        for i in range(len(self)):
            key, label = (self._keys[i], self._labels[i]) if hasattr(self, "_keys") else (self[i].key, self[i].label)
            h.update(f"{key}\t{label}\n".encode())
        return h.hexdigest()[:16]


SOURCES: Registry[Callable[[str], Source]] = Registry("source")


_ORDER_TAG = 0x5348554646  # "SHUFF": the shard order's stream, apart from the augmentation seeds


def sample_order(n: int, seed: int, shuffle: bool = True) -> np.ndarray:
    """The order in which a job writes a source's ``n`` samples into shards: seeded, or as listed."""
    return np.random.default_rng([seed, _ORDER_TAG]).permutation(n) if shuffle else np.arange(n)


# ----------------------------------------------------------------------------------------
# ImageFolder


class ImageFolderSource(Source):
    """``ROOT/<class>/**/<image>.{jpg,jpeg,png,webp}``; classes are the sorted folder names.

    Keys are ``<class>_<path below the class folder without extension>``, sanitised.
    """

    def __init__(self, root: str | os.PathLike):
        root = Path(root)
        if not root.is_dir():
            raise ValueError(f"expected an ImageFolder directory, got {str(root)!r} (not a directory)")
        self.spec = str(root)
        self.class_names = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        files: list[tuple[str, int]] = []
        for label, name in enumerate(self.class_names):
            found = []
            for dirpath, dirnames, filenames in os.walk(root / name):
                dirnames.sort()
                for fname in filenames:
                    if fname.rsplit(".", 1)[-1].lower() in IMAGE_EXTS and not fname.startswith("."):
                        found.append(os.path.relpath(os.path.join(dirpath, fname), root))
            files.extend((rel, label) for rel in sorted(found))
        self._files = [f for f, _ in files]
        self._labels = [lab for _, lab in files]
        self._keys = unique_keys([os.path.splitext(f)[0].replace(os.sep, "_") for f in self._files])
        self._root = root

    def __len__(self) -> int:
        return len(self._files)

    def __getitem__(self, index: int) -> SourceSample:
        rel = self._files[index]
        data = (self._root / rel).read_bytes()
        return SourceSample(self._keys[index], data, self._labels[index], image_ext(rel))


# ----------------------------------------------------------------------------------------
# webdataset shards


class WebDatasetSource(Source):
    """Existing webdataset tar shards (a path, brace pattern or glob), read in order.

    The image is the sample's ``jpg``/``jpeg``/``png``/``webp`` member; the label its ``cls``
    member, else ``json["label"]``, an integer >= 0 (``io.shards.sample_label``). Shards are
    plain (uncompressed) tars: images are read in place when used. A sample without an image member stays in the listing
    (never silently dropped): reading it raises ``SourceSampleError`` and the producer lists it as
    skipped. Keys are the shards' keys (sanitised, made unique). Class
    names come from ``_info.json`` / ``manifest.json`` (``class_names``) beside the first shard
    when present, else ``0 .. max label``. Only member offsets are kept in memory.
    """

    def __init__(self, pattern: str):
        self.spec = pattern
        paths = local_shards(pattern)
        missing = [p for p in paths if not os.path.isfile(p)]
        if not paths or missing:
            raise ValueError(
                f"expected existing webdataset shard(s), got {pattern!r} (missing: {missing[:3] or [pattern]})"
            )
        self._paths = paths
        entries: list[tuple[int, int, int, str, str]] = []  # (shard, offset, size, ext, raw key)
        labels: list[int] = []
        self._no_image: dict[int, str] = {}  # index -> reason, for samples without an image member
        for si, path in enumerate(paths):
            try:
                for sample in self._scan(path):
                    raw_key, image = sample["__key__"], image_member(sample)
                    if image is None:
                        self._no_image[len(entries)] = (
                            f"no image member ({'/'.join(IMAGE_EXTS)}); members: {members_of(sample)}"
                        )
                        try:
                            label = self._label(path, sample)
                        except ValueError:
                            label = -1  # never written: the sample is skipped
                        entries.append((si, -1, 0, "", raw_key))
                    else:
                        label = self._label(path, sample)
                        entries.append((si, image[1].offset, image[1].size, image_ext(image[0]), raw_key))
                    labels.append(label)
            except (tarfile.TarError, OSError) as exc:
                raise ValueError(f"expected webdataset .tar shards, got {path}: {type(exc).__name__}: {exc}") from None
        if entries and len(self._no_image) == len(entries):
            raise ValueError(
                f"expected webdataset samples with an image member ({'/'.join(IMAGE_EXTS)}), got none in {pattern!r} "
                f"({len(entries)} samples; first: {self._no_image[0]})"
            )
        self._entries = entries
        self._labels = labels
        self._keys = unique_keys([e[4] for e in entries])
        self.class_names = self._class_names(paths[0], labels)

    @staticmethod
    def _scan(path: str) -> Iterator[dict]:
        """Each sample's label members (``cls``, ``json``) and where its other members lie (``Span``)."""
        with open(path, "rb") as f:
            yield from samples(f, path, read=LABEL_EXTS.__contains__)

    def _read(self, shard: int, offset: int, size: int) -> bytes:
        return Span(offset, size).read(self._paths[shard])

    @staticmethod
    def _label(path: str, sample: dict) -> int:
        try:
            return sample_label(sample)
        except ValueError as exc:
            raise ValueError(
                f"expected an integer label for every sample in {path}, got sample {sample['__key__']!r}: {exc}"
            ) from None

    @staticmethod
    def _class_names(first: str, labels: list[int]) -> list[str]:
        folder = os.path.dirname(first)
        for name in ("manifest.json", "_info.json"):
            path = os.path.join(folder, name)
            if os.path.isfile(path):
                with open(path) as f:
                    meta = json.load(f)
                names = meta.get("class_names") if isinstance(meta, dict) else None
                if isinstance(names, list) and names:
                    return [str(n) for n in names]
                if isinstance(meta, dict) and isinstance(meta.get("num_classes"), int):
                    return [str(i) for i in range(meta["num_classes"])]
        return [str(i) for i in range(max(labels) + 1)] if labels else []

    def __len__(self) -> int:
        return len(self._entries)

    def __getitem__(self, index: int) -> SourceSample:
        shard, offset, size, ext, _ = self._entries[index]
        if index in self._no_image:
            raise SourceSampleError(self._keys[index], self._no_image[index], self._paths[shard])
        return SourceSample(self._keys[index], self._read(shard, offset, size), self._labels[index], ext)


# ----------------------------------------------------------------------------------------
# torchvision datasets (download=False: the files must already be there)


class TorchvisionSource(Source):
    """A torchvision dataset's train split already on disk (``cifar100``, ``flowers102``, ``food101``).

    Read in torchvision's order from the dataset's own files by ``datasets`` (the ml-dr
    importer's image source too, so both halves see item i alike): CIFAR's pickled batches through the
    restricted unpickler (numeric arrays and plain values only), never torchvision's pickle.
    CIFAR's images are arrays: they are stored losslessly as PNG. Nothing is downloaded.
    """

    def __init__(self, name: str, root: str):
        try:
            self._images = open_dataset(name, root)
        except (DataError, UsageError) as exc:  # a missing or malformed file, named
            raise ValueError(f"cannot open {name} at {root!r}: {exc}") from None
        self.spec = self._images.spec
        self._keys, self._labels = self._images.keys, self._images.labels
        self.class_names = list(self._images.class_names)

    def __len__(self) -> int:
        return len(self._labels)

    def __getitem__(self, index: int) -> SourceSample:
        data = self._images.read(index)
        return SourceSample(self._keys[index], data, self._labels[index], self._images.exts[index])


for _name in ("cifar100", "flowers102", "food101"):
    SOURCES.register(_name, lambda root, _n=_name: TorchvisionSource(_n, root))
SOURCES.register("imagefolder", ImageFolderSource)
SOURCES.register("wds", WebDatasetSource)


def open_source(spec: str | Source) -> Source:
    """The source a spec names.

    ``NAME:ARG`` picks a registered source (``imagefolder:DIR``, ``wds:PATTERN``,
    ``cifar100:ROOT``, ``flowers102:ROOT``, ``food101:ROOT``); otherwise a directory is an
    ImageFolder and a ``.tar`` path or pattern is a set of webdataset shards.

    Raises:
        ValueError: an unknown source name, a missing path, or a source with no samples.
    """
    if isinstance(spec, Source):
        source = spec
    else:
        if not isinstance(spec, str) or not spec:
            raise ValueError(f"expected a source spec string, got {spec!r}")
        name, sep, arg = spec.partition(":")
        if sep and name in SOURCES:
            source = SOURCES.get(name)(arg)
        elif sep and re.fullmatch(r"[a-z0-9_]+", name) and len(name) > 1 and not os.path.exists(spec):
            SOURCES.get(name)  # raises, listing the valid names
            raise AssertionError("unreachable")
        elif os.path.isdir(spec):
            source = ImageFolderSource(spec)
        elif ".tar" in spec:
            source = WebDatasetSource(spec)
        else:
            raise ValueError(f"expected a source directory, .tar shard pattern or NAME:ROOT, got {spec!r} (not found)")
    if len(source) == 0:
        raise ValueError(f"expected a source with samples, got an empty source {source.spec!r}")
    return source
