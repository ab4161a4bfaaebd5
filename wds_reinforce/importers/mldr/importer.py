"""Import apple/ml-dr's released reinforcements into streaming shards: the job behind tools/import_mldr.py.

Their metadata (read by ``mldr``) is keyed by each image's position in torchvision's ``ImageFolder``
order of the train split; ``mldr_sources`` indexes the images that way (a folder, or plain
webdataset shards) and streams the metadata. The import:

1. checks everything it can before reading a member: arguments, their config (found in the
   archive, the folder, or given), the recipe it makes, classes, the output;
2. streams the metadata once (a ``.tar.gz`` is read member by member, never extracted; every rank
   reads the whole stream, since gzip cannot seek): every file name is checked against the
   images (count, range, duplicates, missing files), and the files of this rank's unfinished
   shards are read safely, converted and checked against their image's size, then kept in a
   local spool as sidecars (no pickle); an index mismatch is an error before any output exists;
3. writes each unfinished shard from the spool through one output step, a ``ShardWriter`` that
   takes ``(image index, sidecar)`` pairs in shard order: ``SelfContainedShards`` copies the
   images in (an ImageFolder, or shards with ``copy_images``); ``SidecarSetShards`` writes a
   sidecar set beside plain input shards (their keys, their order, no image copied); then a done
   marker with the sha256 of every file written;
4. on rank 0, waits for every shard's marker and writes the manifest, which records the import
   source under ``teacher["imported"]``.

Output shard j is a pure function of the images' j-th part (a seeded permutation of the folder
order cut into ``shard_size`` pieces, or input shard j), so under torchrun (RANK / WORLD_SIZE)
rank r makes shards j % world == r, and a rerun verifies finished shards and redoes the rest.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import posixpath
import shutil
import struct
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from wds_reinforce.core.errors import DataError, UsageError
from wds_reinforce.core.format import (
    SIDECAR_EXT,
    Manifest,
    RoundGroup,
    ShardInfo,
    Sidecar,
    SkippedInput,
    crc32c,
    decode_sidecar,
    encode_sidecar,
)
from wds_reinforce.importers.mldr.convert import (
    IndexMismatchError,
    MetadataError,
    MldrConfig,
    check_plain,
    convert_rounds,
    load_torch_save,
)
from wds_reinforce.importers.mldr.inputs import (
    CONFIG_NAME,
    INDEX_NAME,
    FolderImages,
    ImageIndex,
    MetadataSource,
    ShardImages,
    open_images,
)
from wds_reinforce.io.outputs import LocalOutput, S3Output
from wds_reinforce.io.storage import open_output
from wds_reinforce.layouts import SELF_CONTAINED, SIDECAR_SETS, group_dir, layout_of, timm_info
from wds_reinforce.produce.make import dist_env
from wds_reinforce.produce.self_contained import library_versions, write_tar_file
from wds_reinforce.produce.sidecar_sets import SIDECAR_JOB_FILE

__all__ = [
    "ShardWriter",
    "SelfContainedShards",
    "SidecarSetShards",
    "ShardOutput",
    "ImportSummary",
    "import_mldr",
]

_DONE_DIR = ".done"
_SPOOL = ".mldr-spool"


def _load_config(data: bytes, name: str) -> MldrConfig:
    obj = load_torch_save(data, name)
    check_plain(obj, name)
    return MldrConfig.from_dict(obj, name)


# ----------------------------------------------------------------------------------------
# The output step


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

    def __init__(self, output: LocalOutput | S3Output, images: ImageIndex, split: str = "train"):
        self.output, self.images, self.split = output, images, split

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

        info = write_tar_file(self.output, self.name(j), members(), keys)
        return ShardOutput([info], sidecar_bytes)


class SidecarSetShards:
    """A sidecar set beside the input shards (``ShardImages`` with ``keep_keys``); no image is copied.

    For input shard j and each round group g of ``group_rounds`` rounds (default: all in one),
    ``rounds-AAAAA-BBBBB/{split}-{j:06d}.tar`` holds one ``{key}.dr.mp`` per converted sample of
    input shard j, with the input's key, in the input's order (skipped samples have none), each
    with the CRC-32C of its image; the input shard is read once for those and its sha256.
    """

    layout = SIDECAR_SETS

    def __init__(
        self, output: LocalOutput | S3Output, images: ShardImages, split: str = "train", group_rounds: int | None = None
    ):
        self.output, self.images, self.split, self.group_rounds = output, images, split, group_rounds
        self._shards = images.input_shards()

    def name(self, j: int) -> str:
        return f"{self.split}-{j:06d}.tar"

    def groups(self, rounds: int) -> int:
        return rounds // (self.group_rounds or rounds)

    def __call__(self, j: int, pairs: Iterable[tuple[int, Sidecar]], rounds: int) -> ShardOutput:
        G = self.group_rounds or rounds
        crcs, size, sha = self.images.read_shard(j)
        every = [self.images.keys[i] for i in self._shards[j]]
        image = ShardInfo(
            os.path.abspath(self.images.paths[j]),  # local paths made absolute, as sidecars.image_shard_urls
            len(every),
            size,
            sha,
            every[0] if every else "",
            every[-1] if every else "",
        )
        items = list(pairs)
        files, sidecar_bytes = [], 0
        for g in range(self.groups(rounds)):
            rows = slice(g * G, (g + 1) * G)
            keys: list[str] = []

            def members(rows: slice = rows, keys: list[str] = keys) -> Iterator[tuple[str, bytes]]:
                nonlocal sidecar_bytes
                for i, sc in items:
                    part = Sidecar(
                        sc.fingerprint, sc.idx[rows], sc.prob[rows], {c: v[rows] for c, v in sc.ops.items()}, crcs[i]
                    )
                    data = encode_sidecar(part)
                    keys.append(self.images.keys[i])
                    sidecar_bytes += len(data)
                    yield f"{self.images.keys[i]}.{SIDECAR_EXT}", data

            name = f"{group_dir(g * G, G)}/{self.split}-{j:06d}.tar"
            files.append(write_tar_file(self.output, name, members(), keys))
        return ShardOutput(files, sidecar_bytes, image)


# ----------------------------------------------------------------------------------------
# The job


@dataclass
class ImportSummary:
    """What an import run did (``made``/``images_per_s`` are this rank's)."""

    out: str
    variant: str
    samples: int
    rounds: int
    total_rounds: int
    topk: int
    shards: int
    made: int
    reused: int
    bytes: int
    sidecar_bytes_per_round: float
    metadata_bytes_per_round: float
    images_per_s: float
    seconds: float
    manifest_written: bool
    kept: str = ""
    layout: str = SELF_CONTAINED
    groups: int = 1
    image_shards: int = 0

    def format(self) -> str:
        lines = [
            f"imported {self.variant} into {self.out}: {self.samples} images x {self.rounds} rounds (of "
            f"{self.total_rounds}), top-{self.topk}, {self.shards} shards ({self.made} made, {self.reused} reused), "
            f"{self.bytes / 1e6:.1f} MB",
            f"sidecar: {self.sidecar_bytes_per_round:.1f} bytes per round; their metadata: "
            f"{self.metadata_bytes_per_round:.1f} bytes per round",
            f"speed: {self.images_per_s:.0f} images/s over {self.seconds:.1f} s",
        ]
        if self.layout == SIDECAR_SETS:
            lines.append(
                f"sidecar set: {self.groups} round group(s) of {self.rounds // max(self.groups, 1)} rounds beside the "
                f"{self.image_shards} input shards (images not copied; keep the input shards where they are)"
            )
        if self.kept:
            lines.append(self.kept)
        if not self.manifest_written:
            lines.append("manifest: written by rank 0 once every shard is done")
        return "\n".join(lines)


def _positive(name: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise UsageError(f"expected {name} an integer >= {minimum}, got {value!r}")
    return value


class _Progress:
    """Progress lines, at most one per ``every`` seconds unless forced (``due()`` saves building one)."""

    def __init__(self, say: Callable[[str], None] | None, every: float):
        self.say, self.every, self.last = say, every, time.monotonic()

    def due(self) -> bool:
        return self.say is not None and time.monotonic() - self.last >= self.every

    def __call__(self, message: str) -> None:
        if self.say is not None:
            self.last = time.monotonic()
            self.say(message)


_RECORD = struct.Struct("<III")  # image index, kept rounds, sidecar length


@dataclass
class _Job:
    meta: MetadataSource
    images: ImageIndex
    config: MldrConfig
    output: LocalOutput | S3Output
    writer: ShardWriter
    shards: list[list[int]]
    rounds: int | None
    drop_mixing: bool
    seed: int
    split: str
    name: str
    rank: int
    world: int
    digest: str
    spool: Path
    progress: _Progress
    wait_timeout: float
    config_source: str = ""  # where the config came from (a file given, or the archive)
    checked: dict[int, str] = dataclasses.field(default_factory=dict)  # shard -> sha256 made or verified here

    def marker(self, j: int) -> str:
        return f"{_DONE_DIR}/{self.writer.name(j)}.json"

    def read_marker(self, j: int) -> dict[str, Any] | None:
        text = self.output.read_text(self.marker(j))
        try:
            done = json.loads(text) if text is not None else None
        except ValueError:
            return None
        return done if isinstance(done, dict) and done.get("job") == self.digest else None

    def finished(self, j: int) -> dict[str, Any] | None:
        """Shard j's marker when every file it records is in place and intact."""
        done = self.read_marker(j)
        if done is None or not all(self.output.verify(f["name"], f) for f in done.get("files", [done["shard"]])):
            return None
        return done

    def check_existing(self) -> None:
        text = self.output.read_text(SIDECAR_JOB_FILE)  # a sidecar set made here (by this import or the producer)
        if text is not None:
            try:
                other = json.loads(text).get("job")
            except (ValueError, AttributeError):
                other = None
            if other != self.digest:
                raise UsageError(
                    f"expected the output {self.output.url!r} to be empty or hold this import's sidecar set, got "
                    "another job's sidecar set; use a new output folder"
                )
        for j in range(len(self.shards)):
            text = self.output.read_text(self.marker(j))
            if text is None:
                continue
            try:
                other = json.loads(text).get("job")
            except (ValueError, AttributeError):
                continue
            if other != self.digest:
                raise UsageError(
                    f"expected the output {self.output.url!r} to be empty or hold this import's shards, got shards of "
                    "another job (other metadata, images or settings); use a new output folder"
                )
            return

    # -- scan

    def scan(self, todo: list[int]) -> tuple[dict[int, int], dict[int, SkippedInput], int]:
        """Read the metadata once; spool the sidecars of ``todo``'s images.

        Returns the kept rounds per converted image, the unreadable images (by index), and the
        number converted. On any error the spool is removed and nothing else has been written.
        """
        try:
            return self._scan(todo)
        except BaseException:
            self.drop_spool()
            raise

    def drop_spool(self) -> None:
        """Remove this rank's spool (and its folder, when no other rank's is in it)."""
        shutil.rmtree(self.spool, ignore_errors=True)
        with contextlib.suppress(OSError):
            self.spool.parent.rmdir()

    def _scan(self, todo: list[int]) -> tuple[dict[int, int], dict[int, SkippedInput], int]:
        n = len(self.images)
        shard_of = np.full(n, -1, np.int64)
        for j in todo:
            shard_of[self.shards[j]] = j
        if self.meta.is_dir:
            self._check_names(self.meta.names())
        shutil.rmtree(self.spool, ignore_errors=True)
        self.spool.mkdir(parents=True)
        seen = np.zeros(n, bool)
        kept: dict[int, int] = {}
        skipped: dict[int, SkippedInput] = {}
        start, files, converted = time.monotonic(), 0, 0
        fingerprint = self.config.recipe.fingerprint
        for member, read in self.meta.members():
            base = posixpath.basename(member)
            if base == CONFIG_NAME:
                if self.config_source and dict(_load_config(read(), member).raw) != dict(self.config.raw):
                    raise UsageError(f"{self.config_source} differs from the metadata's own {member}")
                continue
            i = self._index_of(member, base, n)
            if seen[i]:
                raise IndexMismatchError(f"two metadata files for index {i}: {member} repeats it")
            seen[i] = True
            files += 1
            j = int(shard_of[i])
            if j >= 0:
                try:
                    size = self.images.size(i)
                except (DataError, OSError) as exc:
                    skipped[i] = SkippedInput(self.images.keys[i], f"{type(exc).__name__}: {exc}")
                else:
                    obj = load_torch_save(read(), member)
                    rounds = convert_rounds(obj, i, self.config, member, size, self.drop_mixing)
                    kept[i] = rounds.kept
                    data = b""
                    if rounds.kept:
                        data = encode_sidecar(Sidecar(fingerprint, rounds.idx, rounds.prob, rounds.ops))
                    with open(self.spool / f"{j:06d}", "ab") as f:
                        f.write(_RECORD.pack(i, rounds.kept, len(data)) + data)
                    converted += 1
            if self.progress.due():
                rate = files / max(time.monotonic() - start, 1e-9)
                self.progress(f"metadata: {files}/{n} files read, {converted} converted ({rate:.0f} files/s)")
        if not seen.all() or files != n:
            i = int(np.argmin(seen))
            raise IndexMismatchError(
                f"the metadata has {files} image files for the {n} images of {self.images.spec}; none for index {i} "
                f"(expected {i}.pth.tar, image {self.images.where(i)})"
            )
        self.progress(f"metadata: all {n} files read and checked, {converted} converted")
        return kept, skipped, converted

    def _check_names(self, names: Sequence[str]) -> None:
        n, seen = len(self.images), np.zeros(len(self.images), bool)
        for name in names:
            if name == CONFIG_NAME:
                continue
            i = self._index_of(name, name, n)
            if seen[i]:
                raise IndexMismatchError(f"two metadata files for index {i}: {name} repeats it")
            seen[i] = True
        if not seen.all():
            i = int(np.argmin(seen))
            raise IndexMismatchError(
                f"the metadata has {int(seen.sum())} image files for the {n} images of {self.images.spec}; none for "
                f"index {i} (expected {i}.pth.tar in {self.meta.root}, image {self.images.where(i)})"
            )

    def _index_of(self, member: str, base: str, n: int) -> int:
        m = INDEX_NAME.fullmatch(base)
        if m is None:
            if base.endswith(".jb"):
                raise MetadataError("joblib metadata (.jb) is not read; only torch.save files are", url=member)
            raise MetadataError(
                f"unexpected file in the metadata (expected INDEX.pth.tar and {CONFIG_NAME})", url=member
            )
        i = int(m.group(1))
        if i >= n:
            raise IndexMismatchError(
                f"metadata file {member} has index {i}, outside the {n} images of {self.images.spec} "
                "(not the split, or not all of it, that the metadata was made for)"
            )
        return i

    # -- write

    def write(self, j: int, rounds: int) -> dict[str, Any]:
        records: dict[int, bytes] = {}
        path = self.spool / f"{j:06d}"
        data = path.read_bytes() if path.exists() else b""
        pos = 0
        while pos < len(data):
            i, _, length = _RECORD.unpack_from(data, pos)
            pos += _RECORD.size
            records[i] = data[pos : pos + length]
            pos += length

        def pairs() -> Iterator[tuple[int, Sidecar]]:
            for i in self.shards[j]:
                if i not in records:
                    continue  # skipped: an unreadable image
                sc = decode_sidecar(records[i])
                if sc.rounds != rounds:
                    ops = {c: v[:rounds] for c, v in sc.ops.items()}
                    sc = Sidecar(sc.fingerprint, sc.idx[:rounds], sc.prob[:rounds], ops)
                yield i, sc

        out = self.writer(j, pairs(), rounds)
        path.unlink(missing_ok=True)
        files = [dataclasses.asdict(f) for f in out.files]
        done = {"shard": files[0], "files": files, "sidecar_bytes": out.sidecar_bytes}
        if out.image is not None:
            done["image"] = dataclasses.asdict(out.image)
        return done

    # -- manifest

    def wait_all(self) -> list[dict[str, Any]]:
        deadline = time.monotonic() + self.wait_timeout
        dones: dict[int, dict[str, Any]] = {}
        while True:
            for j in range(len(self.shards)):
                if j not in dones:
                    done = self.finished(j)
                    if done is not None:
                        dones[j] = done
            if len(dones) == len(self.shards):
                return [dones[j] for j in range(len(self.shards))]
            if time.monotonic() > deadline:
                missing = [self.writer.name(j) for j in range(len(self.shards)) if j not in dones]
                raise TimeoutError(f"expected every shard finished, got {len(missing)} not: {missing[:5]}")
            if self.progress.due():
                self.progress(f"waiting for other ranks: {len(dones)}/{len(self.shards)} shards done")
            time.sleep(1.0)

    def manifest(self, dones: list[dict[str, Any]]) -> Manifest:
        rounds = {d["rounds"] for d in dones}
        digests = {d["metadata_sha256"] for d in dones if d.get("metadata_sha256")}
        if len(rounds) != 1 or len(digests) > 1:
            raise UsageError(f"shards disagree on rounds {sorted(rounds)} or metadata digest {sorted(digests)}")
        cfg, recipe = self.config, self.config.recipe
        stats = [d["kept"] for d in dones if d["kept"]["images"]]
        images = sum(s["images"] for s in stats)
        imported = {
            "from": "apple/ml-dr",
            **cfg.describe(),
            "rounds_kept": (rounds_kept := rounds.pop()),
            "mixing": (
                "dropped: the first rounds_kept rounds without a mixing partner of each image are kept"
                if cfg.mixing
                else "none"
            ),
            "non_mixing_rounds": {
                "min": min((s["min"] for s in stats), default=0),
                "max": max((s["max"] for s in stats), default=0),
                "mean": sum(s["sum"] for s in stats) / max(images, 1),
            },
            "index_rule": self.images.rule,
            "images": self.images.spec,
            "images_copied": self.writer.layout != SIDECAR_SETS,
            "metadata": {
                "name": self.meta.path.name,
                "bytes": self.meta.bytes,
                "sha256": digests.pop() if digests else None,
                "listing_sha256": self.meta.listing_sha256,
                "sha256_of": "the archive file" if not self.meta.is_dir else None,
            },
            "probabilities": "their float32 top-k, sorted descending (ties by class id), rounded to fp16",
            "seed": "their parameters were drawn unseeded; the manifest's seed only orders the shards",
        }
        members = [
            {"kind": "timm", "name": t, "checkpoint": None, "weights_sha256": None, "pretrained": True}
            for t in cfg.teachers
        ]
        teacher = {
            "members": members,
            "ensemble": "mean of softmax",
            "num_classes": cfg.num_classes or len(self.images.class_names),
            "amp": None,
            "imported": imported,
        }
        layout: dict[str, Any] = {"shards": [ShardInfo(**d["shard"]) for d in dones]}
        if self.writer.layout == SIDECAR_SETS:
            files = [[ShardInfo(**f) for f in d["files"]] for d in dones]
            G = rounds_kept // len(files[0]) if files else rounds_kept
            layout = {
                "layout": SIDECAR_SETS,
                "image_shards": [ShardInfo(**d["image"]) for d in dones],
                "round_groups": [
                    RoundGroup(g * G, G, [shard_files[g] for shard_files in files]) for g in range(len(files[0]))
                ],
            }
        return Manifest(
            recipe=recipe.to_dict(),
            fingerprint=recipe.fingerprint.hex(),
            teacher=teacher,
            num_classes=cfg.num_classes or len(self.images.class_names),
            rounds=rounds_kept,
            topk=cfg.topk,
            seed=self.seed,
            class_names=list(self.images.class_names),
            skipped=[SkippedInput(**s) for d in dones for s in d["skipped"]],
            versions=library_versions(),
            split=self.split,
            name=self.name,
            **layout,
        )


def import_mldr(
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
    wait_timeout: float = 7 * 24 * 3600.0,
) -> ImportSummary:
    """Import their metadata for the train split ``images`` into ``out``.

    An ImageFolder becomes self-contained shards (images copied in). Plain webdataset shards get
    a sidecar set in ``out`` beside them (``SidecarSetShards``: sidecar shards aligned with the
    input shards, their keys, no image copied; the manifest lists the input shards by absolute
    path), or with ``copy_images`` self-contained shards as for a folder.

    Args:
        metadata: their ``.tar.gz`` (or ``.tar``), or its extracted folder.
        images: the train split they reinforced: an ImageFolder directory or webdataset shards.
        out: output folder or ``s3://bucket/prefix``.
        config: their ``config.pth.tar`` as a file, to skip finding it in the archive.
        drop_mixing: for +M* variants, keep only rounds without a mixing partner (refused otherwise).
        rounds: keep the first ``rounds`` (kept) rounds of each image; default all of them, or with
            ``drop_mixing`` the most that every image has (single process only).
        shard_size: images per output shard (ImageFolder; shards keep the input's sharding).
        seed, shuffle: the ImageFolder's shard order (a seeded permutation, as the producer's).
        index_rule: for shards: ``imagefolder`` or ``key`` (see ``ShardImages``).
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
    start = time.perf_counter()
    shard_size = _positive("shard_size", shard_size)
    if rounds is not None:
        rounds = _positive("rounds", rounds)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise UsageError(f"expected seed a non-negative integer, got {seed!r}")
    if not isinstance(split, str) or not split or "." in split or "/" in split:
        raise UsageError(f"expected split a name without dots or slashes, got {split!r}")
    if group_rounds is not None:
        group_rounds = _positive("group_rounds", group_rounds)
        if rounds is not None and rounds % group_rounds:
            raise UsageError(f"expected group_rounds a divisor of rounds={rounds}, got {group_rounds}")
    rank, world = dist_env()
    say = _Progress(progress, progress_every)
    sidecar_set = not copy_images and not os.path.isdir(str(images))
    index = open_images(images, index_rule, keep_keys=sidecar_set)
    if group_rounds is not None and not sidecar_set:
        raise UsageError("expected group_rounds only for a sidecar set (webdataset shards as images, no copy_images)")
    meta = MetadataSource(metadata)
    if config is not None:
        if not os.path.isfile(config):
            raise UsageError(f"expected their {CONFIG_NAME} file, got {str(config)!r} (not found)")
        data, where = Path(config).read_bytes(), str(config)
    else:
        data, where = meta.config(progress)
    try:
        cfg = _load_config(data, where)
    except MetadataError as exc:
        raise UsageError(str(exc)) from None
    if cfg.mixing and not drop_mixing:
        raise UsageError(
            f"{where}: {cfg.variant} is a mixing variant: each mixed round needs a partner image from anywhere in the "
            "data set, which a stream cannot fetch; rerun with --drop-mixing to import only its rounds without a "
            "partner (about a quarter of them with MixUp and CutMix at p=0.5)"
        )
    if rounds is not None and rounds > cfg.num_samples:
        raise UsageError(f"expected rounds <= their {cfg.num_samples} rounds per image, got {rounds}")
    if cfg.mixing and rounds is None and world > 1:
        raise UsageError(
            "--drop-mixing under torchrun needs --rounds R (every rank must keep the same number of rounds); "
            "a single process finds the most every image has"
        )
    if cfg.num_classes is None:  # their config does not say: the split's classes (ids are checked against them)
        cfg = dataclasses.replace(cfg, num_classes=len(index.class_names))
    num_classes = cfg.num_classes
    if isinstance(index, FolderImages) and len(index.class_names) != num_classes:
        raise UsageError(f"the images have {len(index.class_names)} classes, their teacher {num_classes}")
    if max(index.labels) >= num_classes:
        raise UsageError(f"the images have a label {max(index.labels)}, outside their teacher's {num_classes} classes")
    if cfg.topk > num_classes:
        raise UsageError(f"their top-{cfg.topk} is more than the {num_classes} classes")
    output = open_output(out)
    output.check_writable()
    ident = {
        "images": index.digest(),
        "metadata": meta.listing_sha256 or [meta.path.name, meta.bytes],
        "config": hashlib.sha256(json.dumps(cfg.describe(), sort_keys=True).encode()).hexdigest(),
        "recipe": cfg.recipe.to_dict(),
        "rounds": rounds,
        "drop_mixing": drop_mixing,
        "shard_size": shard_size,
        "seed": seed,
        "shuffle": shuffle,
        "split": split,
    }
    if sidecar_set:  # (self-contained imports keep the identity they had before sidecar sets)
        ident.update(layout=SIDECAR_SETS, group_rounds=group_rounds)
    digest = hashlib.sha256(json.dumps(ident, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]
    if spool is None:
        base = output.staging() if isinstance(output, S3Output) else Path(out)
        spool = Path(base) / _SPOOL / f"rank-{rank:05d}"
    if isinstance(index, ShardImages) and sidecar_set:
        writer: ShardWriter = SidecarSetShards(output, index, split, group_rounds)
        shards = index.input_shards()  # one sidecar shard per image shard, empty ones too
    else:
        writer = SelfContainedShards(output, index, split)
        shards = index.shards(shard_size, seed, shuffle)
    job = _Job(
        meta,
        index,
        cfg,
        output,
        writer,
        shards,
        rounds,
        drop_mixing,
        seed,
        split,
        name,
        rank,
        world,
        digest,
        Path(spool),
        say,
        wait_timeout,
        config_source=str(config) if config is not None else "",
    )
    job.check_existing()

    mine = [j for j in range(len(job.shards)) if j % world == rank]
    todo, reused, markers = [], 0, {}
    for j in mine:
        done = job.finished(j)
        if done is not None:
            reused += 1
            markers[j] = done
            job.checked[j] = done["shard"]["sha256"]
        else:
            todo.append(j)
    made_images = 0
    if todo:
        kept, skipped, made_images = job.scan(todo)
        known = {d["rounds"] for d in markers.values()}
        if rounds is not None:
            keep = rounds
        elif known:
            keep = known.pop()  # a resumed run keeps what the first one chose
        else:
            keep = min(kept.values(), default=cfg.num_samples) if cfg.mixing else cfg.num_samples
        short = sorted((v, i) for i, v in kept.items() if v < max(keep, 1))
        if short:
            v, i = short[0]
            job.drop_spool()
            raise UsageError(
                f"image {index.where(i)} ({i}.pth.tar) has {v} rounds without a mixing partner, "
                + (f"fewer than the {keep} to keep of every image (--rounds)" if keep >= 1 else "nothing to import")
            )
        if group_rounds is not None and keep % group_rounds:
            job.drop_spool()
            raise UsageError(
                f"expected group_rounds a divisor of the {keep} rounds kept of every image, got {group_rounds}"
            )
        # The sidecar producer's job file: make_shards --sidecars-only then refuses to add its groups here.
        if sidecar_set and rank == 0 and output.read_text(SIDECAR_JOB_FILE) is None:
            output.write_text(SIDECAR_JOB_FILE, json.dumps({"job": digest, "identity": ident}, sort_keys=True) + "\n")
        for n_done, j in enumerate(todo, 1):
            result = job.write(j, keep)
            values = [kept[i] for i in job.shards[j] if i in kept]
            result.update(
                job=digest,
                rounds=keep,
                skipped=[dataclasses.asdict(skipped[i]) for i in job.shards[j] if i in skipped],
                metadata_sha256=meta.sha256,
                kept={
                    "images": len(values),
                    "min": min(values, default=0),
                    "max": max(values, default=0),
                    "sum": sum(values),
                },
            )
            output.write_text(job.marker(j), json.dumps(result, sort_keys=True) + "\n")
            markers[j] = result
            job.checked[j] = result["shard"]["sha256"]
            say(f"shard {job.writer.name(j)}: {result['shard']['samples']} samples ({n_done}/{len(todo)} of this rank)")
        job.drop_spool()
    manifest = None
    if rank == 0:
        manifest = job.manifest(job.wait_all())
        output.write_text("_info.json", json.dumps(timm_info(manifest), indent=1, sort_keys=True) + "\n")
        output.write_text("manifest.json", manifest.to_json())  # last: its presence means every shard is complete
    output.close()
    seconds = time.perf_counter() - start
    return _summary(job, manifest, markers, todo, reused, made_images, seconds)


def _summary(
    job: _Job,
    manifest: Manifest | None,
    markers: dict[int, dict],
    todo: list[int],
    reused: int,
    images: int,
    seconds: float,
) -> ImportSummary:
    cfg = job.config
    dones = list(markers.values())
    rounds = dones[0]["rounds"] if dones else (job.rounds or cfg.num_samples)
    samples = layout_of(manifest).num_samples(manifest) if manifest else sum(d["shard"]["samples"] for d in dones)
    side = sum(d["sidecar_bytes"] for d in dones)
    mine = sum(d["shard"]["samples"] for d in dones)
    kept = ""
    if cfg.mixing:
        stats = [d["kept"] for d in dones if d["kept"]["images"]]
        lo, hi = min((s["min"] for s in stats), default=0), max((s["max"] for s in stats), default=0)
        kept = (
            f"mixing dropped: kept the first {rounds} of each image's rounds without a mixing partner "
            f"(images had {lo} to {hi} such rounds of {cfg.num_samples})"
        )
    return ImportSummary(
        out=job.output.url,
        variant=cfg.variant,
        samples=samples,
        rounds=rounds,
        total_rounds=cfg.num_samples,
        topk=cfg.topk,
        shards=len(job.shards),
        made=len(todo),
        reused=reused,
        bytes=_output_bytes(manifest, dones),
        sidecar_bytes_per_round=side / max(mine * rounds, 1),
        metadata_bytes_per_round=job.meta.bytes / max(len(job.images) * cfg.num_samples, 1),
        images_per_s=images / seconds if seconds > 0 else 0.0,
        seconds=seconds,
        manifest_written=manifest is not None,
        kept=kept,
        layout=job.writer.layout,
        groups=len(dones[0]["files"]) if dones and "files" in dones[0] else 1,
        image_shards=len(job.shards),
    )


def _output_bytes(manifest: Manifest | None, dones: list[dict[str, Any]]) -> int:
    if manifest is None:  # a rank other than 0: its own files
        return sum(f["bytes"] for d in dones for f in d.get("files", [d["shard"]]))
    return sum(s.bytes for s in layout_of(manifest).made_files(manifest))
