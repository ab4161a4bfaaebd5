"""What the producer's jobs share: a teacher run on a recipe's rounds, written through the shard job.

``TeacherJob`` holds the settings every producer job takes and the bookkeeping that follows from
them (its ``ShardJob``, the refusal of another job's files, the count of finished parts);
``self_contained.ReinforceJob`` and ``sidecar_sets.SidecarSetJob`` add what they make.
``ProducerSummary`` is what a run did, as ``make_shards.py`` prints it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import KW_ONLY, dataclass, field
from typing import Any, ClassVar

from wds_reinforce.core.augment import Recipe
from wds_reinforce.core.progress import ShardProgress, SidecarBytes
from wds_reinforce.io.outputs import Output
from wds_reinforce.layouts import layout_of
from wds_reinforce.produce.jobs import JobRun, ShardJob, job_digest
from wds_reinforce.produce.teacher import Teacher

__all__ = ["TeacherJob", "ProducerSummary"]


@dataclass
class TeacherJob:
    """A producer job's settings (checked by ``make``) and its shard job.

    Subclasses define ``identity()`` (what decides the bytes), ``units`` and ``parts(unit)``
    (``jobs.Maker``), and set ``job_file`` (where the identity is kept), ``job_file_decides``
    (``ShardJob.keep_identity``) and ``what`` (their files, for messages).
    """

    job_file: ClassVar[str]
    job_file_decides: ClassVar[bool]  # see ``ShardJob.keep_identity``
    what: ClassVar[str] = "shards"
    _: KW_ONLY
    teacher: Teacher
    recipe: Recipe
    output: Output
    rounds: int
    topk: int
    seed: int
    batch_size: int
    workers: int
    rank: int = 0
    world_size: int = 1
    progress: bool = True
    name: str = "reinforced"
    split: str = "train"
    _job: ShardJob | None = field(default=None, init=False, repr=False)

    def identity(self) -> dict[str, Any]:
        raise NotImplementedError

    @property
    def units(self) -> int:
        raise NotImplementedError

    def parts(self, unit: int) -> list[str]:
        raise NotImplementedError

    @property
    def job(self) -> ShardJob:
        if self._job is None:
            self._job = ShardJob(self.output, job_digest(self.identity()), self.rank, self.world_size)
        return self._job

    @property
    def digest(self) -> str:
        return self.job.digest

    def every_part(self) -> list[str]:
        return [part for unit in range(self.units) for part in self.parts(unit)]

    def check_existing(self) -> None:
        """Refuse to mix another job's files into this output (before any work)."""
        self.job.refuse_other_job(self.every_part(), self.identity(), self.job_file, self.what, self.job_file_decides)

    def progress_bar(self, items: int, shards: int, desc: str, unit: str = "samples") -> ShardProgress | None:
        """This rank's progress (None without ``progress``), begun with a line in a log.

        Of several ranks, each reports its own, as lines prefixed ``rank r/W:`` (never a bar: the
        ranks of one machine share its terminal).
        """
        if not self.progress:
            return None
        several = self.world_size > 1
        desc = f"rank {self.rank}/{self.world_size}: {desc}" if several else desc
        bar = ShardProgress(items, shards, desc, unit, tty=False if several else None)
        bar.started()
        return bar

    def finished_shards(self) -> int:
        """Parts of this job marked done in the output (what an interrupted run keeps; not re-hashed)."""
        return sum(map(self.job.marked, self.every_part()))


def _rank_rates(markers: Mapping[str, Mapping[str, Any]], parts: list[str]) -> dict[int, float]:
    """Each rank's images x rounds per second, from the ``made`` records of ``parts``' markers."""
    views: dict[int, int] = {}
    seconds: dict[int, float] = {}
    for part in parts:
        made = markers.get(part, {}).get("made")
        if isinstance(made, Mapping):  # older markers have none
            r = int(made.get("rank", 0))
            views[r] = views.get(r, 0) + int(made.get("views", 0))
            seconds[r] = max(seconds.get(r, 0.0), float(made.get("elapsed", 0.0)))
    return {r: views[r] / seconds[r] if seconds[r] > 0 else 0.0 for r in sorted(views)}


@dataclass
class ProducerSummary:
    """What a job did: on rank 0 of several, every rank's work (``made``, ``views``, the rate over
    ``world`` ranks); on another rank, its own share."""

    out: str
    samples: int
    skipped: int
    rounds: int
    shards: int
    made: int
    reused: int
    bytes: int
    sidecar_bytes_per_round: float  # the encoded sidecars (payload), per sample and round
    images_per_s: float
    seconds: float
    manifest_written: bool
    rank: int = 0
    world: int = 1
    views: int = 0  # images x rounds made
    rank_rates: dict[int, float] = field(default_factory=dict)  # rank -> its images x rounds / s
    sidecar: SidecarBytes | None = None
    notes: list[str] = field(default_factory=list)

    @classmethod
    def of(cls, job: ShardJob, result: JobRun, rounds: int, sidecar: SidecarBytes | None = None) -> ProducerSummary:
        """The summary of a job's run (``sidecar``: what its sidecars take, over every part on rank 0)."""
        manifest = result.manifest
        layout = layout_of(manifest) if manifest is not None else None
        mine = [result.markers[p] for p in result.fresh if p in result.markers]
        if layout is not None:
            samples = layout.num_samples(manifest)
            written = sum(s.bytes for s in layout.made_files(manifest))
        else:  # a rank other than 0: what it made
            samples = sum(m["shard"]["samples"] for m in mine if "shard" in m)
            written = sum(m["shard"]["bytes"] for m in mine if "shard" in m)
        several = job.world > 1 and manifest is not None
        views = sum(int(m.get("made", {}).get("views", 0)) for m in mine) if several else result.work
        seconds = result.seconds
        if several:  # from the first rank's start (ranks may start apart) to the manifest
            starts = [
                float(m["made"].get("started", job.started_at)) for m in mine if isinstance(m.get("made"), Mapping)
            ]
            seconds = max(result.wall, result.ended_at - min([job.started_at, *starts]))
        return cls(
            out=job.output.url,
            samples=samples,
            skipped=len(manifest.skipped) if manifest is not None else 0,
            rounds=rounds,
            shards=result.parts,
            made=len(result.fresh),
            reused=result.parts - len(result.fresh) if several else result.reused,
            bytes=written,
            sidecar_bytes_per_round=sidecar.payload_per_round if sidecar is not None else 0.0,
            images_per_s=views / seconds if seconds > 0 else 0.0,
            seconds=seconds,
            manifest_written=manifest is not None,
            rank=job.rank,
            world=job.world,
            views=views,
            rank_rates=_rank_rates(result.markers, result.fresh) if several else {},
            sidecar=sidecar,
        )

    def format(self) -> str:
        if not self.manifest_written:  # a rank other than 0
            return (
                f"rank {self.rank}/{self.world} (its own share): made {self.made} of the {self.shards} shards, reused "
                f"{self.reused}, {self.samples} samples, {self.bytes / 1e6:.1f} MB; {self.views} images x rounds at "
                f"{self.images_per_s:.1f} / s over {self.seconds:.1f} s; rank 0 writes the manifest and the totals"
            )
        over = f" over {self.world} ranks" if self.world > 1 else ""
        lines = [
            f"wrote {self.out}: {self.samples} samples x {self.rounds} rounds in {self.shards} shards "
            f"({self.made} made{over}, {self.reused} reused), {self.bytes / 1e6:.1f} MB",
            *(self.sidecar.lines() if self.sidecar is not None else []),
            f"skipped inputs: {self.skipped}",
        ]
        if not self.made:
            lines.append("throughput: nothing to make, every shard was verified (sha256) and reused")
        elif self.world > 1:
            each = ", ".join(f"rank {r} {v:.1f}" for r, v in self.rank_rates.items())
            lines.append(
                f"throughput: {self.images_per_s:.1f} images x rounds / s{over} ({self.views} in {self.seconds:.1f} s, "
                f"until the manifest; each rank's own: {each or 'not recorded'})"
            )
        else:
            lines.append(f"throughput: {self.images_per_s:.1f} images x rounds / s over {self.seconds:.1f} s")
        return "\n".join([*lines, *self.notes])
