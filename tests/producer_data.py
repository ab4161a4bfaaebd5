"""Tiny source datasets and settings shared by the producer tests."""

from __future__ import annotations

import hashlib
import io
import tarfile
from pathlib import Path

from tests.conftest import encode, photo_like

__all__ = ["CLASSES", "TEACHER", "make_image_folder", "make_wds_shard", "job_args", "cli_args", "tree_digest"]

CLASSES = ("cat", "dog", "eel")
TEACHER = "timm:test_resnet"  # 0.4 M parameters: fast on a 2-core CPU


def make_image_folder(root: Path, per_class: int = 4, corrupt: bool = True, seed: int = 0) -> Path:
    """ImageFolder of small photo-like JPEGs (and one PNG); plus one undecodable file in 'dog'."""
    for ci, cls in enumerate(CLASSES):
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            arr = photo_like(40 + 4 * i, 48, seed=seed + 100 * ci + i)
            if i == 1:
                (root / cls / f"img.{i}.png").write_bytes(encode(arr, "PNG"))
            else:
                (root / cls / f"img.{i}.jpg").write_bytes(encode(arr, quality=85))
    if corrupt:
        (root / "dog" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    return root


def make_wds_shard(path: Path, per_class: int = 2, no_image: tuple[str, ...] = ("nopic",), seed: int = 0) -> Path:
    """One webdataset shard of small JPEGs labelled 0..2 (``cls``), plus samples without an image
    member (a ``cls`` and a ``txt`` only) under the keys in ``no_image``, placed mid-shard."""
    members: list[tuple[str, bytes]] = []
    for ci in range(len(CLASSES)):
        for i in range(per_class):
            key = f"s{ci}_{i}"
            members += [
                (f"{key}.jpg", encode(photo_like(40, 44, seed=seed + 10 * ci + i), quality=85)),
                (f"{key}.cls", b"%d" % ci),
            ]
        if ci == 0:
            for key in no_image:
                members += [(f"{key}.cls", b"1"), (f"{key}.txt", b"a caption, but no picture")]
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def job_args(**over) -> dict:
    """Library keyword arguments of a small, fast job."""
    args = dict(
        teacher_num_classes=len(CLASSES),
        image_size=32,
        rounds=3,
        topk=2,
        shard_size=5,
        batch_size=8,
        workers=0,
        seed=7,
        device="cpu",
        progress=False,
    )
    args.update(over)
    return args


def cli_args(source: Path, out: str, **over) -> list[str]:
    """The CLI form of ``job_args``."""
    opts = {
        "--source": str(source),
        "--teacher": TEACHER,
        "--teacher-num-classes": str(len(CLASSES)),
        "--image-size": "32",
        "--rounds": "3",
        "--topk": "2",
        "--shard-size": "5",
        "--batch-size": "8",
        "--workers": "0",
        "--seed": "7",
        "--device": "cpu",
        "--out": out,
    }
    opts.update({k: str(v) for k, v in over.items()})
    argv = [x for kv in opts.items() for x in kv]
    return argv + ["--no-progress"]


def tree_digest(root: Path, pattern: str = "*.tar") -> dict[str, str]:
    """sha256 of each shard and the manifest: what "byte-identical" compares."""
    files = sorted(root.glob(pattern)) + [root / "manifest.json", root / "_info.json"]
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in files}
