"""How an import writes one output shard from ``(image index, sidecar)`` pairs in shard order.

``SelfContainedShards`` copies the images in (an ImageFolder, or shards with ``copy_images``);
``SidecarSetShards`` writes a sidecar set beside plain input shards (their keys, their order, no
image copied). Both write through the shared job (``produce.jobs.ShardJob``): staged, hashed,
put in place.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Protocol

from wds_reinforce.core.format import SIDECAR_EXT, ShardInfo, Sidecar, crc32c, encode_sidecar
from wds_reinforce.importers.images import ImageIndex, ShardImages
from wds_reinforce.layouts import SELF_CONTAINED, SIDECAR_SETS, group_dir
from wds_reinforce.produce.jobs import ShardJob

__all__ = ["ShardOutput", "ShardWriter", "SelfContainedShards", "SidecarSetShards"]


@dataclass
class ShardOutput:
    """What a ``ShardWriter`` wrote for one shard: its files (each verified on resume), the
    sidecar bytes among them, and for a sidecar set the image shard it describes."""

    files: list[ShardInfo]
    sidecar_bytes: int
    image: ShardInfo | None = None


class ShardWriter(Protocol):
    """Writes shard ``j`` from ``(image index, sidecar)`` pairs in shard order, each with ``rounds`` rounds.

    ``name(j)`` names the shard in progress lines and its done marker. The sidecars carry no
    ``image_crc``; a writer sets it for the image they describe. ``layout`` is the manifest's.
    """

    layout: str

    def name(self, j: int) -> str: ...

    def __call__(self, j: int, pairs: Iterable[tuple[int, Sidecar]], rounds: int) -> ShardOutput: ...


class SelfContainedShards:
    """Self-contained shards: each sample's image bytes (copied), label and sidecar, as the producer writes them."""

    layout = SELF_CONTAINED

    def __init__(self, job: ShardJob, images: ImageIndex, split: str = "train"):
        self.job, self.images, self.split = job, images, split

    def name(self, j: int) -> str:
        return f"{self.split}-{j:06d}.tar"

    def __call__(self, j: int, pairs: Iterable[tuple[int, Sidecar]], rounds: int) -> ShardOutput:
        keys: list[str] = []
        sidecar_bytes = 0

        def members() -> Iterator[tuple[str, bytes]]:
            nonlocal sidecar_bytes
            for i, sidecar in pairs:
                key, data = self.images.keys[i], self.images.read(i)
                side = encode_sidecar(dataclasses.replace(sidecar, image_crc=crc32c(data)))
                keys.append(key)
                sidecar_bytes += len(side)
                yield f"{key}.{self.images.exts[i]}", data
                yield f"{key}.cls", str(self.images.labels[i]).encode()
                yield f"{key}.{SIDECAR_EXT}", side

        info = self.job.write_tar(self.name(j), members(), keys)
        return ShardOutput([info], sidecar_bytes)


class SidecarSetShards:
    """A sidecar set beside the input shards (``ShardImages`` with ``keep_keys``); no image is copied.

    For input shard j and each round group g of ``group_rounds`` rounds (default: all in one),
    ``rounds-AAAAA-BBBBB/{split}-{j:06d}.tar`` holds one ``{key}.dr.mp`` per converted sample of
    input shard j, with the input's key, in the input's order (skipped samples have none), each
    with the CRC-32C of its image; the input shard is read once for those and its sha256.
    """

    layout = SIDECAR_SETS

    def __init__(self, job: ShardJob, images: ShardImages, split: str = "train", group_rounds: int | None = None):
        self.job, self.images, self.split, self.group_rounds = job, images, split, group_rounds
        self._shards = images.input_shards()

    def name(self, j: int) -> str:
        return f"{self.split}-{j:06d}.tar"

    def groups(self, rounds: int) -> int:
        return rounds // (self.group_rounds or rounds)

    def __call__(self, j: int, pairs: Iterable[tuple[int, Sidecar]], rounds: int) -> ShardOutput:
        G = self.group_rounds or rounds
        crcs, size, sha = self.images.read_shard(j)
        every = [self.images.keys[i] for i in self._shards[j]]
        # local paths made absolute, as the producer's sidecar sets list them (sidecar_sets.image_shard_urls)
        first, last = (every[0], every[-1]) if every else ("", "")
        image = ShardInfo(os.path.abspath(self.images.paths[j]), len(every), size, sha, first, last)
        items = list(pairs)
        files, sidecar_bytes = [], 0
        for g in range(self.groups(rounds)):
            rows = slice(g * G, (g + 1) * G)
            keys: list[str] = []

            def members(rows: slice = rows, keys: list[str] = keys) -> Iterator[tuple[str, bytes]]:
                nonlocal sidecar_bytes
                for i, sc in items:
                    ops = {c: v[rows] for c, v in sc.ops.items()}
                    data = encode_sidecar(Sidecar(sc.fingerprint, sc.idx[rows], sc.prob[rows], ops, crcs[i]))
                    keys.append(self.images.keys[i])
                    sidecar_bytes += len(data)
                    yield f"{self.images.keys[i]}.{SIDECAR_EXT}", data

            name = f"{group_dir(g * G, G)}/{self.split}-{j:06d}.tar"
            files.append(self.job.write_tar(name, members(), keys))
        return ShardOutput(files, sidecar_bytes, image)
