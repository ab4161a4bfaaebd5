"""The import job: an importer's records + the images they describe -> reinforced shards and a manifest.

1. ``run_import`` checks what it can before reading a record: the settings, classes, the output,
   and that this output holds no other job's files;
2. the records are streamed once (every rank reads the whole stream: a ``.tar.gz`` cannot seek):
   every record's index is checked against the images (range, duplicates, missing records), and
   the records of this rank's unfinished shards are converted by the importer, checked against
   their image's size, and kept in a local spool as sidecars (no pickle); an index mismatch is an
   error before any shard exists. An image that keeps no round (a mixing variant's image whose
   rounds all have a partner) gets a sidecar of none: the loader gives it its original image and
   label every epoch;
3. each unfinished shard is written from the spool by a ``writers.ShardWriter`` (self-contained
   shards with the images copied in, or a sidecar set beside plain input shards), with a done
   marker recording every file's sha256;
4. rank 0 waits for every shard and writes the manifest, which records the import under
   ``teacher["imported"]``.

Output shard j is a pure function of the images' j-th part (a seeded permutation of a folder's
order cut into ``shard_size`` pieces, or input shard j), so under torchrun (RANK / WORLD_SIZE)
rank r makes shards j % world == r, and a rerun verifies finished shards and redoes the rest
(the shared job's lifecycle, ``produce.jobs``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import struct
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from wds_reinforce.core.errors import DataError, UsageError, check_int, check_split
from wds_reinforce.core.format import (
    Manifest,
    Sidecar,
    SkippedInput,
    decode_sidecar,
    encode_sidecar,
)
from wds_reinforce.core.progress import ShardProgress
from wds_reinforce.importers import Importer, IndexMismatchError
from wds_reinforce.importers.images import ImageIndex, ShardImages
from wds_reinforce.importers.summary import ImportSummary, summarize
from wds_reinforce.importers.writers import SelfContainedShards, ShardWriter, SidecarSetShards
from wds_reinforce.io.outputs import LocalOutput
from wds_reinforce.io.storage import open_output
from wds_reinforce.produce.jobs import ShardJob, dist_env, job_digest, library_versions, run
from wds_reinforce.produce.sidecar_sets import SIDECAR_JOB_FILE

__all__ = ["ImportSummary", "check_settings", "run_import"]

_SPOOL = ".import-spool"
_RECORD = struct.Struct("<III")  # image index, kept rounds, sidecar length


def check_settings(
    shard_size: int, rounds: int | None, seed: int, split: str, group_rounds: int | None
) -> tuple[int, int | None, int | None]:
    """(shard_size, rounds, group_rounds), checked before anything is read."""
    shard_size = check_int("shard_size", shard_size)
    rounds = None if rounds is None else check_int("rounds", rounds)
    check_int("seed", seed, 0)
    check_split(split)
    if group_rounds is not None:
        group_rounds = check_int("group_rounds", group_rounds)
        if rounds is not None and rounds % group_rounds:
            raise UsageError(f"expected group_rounds a divisor of rounds={rounds}, got {group_rounds}")
    return shard_size, rounds, group_rounds


# ----------------------------------------------------------------------------------------
# The job


@dataclass
class _Scan:
    """What streaming the records left: rounds kept per converted image, the unreadable images, the count."""

    kept: dict[int, int]
    skipped: dict[int, SkippedInput]
    converted: int


@dataclass
class _ImportJob:
    """The shared job's ``Maker`` for an import: unit j is output shard j, one part (its marker) each."""

    importer: Importer
    images: ImageIndex
    writer: ShardWriter
    shards: list[list[int]]  # the image indices of each output shard, in shard order
    job: ShardJob
    identity: dict[str, Any]
    rounds: int | None
    group_rounds: int | None
    spool: Path
    progress: ShardProgress
    seed: int
    split: str
    name: str

    def parts(self, j: int) -> list[str]:
        return [self.writer.name(j)]

    def make(self, todo: list[tuple[int, list[str]]]) -> int:
        shards = [j for j, _ in todo]
        self.progress.restart(sum(len(self.shards[j]) for j in shards), len(shards))
        try:
            scan = self._scan(shards)
            keep = self._keep(scan)
        except BaseException:
            self.drop_spool()
            raise
        if self.writer.job_file is not None:
            text = json.dumps({"job": self.job.digest, "identity": self.identity}, sort_keys=True) + "\n"
            self.job.keep_identity(self.writer.job_file, text, decides=True)
        for j in shards:
            self.job.done(self.writer.name(j), {**self._write(j, keep, scan), "places": True})
            self.progress.update(len(self.shards[j]))
            self.progress.shard_done(self.writer.name(j))
        self.drop_spool()
        return scan.converted

    def drop_spool(self) -> None:
        """Remove this rank's spool (and its folder, when no other rank's is in it)."""
        shutil.rmtree(self.spool, ignore_errors=True)
        with contextlib.suppress(OSError):
            self.spool.parent.rmdir()

    # -- reading the records

    def _index(self, name: str) -> int | None:
        i = self.importer.index_of(name)
        if i is not None and i >= len(self.images):
            raise IndexMismatchError(
                f"record {name} has index {i}, outside the {len(self.images)} images of {self.images.spec} "
                "(not the split, or not all of it, that the records were made for)"
            )
        return i

    def _missing(self, seen: np.ndarray, files: int) -> IndexMismatchError:
        i, n = int(np.argmin(seen)), len(self.images)
        return IndexMismatchError(
            f"the records hold {files} image records for the {n} images of {self.images.spec}; none for index {i} "
            f"(expected {self.importer.record_name(i)}, image {self.images.where(i)})"
        )

    def _check_listing(self) -> None:
        """Where the record names can be had without reading the records: check them first."""
        names = self.importer.listing()
        if names is None:
            return
        seen = np.zeros(len(self.images), bool)
        for name in names:
            i = self._index(name)
            if i is None:
                continue
            if seen[i]:
                raise IndexMismatchError(f"two records for index {i}: {name} repeats it")
            seen[i] = True
        if not seen.all():
            raise self._missing(seen, int(seen.sum()))

    def _scan(self, shards: list[int]) -> _Scan:
        """Stream the records once; spool the sidecars of ``shards``' images."""
        n = len(self.images)
        shard_of = np.full(n, -1, np.int64)
        for j in shards:
            shard_of[self.shards[j]] = j
        self._check_listing()
        shutil.rmtree(self.spool, ignore_errors=True)
        self.spool.mkdir(parents=True)
        seen = np.zeros(n, bool)
        scan = _Scan({}, {}, 0)
        start, files = time.monotonic(), 0
        for name, read in self.importer.stream():
            i = self._index(name)
            if i is None:
                continue
            if seen[i]:
                raise IndexMismatchError(f"two records for index {i}: {name} repeats it")
            seen[i], files = True, files + 1
            if shard_of[i] >= 0:
                self._convert(scan, int(shard_of[i]), i, name, read)
            if self.progress.due():
                rate = files / max(time.monotonic() - start, 1e-9)
                self.progress.note(f"records: {files}/{n} read, {scan.converted} converted ({rate:.0f} records/s)")
        if not seen.all() or files != n:
            raise self._missing(seen, files)
        self.progress.note(f"records: all {n} read and checked, {scan.converted} converted", force=True)
        return scan

    def _convert(self, scan: _Scan, j: int, i: int, name: str, read: Callable[[], bytes]) -> None:
        try:
            size = self.images.size(i)
        except (DataError, OSError) as exc:
            scan.skipped[i] = SkippedInput(self.images.keys[i], f"{type(exc).__name__}: {exc}")
            return
        rounds = self.importer.convert(read, i, name, size)
        scan.kept[i] = rounds.kept
        data = encode_sidecar(Sidecar(self.importer.recipe.fingerprint, rounds.idx, rounds.prob, rounds.ops))
        with open(self.spool / f"{j:06d}", "ab") as f:
            f.write(_RECORD.pack(i, rounds.kept, len(data)) + data)
        scan.converted += 1

    def _keep(self, scan: _Scan) -> int:
        """The rounds to keep of every image: as asked, as a resumed run chose, or all (the most every
        image with any has). An image that keeps none is imported without rounds."""
        known = {m["rounds"] for m in self.job.markers.values()}
        if self.rounds is not None:
            keep = self.rounds
        elif known:
            keep = known.pop()  # a resumed run keeps what the first one chose
        elif self.importer.variable:
            keep = min((v for v in scan.kept.values() if v), default=0 if scan.kept else self.importer.total_rounds)
        else:
            keep = self.importer.total_rounds
        short = sorted((v, i) for i, v in scan.kept.items() if 0 < v < keep or not keep)
        if short:
            v, i = short[0]
            raise UsageError(self.importer.too_few(self.images.where(i), i, v, keep))
        if self.group_rounds is not None and keep % self.group_rounds:
            raise UsageError(
                f"expected group_rounds a divisor of the {keep} rounds kept of every image, got {self.group_rounds}"
            )
        return keep

    # -- writing

    def _write(self, j: int, rounds: int, scan: _Scan) -> dict[str, Any]:
        """Shard j from the spool, through the writer; its done marker's payload."""
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
                yield i, sc.select(slice(rounds)) if sc.rounds != rounds else sc

        out = self.writer(self.job, j, pairs(), rounds)
        path.unlink(missing_ok=True)
        files = [dataclasses.asdict(f) for f in out.files]
        values = [scan.kept[i] for i in self.shards[j] if i in scan.kept]
        payload = {
            "shard": files[0],
            "files": files,
            "sidecar_bytes": out.sidecar_bytes,
            "rounds": rounds,
            "skipped": [dataclasses.asdict(scan.skipped[i]) for i in self.shards[j] if i in scan.skipped],
            "metadata_sha256": self.importer.sha256,
            "kept": {
                "images": len(values),
                "min": min(values, default=0),
                "max": max(values, default=0),
                "sum": sum(values),
                "none": values.count(0),  # imported without rounds
            },
        }
        if out.image is not None:
            payload["image"] = dataclasses.asdict(out.image)
        return payload

    # -- the manifest

    def manifest(self, markers: Mapping[str, Mapping[str, Any]]) -> Manifest:
        dones = [markers[self.writer.name(j)] for j in range(len(self.shards))]
        rounds = {d["rounds"] for d in dones}
        digests = {d["metadata_sha256"] for d in dones if d.get("metadata_sha256")}
        if len(rounds) != 1 or len(digests) > 1:
            raise UsageError(f"shards disagree on rounds {sorted(rounds)} or metadata digest {sorted(digests)}")
        rounds_kept, recipe = rounds.pop(), self.importer.recipe
        stats = [d["kept"] for d in dones if d["kept"]["images"]]
        kept = {
            "min": min((s["min"] for s in stats), default=0),
            "max": max((s["max"] for s in stats), default=0),
            "mean": sum(s["sum"] for s in stats) / max(sum(s["images"] for s in stats), 1),
        }
        imported = {
            "index_rule": self.images.rule,
            "images": self.images.spec,
            "images_copied": self.writer.copies_images,
            "sha256": digests.pop() if digests else None,
            "images_without_rounds": sum(d["kept"].get("none", 0) for d in dones),
        }
        return Manifest(
            recipe=recipe.to_dict(),
            fingerprint=recipe.fingerprint.hex(),
            teacher=self.importer.teacher(rounds_kept, kept, imported),
            num_classes=self.importer.num_classes,
            rounds=rounds_kept,
            topk=self.importer.topk,
            seed=self.seed,
            class_names=list(self.images.class_names),
            skipped=[SkippedInput(**s) for d in dones for s in d["skipped"]],
            versions=library_versions(),
            split=self.split,
            name=self.name,
            places=all(d.get("places", False) for d in dones),  # shards made before places have none
            **self.writer.manifest_fields(dones, rounds_kept),
        )


# ----------------------------------------------------------------------------------------
# Running an import


def _check(importer: Importer, images: ImageIndex, rounds: int | None, world: int) -> None:
    """The rounds to keep and the classes, checked against the records' and the images'."""
    if rounds is not None and rounds > importer.total_rounds:
        raise UsageError(f"expected rounds <= their {importer.total_rounds} rounds per image, got {rounds}")
    if importer.variable and rounds is None and world > 1:
        raise UsageError(
            f"{importer.label}: images keep different numbers of rounds, so under torchrun give --rounds R (every "
            "rank must keep the same number of rounds); a single process finds the most every image has"
        )
    classes = importer.num_classes
    if not isinstance(images, ShardImages) and len(images.class_names) != classes:
        raise UsageError(f"the images have {len(images.class_names)} classes, their teacher {classes}")
    if max(images.labels) >= classes:
        raise UsageError(f"the images have a label {max(images.labels)}, outside their teacher's {classes} classes")
    if importer.topk > classes:
        raise UsageError(f"their top-{importer.topk} is more than the {classes} classes")


def run_import(
    importer: Importer,
    images: ImageIndex,
    out: str | os.PathLike,
    *,
    sidecar_set: bool,
    rounds: int | None = None,
    shard_size: int = 1000,
    seed: int = 0,
    shuffle: bool = True,
    split: str = "train",
    name: str = "reinforced",
    spool: str | os.PathLike | None = None,
    progress: Callable[[str], None] | None = None,
    progress_every: float = 10.0,
    group_rounds: int | None = None,
    wait_timeout: float | None = None,
) -> ImportSummary:
    """Import ``importer``'s records for ``images`` into ``out`` (see the module docstring).

    ``sidecar_set``: write a sidecar set beside ``images`` (plain shards: ``ShardImages`` with
    their own keys) instead of self-contained shards. The other arguments are ``import_mldr``'s.

    Raises:
        UsageError: bad settings, classes or output; ``IndexMismatchError`` when records and images
            disagree. Both before any output is written.
        MetadataError: a record that is refused or does not fit its image.
    """
    rank, world = dist_env()
    _check(importer, images, rounds, world)
    output = open_output(out)
    output.check_writable()
    writer: ShardWriter = (
        SidecarSetShards(images, split, group_rounds) if sidecar_set else SelfContainedShards(images, split)
    )
    ident = {"images": images.digest(), **importer.identity(), "recipe": importer.recipe.to_dict(), "rounds": rounds}
    ident.update(shard_size=shard_size, seed=seed, shuffle=shuffle, split=split, **writer.identity)
    job = ShardJob(output, job_digest(ident), rank, world)
    if wait_timeout is not None:
        job.wait_timeout = wait_timeout
    shards = writer.shards(shard_size, seed, shuffle)
    if spool is None:
        base = output.root if isinstance(output, LocalOutput) else output.staging()
        spool = Path(base) / _SPOOL / f"rank-{rank:05d}"
    job.refuse_other_job([writer.name(j) for j in range(len(shards))], ident, SIDECAR_JOB_FILE)
    mine = job.mine(len(shards))
    images_made = sum(len(shards[j]) for j in mine)
    say = ShardProgress(images_made, len(mine), "import", "images", say=progress or _quiet, every=progress_every)
    maker = _ImportJob(
        importer, images, writer, shards, job, ident, rounds, group_rounds, Path(spool), say, seed, split, name
    )
    result = run(job, maker, len(shards), info=True, say=say.note)
    return summarize(maker, result)


def _quiet(line: str) -> None:
    pass
