"""The images another project's reinforcement records describe, indexed the way its records are.

Records name each image by its position in some order of the train split. ``FolderImages`` lists
a folder with torchvision's own ``find_classes`` and ``make_dataset`` (so the order is
torchvision's ``ImageFolder`` order by construction); ``ShardImages`` recovers the order from
plain webdataset shards by a stated rule; ``datasets`` indexes torchvision's CIFAR-100,
Flowers-102 and Food-101 as torchvision does. Each says how output shards are cut from it.
"""

from __future__ import annotations

import hashlib
import os
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path

from wds_reinforce.core.decode import SourceImage
from wds_reinforce.core.errors import DataError, UsageError
from wds_reinforce.core.format import crc32c
from wds_reinforce.importers import IndexMismatchError
from wds_reinforce.io.shards import (
    IMAGE_EXTS,
    LABEL_EXTS,
    HashingReader,
    Span,
    image_bytes,
    image_ext,
    image_member,
    local_shards,
    sample_label,
    samples,
)
from wds_reinforce.produce.sources import sample_order, unique_keys

__all__ = ["IMAGEFOLDER_RULE", "ImageIndex", "FolderImages", "ShardImages", "open_images"]

IMAGEFOLDER_RULE = (
    "index = position in torchvision.datasets.ImageFolder order of the train split: class folders sorted by "
    "name (label = position), then within a class the sorted os.walk directories and, in each, the sorted file "
    "names with an extension in torchvision's IMG_EXTENSIONS"
)
_HEAD = 1 << 16  # bytes read for an image's header (the whole file if that is not enough)


def _image_size(read: Callable[[int | None], bytes]) -> tuple[int, int]:
    head = read(_HEAD)
    try:
        return SourceImage(head).size
    except DataError:
        if len(head) < _HEAD:
            raise
        return SourceImage(read(None)).size


# ----------------------------------------------------------------------------------------
# The images, indexed the way their records are


class ImageIndex:
    """The train split, indexed as an importer's records are: image ``i`` is the record of index ``i``.

    Subclasses fill ``keys``, ``labels``, ``exts``, ``class_names``, ``spec``, ``rule`` and
    implement ``read`` and ``shards``.
    """

    spec: str
    rule: str
    keys: list[str]
    labels: list[int]
    exts: list[str]
    class_names: list[str]

    def __len__(self) -> int:
        return len(self.keys)

    def where(self, i: int) -> str:
        """Image ``i`` for messages (a file path or shard and key)."""
        raise NotImplementedError

    def read(self, i: int, limit: int | None = None) -> bytes:
        """The encoded bytes of image ``i`` (at most ``limit`` of them)."""
        raise NotImplementedError

    def size(self, i: int) -> tuple[int, int]:
        """(height, width) of image ``i`` from its header."""
        return _image_size(lambda limit: self.read(i, limit))

    def shards(self, shard_size: int, seed: int, shuffle: bool) -> list[list[int]]:
        """The output shards: image indices of each, in shard order."""
        raise NotImplementedError

    def digest(self) -> str:
        h = hashlib.sha256(self.rule.encode())
        for key, label in zip(self.keys, self.labels):
            h.update(f"{key}\t{label}\n".encode())
        return h.hexdigest()[:16]


class FolderImages(ImageIndex):
    """An ImageFolder train split, listed by torchvision's own ``find_classes`` and ``make_dataset``.

    Keys are ``<class>_<path below the class folder without extension>``, sanitised, as the
    producer's ``sources.ImageFolderSource`` makes them.
    """

    def __init__(self, root: str | os.PathLike):
        from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

        root = Path(root)
        if not root.is_dir():
            raise UsageError(
                f"expected the train split as an ImageFolder directory, got {str(root)!r} (not a directory)"
            )
        try:
            classes, class_to_idx = find_classes(str(root))
            samples = make_dataset(str(root), class_to_idx, extensions=IMG_EXTENSIONS)
        except (FileNotFoundError, OSError) as exc:
            raise UsageError(f"expected an ImageFolder train split in {str(root)!r}: {exc}") from None
        self.spec, self.rule, self._root = str(root), IMAGEFOLDER_RULE, root
        self.class_names = list(classes)
        self._files = [os.path.relpath(path, root) for path, _ in samples]
        self.labels = [int(label) for _, label in samples]
        self.exts = [image_ext(f) for f in self._files]
        unreadable = [f for f, e in zip(self._files, self.exts) if e not in IMAGE_EXTS]
        if unreadable:
            raise UsageError(
                f"{len(unreadable)} image(s) in {self.spec} have an extension the loader does not read "
                f"({'/'.join(IMAGE_EXTS)}), e.g. {unreadable[:3]}"
            )
        self.keys = unique_keys([os.path.splitext(f)[0].replace(os.sep, "_") for f in self._files])

    def where(self, i: int) -> str:
        return str(self._root / self._files[i])

    def read(self, i: int, limit: int | None = None) -> bytes:
        with open(self._root / self._files[i], "rb") as f:
            return f.read(-1 if limit is None else limit)

    def shards(self, shard_size: int, seed: int, shuffle: bool) -> list[list[int]]:
        n = len(self)
        order = sample_order(n, seed, shuffle)  # the producer's: the same seed gives the same shards
        return [order[s : s + shard_size].tolist() for s in range(0, n, shard_size)]


class ShardImages(ImageIndex):
    """The train split as plain webdataset shards (local ``.tar`` paths, a brace pattern or glob).

    Output shard j holds input shard j's samples in their order (so a sidecar set can sit beside
    the input). Keys are sanitised as the producer's (for self-contained output, which copies the
    images), or with ``keep_keys`` exactly the input's keys, as a loader reading the input shards
    sees them (for a sidecar set, whose keys must match the image shards'). Their index of a
    sample comes from ``rule``:

    - ``imagefolder``: samples sorted by (label, key + "." + image extension), which is
      torchvision's ImageFolder order when labels number the sorted class folders and keys are the
      file names or class/file paths without extension (ImageNet shards keyed by file name);
    - ``key``: the key is the index itself (``"%07d" % index``, as webdataset's ImageNet example writes).
    """

    def __init__(self, pattern: str, rule: str = "imagefolder", keep_keys: bool = False):
        if rule not in ("imagefolder", "key"):
            raise UsageError(f"expected index rule 'imagefolder' or 'key', got {rule!r}")
        paths = local_shards(pattern)
        missing = [p for p in paths if not os.path.isfile(p)]
        if not paths or missing:
            raise UsageError(
                f"expected local webdataset .tar shards, got {pattern!r} (missing: {missing[:3] or [pattern]})"
            )
        self.spec, self.paths = pattern, paths
        entries: list[tuple[int, str, str, int, int, int]] = []  # (shard, raw key, ext, offset, size, label)
        for si, path in enumerate(paths):
            entries.extend((si, *e) for e in self._scan(path))
        if not entries:
            raise UsageError(f"expected samples in {pattern!r}, got none")
        raw_keys = [e[1] for e in entries]
        if rule == "key":
            self.rule = "index = the sample key (a decimal number), as webdataset's ImageNet example writes keys"
            bad = [k for k in raw_keys if not k.isdigit()]
            if bad:
                raise UsageError(f"index rule 'key' needs decimal keys, got e.g. {bad[:3]}")
            order = [int(k) for k in raw_keys]
            if sorted(order) != list(range(len(order))):
                seen = set(order)
                missing_i = next((i for i in range(len(order)) if i not in seen), None)
                raise IndexMismatchError(
                    f"the keys of {pattern!r} are not the indices 0..{len(order) - 1}"
                    + (f" (no key {missing_i})" if missing_i is not None else " (duplicates)")
                )
            position = order  # sample s has index position[s]
        else:
            self.rule = (
                "index = position when samples are sorted by (label, key + '.' + image extension): torchvision "
                "ImageFolder order when labels number the sorted class folders and keys are file names"
            )
            ranked = sorted(range(len(entries)), key=lambda s: (entries[s][5], f"{entries[s][1]}.{entries[s][2]}"))
            position = [0] * len(entries)
            for i, s in enumerate(ranked):
                position[s] = i
        by_index = [0] * len(entries)
        for s, i in enumerate(position):
            by_index[i] = s
        keys = raw_keys if keep_keys else unique_keys(raw_keys)
        self._entries = [entries[s] for s in by_index]
        self._shard_of_sample = [e[0] for e in entries]
        self._position = position
        self.keys = [keys[s] for s in by_index]
        self.exts = [e[2] for e in self._entries]
        self.labels = [e[5] for e in self._entries]
        self.class_names = [str(c) for c in range(max(self.labels) + 1)]

    @staticmethod
    def _scan(path: str) -> Iterator[tuple[str, str, int, int, int]]:
        """(raw key, image ext, data offset, size, label) per sample, grouped as the loader groups them."""
        try:
            with open(path, "rb") as f:
                for sample in samples(f, path, read=LABEL_EXTS.__contains__):
                    key, image = sample["__key__"], image_member(sample)
                    if image is None or not isinstance(image[1], Span):
                        raise UsageError(f"sample {key!r} in {path} has no image member ({'/'.join(IMAGE_EXTS)})")
                    try:
                        label = sample_label(sample)
                    except ValueError as exc:
                        raise UsageError(f"sample {key!r} in {path} has no integer label: {exc}") from None
                    yield key, image_ext(image[0]), image[1].offset, image[1].size, label
        except (tarfile.TarError, OSError, ValueError) as exc:
            if isinstance(exc, UsageError):
                raise
            raise UsageError(f"expected webdataset .tar shards, got {path}: {type(exc).__name__}: {exc}") from None

    def where(self, i: int) -> str:
        e = self._entries[i]
        return f"{self.paths[e[0]]}:{e[1]}.{e[2]}"

    def read(self, i: int, limit: int | None = None) -> bytes:
        shard, _, _, offset, size, _ = self._entries[i]
        return _read_at(self.paths[shard], offset, size if limit is None else min(size, limit))

    def shards(self, shard_size: int, seed: int, shuffle: bool) -> list[list[int]]:
        return [s for s in self.input_shards() if s]

    def input_shards(self) -> list[list[int]]:
        """Each input shard's image indices in its order, one list per path (empty for an empty shard)."""
        out: list[list[int]] = [[] for _ in self.paths]
        for s, shard in enumerate(self._shard_of_sample):
            out[shard].append(self._position[s])
        return out

    def read_shard(self, s: int) -> tuple[dict[int, tuple[int, int]], int, str]:
        """Input shard ``s`` read once, front to back: (CRC-32C of each image and of its ``cls`` member
        by index, bytes, sha256)."""
        with open(self.paths[s], "rb") as f:
            reader = HashingReader(f)
            crcs = {
                i: (crc32c(image_bytes(sample)), crc32c(sample.get("cls") or b""))
                for i, sample in zip(self.input_shards()[s], samples(reader))
            }
            reader.drain()
        return crcs, reader.count, reader.hexdigest()


def _read_at(path: str, offset: int, size: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(size)


def open_images(spec: str | os.PathLike, rule: str = "imagefolder", keep_keys: bool = False) -> ImageIndex:
    """The train split: an ImageFolder directory, webdataset shards (``.tar`` path, pattern or glob;
    ``keep_keys``: their keys as they are, see ``ShardImages``). torchvision's datasets are
    ``importers.datasets``."""
    text = str(spec)
    if os.path.isdir(text):
        if rule != "imagefolder":
            raise UsageError(f"index rule {rule!r} is for webdataset shards; an ImageFolder uses 'imagefolder'")
        return FolderImages(text)
    if ".tar" in text:
        return ShardImages(text, rule, keep_keys)
    raise UsageError(f"expected the train split as an ImageFolder directory or .tar shards, got {text!r} (not found)")
