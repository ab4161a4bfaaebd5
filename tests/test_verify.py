from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from tests.shardmaker import make_shards
from wds_reinforce.verify import draw_rounds, verify_shards


@pytest.fixture
def made(tmp_path):
    return make_shards(tmp_path / "ds", num_shards=2, per_shard=3, rounds=3, topk=3, record_pixels=False)


def test_clean_dataset_passes(made):
    report = verify_shards(str(made.root))
    assert report.ok, [str(p) for p in report.problems]
    assert (report.shards, report.samples) == (2, 6)
    assert report.bytes == sum(s.bytes for s in made.manifest.shards)


def test_tampered_shard_fails_with_shard_name(made):
    path = Path(made.urls[1])
    data = bytearray(path.read_bytes())
    data[700] ^= 0xFF  # inside the first member's bytes
    path.write_bytes(bytes(data))
    report = verify_shards(str(made.root))
    assert not report.ok
    assert any(p.shard == "shard-000001.tar" and "sha256 differs" in p.message for p in report.problems)


def test_removed_sample_fails(tmp_path):
    made = make_shards(
        tmp_path / "ds", num_shards=2, per_shard=3, record_pixels=False, mutate=lambda key, ext, data: None if key == "s01_0002" else data
    )
    report = verify_shards(str(made.root))
    messages = [str(p) for p in report.problems]
    assert "shard-000001.tar: 2 samples, the manifest says 3" in messages


def test_corrupt_sidecar_and_image_are_named(tmp_path):
    def mutate(key, ext, data):
        if key == "s00_0001" and ext == "dr.mp":
            return data[:-3]
        if key == "s01_0000" and ext == "jpg":
            return data[: len(data) // 3]
        return data

    made = make_shards(tmp_path / "ds", num_shards=2, per_shard=3, record_pixels=False, mutate=mutate)
    report = verify_shards(str(made.root))
    by_key = {p.key: p.message for p in report.problems if p.key}
    assert by_key["s00_0001"].startswith("bad sidecar")
    assert "cannot decode image" in by_key["s01_0000"]


def test_outputs_that_do_not_match_the_teacher_fail(made):
    from wds_reinforce.teacher import Teacher

    teacher = Teacher("timm:resnet10t", num_classes=10, device="cpu")
    report = verify_shards(str(made.root), teacher=teacher, checks=4)
    assert report.teacher_checks == 4
    assert any("stored outputs differ from the teacher's" in p.message for p in report.problems)


def test_missing_manifest_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        verify_shards(str(tmp_path))


def test_grid_shows_every_round(made, tmp_path):
    out = tmp_path / "grid.png"
    key = draw_rounds(str(made.root), str(out), columns=2)
    assert key == made.keys[0]
    img = Image.open(out)
    assert img.size[0] == 2 * 150 and img.size[1] > 2 * 32


def test_producer_shards_pass_the_teacher_check(tmp_path):
    from tests.producer_data import TEACHER, job_args, make_image_folder
    from wds_reinforce.teacher import load_teacher
    from wds_reinforce.writer import make_shards as produce

    source = make_image_folder(tmp_path / "src", per_class=3, corrupt=False)
    produce(str(source), TEACHER, out=str(tmp_path / "out"), **job_args())
    teacher = load_teacher(TEACHER, num_classes=3, device="cpu")
    report = verify_shards(str(tmp_path / "out"), teacher=teacher, checks=6)
    assert report.ok, [str(p) for p in report.problems]
    assert report.teacher_checks == 6 and report.max_prob_diff < 2e-3 and report.top1_agreement == 1.0


def _inspect(*args):
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    return subprocess.run([sys.executable, str(root / "tools" / "inspect_shards.py"), *args], capture_output=True, text=True, cwd=root)


def test_inspect_cli_exit_status(made, tmp_path):
    ok = _inspect(str(made.root), "--no-progress")
    assert ok.returncode == 0 and ok.stdout.strip().endswith("OK")
    path = Path(made.urls[0])
    path.write_bytes(path.read_bytes()[:-1024])  # lose the end-of-archive blocks and more
    bad = _inspect(str(made.root), "--no-progress")
    assert bad.returncode == 1 and "FAIL shard-000000.tar" in bad.stdout
    missing = _inspect(str(tmp_path / "nothing"))
    assert missing.returncode == 2 and missing.stderr.startswith("inspect_shards.py: error: cannot read")
    assert "Traceback" not in missing.stderr


def test_sidecar_without_a_recipe_column_fails(tmp_path):
    from wds_reinforce.format import Sidecar, decode_sidecar, encode_sidecar

    def drop_flip(key, ext, data):
        if key != "s00_0002" or ext != "dr.mp":
            return data
        sc = decode_sidecar(data)
        return encode_sidecar(Sidecar(sc.fingerprint, sc.idx, sc.prob, {"rrc": sc.ops["rrc"]}))

    made = make_shards(tmp_path / "ds", num_shards=1, per_shard=3, record_pixels=False, mutate=drop_flip)
    report = verify_shards(str(made.root))
    assert [(p.key, p.message.split(":")[0]) for p in report.problems] == [("s00_0002", "bad sidecar")]
    assert "expected op columns" in report.problems[0].message
