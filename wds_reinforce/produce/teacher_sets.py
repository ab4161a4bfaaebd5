"""Another teacher's targets for a sidecar set's stored rounds, without storing the rounds again.

The stored parameters of every round are replayed on the image shards (mixed within their
pairing windows, as the first teacher saw them) and the new teacher's top-k (the set's k) is
written as targets-only sidecars (no op columns) under ``teachers/{name}/``, aligned with the
params shards; the manifest gains a ``TeacherSet`` and is replaced last. Resumable and
torchrun-partitioned by image shard, with the shared job's lifecycle (``jobs``). Before anything
is written, every rank reads every image shard once and refuses if one changed since the set was
made (``sidecar_sets.check_image_shards``). The loader then takes ``teacher=k`` or ``teacher="mean"``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from wds_reinforce.core.augment import Recipe, replay
from wds_reinforce.core.augment.mixing import mixed_views
from wds_reinforce.core.decode import SourceImage
from wds_reinforce.core.errors import DataError, UsageError, check_int
from wds_reinforce.core.format import (
    SIDECAR_EXT,
    Manifest,
    RoundGroup,
    ShardInfo,
    Sidecar,
    TeacherSet,
    crc32c,
    decode_sidecar,
    encode_sidecar,
)
from wds_reinforce.core.progress import ShardProgress
from wds_reinforce.core.schedule import pairing_windows
from wds_reinforce.core.threads import default_workers
from wds_reinforce.io.shards import image_bytes
from wds_reinforce.io.storage import open_output
from wds_reinforce.layouts import MANIFEST_NAME, Part, layout_of, parse_manifest, read_unit
from wds_reinforce.produce.jobs import ShardJob, dist_env, run
from wds_reinforce.produce.sidecar_sets import MadeFrom, check_image_shards
from wds_reinforce.produce.teacher import Teacher, TeacherBatcher

__all__ = ["add_teacher_set"]


@dataclass
class _TeacherSetJob:
    """The targets shards of one teacher set: unit i is image shard i, its parts the round groups' shards."""

    job: ShardJob
    current: Manifest  # the set's manifest as it was read
    recipe: Recipe
    teacher: Teacher
    name: str
    batch_size: int
    progress: bool

    def target_name(self, g: int, i: int) -> str:
        return f"teachers/{self.name}/{self.current.round_groups[g].shards[i].name}"

    def parts(self, i: int) -> list[str]:
        return [self.target_name(g, i) for g in range(len(self.current.round_groups))]

    def make(self, todo: list[tuple[int, list[str]]]) -> int:
        work = [
            (i, g)
            for i, missing in todo
            for g in range(len(self.current.round_groups))
            if self.target_name(g, i) in missing
        ]
        show = self.progress and self.job.rank == 0
        bar = ShardProgress(len(work), len(work), f"teacher set {self.name}", "shards") if show else None
        views = 0
        try:
            for i, g in work:
                views += self._make(i, g)
                if bar is not None:
                    bar.update(1)
                    bar.shard_done(self.target_name(g, i))
        finally:
            if bar is not None:
                bar.close()
        return views

    def _make(self, i: int, g: int) -> int:
        """Round group g's targets of image shard i: replay its stored rounds, run the teacher, write."""
        group = self.current.round_groups[g]
        batcher = TeacherBatcher(self.teacher, self.current.topk, self.batch_size)
        # The teacher sees each round as it was stored: mixed within its pairing window, where the recipe mixes.
        for window in pairing_windows(self._replayed(i, group), self.recipe.pairing_window):
            views = [pixels for _, _, pixels in window]
            if self.recipe.mix is not None:
                views = mixed_views(views, [sidecar.ops for _, sidecar, _ in window])
            for (key, sidecar, _), pixels in zip(window, views):
                batcher.add(pixels, (key, sidecar))
        batcher.flush()
        seen = list(batcher.ready())
        members = [(f"{v.item[0]}.{SIDECAR_EXT}", encode_targets(v.item[1], v.idx, v.prob)) for v in seen]
        name = self.target_name(g, i)
        info = self.job.write_tar(name, iter(members), [v.item[0] for v in seen])
        self.job.done(name, {"shard": dataclasses.asdict(info)})
        return batcher.views

    def _replayed(self, i: int, group: RoundGroup) -> Iterator[tuple[str, Sidecar, torch.Tensor]]:
        """Image shard i's samples with their params sidecar of ``group``, and their views of its rounds."""
        base = self.job.output.url.rstrip("/")
        skipped = frozenset(s.key for s in self.current.skipped)
        params = Part(f"{base}/{group.shards[i].name}")
        for sample in read_unit(Part(self.current.image_shards[i].name), [params], skipped):
            key = sample["__key__"]
            sidecar = _params_sidecar(sample[SIDECAR_EXT], self.current, group.rounds, key)
            data = image_bytes(sample)
            if sidecar.image_crc is not None and crc32c(data) != sidecar.image_crc:
                raise DataError("image bytes do not match the sidecar's checksum", key)
            src = SourceImage(data)  # decoded once for all the group's rounds
            views = [replay(src, sidecar.round_params(r), self.recipe) for r in range(sidecar.rounds)]
            # no rounds (an image imported without one): no view for the teacher, a targets sidecar of none
            yield key, sidecar, torch.stack(views) if views else torch.empty(0, 3, *self.recipe.size, dtype=torch.uint8)

    def check_images(self) -> None:
        """Refuse, before anything is written, when an image shard changed since the set was made from
        it (every rank reads every image shard once, when any targets shard is to be made)."""
        units = range(len(self.current.image_shards))
        if all(self.job.finished(part) is not None for i in units for part in self.parts(i)):
            return
        first = self.current.round_groups[0].shards
        made = [
            MadeFrom(s.name, s.sha256, s.samples, os.path.dirname(first[i].name))
            for i, s in enumerate(self.current.image_shards)
        ]
        check_image_shards(made, default_workers())

    def manifest(self, markers: Mapping[str, Mapping[str, Any]]) -> Manifest:
        manifest, groups = self.current, range(len(self.current.round_groups))
        desc = self.teacher.describe(self.recipe)
        shards = [
            [ShardInfo(**markers[self.target_name(g, i)]["shard"]) for i in range(len(manifest.image_shards))]
            for g in groups
        ]
        manifest.teacher_sets = [t for t in manifest.teacher_sets if t.name != self.name] + [
            TeacherSet(self.name, desc, shards)
        ]
        return manifest


def encode_targets(params: Sidecar, idx: Any, prob: Any) -> bytes:
    """A targets-only sidecar: the same rounds as ``params`` (fingerprint, image and label checksums,
    place), no op columns."""
    sidecar = Sidecar(params.fingerprint, idx, prob, {}, params.image_crc, None, params.place, params.label_crc)
    return encode_sidecar(sidecar)


def _params_sidecar(raw: bytes | None, manifest: Manifest, rounds: int, key: str) -> Sidecar:
    """A params sidecar of a sidecar set, checked against its manifest (fingerprint, rounds, top-k)."""
    if raw is None:
        raise DataError(f"no {SIDECAR_EXT} member", key)
    sidecar = decode_sidecar(raw, key)
    if sidecar.fingerprint.hex() != manifest.fingerprint or sidecar.rounds not in (rounds, 0):  # 0: none kept
        raise DataError("sidecar does not match the manifest (fingerprint or rounds)", key)
    if sidecar.topk != manifest.topk:
        raise DataError("sidecar does not match the manifest (top-k)", key)
    return sidecar


def add_teacher_set(
    location: str,
    teacher: str | Sequence[str] | Teacher,
    name: str,
    *,
    batch_size: int = 256,
    device: str = "auto",
    teacher_checkpoint: str | Sequence[str | None] | None = None,
    teacher_num_classes: int | None = None,
    pretrained: bool = False,
    progress: bool = True,
) -> Manifest:
    """Add another teacher's targets to the sidecar set at ``location``, for the rounds it already stores.

    Returns:
        The manifest (rank 0: with the new teacher set; other ranks: as it was).

    Raises:
        UsageError: not a sidecar set, a name in use by another teacher, a teacher whose classes
            differ from the set's, bad numbers; before any work.
        DataError: an image shard changed since the set was made from it; nothing written.
    """
    from wds_reinforce.produce.make import checked_teacher

    if not isinstance(name, str) or not name or "/" in name or name.startswith("."):
        raise UsageError(f"expected a teacher set name without slashes, got {name!r}")
    check_int("batch_size", batch_size)
    output = open_output(location)
    text = output.read_text(MANIFEST_NAME)
    if text is None:
        raise UsageError(f"expected a sidecar set at {location!r}, found no {MANIFEST_NAME}")
    manifest = parse_manifest(text, f"{location}/{MANIFEST_NAME}")
    if not layout_of(manifest).teacher_sets:
        raise UsageError(f"expected a sidecar set at {location!r}, got a {manifest.layout} data set")
    tch = checked_teacher(teacher, teacher_checkpoint, teacher_num_classes, pretrained, device)
    if tch.num_classes != manifest.num_classes:
        raise UsageError(f"expected a teacher with the set's {manifest.num_classes} classes, got {tch.num_classes}")
    recipe = Recipe.from_dict(manifest.recipe)
    desc = tch.describe(recipe)
    existing = next((t for t in manifest.teacher_sets if t.name == name), None)
    if existing is not None and existing.teacher != desc:
        raise UsageError(f"expected a new teacher set name, got {name!r}, which another teacher's targets use")
    rank, world = dist_env()
    # The set's identity: this teacher's targets for the rounds of this recipe (fingerprint).
    digest = hashlib.sha256(json.dumps([name, desc, manifest.fingerprint], sort_keys=True).encode()).hexdigest()[:16]
    maker = _TeacherSetJob(ShardJob(output, digest, rank, world), manifest, recipe, tch, name, batch_size, progress)
    maker.check_images()
    result = run(maker.job, maker, len(manifest.image_shards))
    return result.manifest or manifest
