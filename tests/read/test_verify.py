from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from tests.shardmaker import make_shards
from wds_reinforce.read.picture import draw_rounds
from wds_reinforce.read.verify import verify_shards


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
        tmp_path / "ds",
        num_shards=2,
        per_shard=3,
        record_pixels=False,
        mutate=lambda key, ext, data: None if key == "s01_0002" else data,
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
        if key == "s01_0001" and ext == "jpg":  # one flipped bit: the image checksum tells
            return data[:200] + bytes([data[200] ^ 0x10]) + data[201:]
        return data

    made = make_shards(tmp_path / "ds", num_shards=2, per_shard=3, record_pixels=False, mutate=mutate)
    report = verify_shards(str(made.root))
    by_key = {}
    for p in report.problems:
        by_key.setdefault(p.key, []).append(p.message)
    assert by_key["s00_0001"][0].startswith("bad sidecar")
    assert any("cannot decode image" in m for m in by_key["s01_0000"])
    assert "image bytes do not match the sidecar's checksum: the image member is damaged" in by_key["s01_0001"]


def test_outputs_that_do_not_match_the_teacher_fail(made):
    from wds_reinforce.produce.teacher import Teacher

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
    from wds_reinforce.produce.make import make_shards as produce
    from wds_reinforce.produce.teacher import load_teacher

    source = make_image_folder(tmp_path / "src", per_class=3, corrupt=False)
    produce(str(source), TEACHER, out=str(tmp_path / "out"), **job_args())
    teacher = load_teacher(TEACHER, num_classes=3, device="cpu")
    report = verify_shards(str(tmp_path / "out"), teacher=teacher, checks=6)
    assert report.ok, [str(p) for p in report.problems]
    assert report.teacher_checks == 6 and report.max_prob_diff < 2e-3 and report.top1_agreement == 1.0


def _inspect(*args):
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    tool = str(root / "tools" / "inspect_shards.py")
    return subprocess.run([sys.executable, tool, *args], capture_output=True, text=True, cwd=root)


def test_inspect_cli_exit_status(made, tmp_path):
    ok = _inspect(str(made.root), "--no-progress")
    assert ok.returncode == 0 and ok.stdout.strip().endswith("OK")
    path = Path(made.urls[0])
    path.write_bytes(path.read_bytes()[:-1024])  # lose the end-of-archive blocks and more
    bad = _inspect(str(made.root), "--no-progress")
    assert bad.returncode == 1 and "FAIL shard-000000.tar" in bad.stdout
    missing = _inspect(str(tmp_path / "nothing"))
    assert missing.returncode == 2 and missing.stderr.startswith(
        "inspect_shards.py: error: expected a folder or URL prefix holding manifest.json"
    )
    assert "nothing', which does not exist" in missing.stderr
    assert "Traceback" not in missing.stderr


def test_sidecar_without_a_recipe_column_fails(tmp_path):
    from wds_reinforce.core.format import Sidecar, decode_sidecar, encode_sidecar

    def drop_flip(key, ext, data):
        if key != "s00_0002" or ext != "dr.mp":
            return data
        sc = decode_sidecar(data)
        return encode_sidecar(Sidecar(sc.fingerprint, sc.idx, sc.prob, {"rrc": sc.ops["rrc"]}))

    made = make_shards(tmp_path / "ds", num_shards=1, per_shard=3, record_pixels=False, mutate=drop_flip)
    report = verify_shards(str(made.root))
    assert [(p.key, p.message.split(":")[0]) for p in report.problems] == [("s00_0002", "bad sidecar")]
    assert "expected op columns" in report.problems[0].message


# ----------------------------------------------------------------------------------------
# Shards cut mid-member, and keys split as webdataset splits them


def _member_spans(path: Path) -> dict[str, tuple[int, int, int]]:
    """member name -> (header offset, data offset, data size)."""
    import tarfile

    with tarfile.open(path) as tar:
        return {m.name: (m.offset, m.offset_data, m.size) for m in tar.getmembers()}


@pytest.fixture
def nine(tmp_path):
    return make_shards(tmp_path / "ds", num_shards=1, per_shard=9, record_pixels=False)


@pytest.mark.parametrize("ext", ["jpg", "cls", "dr.mp"])
def test_cut_inside_a_member_names_the_cut_sample(nine, ext):
    # The old reader named the last sample it had finished (the 6th, or the 5th for a cut in the
    # 7th's first member) and counted only what it had yielded.
    seventh = nine.keys[6]
    path = Path(nine.urls[0])
    _, start, size = _member_spans(path)[f"{seventh}.{ext}"]
    path.write_bytes(path.read_bytes()[: start + size // 2])
    report = verify_shards(str(nine.root))
    cut = [p for p in report.problems if "cut" in p.message]
    assert [p.key for p in cut] == [seventh], [str(p) for p in report.problems]
    assert f"'{seventh}.{ext}'" in cut[0].message and "after 6 complete samples" in cut[0].message
    assert report.samples == 6
    messages = [str(p) for p in report.problems]
    assert "shard-000000.tar: 6 samples, the manifest says 9" in messages
    assert not any(p.key in nine.keys[:6] for p in report.problems), messages


def test_cut_inside_the_first_member_of_the_next_sample_counts_the_one_before(nine):
    path = Path(nine.urls[0])
    _, start, size = _member_spans(path)[f"{nine.keys[7]}.jpg"]
    path.write_bytes(path.read_bytes()[: start + size // 2])
    report = verify_shards(str(nine.root))
    assert [p.key for p in report.problems if p.key] == [nine.keys[7]]
    assert "after 7 complete samples" in report.problems[0].message and report.samples == 7


def test_cut_between_members_is_reported_on_the_cut_sample(nine):
    # tarfile ends quietly at a missing header: without the end-of-archive marker, the last
    # sample may lack members, and the verifier says so on that sample.
    seventh = nine.keys[6]
    path = Path(nine.urls[0])
    header, _, _ = _member_spans(path)[f"{seventh}.dr.mp"]
    path.write_bytes(path.read_bytes()[:header])
    report = verify_shards(str(nine.root))
    by_key = [(p.key, p.message) for p in report.problems if p.key]
    assert [k for k, _ in by_key] == [seventh, seventh]
    assert by_key[0][1] == "no dr.mp member"
    assert "without the end-of-archive marker" in by_key[1][1] and "6 complete samples" in by_key[1][1]


def test_whole_samples_without_the_end_marker_are_reported(nine):
    path = Path(nine.urls[0])
    _, start, size = _member_spans(path)[f"{nine.keys[-1]}.dr.mp"]
    path.write_bytes(path.read_bytes()[: -(-(start + size) // 512) * 512])  # the members, no end blocks
    report = verify_shards(str(nine.root))
    assert report.samples == 9
    assert [p.key for p in report.problems if p.key] == [nine.keys[-1]]
    assert "without the end-of-archive marker" in report.problems[0].message


def test_inspect_cli_names_the_cut_sample(nine, capsys):
    from wds_reinforce.cli.inspect_shards import main  # what tools/inspect_shards.py runs, in-process

    seventh = nine.keys[6]
    path = Path(nine.urls[0])
    _, start, size = _member_spans(path)[f"{seventh}.dr.mp"]
    path.write_bytes(path.read_bytes()[: start + size // 2])
    assert main([str(nine.root), "--no-progress", "--no-decode"]) == 1
    out = capsys.readouterr()
    lines = [line for line in out.out.splitlines() if " key " in line]
    assert len(lines) == 1 and lines[0].startswith(f"FAIL shard-000000.tar key {seventh}: shard cut inside member")
    assert "after 6 complete samples" in lines[0]
    assert "FAIL shard-000000.tar: 6 samples, the manifest says 9" in out.out


def test_keys_are_split_as_webdataset_splits_them(tmp_path):
    """A dot in a directory name stays in the key; the key ends at the basename's first dot."""
    import dataclasses
    import hashlib
    import io
    import tarfile

    import webdataset as wds

    made = make_shards(tmp_path / "ds", num_shards=1, per_shard=3, record_pixels=False)
    path = Path(made.urls[0])
    buf = io.BytesIO()
    with tarfile.open(path) as src, tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as dst:
        for info in src.getmembers():
            data = src.extractfile(info).read()
            info.name = f"a.b/{info.name}"
            dst.addfile(info, io.BytesIO(data))
    path.write_bytes(buf.getvalue())
    wds_keys = [s["__key__"] for s in wds.WebDataset(str(path), shardshuffle=False)]
    assert wds_keys == [f"a.b/{k}" for k in made.keys]
    shard = dataclasses.replace(
        made.manifest.shards[0],
        bytes=len(buf.getvalue()),
        sha256=hashlib.sha256(buf.getvalue()).hexdigest(),
        first_key=wds_keys[0],
        last_key=wds_keys[-1],
    )
    (made.root / "manifest.json").write_text(dataclasses.replace(made.manifest, shards=[shard]).to_json())
    report = verify_shards(str(made.root))
    assert report.ok, [str(p) for p in report.problems]
    assert report.samples == 3
    assert draw_rounds(str(made.root), str(tmp_path / "g.png"), key=wds_keys[1]) == wds_keys[1]


def test_a_sample_that_repeats_a_member_is_a_problem_of_its_shard(made):
    path = Path(made.urls[0])
    with tarfile.open(path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    key = members[0][0].name.split(".", 1)[0]
    end = next(i for i, (m, _) in enumerate(members) if not m.name.startswith(f"{key}."))  # its last member + 1
    members.insert(end, (tarfile.TarInfo(f"{key}.JPG"), b"again"))
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for info, data in members:
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    report = verify_shards(str(made.root))  # reported, not raised
    assert any(
        p.shard == "shard-000000.tar" and p.key == key and "repeats extension 'jpg'" in p.message
        for p in report.problems
    ), [str(p) for p in report.problems]
    assert not any(p.shard == "shard-000001.tar" for p in report.problems)


def test_a_label_that_does_not_match_its_sidecars_checksum_is_a_problem(tmp_path):
    def relabel(key, ext, data):  # another valid label: only the checksum can tell
        return (b"8" if data == b"9" else b"9") if (key, ext) == ("s00_0002", "cls") else data

    made = make_shards(tmp_path / "ds", num_shards=1, per_shard=4, record_pixels=False, mutate=relabel)
    report = verify_shards(str(made.root))
    problems = [(p.key, p.message) for p in report.problems if "label" in p.message]
    assert problems == [("s00_0002", "the label member 'cls' does not match the sidecar's checksum")]
