"""torchvision's CIFAR-100, Flowers-102 and Food-101 train splits on disk, indexed as torchvision indexes them.

apple/ml-dr reinforced these through ``torchvision.datasets`` (``CIFAR100(train=True)``,
``Flowers102(split="train")``, ``Food101(split="train")``): their file i is item i of that
dataset. These indexes read the same files in the same order without torchvision's classes
(which check md5 sums and, for CIFAR, unpickle with pickle): CIFAR's batches through the
restricted unpickler (numeric arrays and plain values only), Flowers' ``.mat`` files through
``matfile``, Food's ``meta/train.json`` as JSON. Nothing is ever downloaded. CIFAR's images are
arrays: they are encoded as PNG (lossless; fixed settings, so the same bytes every run). The
producer's ``cifar100:ROOT``-style sources (``sources.TorchvisionSource``) and the ml-dr importer
(``importers.datasets``) both read through these, so item i is the same image in both.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from wds_reinforce.core.errors import MetadataError, UsageError
from wds_reinforce.io.matfile import read_mat
from wds_reinforce.io.pickles import load_arrays
from wds_reinforce.io.shards import image_ext, unique_keys

__all__ = ["DATASETS", "DatasetFiles", "open_dataset"]

DATASETS = ("cifar100", "flowers102", "food101")


def _missing(name: str, root: Path, files: list[str]) -> UsageError:
    want = ", ".join(str(root / f) for f in files)
    return UsageError(f"expected torchvision's {name} train split in {root} ({want}); nothing is downloaded")


class DatasetFiles:
    """A torchvision dataset's train split: image i is the dataset's item i.

    ``keys``, ``labels``, ``exts`` and ``class_names`` per image; ``read(i)`` its encoded bytes.
    """

    name: str
    keys: list[str]
    labels: list[int]
    exts: list[str]
    class_names: list[str]

    def __init__(self, root: str | os.PathLike):
        self._root = Path(root)
        self.spec = f"{self.name}:{root}"
        self.rule = (
            f"index = position in torchvision.datasets.{self._TV}'s train split ({self._ORDER}); read from the "
            "dataset's own files, never downloaded"
        )
        self._files: list[Path] = []
        self._load()
        if not self.labels:
            raise UsageError(f"expected images in {self.spec}, got none")

    _TV = ""
    _ORDER = ""

    def _load(self) -> None:
        raise NotImplementedError

    def where(self, i: int) -> str:
        return str(self._files[i])

    def read(self, i: int, limit: int | None = None) -> bytes:
        with open(self._files[i], "rb") as f:
            return f.read(-1 if limit is None else limit)

    def __len__(self) -> int:
        return len(self.keys)

    def size(self, i: int) -> tuple[int, int] | None:
        """(height, width) of image ``i`` when known without reading it (CIFAR's 32 x 32), else None."""
        return None


class CifarFiles(DatasetFiles):
    """``ROOT/cifar-100-python/{train,meta}``: Python pickles of a uint8 (N, 3072) array and label lists."""

    name, _TV, _ORDER = "cifar100", "CIFAR100(train=True)", "the rows of cifar-100-python/train"

    def _load(self) -> None:
        base = self._root / "cifar-100-python"
        if not (base / "train").is_file() or not (base / "meta").is_file():
            raise _missing("CIFAR100", self._root, ["cifar-100-python/train", "cifar-100-python/meta"])
        train = self._pickle(base / "train")
        meta = self._pickle(base / "meta")
        data, labels, names = train.get("data"), train.get("fine_labels"), meta.get("fine_label_names")
        if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
            raise MetadataError("expected 'data' a uint8 array of 3072 values per image", url=str(base / "train"))
        if type(labels) is not list or len(labels) != len(data) or set(map(type, labels)) - {int}:
            raise MetadataError(f"expected 'fine_labels' {len(data)} integers", url=str(base / "train"))
        if type(names) is not list or set(map(type, names)) - {str}:
            raise MetadataError("expected 'fine_label_names' a list of names", url=str(base / "meta"))
        self._arrays = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # HWC, as torchvision's data
        self.labels = [int(v) for v in labels]
        self.class_names = list(names)
        self.keys = [f"train_{i:05d}" for i in range(len(self.labels))]
        self.exts = ["png"] * len(self.labels)
        self._where = base / "train"

    @staticmethod
    def _pickle(path: Path) -> dict[str, Any]:
        obj = load_arrays(path.read_bytes(), str(path), encoding="latin1")  # Python 2 pickles: str is latin-1
        if type(obj) is not dict:
            raise MetadataError(f"expected a dict, got {type(obj).__name__}", url=str(path))
        return obj

    def where(self, i: int) -> str:
        return f"{self._where}[{i}]"

    def read(self, i: int, limit: int | None = None) -> bytes:
        from PIL import Image

        buf = io.BytesIO()
        # compress_level fixed: the PNG bytes (and so the shards) must not vary between runs.
        Image.fromarray(np.ascontiguousarray(self._arrays[i])).save(buf, "PNG", compress_level=6)
        data = buf.getvalue()
        return data if limit is None else data[:limit]

    def size(self, i: int) -> tuple[int, int]:
        return 32, 32


_FLOWERS = 102  # Flowers-102's classes


class FlowersFiles(DatasetFiles):
    """``ROOT/flowers-102/{jpg/image_NNNNN.jpg, imagelabels.mat, setid.mat}``: the ``trnid`` order."""

    name, _TV, _ORDER = "flowers102", 'Flowers102(split="train")', "the image ids in setid.mat's trnid, in order"

    def _load(self) -> None:
        base = self._root / "flowers-102"
        wanted = ["flowers-102/jpg/", "flowers-102/imagelabels.mat", "flowers-102/setid.mat"]
        if (
            not (base / "jpg").is_dir()
            or not (base / "imagelabels.mat").is_file()
            or not (base / "setid.mat").is_file()
        ):
            raise _missing("Flowers102", self._root, wanted)
        ids = read_mat(base / "setid.mat").get("trnid")
        labels = read_mat(base / "imagelabels.mat").get("labels")
        if ids is None or labels is None:
            raise MetadataError("expected 'trnid' in setid.mat and 'labels' in imagelabels.mat", url=str(base))
        ids, labels = ids.ravel(), labels.ravel()
        if ids.size and (ids.min() < 1 or ids.max() > labels.size or (ids != ids.round()).any()):
            raise MetadataError(f"an image id in trnid outside 1..{labels.size}", url=str(base / "setid.mat"))
        picked = labels[ids.astype(np.int64) - 1]
        if picked.size and (picked.min() < 1 or picked.max() > _FLOWERS or (picked != picked.round()).any()):
            # their labels count from 1: a 0 would become class -1
            raise MetadataError(f"a train image's label outside 1..{_FLOWERS}", url=str(base / "imagelabels.mat"))
        self._files = [base / "jpg" / f"image_{int(i):05d}.jpg" for i in ids]
        self.labels = [int(v) - 1 for v in picked]
        try:
            from torchvision.datasets import Flowers102

            classes = list(getattr(Flowers102, "classes", []))
        except ImportError:  # pragma: no cover - torchvision is a dependency
            classes = []
        self.class_names = classes if len(classes) == _FLOWERS else [str(c) for c in range(_FLOWERS)]
        self.keys = unique_keys([p.stem for p in self._files])
        self.exts = ["jpg"] * len(self._files)


class FoodFiles(DatasetFiles):
    """``ROOT/food-101/{images/CLASS/ID.jpg, meta/train.json}``: the JSON's order, classes sorted."""

    name, _TV, _ORDER = "food101", 'Food101(split="train")', "meta/train.json's classes and files as listed"

    def _load(self) -> None:
        base = self._root / "food-101"
        if not (base / "images").is_dir() or not (base / "meta" / "train.json").is_file():
            raise _missing("Food101", self._root, ["food-101/images/", "food-101/meta/train.json"])
        try:
            meta = json.loads((base / "meta" / "train.json").read_text())
        except (OSError, ValueError) as exc:
            raise MetadataError(f"not readable JSON ({exc})", url=str(base / "meta" / "train.json")) from None
        if not isinstance(meta, dict) or not all(isinstance(v, list) for v in meta.values()):
            raise MetadataError("expected {class: [CLASS/ID, ...]}", url=str(base / "meta" / "train.json"))
        self.class_names = sorted(meta)
        index = {c: i for i, c in enumerate(self.class_names)}
        self.labels, raw = [], []
        for cls, items in meta.items():  # torchvision keeps the file's order
            for rel in items:
                self._files.append(base / "images" / Path(*f"{rel}.jpg".split("/")))
                self.labels.append(index[cls])
                raw.append(f"{cls}_{Path(rel).name}")
        self.keys = unique_keys(raw)
        self.exts = [image_ext(p.name) for p in self._files]


_CLASSES = {"cifar100": CifarFiles, "flowers102": FlowersFiles, "food101": FoodFiles}


def open_dataset(name: str, root: str) -> DatasetFiles:
    """The train split of torchvision dataset ``name`` (one of ``DATASETS``) at ``root``."""
    if name not in _CLASSES:
        raise UsageError(f"expected a dataset name of {list(DATASETS)}, got {name!r}")
    if not os.path.isdir(root):
        raise UsageError(f"expected the {name} root directory, got {root!r} (not a directory)")
    return _CLASSES[name](root)
