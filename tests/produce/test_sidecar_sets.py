"""Sidecar sets: reinforcement beside existing plain shards, one round group read per epoch.

Real servers only: image shards over HTTP (a stdlib server) and sidecars in moto's S3, and the
other way round, all on 127.0.0.1.
"""

from __future__ import annotations

import functools
import hashlib
import http.server
import io
import shutil
import tarfile
import threading
from collections import defaultdict
from pathlib import Path

import boto3
import pytest
import torch

from tests.conftest import encode, photo_like
from tests.producer_data import TEACHER
from wds_reinforce.core.errors import DataError, UsageError
from wds_reinforce.core.format import Manifest, decode_sidecar
from wds_reinforce.core.schedule import group_for, round_in_group
from wds_reinforce.layouts import num_samples
from wds_reinforce.produce.jobs import OtherJobError
from wds_reinforce.produce.make import make_shards
from wds_reinforce.read.dataset import ReinforcedDataset
from wds_reinforce.read.loader import SkipCounter

torch.set_num_threads(1)
KEYS_PER_SHARD = 3
JOB = dict(
    teacher_num_classes=3,
    image_size=32,
    topk=2,
    batch_size=1,  # one image per teacher call: both layouts see identical batches
    workers=0,
    seed=7,
    device="cpu",
    progress=False,
)


def make_image_shards(root: Path, shards: int = 3, no_image: str | None = None) -> list[Path]:
    """Plain webdataset shards (jpg + cls), as a user already has them; never rewritten."""
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for s in range(shards):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for i in range(KEYS_PER_SHARD):
                key = f"img{s}_{i}"
                members = {"cls": str((s + i) % 3).encode()}
                if key != no_image:
                    members = {"jpg": encode(photo_like(40 + 4 * i, 52, seed=10 * s + i), quality=85), **members}
                else:
                    members["txt"] = b"no picture here"
                for ext, data in members.items():
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        paths.append(root / f"images-{s:06d}.tar")
        paths[-1].write_bytes(buf.getvalue())
    return paths


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[Path]:
    return make_image_shards(tmp_path_factory.mktemp("images"))


@pytest.fixture(scope="module")
def sets(images, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sets")
    pattern = str(images[0]).replace("000000", "{000000..000002}")
    make_shards(pattern, TEACHER, out=str(out), sidecars_only=True, round_group=4, rounds=8, **JOB)
    return out


def _rows(source, epochs: range, **kw) -> dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]]:
    ds = ReinforcedDataset(source, keys=("__key__", "round", "image", "target"), **kw)
    out = {}
    for epoch in epochs:
        ds.set_epoch(epoch)
        for key, r, image, target in ds:
            out[(key, int(r))] = (image, target)
    return out


def test_manifest_lists_image_shards_and_groups_and_images_are_untouched(images, sets):
    before = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in images}
    manifest = Manifest.from_json((sets / "manifest.json").read_text())
    assert manifest.layout == "sidecar-sets" and manifest.rounds == 8 and num_samples(manifest) == 9
    assert [s.name for s in manifest.image_shards] == [str(p) for p in images]
    assert [s.sha256 for s in manifest.image_shards] == list(before.values())
    assert [(g.first_round, g.rounds) for g in manifest.round_groups] == [(0, 4), (4, 4)]
    assert [s.name for s in manifest.round_groups[1].shards][0] == "rounds-00004-00007/train-000000.tar"
    side = tarfile.open(sets / "rounds-00004-00007/train-000001.tar")
    names = side.getnames()
    assert names == [f"img1_{i}.dr.mp" for i in range(KEYS_PER_SHARD)]  # same keys, same order, sidecars only
    assert decode_sidecar(side.extractfile(names[0]).read()).rounds == 4
    assert not list(sets.glob("**/*.jpg"))


def test_same_key_and_round_give_identical_pixels_and_targets_in_both_layouts(images, sets, tmp_path):
    pattern = str(images[0]).replace("000000", "{000000..000002}")
    whole = tmp_path / "whole"
    make_shards(pattern, TEACHER, out=str(whole), rounds=8, shard_size=3, shuffle=False, **JOB)
    a, b = _rows(str(sets), range(8)), _rows(str(whole), range(8))
    assert len(a) == 9 * 8, "every round of every sample in 8 epochs"
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k][0], b[k][0]) and torch.equal(a[k][1], b[k][1]), k


def test_an_epoch_reads_one_group_and_a_cycle_uses_every_round(sets):
    ds = ReinforcedDataset(str(sets), seed=3, keys=("__key__", "round"))
    seen = defaultdict(list)
    for epoch in range(8):
        ds.set_epoch(epoch)
        rounds = {key: int(r) for key, r in ds}
        g = group_for(3, epoch, 8, 4)
        assert {r // 4 for r in rounds.values()} == {g}, "one round group per epoch"
        for key, r in rounds.items():
            assert r == g * 4 + round_in_group(3, key, epoch, 8, 4)
            seen[key].append(r)
    assert all(sorted(v) == list(range(8)) for v in seen.values())


def test_adding_rounds_writes_only_new_groups(images, tmp_path):
    out = tmp_path / "grow"
    pattern = str(images[0]).replace("000000", "{000000..000002}")
    make_shards(pattern, TEACHER, out=str(out), sidecars_only=True, round_group=4, rounds=8, **JOB)
    first = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.glob("rounds-*/*.tar")}
    assert len(first) == 6
    summary = make_shards(pattern, TEACHER, out=str(out), sidecars_only=True, round_group=4, rounds=16, **JOB)
    assert summary.made == 6 and summary.reused == 6
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in first} == first, "old groups untouched"
    manifest = Manifest.from_json((out / "manifest.json").read_text())
    assert manifest.rounds == 16 and len(manifest.round_groups) == 4
    seen = defaultdict(set)
    for key, r in _rows(str(out), range(16)):
        seen[key].add(r)
    assert all(v == set(range(16)) for v in seen.values()) and len(seen) == 9
    with pytest.raises(OtherJobError, match=r"another job \(group_rounds 2 \(the output has 4\)\)"):
        make_shards(pattern, TEACHER, out=str(out), sidecars_only=True, round_group=2, rounds=16, **JOB)


def test_bad_arguments_fail_before_any_work(images, tmp_path):
    pattern = str(images[0])
    with pytest.raises(UsageError, match="round_group a positive divisor of rounds=8"):
        make_shards(pattern, TEACHER, out=str(tmp_path / "o"), sidecars_only=True, round_group=3, rounds=8, **JOB)
    with pytest.raises(UsageError, match="existing image shards"):
        make_shards(str(tmp_path / "nope.tar"), TEACHER, out=str(tmp_path / "o"), sidecars_only=True, **JOB)
    with pytest.raises(UsageError, match="round_group only with sidecars_only"):
        make_shards(pattern, TEACHER, out=str(tmp_path / "o"), round_group=2, **JOB)
    # an option of self-contained shards, or one no job knows, means nothing for a sidecar set
    with pytest.raises(UsageError, match=r"expected no roundz, shard_size with sidecar sets"):
        make_shards(pattern, TEACHER, out=str(tmp_path / "o"), sidecars_only=True, shard_size=5, roundz=2, **JOB)
    make_job = functools.partial(make_shards, pattern, TEACHER, out=str(tmp_path / "o"), **JOB)
    with pytest.raises(TypeError, match=r"prepare_job\(\) got an unexpected keyword argument 'roundz'"):
        make_job(roundz=2)
    assert not (tmp_path / "o").exists()


def test_misaligned_shards_are_a_data_error_naming_both(images, sets, tmp_path):
    # image shard 0 replaced by shard 1's images: keys no longer match the sidecars
    manifest = Manifest.from_json((sets / "manifest.json").read_text())
    moved = tmp_path / "moved.tar"
    moved.write_bytes(images[1].read_bytes())
    manifest.image_shards[0].name = str(moved)
    (sets / "other.json").write_text(manifest.to_json())
    with pytest.raises(DataError, match=r"moved.tar: .*key 'img1_0' where sidecar shard .*train-000000.tar has"):
        list(ReinforcedDataset(str(sets / "other.json"), keys=("__key__",)))
    counter = SkipCounter()
    keys = [k for (k,) in ReinforcedDataset(str(sets / "other.json"), keys=("__key__",), handler=counter)]
    assert len(keys) == 6 and counter.samples == 3


def test_a_sample_without_image_is_listed_and_passed_over(tmp_path):
    shards = make_image_shards(tmp_path / "im", shards=2, no_image="img1_1")
    out = tmp_path / "out"
    make_shards([str(p) for p in shards], TEACHER, out=str(out), sidecars_only=True, rounds=2, **JOB)
    manifest = Manifest.from_json((out / "manifest.json").read_text())
    assert [s.key for s in manifest.skipped] == ["img1_1"] and "no image member" in manifest.skipped[0].reason
    counter = SkipCounter()
    keys = [k for (k,) in ReinforcedDataset(str(out), keys=("__key__",), handler=counter)]
    assert len(keys) == 5 and "img1_1" not in keys and counter.count == 0


# ----------------------------------------------------------------------------------------
# Images over HTTP, sidecars in S3 (moto), and the other way round


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def http_dir(tmp_path, monkeypatch):
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.setenv(name, "127.0.0.1")
    root = tmp_path / "served"
    root.mkdir()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(root)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_images_over_http_sidecars_in_s3(images, sets, http_dir, s3_env):
    root, base = http_dir
    for p in images:
        (root / p.name).write_bytes(p.read_bytes())
    boto3.client("s3", endpoint_url=s3_env).create_bucket(Bucket="side")
    urls = [f"{base}/{p.name}" for p in images]
    make_shards(urls, TEACHER, out="s3://side/run", sidecars_only=True, round_group=4, rounds=8, **JOB)
    remote = _rows("s3://side/run/manifest.json", range(8))
    local = _rows(str(sets), range(8))
    assert remote.keys() == local.keys() and len(remote) == 72
    assert all(torch.equal(remote[k][0], local[k][0]) and torch.equal(remote[k][1], local[k][1]) for k in local)


def test_images_in_s3_sidecars_over_http(images, sets, http_dir, s3_env):
    root, base = http_dir
    client = boto3.client("s3", endpoint_url=s3_env)
    client.create_bucket(Bucket="imgs")
    for p in images:
        client.put_object(Bucket="imgs", Key=f"train/{p.name}", Body=p.read_bytes())
    urls = [f"s3://imgs/train/{p.name}" for p in images]
    make_shards(urls, TEACHER, out=str(root / "sets"), sidecars_only=True, round_group=4, rounds=8, **JOB)
    remote = _rows(f"{base}/sets/manifest.json", range(8))
    local = _rows(str(sets), range(8))
    assert remote.keys() == local.keys()
    assert all(torch.equal(remote[k][0], local[k][0]) and torch.equal(remote[k][1], local[k][1]) for k in local)


def test_inspect_verifies_sidecar_sets_and_reruns_the_teacher(images, tmp_path):
    from wds_reinforce.produce.teacher import load_teacher
    from wds_reinforce.read.verify import verify_shards

    teacher = load_teacher(TEACHER, num_classes=3, device="cpu")
    copies = [tmp_path / p.name for p in images]
    for src, dst in zip(images, copies):
        dst.write_bytes(src.read_bytes())
    out = tmp_path / "sets"
    job = {k: v for k, v in JOB.items() if k not in ("teacher_num_classes", "device")}
    make_shards([str(p) for p in copies], teacher, out=str(out), sidecars_only=True, round_group=2, rounds=4, **job)
    report = verify_shards(str(out), teacher=teacher, checks=9)
    assert report.ok, [str(p) for p in report.problems]
    assert report.teacher_checks == 9 and report.top1_agreement == 1.0
    assert report.shards == 3 + 2 * 3 and report.samples == 9
    # an image shard changed since its sidecars were made
    data = bytearray(copies[1].read_bytes())
    data[700] ^= 0x20
    copies[1].write_bytes(bytes(data))
    problems = [str(p) for p in verify_shards(str(out)).problems]
    assert any("images-000001.tar" in p and "sha256 differs" in p for p in problems), problems
    # a sidecar shard of the wrong image shard: not aligned
    copies[1].write_bytes(images[1].read_bytes())
    side = out / "rounds-00002-00003"
    (side / "train-000000.tar").write_bytes((side / "train-000002.tar").read_bytes())
    problems = [str(p) for p in verify_shards(str(out)).problems]
    assert any("train-000000.tar" in p and "not aligned with image shard" in p for p in problems), problems


def test_a_second_teacher_adds_targets_only_and_the_loader_uses_one_or_the_mean(images, tmp_path):
    from wds_reinforce.core.targets import densify, mean_topk
    from wds_reinforce.produce.teacher import load_teacher
    from wds_reinforce.produce.teacher_sets import add_teacher_set

    first = load_teacher(TEACHER, num_classes=3, device="cpu")
    second = load_teacher("timm:test_efficientnet", num_classes=3, device="cpu")
    out = tmp_path / "sets"
    job = {k: v for k, v in JOB.items() if k not in ("teacher_num_classes", "device")}
    make_shards([str(p) for p in images], first, out=str(out), sidecars_only=True, round_group=2, rounds=4, **job)
    params_bytes = _member_bytes(out.glob("rounds-*/*.tar"))
    manifest = add_teacher_set(str(out), second, "second", batch_size=1, progress=False)
    assert [t.name for t in manifest.teacher_sets] == ["second"] and len(manifest.teacher_sets[0].groups) == 2
    shard = tarfile.open(out / "teachers/second/rounds-00000-00001/train-000000.tar")
    targets = decode_sidecar(shard.extractfile(shard.getnames()[0]).read())
    assert targets.ops == {} and targets.rounds == 2  # targets only: the parameters are not repeated
    assert _member_bytes(out.glob("teachers/**/*.tar")) < params_bytes
    own, other, mean = (_rows(str(out), range(4), teacher=t) for t in (0, 1, "mean"))
    assert own.keys() == other.keys() == mean.keys() and len(own) == 36
    differ = 0
    for k in own:
        assert torch.equal(own[k][0], other[k][0]) and torch.equal(own[k][0], mean[k][0])  # same pixels
        differ += not torch.equal(own[k][1], other[k][1])
        torch.testing.assert_close(mean[k][1].sum(), torch.tensor(1.0))
    assert differ > 30, "the second teacher's targets are its own"
    # the mean target is the smooth densification of the mean of both top-k rows
    ds = ReinforcedDataset(str(out), teacher="mean", keys=("__key__", "round", "target", "sidecar", "teacher_sidecars"))
    for _key, r, target, sc, extras in ds:
        row = r - 2 * (r // 2)
        idx, prob = mean_topk([(sc.idx[row], sc.prob[row]), (extras[0].idx[row], extras[0].prob[row])])
        torch.testing.assert_close(target, densify(idx, prob, 3), atol=1e-6, rtol=0)
    with pytest.raises(UsageError, match="expected teacher 'mean' or one of 0 .* 1 \\(second\\)"):
        ReinforcedDataset(str(out), teacher=2)
    with pytest.raises(UsageError, match="expected teacher an index >= 0 or 'mean'"):
        ReinforcedDataset(str(out), teacher="mean", densify="sparse")
    # the teacher set's group 0 targets in group 1's place: the sidecars' places tell them apart
    teachers = out / "teachers/second"
    swapped = (teachers / "rounds-00000-00001/train-000000.tar").read_bytes()
    (teachers / "rounds-00002-00003/train-000000.tar").write_bytes(swapped)
    epoch = next(e for e in range(50) if group_for(0, e, 4, 2) == 1)
    with pytest.raises(DataError, match="teacher set 1's sidecar does not hold targets for this sample's stored"):
        list(ReinforcedDataset(str(out), teacher=1, epoch=epoch, keys=("__key__",)))


def _member_bytes(paths) -> int:
    return sum(m.size for p in paths for m in tarfile.open(p).getmembers())


def test_ranks_split_image_shards_and_match_one_process(images, sets, tmp_path, monkeypatch):
    """Two ranks (run one after the other here) make the same files as one process."""
    out = tmp_path / "ranks"
    pattern = str(images[0]).replace("000000", "{000000..000002}")
    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank in (1, 0):  # rank 0 last: it waits for every shard, then writes the manifest
        monkeypatch.setenv("RANK", str(rank))
        summary = make_shards(pattern, TEACHER, out=str(out), sidecars_only=True, round_group=4, rounds=8, **JOB)
        # rank 1: its own share; rank 0: every rank's (rank 1's ran just before, so in this run)
        assert summary.made == (2 if rank == 1 else 6) and summary.manifest_written == (rank == 0)
    files = sorted(p.relative_to(out) for p in out.glob("rounds-*/*.tar"))
    assert files == sorted(p.relative_to(sets) for p in sets.glob("rounds-*/*.tar"))
    assert all((out / f).read_bytes() == (sets / f).read_bytes() for f in files)
    strip = lambda m: {k: v for k, v in m.__dict__.items() if k != "versions"}  # noqa: E731
    assert strip(Manifest.from_json((out / "manifest.json").read_text())) == strip(
        Manifest.from_json((sets / "manifest.json").read_text())
    )


def test_the_rounds_picture_of_a_sidecar_set(sets, tmp_path):
    from PIL import Image

    from wds_reinforce.read.picture import draw_rounds

    key = draw_rounds(str(sets), str(tmp_path / "rounds.png"), key="img1_2", max_rounds=6)
    assert key == "img1_2"
    assert Image.open(tmp_path / "rounds.png").size[0] > 0
    with pytest.raises(ValueError, match="key 'nope' is not in"):
        draw_rounds(str(sets), str(tmp_path / "x.png"), key="nope")


def test_train_sizes_its_workers_from_the_sets_image_shards(sets):
    """A sidecar set lists no ``shards``: the default worker count comes from its units (3 image shards)."""
    import json
    import os
    import subprocess
    import sys

    from wds_reinforce.core.threads import default_workers

    root = Path(__file__).resolve().parents[2]
    cmd = [sys.executable, str(root / "tools" / "train.py"), "--data", str(sets), "--epochs", "1", "--batch-size", "3"]
    out = subprocess.run([*cmd, "--json"], capture_output=True, text=True, check=True, cwd=root, env=os.environ)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["workers"] == min(default_workers(), 3) and result["steps"] == 9 // 3


def test_sidecars_record_their_image_shards_place_and_a_cut_sidecar_shard_is_named_as_itself(sets, tmp_path):
    manifest = Manifest.from_json((sets / "manifest.json").read_text())
    with tarfile.open(sets / "rounds-00000-00003/train-000001.tar") as tar:
        places = [decode_sidecar(tar.extractfile(m).read()).place for m in tar]
    assert places == [(1, n, 0) for n in range(len(places))]  # image shard 1, positions among its sidecars, round 0
    copy = tmp_path / "copy"
    shutil.copytree(sets, copy)
    for group in ("rounds-00000-00003", "rounds-00004-00007"):  # whichever group the epoch reads
        side = copy / group / "train-000001.tar"
        data = side.read_bytes()
        side.write_bytes(data[: data.index(b"img1_1.dr.mp") + 600])  # inside the second sample's sidecar
    counter = SkipCounter()
    keys = [k for (k,) in ReinforcedDataset(str(copy) + "/", keys=("__key__",), handler=counter)]
    assert counter.count == 1 and "rounds-0000" in counter.last and "/train-000001.tar: " in counter.last
    assert "images-000001.tar" not in counter.last, counter.last
    assert counter.samples == manifest.image_shards[1].samples - sum(k.startswith("img1_") for k in keys)


def test_a_round_groups_sidecar_shard_put_in_another_groups_place_is_refused(sets, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(sets, copy)
    shutil.copy(copy / "rounds-00000-00003/train-000001.tar", copy / "rounds-00004-00007/train-000001.tar")
    epoch = next(e for e in range(50) if group_for(0, e, 8, 4) == 1)  # an epoch that reads rounds 4-7
    counter = SkipCounter()
    keys = [k for (k,) in ReinforcedDataset(str(copy) + "/", keys=("__key__",), epoch=epoch, handler=counter)]
    assert not any(k.startswith("img1_") for k in keys) and len(keys) == 6
    assert (counter.samples, counter.foreign) == (3, 3), counter.last
    with pytest.raises(DataError, match="img1_0.: .* holds rounds from 0, where this epoch's round group begins at 4"):
        list(ReinforcedDataset(str(copy) + "/", keys=("__key__",), epoch=epoch))


def test_groups_remade_out_of_order_are_byte_identical_and_read_in_their_own_place(tmp_path):
    images = make_image_shards(tmp_path / "images", shards=1)
    out = tmp_path / "set"
    job = dict(out=str(out), sidecars_only=True, round_group=2, rounds=6, **JOB)
    make_shards(str(images[0]), TEACHER, **job)
    files = sorted(out.glob("rounds-*/*.tar"))
    before = {f: f.read_bytes() for f in files}
    files[0].unlink()  # groups 0 and 2 lost: the rerun makes rounds 0-1 and 4-5, not consecutive
    files[2].unlink()
    make_shards(str(images[0]), TEACHER, **job)
    assert {f: f.read_bytes() for f in sorted(out.glob("rounds-*/*.tar"))} == before
    with tarfile.open(files[2]) as tar:
        assert {decode_sidecar(tar.extractfile(m).read()).place[2] for m in tar} == {4}
