"""apple/ml-dr's CIFAR-100+, Flowers-102+ and Food-101+: torchvision's train splits as sources, joblib and gzip records.

Fixtures are built byte by byte (tests/mldr_plus.py): CIFAR's Python 2 pickles and joblib's files
from hand-written pickle opcodes, Flowers' MAT-files from their element layout. The tests here need
no new op; those that do (CIFAR's resize and random_crop, RandAugment p < 1, a recipe without a
crop) are in test_mldr_plus_ops.py.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.importers.test_mldr import _shards
from tests.mldr_plus import (
    NumpyArray,
    cifar_root,
    draw_plus,
    expected_columns,
    flowers_root,
    food_root,
    joblib_file,
    pickled,
    plus_config,
    torch_saved,
    write_mat,
)
from wds_reinforce import decode_sidecar
from wds_reinforce.core.errors import UsageError
from wds_reinforce.importers.datasets import open_dataset
from wds_reinforce.importers.mldr import MetadataError, MldrConfig, import_mldr
from wds_reinforce.importers.mldr.unpickle import load_arrays, load_record
from wds_reinforce.io.matfile import read_mat

ROOT = Path(__file__).resolve().parents[2]
FLOWER_SIZES = [(60, 80), (70, 50), (90, 90), (64, 64), (80, 100), (50, 70)]
FLOWER_TRNID = [5, 2, 6, 1]  # setid.mat's train ids, not sorted: the order is theirs
FLOWER_LABELS = [3, 1, 102, 3, 1, 2]  # imagelabels.mat counts from 1


def write_archive(out: Path, files: list[tuple[str, bytes]], mode: str) -> Path:
    """Their ``reinforced_data`` as ``.tar.gz`` (gzip: true), ``.tar`` (gzip: false) or a folder."""
    if mode == "dir":
        (out / "reinforced_data").mkdir(parents=True)
        for name, data in files:
            (out / "reinforced_data" / name).write_bytes(data)
        return out
    with tarfile.open(out, "w:gz" if mode == "tar.gz" else "w") as tar:
        for name, data in files:
            info = tarfile.TarInfo(f"reinforced_data/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out


def their_files(images, config: dict, form: str) -> tuple[list, list[tuple[str, bytes]]]:
    """Every image's ``(index, rounds)`` and the files their reinforce.py writes in ``form``."""
    objs, files = [], []
    for i in range(len(images)):
        obj = draw_plus(i, images.size(i), images.labels[i], config)
        objs.append(obj)
        if form == "torch":
            files.append((f"{i}.pth.tar", torch_saved(obj, f"{i}.pth.tar")))
        elif form == "joblib":  # joblib.dump(..., "{i}.pth.tar", compress=True): zlib under their usual name
            files.append((f"{i}.pth.tar", joblib_file(obj)))
        else:  # joblib, gzip, as .jb
            files.append((f"{i}.jb", joblib_file(obj, gzip=True)))
    files.append(("config.pth.tar", torch_saved(config, "config.pth.tar")))
    files.reverse()  # the config first, the images from the last
    return objs, files


def check_import(out: Path, images, objs: list, config: dict) -> None:
    """Every stored parameter and top-k row of every image, read back from the shards."""
    recipe = MldrConfig.from_dict(config).recipe
    samples = _shards(out)
    assert sorted(samples) == sorted(images.keys)
    for i, key in enumerate(images.keys):
        sc = decode_sidecar(samples[key]["dr.mp"], key)
        want = expected_columns(objs[i], recipe.columns)
        assert sc.fingerprint == recipe.fingerprint
        assert int(samples[key]["cls"]) == images.labels[i]
        np.testing.assert_array_equal(sc.idx, want["idx"])
        np.testing.assert_array_equal(sc.prob.view(np.uint16), want["prob"].view(np.uint16))
        assert set(sc.ops) == set(recipe.columns)
        for column in recipe.columns:
            np.testing.assert_array_equal(sc.ops[column], want[column], err_msg=f"{key} {column}")


# ----------------------------------------------------------------------------------------
# The datasets as torchvision reads them


def test_cifar100_is_torchvision_order(tmp_path, monkeypatch):
    images, labels = cifar_root(tmp_path, 12, seed=1)
    ours = open_dataset("cifar100", str(tmp_path))
    assert ours.labels == labels and len(ours.class_names) == 100 and ours.class_names[7] == "class_7"
    import torchvision.datasets.cifar as tv_cifar

    # torchvision checks the real files' md5 sums; these are tiny stand-ins in the same format.
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda *a, **k: True)
    theirs = tv_cifar.CIFAR100(str(tmp_path), train=True, download=False)
    assert theirs.classes == ours.class_names and list(theirs.targets) == ours.labels
    for i in range(len(ours)):
        pixels = np.asarray(Image.open(io.BytesIO(ours.read(i))))
        np.testing.assert_array_equal(pixels, np.asarray(theirs[i][0]))
        np.testing.assert_array_equal(pixels, images[i])
    assert ours.read(3) == ours.read(3) and ours.size(0) == (32, 32)


def test_flowers102_and_food101_are_torchvision_order(tmp_path):
    flowers_root(tmp_path / "fl", FLOWER_SIZES, FLOWER_TRNID, FLOWER_LABELS)
    fl = open_dataset("flowers102", str(tmp_path / "fl"))
    assert [Path(fl.where(i)).name for i in range(4)] == [f"image_{i:05d}.jpg" for i in FLOWER_TRNID]
    assert fl.labels == [FLOWER_LABELS[i - 1] - 1 for i in FLOWER_TRNID] and len(fl.class_names) == 102
    assert [fl.size(i) for i in range(4)] == [FLOWER_SIZES[i - 1] for i in FLOWER_TRNID]
    mats = read_mat(tmp_path / "fl" / "flowers-102" / "setid.mat")
    assert mats["trnid"].shape == (1, 4) and mats["valid"].tolist() == [[3.0]] and mats["tstid"].tolist() == [[4.0]]

    files = {"tacos": [("71", (40, 60)), ("12", (50, 50))], "apple_pie": [("9", (45, 55))], "ramen": []}
    food_root(tmp_path / "fo", files)
    fo = open_dataset("food101", str(tmp_path / "fo"))
    from torchvision.datasets import Food101  # no md5 check: torchvision itself reads the stand-in

    tv = Food101(str(tmp_path / "fo"), split="train", download=False)
    assert [fo.where(i) for i in range(len(fo))] == [str(p) for p in tv._image_files]
    assert fo.labels == list(tv._labels) and fo.class_names == tv.classes
    assert fo.keys == ["tacos_71", "tacos_12", "apple_pie_9"]


@pytest.mark.parametrize("label", [0, 103, 2.5])
def test_flowers_label_outside_1_to_102_is_refused(tmp_path, label):
    """Their labels count from 1: a 0 would be class -1, which no later check on the classes catches."""
    labels = list(FLOWER_LABELS)
    labels[FLOWER_TRNID[0] - 1] = label
    flowers_root(tmp_path, FLOWER_SIZES, FLOWER_TRNID, labels)
    with pytest.raises(MetadataError, match=r"imagelabels\.mat: a train image's label outside 1\.\.102"):
        open_dataset("flowers102", str(tmp_path))
    labels = list(FLOWER_LABELS)
    labels[3 - 1] = label  # image 3 is no train image: its label is not read
    flowers_root(tmp_path / "other", FLOWER_SIZES, FLOWER_TRNID, labels)
    other = open_dataset("flowers102", str(tmp_path / "other"))
    assert other.labels == [FLOWER_LABELS[i - 1] - 1 for i in FLOWER_TRNID]


@pytest.mark.parametrize(
    "name, files",
    [("cifar100", "cifar-100-python/train"), ("flowers102", "setid.mat"), ("food101", "food-101/meta/train.json")],
)
def test_missing_dataset_files_are_named(tmp_path, name, files):
    with pytest.raises(UsageError, match=rf"expected torchvision's .* train split in .*{files}.*nothing is downloaded"):
        open_dataset(name, str(tmp_path))
    done = _cli("--metadata", str(tmp_path), "--images", f"{name}:{tmp_path}", "--out", str(tmp_path / "o"))
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and files in done.stderr


def test_mat_and_cifar_readers_refuse_other_content(tmp_path):
    path = tmp_path / "x.mat"
    write_mat(path, {"a": [1.0, 2.0]})
    data = bytearray(path.read_bytes())
    path.write_bytes(b"not a mat file" + bytes(data[14:]))
    with pytest.raises(MetadataError, match="not a Level 5 MAT-file"):
        read_mat(path)
    evil = b"\x80\x02cos\nsystem\nU\x04trueq\x85R."  # GLOBAL os.system, REDUCE
    with pytest.raises(MetadataError, match=r"train: refused: the pickle needs the global os\.system"):
        load_arrays(evil, "train", encoding="latin1")
    objects = pickled({"data": NumpyArray(np.zeros(2, np.float32))}, py2_strings=True).replace(b"U\x02f4", b"U\x02O8")
    with pytest.raises(MetadataError, match="refused: an array of dtype"):
        load_arrays(objects, "train", encoding="latin1")


# ----------------------------------------------------------------------------------------
# Their records: joblib, gzip


def test_joblib_records_with_arrays_read_as_their_values():
    """A record whose top-k are numpy arrays, stored as joblib stores arrays (wrapper record, padding, bytes)."""
    values, ids = np.array([0.5, 0.25, 0.125], np.float32), np.array([7, 1, 3], np.int64)
    plain = (4, [{"params": [(1, 2, 3, 4), True], "prob": (values.tolist(), ids.tolist())}])
    arrays = (4, [{"params": [(1, 2, 3, 4), True], "prob": (NumpyArray(values, "joblib"), NumpyArray(ids, "joblib"))}])
    for data in (joblib_file(arrays), joblib_file(arrays, gzip=True), pickled(arrays, protocol=4)):
        assert load_record(data, "4.pth.tar") == plain
    assert load_record(torch_saved(plain, "4.pth.tar"), "4.pth.tar") == plain
    evil = zlibbed(b"\x80\x04cos\nsystem\nX\x04\x00\x00\x00trueq\x85R.")
    with pytest.raises(MetadataError, match=r"4\.jb: refused: the pickle needs the global os\.system"):
        load_record(evil, "4.jb")
    with pytest.raises(MetadataError, match="not a torch.save container, a joblib file or a pickle"):
        load_record(b"hello", "4.jb")


def zlibbed(data: bytes) -> bytes:
    import zlib

    return zlib.compress(data)


@pytest.mark.parametrize(
    "dataset, form, mode",
    [
        ("flowers102", "torch", "tar.gz"),
        ("food101", "joblib", "tar"),
        ("food101", "jb.gz", "dir"),
        ("cifar100", "jb.gz", "tar.gz"),
    ],
)
def test_plus_archives_import_every_parameter(tmp_path, dataset, form, mode):
    """Their archives of each set, in each way they write files; crops spelled as their code knows them.

    (CIFAR-100+'s resize and random_crop need the new ops: test_mldr_plus_ops.py. Here CIFAR gets an RRC
    config, which exercises its source and records.)"""
    if dataset == "flowers102":
        flowers_root(tmp_path / "data", FLOWER_SIZES, FLOWER_TRNID, FLOWER_LABELS)
    elif dataset == "food101":
        food = {"tacos": [("71", (40, 60)), ("12", (50, 50))], "apple_pie": [("9", (45, 55))], "ramen": []}
        food_root(tmp_path / "data", food)
    else:
        cifar_root(tmp_path / "data", 5, seed=2)
    images = open_dataset(dataset, str(tmp_path / "data"))
    config = plus_config(dataset, rounds=5, topk=3)
    if dataset == "cifar100":  # an RRC variant of their CIFAR config: no new op needed
        aug = config["reinforce"]["image_augmentation"]
        del aug["resize"], aug["random_crop"]
        aug = {"random_resized_crop": {"size": 224}, **aug}
        config["reinforce"]["image_augmentation"] = aug
    if dataset == "food101":
        config["num_classes"] = 3  # this stand-in's classes (their config says 101, from their data.py)
    config["reinforce"]["joblib"] = form != "torch"
    config["reinforce"]["gzip"] = mode == "tar.gz"
    objs, files = their_files(images, config, form)
    meta = write_archive(tmp_path / f"meta.{mode}" if mode != "dir" else tmp_path / "meta", files, mode)
    summary = import_mldr(meta, f"{dataset}:{tmp_path / 'data'}", tmp_path / "out", shard_size=2)
    assert summary.samples == len(images) and summary.rounds == 5 and summary.layout == "self-contained"
    check_import(tmp_path / "out", images, objs, config)
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["teacher"]["imported"]["dataset"] == dataset and manifest["num_classes"] == config["num_classes"]
    assert "torchvision.datasets." in manifest["teacher"]["imported"]["index_rule"]
    with pytest.raises(UsageError, match=f"their config is for {dataset}, the images are"):
        other = "food101" if dataset != "food101" else "flowers102"
        (tmp_path / "other").mkdir()
        if other == "food101":
            food_root(tmp_path / "other", {"a": [("1", (40, 40))]})
        else:
            flowers_root(tmp_path / "other", FLOWER_SIZES, FLOWER_TRNID, FLOWER_LABELS)
        import_mldr(meta, f"{other}:{tmp_path / 'other'}", tmp_path / "out2")


def test_ignored_transform_is_in_manifest_and_summary(tmp_path):
    """Their Flowers config spells the crop random_resize_crop, which their code skips; said where it shows."""
    flowers_root(tmp_path / "data", FLOWER_SIZES, FLOWER_TRNID, FLOWER_LABELS)
    images = open_dataset("flowers102", str(tmp_path / "data"))
    config = plus_config("flowers102", rounds=3, topk=2)
    aug = config["reinforce"]["image_augmentation"]
    config["reinforce"]["image_augmentation"] = {"random_resize_crop": {"enable": True, "size": 224}, **aug}
    assert MldrConfig.from_dict(config).ignored == ("random_resize_crop",)
    objs, files = their_files(images, config, "torch")
    write_archive(tmp_path / "meta.tar.gz", files, "tar.gz")
    summary = import_mldr(tmp_path / "meta.tar.gz", f"flowers102:{tmp_path / 'data'}", tmp_path / "out")
    assert "random_resize_crop, which their code does not know" in summary.format()
    imported = json.loads((tmp_path / "out" / "manifest.json").read_text())["teacher"]["imported"]
    assert imported["ignored_transforms"] == ["random_resize_crop"] and "not applied" in imported["ignored_note"]
    check_import(tmp_path / "out", images, objs, config)


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run(
        [sys.executable, str(ROOT / "tools" / "import_mldr.py"), *args], capture_output=True, text=True, env=env
    )


def test_cli_names_the_round_group_flag(tmp_path):
    cifar_root(tmp_path / "data", 2)
    done = _cli(
        "--metadata",
        str(tmp_path),
        "--images",
        f"cifar100:{tmp_path / 'data'}",
        "--out",
        str(tmp_path / "o"),
        "--round-group",
        "2",
    )
    assert done.returncode == 2 and "expected --round-group only for a sidecar set" in done.stderr, done.stderr
    assert "group_rounds" not in done.stderr
