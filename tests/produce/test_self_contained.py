from __future__ import annotations

import json
import tarfile

import numpy as np
import pytest
import torch
import webdataset as wds

from tests.producer_data import CLASSES, TEACHER, job_args, make_image_folder, make_wds_shard, tree_digest
from wds_reinforce.core.augment import Recipe, replay
from wds_reinforce.core.decode import SourceImage
from wds_reinforce.core.errors import UsageError
from wds_reinforce.core.format import Manifest, decode_sidecar
from wds_reinforce.core.targets import topk
from wds_reinforce.layouts import num_samples, timm_info
from wds_reinforce.produce.make import make_shards, prepare_job
from wds_reinforce.produce.teacher import load_teacher

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("src"), per_class=4)


@pytest.fixture(scope="module")
def made(source, tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    summary = make_shards(str(source), TEACHER, out=str(out), **job_args())
    return out, summary


def test_end_to_end_manifest_and_members(source, made):
    out, summary = made
    manifest = Manifest.from_json((out / "manifest.json").read_text())
    assert manifest.num_classes == 3 and manifest.class_names == list(CLASSES)
    assert (manifest.rounds, manifest.topk, manifest.seed) == (3, 2, 7)
    # 13 inputs in shards of 5: 3 shards; the broken JPEG is skipped and listed with its reason.
    assert [s.name for s in manifest.shards] == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    assert num_samples(manifest) == 12 == summary.samples
    assert [s.key for s in manifest.skipped] == ["dog_broken"]
    assert "cannot decode" in manifest.skipped[0].reason
    assert json.loads((out / "_info.json").read_text()) == timm_info(manifest)
    assert manifest.teacher["members"][0]["name"] == "test_resnet"
    assert manifest.fingerprint == Recipe.from_spec("rrc", size=32).fingerprint.hex()
    for info in manifest.shards:
        with tarfile.open(out / info.name) as tar:
            members = tar.getmembers()
        assert all(m.mtime == 0 and m.uid == 0 and m.gid == 0 and m.mode == 0o444 for m in members)
        names = [m.name for m in members]
        assert names[0].split(".")[0] == info.first_key and names[-1].split(".")[0] == info.last_key
        assert len(names) == 3 * info.samples
    stored = {}
    for info in manifest.shards:
        with tarfile.open(out / info.name) as tar:
            stored.update({m.name: tar.extractfile(m).read() for m in tar.getmembers()})
    assert stored["cat_img_0.jpg"] == (source / "cat" / "img.0.jpg").read_bytes()  # bytes untouched


def test_shards_mix_the_source_order_unless_asked_not_to(source, tmp_path):
    def shard_keys(out):
        manifest = Manifest.from_json((out / "manifest.json").read_text())
        keys = []
        for info in manifest.shards:
            with tarfile.open(out / info.name) as tar:
                keys.append([m.name.split(".")[0] for m in tar.getmembers() if m.name.endswith(".cls")])
        return keys

    kept = shard_keys(_made(source, tmp_path / "kept", shuffle=False))
    mixed = shard_keys(_made(source, tmp_path / "mixed"))
    flat_kept = [k for keys in kept for k in keys]
    flat_mixed = [k for keys in mixed for k in keys]
    assert flat_kept == sorted(flat_kept, key=flat_kept.index) and sorted(flat_mixed) == sorted(flat_kept)
    assert flat_mixed != flat_kept
    assert len({k.split("_")[0] for k in kept[0]}) < len({k.split("_")[0] for k in mixed[0]})
    # the permutation is a function of the seed
    assert shard_keys(_made(source, tmp_path / "again")) == mixed


def _made(source, out, **kwargs):
    make_shards(str(source), TEACHER, out=str(out), **{**job_args(), "progress": False, **kwargs})
    return out


def test_plain_webdataset_reads_the_shards(made):
    out, _ = made
    urls = [str(p) for p in sorted(out.glob("*.tar"))]
    ds = wds.WebDataset(urls, shardshuffle=False).decode("pil").to_tuple("jpg;png", "cls", "dr.mp")
    rows = list(ds)
    assert len(rows) == 12
    for img, cls, side in rows:
        assert img.mode == "RGB" and cls in (0, 1, 2)
        assert isinstance(side, dict) and side["n"] == 3


def test_exact_replay_reproduces_the_stored_topk(source, made):
    out, _ = made
    manifest = Manifest.from_json((out / "manifest.json").read_text())
    recipe = Recipe.from_dict(manifest.recipe)
    teacher = load_teacher(TEACHER, num_classes=3, device="cpu")
    with tarfile.open(out / "train-000001.tar") as tar:
        files = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    keys = sorted({name.split(".")[0] for name in files})
    checked = 0
    for key in keys:
        image = files.get(f"{key}.jpg") or files[f"{key}.png"]
        sc = decode_sidecar(files[f"{key}.dr.mp"], key)
        sc.validate(num_classes=3, key=key)
        assert sc.fingerprint == recipe.fingerprint and sc.rounds == 3
        for r in range(sc.rounds):
            pixels = replay(SourceImage(image), sc.round_params(r), recipe)
            idx, prob = topk(teacher.predict(pixels[None]), 2)
            assert idx[0].tolist() == sc.idx[r].tolist()
            np.testing.assert_allclose(prob[0].astype(np.float32), sc.prob[r].astype(np.float32), atol=2e-3)
            checked += 1
    assert checked >= 9


def test_rerun_is_byte_identical_and_independent_of_workers(source, made, tmp_path):
    out, _ = made
    again = tmp_path / "again"
    make_shards(str(source), TEACHER, out=str(again), **job_args(workers=1))
    assert tree_digest(again) == tree_digest(out)


def test_resume_verifies_and_redoes_only_broken_shards(source, made, tmp_path):
    out, _ = made
    copy = tmp_path / "copy"
    make_shards(str(source), TEACHER, out=str(copy), **job_args())
    (copy / "train-000000.tar").unlink()
    data = bytearray((copy / "train-000002.tar").read_bytes())
    data[600] ^= 0xFF
    (copy / "train-000002.tar").write_bytes(bytes(data))
    (copy / "manifest.json").unlink()
    summary = make_shards(str(source), TEACHER, out=str(copy), **job_args())
    assert (summary.made, summary.reused) == (2, 1)
    assert tree_digest(copy) == tree_digest(out)


def test_another_job_into_the_same_out_is_refused(source, made):
    out, _ = made
    with pytest.raises(UsageError, match="another job"):
        prepare_job(str(source), TEACHER, out=str(out), **job_args(seed=8))


def test_class_map_restricts_a_larger_teacher(source, tmp_path):
    cmap = tmp_path / "map.json"
    cmap.write_text(json.dumps({"cat": 7, "dog": 2, "eel": 9}))
    out = tmp_path / "out"
    make_shards(
        str(source),
        TEACHER,
        out=str(out),
        class_map=str(cmap),
        **job_args(teacher_num_classes=10, rounds=1, shard_size=20),
    )
    manifest = Manifest.from_json((out / "manifest.json").read_text())
    assert manifest.num_classes == 3 and manifest.teacher["class_map"] == [7, 2, 9]
    with tarfile.open(out / "train-000000.tar") as tar:
        sc = decode_sidecar(tar.extractfile("cat_img_0.dr.mp").read())
    sc.validate(num_classes=3)
    assert 2 / 3 - 1e-2 <= float(sc.prob[0].astype(np.float32).sum()) <= 1 + 1e-2  # top-2 of 3 renormalised classes
    with pytest.raises(UsageError, match="cover every source class"):
        cmap.write_text(json.dumps({"cat": 7}))
        prepare_job(
            str(source), TEACHER, out=str(tmp_path / "o2"), class_map=str(cmap), **job_args(teacher_num_classes=10)
        )


def test_exact_replay_with_randaugment_erasing_and_reduced_decode(source, tmp_path):
    out = tmp_path / "out"
    make_shards(
        str(source),
        TEACHER,
        out=str(out),
        **job_args(recipe="rrc+ra/re", decode="reduced", image_size=16, rounds=6, shard_size=20),
    )
    manifest = Manifest.from_json((out / "manifest.json").read_text())
    recipe = Recipe.from_dict(manifest.recipe)
    assert recipe.decode == "reduced" and num_samples(manifest) == 12
    teacher = load_teacher(TEACHER, num_classes=3, device="cpu")
    with tarfile.open(out / "train-000000.tar") as tar:
        files = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    for key in ("cat_img_0", "eel_img_3"):
        sc = decode_sidecar(files[f"{key}.dr.mp"], key)
        assert set(sc.ops) == {"rrc", "flip", "ra", "re"}
        for r in range(sc.rounds):
            pixels = replay(SourceImage(files[f"{key}.jpg"]), sc.round_params(r), recipe)
            idx, prob = topk(teacher.predict(pixels[None]), 2)
            assert idx[0].tolist() == sc.idx[r].tolist()
            np.testing.assert_allclose(prob[0].astype(np.float32), sc.prob[r].astype(np.float32), atol=2e-3)


# ----------------------------------------------------------------------------------------
# Inputs that cannot be read are listed as skipped, never dropped silently, never fatal


def _shard_keys(out) -> list[str]:
    keys = []
    for path in sorted(out.glob("*.tar")):
        with tarfile.open(path) as tar:
            keys += [m.name.split(".")[0] for m in tar.getmembers() if m.name.endswith(".cls")]
    return keys


def test_webdataset_sample_without_image_is_listed_as_skipped(tmp_path):
    shard = make_wds_shard(tmp_path / "src" / "s.tar", per_class=2, no_image=("nopic",))
    out = tmp_path / "out"
    summary = make_shards(str(shard), TEACHER, out=str(out), **job_args(rounds=1, shard_size=4))
    manifest = Manifest.from_json((out / "manifest.json").read_text())
    assert [(s.key, s.reason) for s in manifest.skipped] == [
        ("nopic", "no image member (jpg/jpeg/png/webp); members: ['cls', 'txt']")
    ]
    assert summary.skipped == 1 and num_samples(manifest) == 6 == summary.samples
    assert sorted(_shard_keys(out)) == ["s0_0", "s0_1", "s1_0", "s1_1", "s2_0", "s2_1"]


def test_source_file_gone_after_listing_is_listed_as_skipped(tmp_path):
    src = make_image_folder(tmp_path / "src", per_class=2, corrupt=False)
    out = tmp_path / "out"
    job = prepare_job(str(src), TEACHER, out=str(out), **job_args(rounds=1, shard_size=4))
    (src / "dog" / "img.0.jpg").unlink()  # listed by open_source, gone before it is read
    summary = job.run()
    manifest = Manifest.from_json((out / "manifest.json").read_text())
    assert [s.key for s in manifest.skipped] == ["dog_img_0"]
    assert manifest.skipped[0].reason.startswith("FileNotFoundError: [Errno 2] No such file or directory")
    assert "dog/img.0.jpg" in manifest.skipped[0].reason
    assert summary.manifest_written and num_samples(manifest) == 5
    assert "dog_img_0" not in _shard_keys(out) and len(_shard_keys(out)) == 5


def test_manifest_counts_a_done_marker_only_with_its_shard_intact(source, tmp_path):
    out = tmp_path / "out"
    make_shards(str(source), TEACHER, out=str(out), **job_args(rounds=1))  # 3 shards, markers in .done
    (out / "manifest.json").unlink()
    (out / "train-000000.tar").unlink()
    data = bytearray((out / "train-000002.tar").read_bytes())
    data[600] ^= 0xFF
    (out / "train-000002.tar").write_bytes(bytes(data))
    # As rank 0 under torchrun, waiting for other ranks: their stale markers must not count.
    job = prepare_job(str(source), TEACHER, out=str(out), **job_args(rounds=1)).job
    job.wait_timeout = 0.0
    parts = ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    with pytest.raises(
        TimeoutError,
        match=r"expected every part finished and matching its done marker, got 2 not "
        r".*\['train-000000.tar', 'train-000002.tar'\]",
    ):
        job.wait_all(parts)
    assert not (out / "manifest.json").exists()
    # Once the shards are back (here: remade by a rerun), the same wait accepts them.
    make_shards(str(source), TEACHER, out=str(out), **job_args(rounds=1))
    job = prepare_job(str(source), TEACHER, out=str(out), **job_args(rounds=1)).job
    job.wait_timeout = 0.0
    assert [d["shard"]["name"] for d in job.wait_all(parts).values()] == [
        "train-000000.tar",
        "train-000001.tar",
        "train-000002.tar",
    ]
