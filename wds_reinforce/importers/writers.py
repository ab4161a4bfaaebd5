"""How an import writes one output shard from ``(image index, sidecar)`` pairs in shard order.

``SelfContainedShards`` copies the images in (an ImageFolder, or shards with ``copy_images``);
``SidecarSetShards`` writes a sidecar set beside plain input shards (their keys, their order, no
image copied). Both write through the shared job (``produce.jobs.ShardJob``): staged, hashed,
put in place.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from wds_reinforce.core.format import SIDECAR_EXT, ShardInfo, Sidecar, crc32c, encode_sidecar
from wds_reinforce.importers.images import ImageIndex, ShardImages
from wds_reinforce.layouts import SELF_CONTAINED, SIDECAR_SETS, group_rows, group_shard_name, sidecar_set_fields
from wds_reinforce.produce.jobs import ShardJob
from wds_reinforce.produce.sidecar_sets import SIDECAR_JOB_FILE

__all__ = ["ShardOutput", "ShardWriter", "SelfContainedShards", "SidecarSetShards"]


@dataclass
class ShardOutput:
    """What a ``ShardWriter`` wrote for one shard: its files (each verified on resume), the
    sidecar bytes among them, and for a sidecar set the image shard it describes."""

    files: list[ShardInfo]
    sidecar_bytes: int
    image: ShardInfo | None = None


class ShardWriter(Protocol):
    """Writes shard ``j`` from ``(image index, sidecar)`` pairs in shard order, each with ``rounds`` rounds
    (or none: an image imported without rounds).

    ``name(j)`` names the shard in progress lines and its done marker. The sidecars carry no
    ``image_crc``; a writer sets it for the image they describe. ``layout`` is the manifest's;
    ``copies_images`` whether the images are copied in; ``job_file`` the job file to keep beside
    the output (or None); ``identity`` what the writer adds to the job's identity.
    """

    layout: str
    copies_images: bool
    job_file: str | None
    identity: dict[str, Any]

    def name(self, j: int) -> str: ...

    def shards(self, shard_size: int, seed: int, shuffle: bool) -> list[list[int]]:
        """The image indices of each output shard, in shard order."""

    def __call__(self, job: ShardJob, j: int, pairs: Iterable[tuple[int, Sidecar]], rounds: int) -> ShardOutput: ...

    def manifest_fields(self, dones: list[Mapping[str, Any]], rounds: int) -> dict[str, Any]:
        """The manifest's layout fields, from every shard's done marker."""

    def note(self, groups: int, rounds: int, shards: int) -> str:
        """A summary line on where the output lies (or "")."""


class SelfContainedShards:
    """Self-contained shards: each sample's image bytes (copied), label and sidecar, as the producer writes them."""

    layout, copies_images, job_file = SELF_CONTAINED, True, None

    def __init__(self, images: ImageIndex, split: str = "train"):
        self.images, self.split = images, split

    @property
    def identity(self) -> dict[str, Any]:
        return {}  # self-contained imports keep the identity they had before sidecar sets

    def name(self, j: int) -> str:
        return f"{self.split}-{j:06d}.tar"

    def shards(self, shard_size: int, seed: int, shuffle: bool) -> list[list[int]]:
        return self.images.shards(shard_size, seed, shuffle)

    def manifest_fields(self, dones: list[Mapping[str, Any]], rounds: int) -> dict[str, Any]:
        return {"shards": [ShardInfo(**d["shard"]) for d in dones]}

    def note(self, groups: int, rounds: int, shards: int) -> str:
        return ""

    def __call__(self, job: ShardJob, j: int, pairs: Iterable[tuple[int, Sidecar]], rounds: int) -> ShardOutput:
        keys: list[str] = []
        sidecar_bytes = 0

        def members() -> Iterator[tuple[str, bytes]]:
            nonlocal sidecar_bytes
            for i, sidecar in pairs:
                key, data = self.images.keys[i], self.images.read(i)
                label = str(self.images.labels[i]).encode()
                bound = {"image_crc": crc32c(data), "label_crc": crc32c(label), "place": (j, len(keys), 0)}
                side = encode_sidecar(dataclasses.replace(sidecar, **bound))
                keys.append(key)
                sidecar_bytes += len(side)
                yield f"{key}.{self.images.exts[i]}", data
                yield f"{key}.cls", label
                yield f"{key}.{SIDECAR_EXT}", side

        info = job.write_tar(self.name(j), members(), keys)
        return ShardOutput([info], sidecar_bytes)


class SidecarSetShards:
    """A sidecar set beside the input shards (``ShardImages`` with ``keep_keys``); no image is copied.

    For input shard j and each round group g of ``group_rounds`` rounds (default: all in one),
    ``rounds-AAAAA-BBBBB/{split}-{j:06d}.tar`` holds one ``{key}.dr.mp`` per converted sample of
    input shard j, with the input's key, in the input's order (skipped samples have none), each
    with the CRC-32C of its image; the input shard is read once for those and its sha256.
    """

    layout, copies_images = SIDECAR_SETS, False
    job_file = SIDECAR_JOB_FILE  # make_shards --sidecars-only then refuses to add its groups here

    def __init__(self, images: ShardImages, split: str = "train", group_rounds: int | None = None):
        self.images, self.split, self.group_rounds = images, split, group_rounds
        self._shards = images.input_shards()
        self.identity = {"layout": SIDECAR_SETS, "group_rounds": group_rounds}

    def name(self, j: int) -> str:
        return f"{self.split}-{j:06d}.tar"

    def shards(self, shard_size: int, seed: int, shuffle: bool) -> list[list[int]]:
        return self._shards  # one sidecar shard per image shard, empty ones too

    def manifest_fields(self, dones: list[Mapping[str, Any]], rounds: int) -> dict[str, Any]:
        files = [[ShardInfo(**f) for f in d["files"]] for d in dones]  # [image shard][group]
        groups = len(files[0]) if files else 0
        by_group = [[shard[g] for shard in files] for g in range(groups)]
        return sidecar_set_fields([ShardInfo(**d["image"]) for d in dones], rounds // max(groups, 1), by_group)

    def note(self, groups: int, rounds: int, shards: int) -> str:
        return (
            f"sidecar set: {groups} round group(s) of {rounds // max(groups, 1)} rounds beside the {shards} input "
            "shards (images not copied; keep the input shards where they are)"
        )

    def groups(self, rounds: int) -> int:
        return rounds // (self.group_rounds or rounds)

    def __call__(self, job: ShardJob, j: int, pairs: Iterable[tuple[int, Sidecar]], rounds: int) -> ShardOutput:
        G = self.group_rounds or rounds
        crcs, size, sha = self.images.read_shard(j)
        every = [self.images.keys[i] for i in self._shards[j]]
        # local paths made absolute, as the producer's sidecar sets list them (sidecar_sets.image_shard_urls)
        first, last = (every[0], every[-1]) if every else ("", "")
        image = ShardInfo(os.path.abspath(self.images.paths[j]), len(every), size, sha, first, last)
        items = list(pairs)
        files, sidecar_bytes = [], 0

        def members(rows: slice, keys: list[str]) -> Iterator[tuple[str, bytes]]:
            nonlocal sidecar_bytes
            for n, (i, sc) in enumerate(items):
                image_crc, label_crc = crcs[i]
                bound = {"image_crc": image_crc, "label_crc": label_crc, "place": (j, n, 0)}
                data = encode_sidecar(dataclasses.replace(sc, **bound).select(rows))
                keys.append(self.images.keys[i])
                sidecar_bytes += len(data)
                yield f"{self.images.keys[i]}.{SIDECAR_EXT}", data

        for g in range(self.groups(rounds)):
            keys: list[str] = []
            files.append(job.write_tar(group_shard_name(g, G, self.split, j), members(group_rows(g, G), keys), keys))
        return ShardOutput(files, sidecar_bytes, image)
