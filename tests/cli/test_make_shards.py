"""The CLI end to end: argument errors, kill + resume, torchrun, and s3:// against a real moto server."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.producer_data import TEACHER, cli_args, job_args, make_image_folder, tree_digest
from wds_reinforce.core.errors import UsageError
from wds_reinforce.produce.make import make_shards, prepare_job

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
import make_shards as cli  # noqa: E402

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[2]
TOOL = str(ROOT / "tools" / "make_shards.py")


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), NO_PROXY="127.0.0.1", no_proxy="127.0.0.1")
    env.update(extra)
    return env


def _wait_for(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(
                f"process exited ({proc.returncode}) before {what}: {proc.stderr.read() if proc.stderr else ''}"
            )
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("src"), per_class=4)


@pytest.fixture(scope="module")
def reference(source, tmp_path_factory):
    """The uninterrupted single-process run every other run must match byte for byte."""
    out = tmp_path_factory.mktemp("ref")
    make_shards(str(source), TEACHER, out=str(out), **job_args())
    return out


# ----------------------------------------------------------------------------------------
# Bad arguments: one line, exit 2, nothing written


@pytest.mark.parametrize(
    "over, drop, match",
    [
        ({"--source": "{tmp}/missing"}, None, "not found"),
        ({"--source": "{tmp}/empty"}, None, "empty source"),
        ({}, "--source", "expected --source"),
        ({"--teacher": "timm:no_such_model"}, None, "unknown teacher 'timm:no_such_model'"),
        ({"--teacher": "keras:resnet"}, None, "unknown teacher kind 'keras'"),
        ({"--recipe": "no_such_recipe"}, None, "unknown recipe 'no_such_recipe'"),
        ({"--recipe": "{tmp}/missing.yaml"}, None, "does not exist"),
        ({"--topk": "4"}, None, "expected --topk <= the 3 classes, got 4"),
        (
            {"--teacher-num-classes": "10"},
            None,
            "expected a teacher with the source's 3 classes, got 10 (pass a --class-map from source classes",
        ),
        ({"--image-size": "0"}, None, "expected --image-size a positive int or (height, width), got 0"),
        ({"--out": "{tmp}/afile/out"}, None, "expected a writable output folder"),
        ({"--rounds": "0"}, None, "expected --rounds an integer >= 1, got 0"),
        ({"--teacher-checkpoint": "{tmp}/missing.pt"}, None, "expected a teacher checkpoint file"),
        ({"--class-map": "{tmp}/missing.json"}, None, "expected --class-map to be a JSON file"),
        (
            {"--teacher-checkpoint": "{tmp}/text.pt"},
            None,
            "expected a torch state_dict checkpoint at '{tmp}/text.pt' (loaded with weights_only=True), got ",
        ),
        (
            {"--teacher-checkpoint": "{tmp}/bytes.pt"},
            None,
            "expected a torch state_dict checkpoint at '{tmp}/bytes.pt' (loaded with weights_only=True), "
            "got UnpicklingError: Unsupported operand",
        ),
        ({"--teacher-checkpoint": "{tmp}/zero.pt"}, None, "(loaded with weights_only=True), got EOFError: unreadable"),
        ({"--teacher-checkpoint": "{tmp}/other.zip"}, None, "(loaded with weights_only=True), got RuntimeError: "),
        (
            {"--teacher-checkpoint": "{tmp}/cut.pt"},
            None,
            "(loaded with weights_only=True), got RuntimeError: PytorchStreamReader failed",
        ),
        ({"--teacher-checkpoint": "{tmp}/pickled.pt"}, None, "(loaded with weights_only=True), got UnpicklingError: "),
        ({"--source": "{tmp}/text.tar"}, None, "expected webdataset .tar shards, got {tmp}/text.tar: ReadError"),
    ],
)
def test_bad_arguments_fail_early(source, tmp_path, capsys, over, drop, match):
    _bad_inputs(tmp_path)
    out = tmp_path / "out"
    argv = cli_args(source, str(out), **{k: v.format(tmp=tmp_path) for k, v in over.items()})
    if drop:
        i = argv.index(drop)
        del argv[i : i + 2]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("make_shards.py: error: ") and "\n" not in err
    assert match.format(tmp=tmp_path) in err
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("device, match", [("cuda", "CUDA is not available"), ("gpu7", "expected device auto, cpu")])
def test_bad_device_fails_early(source, tmp_path, capsys, device, match):
    assert cli.main(cli_args(source, str(tmp_path / "out"), **{"--device": device})) == 2
    assert match in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def _bad_inputs(tmp: Path) -> None:
    """Files that are not what their option expects: none may give a traceback."""
    import pickle
    import zipfile

    (tmp / "empty").mkdir()
    (tmp / "afile").write_text("x")
    (tmp / "text.pt").write_text("these are not weights\n")
    (tmp / "bytes.pt").write_bytes(bytes(range(123, 256)) * 4)
    (tmp / "zero.pt").write_bytes(b"")
    with zipfile.ZipFile(tmp / "other.zip", "w") as z:
        z.writestr("readme.txt", "a zip, but not a torch file")
    torch.save({"w": torch.zeros(3)}, tmp / "good.pt")
    (tmp / "cut.pt").write_bytes((tmp / "good.pt").read_bytes()[:200])
    (tmp / "pickled.pt").write_bytes(pickle.dumps({"w": {1, 2}}))  # needs pickle, not weights_only
    (tmp / "text.tar").write_text("not a tar file\n" * 40)


@pytest.mark.parametrize(
    "over, match",
    [
        ({"--teacher-checkpoint": "{tmp}/bytes.pt"}, "expected a torch state_dict checkpoint at '{tmp}/bytes.pt'"),
        ({"--source": "{tmp}/text.tar"}, "expected webdataset .tar shards, got {tmp}/text.tar: ReadError"),
    ],
)
def test_bad_input_file_in_a_subprocess_is_one_line(source, tmp_path, over, match):
    _bad_inputs(tmp_path)
    out = tmp_path / "out"
    argv = cli_args(source, str(out), **{k: v.format(tmp=tmp_path) for k, v in over.items()})
    proc = subprocess.run([sys.executable, TOOL, *argv], capture_output=True, text=True, env=_env(), timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("make_shards.py: error: "), proc.stderr
    assert match.format(tmp=tmp_path) in lines[0]
    assert not out.exists()


def test_bad_argument_in_a_subprocess_has_no_traceback(source, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, TOOL, *cli_args(source, str(out), **{"--topk": "9"})],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=120,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == "make_shards.py: error: expected --topk <= the 3 classes, got 9"
    assert not out.exists()


def test_config_yaml_gives_the_same_shards(source, reference, tmp_path):
    out = tmp_path / "out"
    argv = cli_args(source, str(out))
    cfg = tmp_path / "job.yaml"
    # Options from the file, except --out given on the command line (which wins).
    pairs = dict(zip(argv[0:-1:2], argv[1:-1:2]))
    pairs.pop("--out")
    cfg.write_text(
        "".join(
            f"{k[2:]}: {v!r}\n" if k in ("--source", "--teacher", "--device") else f"{k[2:]}: {v}\n"
            for k, v in pairs.items()
        )
    )
    assert cli.main(["--config", str(cfg), "--out", str(out), "--no-progress"]) == 0
    assert tree_digest(out) == tree_digest(reference)


# ----------------------------------------------------------------------------------------
# Killed mid-way, then resumed: the same bytes as an uninterrupted run


def test_sigkill_then_resume_is_byte_identical(tmp_path):
    src = make_image_folder(tmp_path / "src", per_class=10)  # 31 inputs, one shard each
    ref = tmp_path / "ref"
    make_shards(str(src), TEACHER, out=str(ref), **job_args(shard_size=1))
    out = tmp_path / "out"
    argv = [sys.executable, TOOL, *cli_args(src, str(out), **{"--shard-size": "1"})]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    try:
        _wait_for(lambda: (out / ".done" / "train-000000.tar.json").exists(), 120, "the first finished shard", proc)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    finished = len(list((out / ".done").glob("*.json")))
    assert not (out / "manifest.json").exists() and 1 <= finished < 31, f"{finished} shards finished before the kill"
    done = subprocess.run([*argv], capture_output=True, text=True, env=_env(), timeout=300)
    assert done.returncode == 0, done.stderr
    assert f"{31 - finished} made, {finished} reused" in done.stdout or finished == 31
    assert tree_digest(out) == tree_digest(ref)


# ----------------------------------------------------------------------------------------
# torchrun on CPU: two ranks share the shards; rank 0 writes the manifest


def test_torchrun_two_ranks_match_one_process(source, reference, tmp_path):
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        TOOL,
        *cli_args(source, str(out)),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert tree_digest(out) == tree_digest(reference)


# ----------------------------------------------------------------------------------------
# s3:// against a real moto server on 127.0.0.1


@pytest.fixture
def s3(s3_env):
    import boto3

    client = boto3.client("s3")
    client.create_bucket(Bucket="reinforced")
    return client


def test_s3_out_matches_local_and_resumes(source, reference, s3):
    summary = make_shards(str(source), TEACHER, out="s3://reinforced/run1", **job_args())
    assert summary.made == 3
    listed = sorted(o["Key"] for o in s3.list_objects_v2(Bucket="reinforced", Prefix="run1/")["Contents"])
    assert [k for k in listed if not k.startswith("run1/.done/")] == [
        "run1/_info.json",
        "run1/manifest.json",
        "run1/train-000000.tar",
        "run1/train-000001.tar",
        "run1/train-000002.tar",
    ]
    for name in ("train-000000.tar", "train-000001.tar", "train-000002.tar", "manifest.json", "_info.json"):
        body = s3.get_object(Bucket="reinforced", Key=f"run1/{name}")["Body"].read()
        assert body == (reference / name).read_bytes(), name
    s3.delete_object(Bucket="reinforced", Key="run1/train-000001.tar")
    again = make_shards(str(source), TEACHER, out="s3://reinforced/run1", **job_args())
    assert (again.made, again.reused) == (1, 2)


def test_s3_missing_bucket_is_a_usage_error(source, s3):
    with pytest.raises(UsageError, match="expected a writable output"):
        prepare_job(str(source), TEACHER, out="s3://no-such-bucket/x", **job_args())


# ----------------------------------------------------------------------------------------
# Ctrl-C, logs, refusals that say why (issue 11)


def _done_markers(out: Path) -> int:
    return len(list((out / ".done").glob("train-*.tar.json")))


@pytest.mark.parametrize("target", ["process", "group"])
def test_ctrl_c_says_how_to_resume_and_a_rerun_resumes(tmp_path, target):
    """A real SIGINT: to the producer alone, or to its process group as a terminal's Ctrl-C sends it."""
    src = make_image_folder(tmp_path / "src", per_class=10)  # 31 inputs, one shard each
    ref = tmp_path / "ref"
    make_shards(str(src), TEACHER, out=str(ref), **job_args(shard_size=1))
    out = tmp_path / "out"
    argv = [sys.executable, TOOL, *cli_args(src, str(out), **{"--shard-size": "1", "--workers": "1"})]
    proc = subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
        start_new_session=True,
        # A shell's background job (nohup ... &) starts with SIGINT ignored, and its children inherit
        # that: give the producer the default disposition a terminal's foreground job has.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        _wait_for(lambda: _done_markers(out) >= 1, 120, "the first finished shard", proc)
        if target == "group":
            os.killpg(proc.pid, signal.SIGINT)
        else:
            proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    kept = _done_markers(out)
    assert err.strip().splitlines()[-1] == (
        f"make_shards.py: interrupted; rerun the same command to resume, {kept} shards kept"
    )
    assert 1 <= kept < 31 and not (out / "manifest.json").exists()
    done = subprocess.run(argv, capture_output=True, text=True, env=_env(), timeout=300)
    assert done.returncode == 0, done.stderr
    assert f"({31 - kept} made, {kept} reused)" in done.stdout
    assert tree_digest(out) == tree_digest(ref)


def test_a_log_gets_a_line_per_finished_shard(source, tmp_path):
    out = tmp_path / "out"
    argv = cli_args(source, str(out))
    argv.remove("--no-progress")  # progress on, but stderr is a pipe: lines, not a bar
    proc = subprocess.run([sys.executable, TOOL, *argv], capture_output=True, text=True, env=_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr
    # (a shard slower than 30 s, on a loaded machine, also gets an "in progress" line)
    lines = [line for line in proc.stderr.splitlines() if line.startswith("reinforce:") and " done (" in line]
    assert len(lines) == 3 and "\r" not in proc.stderr
    assert lines[0].startswith("reinforce: shard 1/3 done (train-000000.tar); 5/13 samples (38 %), ")
    assert lines[-1].startswith("reinforce: shard 3/3 done (train-000002.tar); 13/13 samples (100 %), ")
    assert all(" samples/s, elapsed " in line and ", ETA " in line for line in lines)


def test_another_job_is_refused_naming_what_differs(source, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main(cli_args(source, str(out))) == 0
    capsys.readouterr()
    assert cli.main(cli_args(source, str(out), **{"--rounds": "2", "--seed": "8"})) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "got shards of another job (" in err
    assert "rounds 2 (the output has 3)" in err and "seed 8 (the output has 7)" in err
    assert cli.main(cli_args(source, str(out), **{"--image-size": "24"})) == 2
    assert "recipe.size[0] 24 (the output has 32)" in capsys.readouterr().err


@pytest.mark.skipif(not sys.platform.startswith("linux") or not os.path.isdir("/proc"), reason="needs /proc")
def test_unwritable_out_under_proc_is_one_line(source, capsys):
    assert cli.main(cli_args(source, "/proc/x")) == 2
    err = capsys.readouterr().err.strip()
    assert (
        err.startswith("make_shards.py: error: expected a writable output folder, got '/proc/x' (") and "\n" not in err
    )


def test_default_topk_fits_the_classes_and_help_says_the_thread_choice(source, tmp_path, capsys):
    out = tmp_path / "out"
    argv = cli_args(source, str(out))
    i = argv.index("--topk")
    del argv[i : i + 2]
    assert cli.main(argv) == 0
    assert json.loads((out / "manifest.json").read_text())["topk"] == 3  # 3 classes, not the default 10
    assert capsys.readouterr().err.splitlines()[0] == (
        "make_shards.py: note: keeping all 3 classes per round (the default --topk 10 is more than there are)"
    )
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "cores available ->" in text and "at most 8" in text


def test_argument_errors_come_before_the_teacher_loads(source, tmp_path):
    """Cheap checks run before torch loads a model: fast, one line."""
    out = tmp_path / "out"
    for over, message in [
        ({"--workers": "-1"}, "expected --workers an integer >= 0, got -1"),
        ({"--threads": "0"}, "expected --threads an integer >= 1, got 0"),
        ({"--source": str(tmp_path / "none.tar")}, "expected existing webdataset shard(s)"),
    ]:
        proc = subprocess.run(
            [sys.executable, TOOL, *cli_args(source, str(out), **over)],
            capture_output=True,
            text=True,
            env=_env(),
            timeout=120,
        )
        assert proc.returncode == 2 and message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_a_recipe_file_is_named_by_its_file(source, tmp_path):
    recipe = tmp_path / "mild.yaml"
    recipe.write_text("ops:\n  - {op: rrc, scale: [0.35, 1.0]}\n  - {op: flip}\n")
    out = tmp_path / "out"
    assert cli.main(cli_args(source, str(out), **{"--recipe": str(recipe)})) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["recipe"]["name"] == "mild.yaml" and manifest["recipe"]["ops"][0]["scale"] == [0.35, 1.0]


@pytest.mark.parametrize(
    "over, match",
    [
        ({"image_size": 0}, "expected image_size a positive int or (height, width), got 0"),
        ({"topk": 4}, "expected topk <= the 3 classes, got 4"),
        ({"teacher_num_classes": 10}, "(pass a class_map from source classes to teacher classes)"),
    ],
)
def test_the_library_names_its_arguments_not_the_flags(source, tmp_path, over, match):
    with pytest.raises(UsageError) as info:
        prepare_job(str(source), TEACHER, str(tmp_path / "out"), **job_args(**over))
    assert match in str(info.value) and "--" not in str(info.value)
