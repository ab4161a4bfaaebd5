"""What the producer reports (issue 21): a sidecar set's class names, what its bytes per round
count, and the totals of several rank processes writing one output."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

from tests.conftest import encode, photo_like
from tests.producer_data import CLASSES, TEACHER, job_args, make_image_folder
from wds_reinforce.core.errors import UsageError
from wds_reinforce.core.format import Manifest
from wds_reinforce.core.progress import ShardProgress
from wds_reinforce.produce.make import make_shards

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[2]
SETS = dict(job_args(), sidecars_only=True)
del SETS["shard_size"]


def _manifest(out: Path) -> Manifest:
    return Manifest.from_json((out / "manifest.json").read_text())


@pytest.fixture(scope="module")
def named_shards(tmp_path_factory) -> Path:
    """Self-contained shards made from an ImageFolder of named classes (cat, dog, eel)."""
    out = tmp_path_factory.mktemp("named")
    source = str(make_image_folder(tmp_path_factory.mktemp("src"), corrupt=False))
    make_shards(source, TEACHER, out=str(out), **job_args())
    (out / "source.txt").write_text(source)
    return out


def _bare_shard(path: Path, json_names: bool) -> Path:
    """A plain shard with no manifest beside it: labels in ``cls``, or a json with the class's name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for i in range(4):
            c = i % 3
            label = (
                ("json", json.dumps({"label": c, "class_name": CLASSES[c]}).encode())
                if json_names
                else ("cls", b"%d" % c)
            )
            for ext, data in (("jpg", encode(photo_like(40, 44, seed=i), quality=85)), label):
                info = tarfile.TarInfo(f"k{i}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


# ----------------------------------------------------------------------------------------
# Class names


def test_a_sidecar_set_of_named_shards_gets_their_class_names(named_shards, tmp_path):
    out = tmp_path / "sets"
    summary = make_shards(str(named_shards / "train-{000000..000002}.tar"), TEACHER, out=str(out), **SETS)
    assert _manifest(out).class_names == list(CLASSES)
    assert f"class names: 3, from {named_shards / 'manifest.json'}" in summary.format()


def test_class_names_from_a_file_win_and_must_match_the_teacher(named_shards, tmp_path):
    names = tmp_path / "names.txt"
    names.write_text("kitten\npuppy\nlamprey\n\n")
    out = tmp_path / "sets"
    make_shards(str(named_shards / "train-000000.tar"), TEACHER, out=str(out), class_names=str(names), **SETS)
    assert _manifest(out).class_names == ["kitten", "puppy", "lamprey"]
    names.write_text("kitten\npuppy\n")
    with pytest.raises(
        UsageError, match=r"expected class_names file '.*names.txt' to name the teacher's 3 classes, got 2"
    ):
        make_shards(
            str(named_shards / "train-000000.tar"), TEACHER, out=str(tmp_path / "o"), class_names=str(names), **SETS
        )
    with pytest.raises(UsageError, match="expected class_names only with sidecars_only"):
        make_shards(
            str(named_shards / "train-000000.tar"),
            TEACHER,
            out=str(tmp_path / "o"),
            class_names=str(names),
            **job_args(),
        )


def test_the_cli_names_the_flag_of_a_class_names_mismatch(named_shards, tmp_path):
    names = tmp_path / "names.txt"
    names.write_text("a\nb\nc\nd\n")
    argv = ["--source", str(named_shards / "train-000000.tar"), "--sidecars-only", "--class-names", str(names)]
    argv += ["--teacher", TEACHER, "--teacher-num-classes", "3", "--image-size", "32", "--rounds", "2", "--topk", "2"]
    argv += ["--workers", "0", "--device", "cpu", "--no-progress", "--out", str(tmp_path / "o")]
    done = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "make_shards.py"), *argv], capture_output=True, text=True, env=_env()
    )
    assert done.returncode == 2
    flag = f"--class-names file {str(names)!r}"
    assert done.stderr.strip() == f"make_shards.py: error: expected {flag} to name the teacher's 3 classes, got 4 names"


def test_names_from_the_samples_json_else_numbers_with_a_note(tmp_path):
    out = tmp_path / "json-sets"
    make_shards(str(_bare_shard(tmp_path / "j" / "a.tar", json_names=True)), TEACHER, out=str(out), **SETS)
    assert _manifest(out).class_names == list(CLASSES)
    out = tmp_path / "bare-sets"
    summary = make_shards(str(_bare_shard(tmp_path / "b" / "a.tar", json_names=False)), TEACHER, out=str(out), **SETS)
    assert _manifest(out).class_names == ["0", "1", "2"]
    assert (
        'class names: not found (no class_names beside the image shards, no json class_name), listed as "0" .. "2"'
        in (summary.format())
    )


def test_the_picture_never_runs_a_class_into_its_probability():
    from wds_reinforce.read.picture import class_text

    assert class_text(5, [str(c) for c in range(6)]) == "class 5"
    assert class_text(0, ["circle", "square"]) == "circle (0)"
    assert class_text(7, ["circle"]) == "class 7"


# ----------------------------------------------------------------------------------------
# Bytes per round


def _sidecar_members(paths: list[Path]) -> tuple[int, int]:
    """(sidecar members, their bytes) in tars."""
    sizes = [m.size for p in paths for m in tarfile.open(p).getmembers() if m.name.endswith(".dr.mp")]
    return len(sizes), sum(sizes)


@pytest.mark.parametrize("group", [1, 3])
def test_the_bytes_line_says_payload_tar_overhead_and_what_an_epoch_reads(named_shards, tmp_path, group):
    out = tmp_path / "sets"
    summary = make_shards(
        str(named_shards / "train-{000000..000002}.tar"), TEACHER, out=str(out), round_group=group, **SETS
    )
    tars = sorted(out.glob("rounds-*/*.tar"))
    members, payload = _sidecar_members(tars)
    samples, rounds = 12, 3
    assert members == samples * rounds // group
    disk = sum(p.stat().st_size for p in tars)
    per_round = samples * rounds
    read = f"one group of {group} round{'s' * (group > 1)}" if group < rounds else "all 3 rounds"
    lines = summary.format().splitlines()
    assert lines[1] == (
        f"sidecar: {payload / per_round:.1f} B/round payload + {(disk - payload) / per_round:.1f} B/round tar "
        f"overhead = {disk / per_round:.1f} B/round on disk; an epoch reads {read}: {disk / members:.0f} B of "
        "sidecar per sample"
    )
    each = "sample and round group" if group < rounds else "sample"
    why = "; larger groups pay it fewer times" if group < rounds else ""
    assert lines[2] == (
        f"  (tar overhead: {(disk - payload) / members:.0f} B per {each}: a sidecar member's 512-byte header and "
        f"padding to 512 bytes, and a share of the tar's end{why})"
    )
    assert summary.sidecar_bytes_per_round == pytest.approx(payload / (samples * rounds))


def test_self_contained_shards_count_their_sidecar_members_the_same_way(named_shards):
    tars = sorted(named_shards.glob("train-*.tar"))
    members, payload = _sidecar_members(tars)
    overhead = sum(
        512 + -(-m.size // 512) * 512 - m.size
        for p in tars
        for m in tarfile.open(p).getmembers()
        if m.name.endswith(".dr.mp")
    )
    summary = make_shards(
        (named_shards / "source.txt").read_text(), TEACHER, out=str(named_shards), **job_args()
    )  # all reused
    assert summary.format().splitlines()[1] == (
        f"sidecar: {payload / (members * 3):.1f} B/round payload + {overhead / (members * 3):.1f} B/round tar "
        f"overhead = {(payload + overhead) / (members * 3):.1f} B/round on disk; an epoch reads all 3 rounds: "
        f"{(payload + overhead) / members:.0f} B of sidecar per sample"
    )


# ----------------------------------------------------------------------------------------
# Several rank processes


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    env.update(extra)
    return env


def test_two_rank_processes_report_their_progress_and_rank_0_the_totals(tmp_path):
    src = make_image_folder(tmp_path / "src", per_class=4, corrupt=False)
    out = tmp_path / "out"
    argv = [sys.executable, str(ROOT / "tools" / "make_shards.py"), "--source", str(src), "--teacher", TEACHER]
    argv += ["--teacher-num-classes", "3", "--image-size", "32", "--rounds", "3", "--topk", "2", "--shard-size", "4"]
    argv += ["--batch-size", "8", "--workers", "0", "--seed", "7", "--device", "cpu", "--out", str(out)]
    procs = [
        subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(RANK=str(r), WORLD_SIZE="2")
        )
        for r in (0, 1)
    ]
    (out0, err0), (out1, err1) = (p.communicate(timeout=600) for p in procs)
    assert [p.returncode for p in procs] == [0, 0], err0 + err1
    # every rank reports its own progress, prefixed, from a first line on
    assert err1.splitlines()[0] == "rank 1/2: reinforce: started, 1 shards (4 samples) to make"
    assert any(
        line.startswith("rank 1/2: reinforce: shard 1/1 done (train-000001.tar); 4/4 samples")
        for line in err1.splitlines()
    )
    assert err0.splitlines()[0] == "rank 0/2: reinforce: started, 2 shards (8 samples) to make"
    # rank 1 says its share; rank 0 sums every rank's work from the markers
    assert out1.strip().startswith("rank 1/2 (its own share): made 1 of the 3 shards, reused 0, 4 samples")
    assert "12 images x rounds at " in out1
    markers = [json.loads(p.read_text()) for p in sorted((out / ".done").glob("train-*.json"))]
    assert sorted(m["made"]["rank"] for m in markers) == [0, 0, 1]
    assert sum(m["made"]["views"] for m in markers) == 36 == 12 * 3
    assert "12 samples x 3 rounds in 3 shards (3 made over 2 ranks, 0 reused)" in out0
    throughput = re.search(r"throughput: [\d.]+ images x rounds / s over 2 ranks \((\d+) in ", out0)
    assert throughput is not None and int(throughput.group(1)) == 36, out0
    assert "each rank's own: rank 0 " in out0 and ", rank 1 " in out0


def test_a_log_gets_a_first_line_before_any_shard_is_done():
    log = io.StringIO()
    progress = ShardProgress(3000, 3, "rank 1/2: reinforce", stream=log, clock=lambda: 0.0)
    progress.started()
    assert log.getvalue() == "rank 1/2: reinforce: started, 3 shards (3000 samples) to make\n"


def test_a_run_id_tells_this_launchs_parts_from_an_earlier_ones(tmp_path, monkeypatch):
    """With a run id the markers' ``run`` decides (an earlier launch a second ago is not this one; a rank
    started long before is); without one, the timing heuristic."""
    from wds_reinforce.io.outputs import LocalOutput
    from wds_reinforce.produce.jobs import SAME_RUN_SLACK, ShardJob

    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    monkeypatch.setenv("WDS_REINFORCE_RUN_ID", "launch-2")
    job = ShardJob(LocalOutput(tmp_path), "d" * 16, rank=0, world=2)
    assert job.work(4, 12)["run"] == "launch-2"
    now = job.started_at
    earlier = {"made": {"rank": 1, "started": now - 1.0, "run": "launch-1"}}
    long_ago = {"made": {"rank": 1, "started": now - 10 * SAME_RUN_SLACK, "run": "launch-2"}}
    assert not job.made_in_this_run(earlier, earlier)
    assert job.made_in_this_run(long_ago, long_ago)
    monkeypatch.setenv("WDS_REINFORCE_RUN_ID", "")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")  # torchrun's default: no id
    guess = ShardJob(LocalOutput(tmp_path), "d" * 16, rank=0, world=2)
    assert guess.run is None and "run" not in guess.work(4, 12)
    assert guess.made_in_this_run(earlier, earlier)  # within the slack: counted as made
    assert not guess.made_in_this_run(long_ago, long_ago)
    assert guess.made_in_this_run(long_ago, None)  # changed since this rank started
