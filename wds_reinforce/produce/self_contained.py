"""The producer's self-contained shards: source + teacher + recipe -> shards of images, labels and sidecars.

Work is partitioned by output shard: shard j holds positions ``j * shard_size .. (j + 1) *
shard_size - 1`` of the source order (minus inputs that cannot be read or decoded, listed as
skipped), so any process can make any shard and get the same bytes. The order is a permutation
seeded by ``seed`` (``shuffle=True``, the default: an ImageFolder lists its samples class by
class, and shards of one or two classes train badly through a shuffle buffer) or the source's
own. DataLoader workers decode, sample every round's parameters and replay them (uint8); the
main process runs the teacher in batches that never cross a shard boundary (so a shard's bytes
do not depend on what was made before it). The lifecycle (staged tars, done markers, resume,
ranks, the manifest last) is the shared job's (``jobs``).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch

from wds_reinforce.core.augment import Recipe
from wds_reinforce.core.errors import DataError, error_text
from wds_reinforce.core.format import SIDECAR_EXT, Manifest, ShardInfo, Sidecar, SkippedInput, crc32c, encode_sidecar
from wds_reinforce.core.progress import ShardProgress, SidecarBytes
from wds_reinforce.core.schedule import pairing_windows
from wds_reinforce.produce.jobs import DONE_DIR, library_versions, run, tar_member_bytes
from wds_reinforce.produce.sources import Source, SourceSample, SourceSampleError, sample_order
from wds_reinforce.produce.teacher import TeacherBatcher
from wds_reinforce.produce.teacher_job import ProducerSummary, TeacherJob
from wds_reinforce.produce.workers import mix_items, replay_rounds, worker_loader

__all__ = ["ReinforceJob", "ReplayDataset", "IDENTITY_FILE"]

IDENTITY_FILE = f"{DONE_DIR}/job.identity"  # the job's identity (JSON), for a refused other job's message


class ReplayDataset(torch.utils.data.Dataset):
    """Item i: read source input ``indices[i]``, sample R rounds of params, replay them all (uint8)."""

    def __init__(self, source: Source, indices: Sequence[int], recipe: Recipe, seed: int, rounds: int):
        self.source, self.indices, self.recipe, self.seed, self.rounds = source, list(indices), recipe, seed, rounds

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict[str, Any]:
        index = self.indices[i]
        try:
            sample = self.source[index]
        except SourceSampleError as exc:  # listed, but no image to read (e.g. a wds sample without one)
            return {"key": exc.key, "sample": SourceSample(exc.key, b"", -1, ""), "error": exc.reason}
        except OSError as exc:  # listed, then unreadable or gone (deleted, permissions, I/O error)
            key = self.source.key(index)
            return {"key": key, "sample": SourceSample(key, b"", -1, ""), "error": error_text(exc, whole=True)}
        try:
            params, pixels = replay_rounds(sample.data, sample.key, range(self.rounds), self.recipe, self.seed)
        except (DataError, OSError) as exc:
            return {"key": sample.key, "sample": sample, "error": error_text(exc, whole=True)}
        return {"key": sample.key, "sample": sample, "error": None, "params": params, "images": pixels}


@dataclass
class ReinforceJob(TeacherJob):
    """A checked self-contained producer job (see ``make.prepare_job``); ``run()`` makes this rank's shards."""

    job_file: ClassVar[str] = IDENTITY_FILE
    job_file_decides: ClassVar[bool] = False  # rewritten by each run; the shards' markers decide
    source: Source
    shard_size: int
    class_names: list[str]
    class_map: list[int] | None
    shuffle: bool = True
    _order: np.ndarray | None = field(default=None, init=False, repr=False)

    @property
    def num_shards(self) -> int:
        return -(-len(self.source) // self.shard_size)

    @property
    def units(self) -> int:
        return self.num_shards

    def shard_name(self, j: int) -> str:
        return f"{self.split}-{j:06d}.tar"

    def describe_teacher(self) -> dict[str, Any]:
        desc = self.teacher.describe(self.recipe)  # the view the teacher saw, not timm's config
        if self.class_map is not None:
            desc["class_map"] = list(self.class_map)
        return desc

    def identity(self) -> dict[str, Any]:
        """Everything that decides the shards' bytes (``digest`` hashes it; the output keeps a copy)."""
        return {
            "samples": len(self.source),
            "source_index": self.source.index_digest(),
            "class_names": self.class_names,
            "recipe": self.recipe.to_dict(),
            "teacher": self.describe_teacher(),
            "rounds": self.rounds,
            "topk": self.topk,
            "seed": self.seed,
            "shard_size": self.shard_size,
            "batch_size": self.batch_size,
            "shuffle": self.shuffle,
        }

    def run(self) -> ProducerSummary:
        """Make this rank's unfinished shards; rank 0 then waits for all and writes the manifest."""
        self.job.output.staging()
        self.job.keep_identity(self.job_file, json.dumps(self.identity(), sort_keys=True) + "\n", self.job_file_decides)
        result = run(self.job, self, self.num_shards, info=True)
        return ProducerSummary.of(self.job, result, self.rounds, self._sidecar_bytes(result.markers.values()))

    def _sidecar_bytes(self, markers: Iterable[Mapping[str, Any]]) -> SidecarBytes:
        """What the sidecars of these parts take (markers of older versions: the tar overhead estimated)."""
        markers = list(markers)
        samples = sum(m["shard"]["samples"] for m in markers)
        payload = sum(m.get("sidecar_bytes", 0) for m in markers)
        counted = [m["sidecar_tar_bytes"] for m in markers if "sidecar_tar_bytes" in m]
        estimated = len(counted) < len(markers)
        on_disk = sum(
            m.get("sidecar_tar_bytes", m.get("sidecar_bytes", 0) + m["shard"]["samples"] * 768) for m in markers
        )
        return SidecarBytes(payload, on_disk, samples, self.rounds, self.rounds, estimated)

    # -- the Maker

    def parts(self, j: int) -> list[str]:
        return [self.shard_name(j)]

    def _indices(self, j: int) -> Sequence[int]:
        """Source indices of shard j: a slice of the (seeded) source order."""
        positions = range(j * self.shard_size, min((j + 1) * self.shard_size, len(self.source)))
        if not self.shuffle:
            return positions
        if self._order is None:
            self._order = sample_order(len(self.source), self.seed)
        return self._order[positions.start : positions.stop].tolist()

    def make(self, todo: list[tuple[int, list[str]]]) -> int:
        shards = [j for j, _ in todo]
        indices = [i for j in shards for i in self._indices(j)]
        per_sample = -(-self.batch_size // max(self.rounds, 1))  # samples a teacher batch takes
        prefetch = max(2, per_sample // max(self.workers, 1) + 1)
        items = iter(
            worker_loader(
                ReplayDataset(self.source, indices, self.recipe, self.seed, self.rounds), self.workers, prefetch
            )
        )
        # A bar on a terminal; in a log file, one line per finished shard (count, rate, ETA).
        bar = self.progress_bar(len(indices), len(shards), "reinforce")
        views = 0
        try:
            for j in shards:
                views += self._make_shard(j, items, bar)
                if bar is not None:
                    bar.shard_done(self.shard_name(j))
        finally:  # Ctrl-C included: end the bar's line before the caller says what was kept
            if bar is not None:
                bar.close()
        return views

    def _make_shard(self, j: int, items: Iterator[dict[str, Any]], bar: ShardProgress | None) -> int:
        batcher = TeacherBatcher(self.teacher, self.topk, self.batch_size, self.class_map)
        keys: list[str] = []
        skipped: list[SkippedInput] = []
        sidecar_bytes = [0, 0]  # the sidecars' bytes, and what they take in the tar

        def good() -> Iterator[dict[str, Any]]:
            for _ in self._indices(j):
                item = next(items)
                if bar is not None:
                    bar.update(1)
                if item["error"] is not None:
                    skipped.append(SkippedInput(item["key"], item["error"]))
                else:
                    yield item

        def members() -> Iterator[tuple[str, bytes]]:
            # Mixing recipes pair the samples of each window of W written samples: the window is
            # complete before its views (mixed) go to the teacher. The teacher's batches are the
            # same either way: the queue's order does not change, only when it fills.
            width = self.recipe.pairing_window
            for window in pairing_windows(good(), width):
                if self.recipe.mix is not None:
                    mix_items(window, self.recipe, self.seed, range(self.rounds))
                for item in window:
                    batcher.add(item.pop("images"), item)  # the batcher holds the pixels until seen
                yield from self._members(j, batcher, keys, sidecar_bytes)
            batcher.flush()
            yield from self._members(j, batcher, keys, sidecar_bytes)

        info = self.job.write_tar(self.shard_name(j), members(), keys)
        skipped_rows = [dataclasses.asdict(s) for s in skipped]
        payload = {"shard": dataclasses.asdict(info), "skipped": skipped_rows, "sidecar_bytes": sidecar_bytes[0]}
        payload["sidecar_tar_bytes"] = sidecar_bytes[1]
        payload["made"] = self.job.work(len(keys), batcher.views)
        payload["places"] = True  # its sidecars record them (shards made before, resumed, do not)
        self.job.done(self.shard_name(j), payload)
        return batcher.views

    def _members(
        self, j: int, batcher: TeacherBatcher, keys: list[str], sidecar_bytes: list[int]
    ) -> Iterator[tuple[str, bytes]]:
        """The tar members of the samples the teacher has finished: image (untouched), label, sidecar
        (bound to shard ``j`` and the sample's position in it, and covering the image and label)."""
        for views in batcher.ready():
            item = views.item
            sample: SourceSample = item["sample"]
            label = str(sample.label).encode()
            sidecar = Sidecar(
                self.recipe.fingerprint,
                views.idx,
                views.prob,
                item["params"],
                crc32c(sample.data),
                item.get("window"),
                place=(j, len(keys), 0),
                label_crc=crc32c(label),
            )
            data = encode_sidecar(sidecar)
            keys.append(sample.key)
            sidecar_bytes[0] += len(data)
            sidecar_bytes[1] += tar_member_bytes(len(data))
            yield f"{sample.key}.{sample.ext}", sample.data
            yield f"{sample.key}.cls", label
            yield f"{sample.key}.{SIDECAR_EXT}", data

    def manifest(self, markers: Mapping[str, Mapping[str, Any]]) -> Manifest:
        dones = [markers[self.shard_name(j)] for j in range(self.num_shards)]
        return Manifest(
            recipe=self.recipe.to_dict(),
            fingerprint=self.recipe.fingerprint.hex(),
            teacher=self.describe_teacher(),
            num_classes=len(self.class_names),
            rounds=self.rounds,
            topk=self.topk,
            seed=self.seed,
            class_names=list(self.class_names),
            shards=[ShardInfo(**d["shard"]) for d in dones],
            skipped=[SkippedInput(**s) for d in dones for s in d["skipped"]],
            versions=library_versions(),
            split=self.split,
            name=self.name,
            places=all(d.get("places", False) for d in dones),
        )
