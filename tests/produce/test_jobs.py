"""The shard job every writer shares: another job's files refused, resume that verifies, the wait for all parts."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

import pytest

from wds_reinforce.core.augment import Recipe
from wds_reinforce.core.format import Manifest, ShardInfo
from wds_reinforce.io.outputs import LocalOutput
from wds_reinforce.layouts import MANIFEST_NAME
from wds_reinforce.produce.jobs import OtherJobError, ShardJob, job_digest, run

RECIPE = Recipe.from_spec("rrc", size=32)
JOB_FILE = ".done/job.identity"


@dataclass
class _Tars:
    """A Maker: one one-member tar per unit, its member's bytes set by ``content``."""

    job: ShardJob
    content: bytes = b"payload"
    made: list[str] = field(default_factory=list)

    def parts(self, unit: int) -> list[str]:
        return [f"part-{unit}.tar"]

    def make(self, todo: list[tuple[int, list[str]]]) -> int:
        for unit, parts in todo:
            for part in parts:
                info = self.job.write_tar(part, iter([(f"k{unit}.txt", self.content)]), [f"k{unit}"])
                self.job.done(part, {"shard": dataclasses.asdict(info)})
                self.made.append(part)
        return len(todo)

    def manifest(self, markers) -> Manifest:
        shards = [ShardInfo(**m["shard"]) for m in markers.values()]
        return Manifest(RECIPE.to_dict(), RECIPE.fingerprint.hex(), {"name": "t"}, 10, 1, 1, 0, shards=shards)


def _job(tmp_path, identity: dict, **kw) -> ShardJob:
    return ShardJob(LocalOutput(tmp_path / "out"), job_digest(identity), **kw)


def _run(tmp_path, identity: dict, units: int = 3) -> _Tars:
    maker = _Tars(_job(tmp_path, identity))
    run(maker.job, maker, units)
    return maker


def test_a_rerun_reuses_intact_parts_and_remakes_changed_or_lost_ones(tmp_path):
    identity = {"seed": 0}
    assert _run(tmp_path, identity).made == ["part-0.tar", "part-1.tar", "part-2.tar"]
    assert _run(tmp_path, identity).made == []
    first = json.loads((tmp_path / "out" / MANIFEST_NAME).read_text())

    part = tmp_path / "out" / "part-1.tar"
    data = bytearray(part.read_bytes())
    data[514] ^= 0xFF  # inside the member's data (after its 512-byte header): same size, other bytes
    part.write_bytes(bytes(data))
    (tmp_path / "out" / "part-2.tar").unlink()
    assert _run(tmp_path, identity).made == ["part-1.tar", "part-2.tar"]
    assert json.loads((tmp_path / "out" / MANIFEST_NAME).read_text()) == first


def test_a_marker_counts_as_kept_but_not_as_finished_once_its_file_changed(tmp_path):
    maker = _run(tmp_path, {"seed": 0}, units=1)
    (tmp_path / "out" / "part-0.tar").write_bytes(b"not the tar the marker describes")
    fresh = _job(tmp_path, {"seed": 0})
    assert fresh.marked("part-0.tar")
    assert fresh.finished("part-0.tar") is None
    assert not _job(tmp_path, {"seed": 1}).marked("part-0.tar")
    assert maker.job.read_marker("part-0.tar")["job"] == fresh.digest


def test_another_jobs_markers_are_refused_saying_what_differs(tmp_path):
    old = {"seed": 0, "rounds": 8}
    maker = _run(tmp_path, old)
    maker.job.keep_identity(JOB_FILE, json.dumps(old), decides=False)
    new = {"seed": 0, "rounds": 16}
    with pytest.raises(OtherJobError, match=r"rounds 16 \(the output has 8\)"):
        _job(tmp_path, new).refuse_other_job(maker.parts(0), new, JOB_FILE, file_decides=False)
    _job(tmp_path, old).refuse_other_job(maker.parts(0), old, JOB_FILE, file_decides=False)  # its own: fine


def test_a_job_file_that_decides_refuses_before_any_part_exists(tmp_path):
    old, new = {"seed": 0}, {"seed": 1}
    _job(tmp_path, old).keep_identity(JOB_FILE, json.dumps({"job": job_digest(old), "identity": old}), decides=True)
    with pytest.raises(OtherJobError, match=r"seed 1 \(the output has 0\)"):
        _job(tmp_path, new).refuse_other_job(["part-0.tar"], new, JOB_FILE, file_decides=True)
    # a job file that only describes does not decide: with no markers there is nothing to refuse
    _job(tmp_path, new).refuse_other_job(["part-0.tar"], new, JOB_FILE, file_decides=False)
    # and one that decides is never replaced by a later run
    _job(tmp_path, new).keep_identity(JOB_FILE, json.dumps({"job": job_digest(new), "identity": new}), decides=True)
    assert json.loads((tmp_path / "out" / JOB_FILE).read_text())["identity"] == old


def test_waiting_for_parts_ends_with_an_error_naming_the_missing_ones(tmp_path):
    _run(tmp_path, {"seed": 0}, units=1)
    job = _job(tmp_path, {"seed": 0}, wait_timeout=-1.0)
    with pytest.raises(TimeoutError, match=r"got 1 not .*part-1\.tar"):
        job.wait_all(["part-0.tar", "part-1.tar"])
    assert list(job.wait_all(["part-0.tar"])) == ["part-0.tar"]
