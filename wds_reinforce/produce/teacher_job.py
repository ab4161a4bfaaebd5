"""What the producer's jobs share: a teacher run on a recipe's rounds, written through the shard job.

``TeacherJob`` holds the settings every producer job takes and the bookkeeping that follows from
them (its ``ShardJob``, the refusal of another job's files, the count of finished parts);
``self_contained.ReinforceJob`` and ``sidecar_sets.SidecarSetJob`` add what they make.
``ProducerSummary`` is what a run did, as ``make_shards.py`` prints it.
"""

from __future__ import annotations

from dataclasses import KW_ONLY, dataclass, field
from typing import Any, ClassVar

from wds_reinforce.core.augment import Recipe
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

    def finished_shards(self) -> int:
        """Parts of this job marked done in the output (what an interrupted run keeps; not re-hashed)."""
        return sum(map(self.job.marked, self.every_part()))


@dataclass
class ProducerSummary:
    """What a job did (this rank's share for ``made``/``reused``/``images_per_s``)."""

    out: str
    samples: int
    skipped: int
    rounds: int
    shards: int
    made: int
    reused: int
    bytes: int
    sidecar_bytes_per_round: float
    images_per_s: float
    seconds: float
    manifest_written: bool

    @classmethod
    def of(cls, job: ShardJob, result: JobRun, rounds: int, sidecar_bytes: int | None = None) -> ProducerSummary:
        """The summary of a job's run; ``sidecar_bytes`` defaults to all the bytes the set's job wrote."""
        manifest = result.manifest
        layout = layout_of(manifest) if manifest is not None else None
        samples = layout.num_samples(manifest) if layout is not None else 0
        written = sum(s.bytes for s in layout.made_files(manifest)) if layout is not None else 0
        side = written if sidecar_bytes is None else sidecar_bytes
        return cls(
            out=job.output.url,
            samples=samples,
            skipped=len(manifest.skipped) if manifest is not None else 0,
            rounds=rounds,
            shards=result.parts,
            made=result.made,
            reused=result.reused,
            bytes=written,
            sidecar_bytes_per_round=side / max(samples * rounds, 1),
            images_per_s=result.rate,
            seconds=result.seconds,
            manifest_written=manifest is not None,
        )

    def format(self) -> str:
        lines = [
            f"wrote {self.out}: {self.samples} samples x {self.rounds} rounds in {self.shards} shards "
            f"({self.made} made, {self.reused} reused), {self.bytes / 1e6:.1f} MB",
            f"sidecar: {self.sidecar_bytes_per_round:.1f} bytes per round; skipped inputs: {self.skipped}",
            f"throughput: {self.images_per_s:.1f} images x rounds / s over {self.seconds:.1f} s"
            if self.made
            else "throughput: nothing to make, every shard was verified (sha256) and reused",
        ]
        return "\n".join(lines)
