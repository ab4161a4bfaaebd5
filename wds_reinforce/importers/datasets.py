"""torchvision's CIFAR-100, Flowers-102 and Food-101 train splits as an importer's image index.

The files are read by ``produce.datasets`` (the producer's sources read them the same way); this
adds what an import needs: the index rule its manifest records and the output shards' order.
"""

from __future__ import annotations

from wds_reinforce.importers.images import ImageIndex
from wds_reinforce.produce import datasets
from wds_reinforce.produce.datasets import DATASETS, DatasetFiles
from wds_reinforce.produce.sources import sample_order

__all__ = ["DATASETS", "DatasetImages", "open_dataset"]


class DatasetImages(ImageIndex):
    """A torchvision dataset's train split: image ``i`` is the dataset's item ``i``, as their records index it."""

    def __init__(self, files: DatasetFiles):
        self.files = files
        self.name, self.spec = files.name, files.spec
        self.rule = files.rule
        self.keys, self.labels, self.exts, self.class_names = files.keys, files.labels, files.exts, files.class_names

    def where(self, i: int) -> str:
        return self.files.where(i)

    def read(self, i: int, limit: int | None = None) -> bytes:
        return self.files.read(i, limit)

    def size(self, i: int) -> tuple[int, int]:
        return self.files.size(i) or super().size(i)

    def shards(self, shard_size: int, seed: int, shuffle: bool) -> list[list[int]]:
        order = sample_order(len(self), seed, shuffle)
        return [order[s : s + shard_size].tolist() for s in range(0, len(self), shard_size)]


def open_dataset(name: str, root: str) -> DatasetImages:
    """The train split of torchvision dataset ``name`` (one of ``DATASETS``) at ``root``, as an image index."""
    return DatasetImages(datasets.open_dataset(name, root))
