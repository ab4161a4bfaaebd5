"""Importing apple/ml-dr metadata: archives of their exact structure (torch.save) for a generated ImageFolder."""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.datasets import ImageFolder

from tests.mldr_archive import closeness, config_dict, make_folder, write_metadata
from wds_reinforce import ReinforcedDataset, decode_sidecar
from wds_reinforce.core.augment import replay
from wds_reinforce.core.errors import UsageError
from wds_reinforce.core.format import Manifest, Sidecar, crc32c
from wds_reinforce.importers.images import FolderImages
from wds_reinforce.importers.mldr import (
    IndexMismatchError,
    MetadataError,
    MldrConfig,
    import_mldr,
    load_torch_save,
    restricted_loads,
)
from wds_reinforce.read.verify import verify_shards

ROOT = Path(__file__).resolve().parents[2]
SIZES = [[(60, 80), (70, 50), (90, 90)], [(64, 64), (80, 100)], [(100, 70), (66, 77), (50, 120)]]
SIZE = 64


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    return make_folder(tmp_path / "train", SIZES)


def _keys(folder: Path) -> list[str]:
    """Keys by their index: the class folder and file name without extension, as the importer makes them."""
    return [
        os.path.splitext(os.path.relpath(p, folder))[0].replace(os.sep, "_") for p, _ in ImageFolder(folder).samples
    ]


def _expected(obj: tuple, config: dict, rounds: int | None = None) -> dict[str, np.ndarray]:
    """Our columns for their ``(index, rounds)``, worked out here independently of the importer."""
    aug = config["reinforce"]["image_augmentation"]
    mixing = "mixup" in aug
    kept = [r["params"] for r in obj[1] if not mixing or r["params"][0] is None]
    probs = [r["prob"] for r in obj[1] if not mixing or r["params"][0] is None]
    kept, probs = kept[:rounds], probs[:rounds]
    own = [p[1:] if mixing else p for p in kept]
    out = {"rrc": np.array([p[0] for p in own]), "flip": np.array([[int(p[1])] for p in own])}
    if "rand_augment" in aug:  # every magnitude was drawn at bin 9
        out["ra"] = np.array([[v for op, m in p[2] for v in (op, -9 if m < 0 else 9)] for p in own])
        out["re"] = np.array([list(p[3]) if p[3] is not None else [0, 0, 0, 0] for p in own])
    idx, prob = [], []
    for values, ids in probs:
        order = sorted(range(len(ids)), key=lambda j: (-values[j], ids[j]))
        idx.append([ids[j] for j in order])
        prob.append([values[j] for j in order])
    out["idx"] = np.array(idx)
    out["prob"] = np.array(prob, np.float64).astype(np.float16)
    return out


def _shards(out: Path) -> dict[str, dict]:
    """Every sample of the manifest's shards: key -> {image, cls, sidecar}."""
    manifest = Manifest.from_json((out / "manifest.json").read_text())
    samples: dict[str, dict] = {}
    for shard in manifest.shards:
        with tarfile.open(out / shard.name) as tar:
            for info in tar:
                key, ext = info.name.split(".", 1)
                samples.setdefault(key, {})[ext] = tar.extractfile(info).read()
    return samples


def _check_sidecars(out: Path, folder: Path, objs: list, config: dict, rounds: int | None = None) -> None:
    recipe = MldrConfig.from_dict(config).recipe
    samples = _shards(out)
    keys = _keys(folder)
    assert sorted(samples) == sorted(keys)
    for i, key in enumerate(keys):
        sc = decode_sidecar(samples[key]["dr.mp"], key)
        want = _expected(objs[i], config, rounds)
        assert sc.fingerprint == recipe.fingerprint
        assert sc.image_crc == crc32c(samples[key]["jpg" if "jpg" in samples[key] else "png"])
        np.testing.assert_array_equal(sc.idx, want["idx"])
        np.testing.assert_array_equal(sc.prob.view(np.uint16), want["prob"].view(np.uint16))
        assert set(sc.ops) == set(recipe.columns)
        for column in recipe.columns:
            np.testing.assert_array_equal(sc.ops[column], want[column], err_msg=f"{key} {column}")


def _check_loader(out: Path, folder: Path, objs: list, config: dict, rounds: int | None = None) -> None:
    """Each epoch's round of every sample comes back through the loader as written: params, top-k, pixels."""
    ds = ReinforcedDataset(str(out), keys=("__key__", "round", "idx", "prob", "image", "cls"), densify="sparse")
    index = {key: i for i, key in enumerate(_keys(folder))}
    files = [p for p, _ in ImageFolder(folder).samples]
    seen = set()
    for epoch in range(2):
        ds.set_epoch(epoch)
        for key, r, idx, prob, image, label in ds:
            i = index[key]
            want = _expected(objs[i], config, rounds)
            assert idx.tolist() == want["idx"][r].tolist()
            assert prob.tolist() == want["prob"][r].astype(np.float32).tolist()
            assert int(label) == ImageFolder(folder).samples[i][1]
            params = {c: want[c][r] for c in ds.recipe.columns}
            assert torch.equal(image, replay(Path(files[i]).read_bytes(), params, ds.recipe))
            seen.add((key, r))
    assert len(seen) == 2 * len(index)  # two epochs: two different rounds per sample


@pytest.mark.parametrize("variant", ["rrc", "rrc+ra/re"])
def test_import_round_trip(tmp_path, folder, variant):
    config = config_dict(variant, rounds=6, topk=3, size=SIZE)
    objs = write_metadata(tmp_path / "meta.tar.gz", folder, config)
    lines: list[str] = []
    summary = import_mldr(tmp_path / "meta.tar.gz", folder, tmp_path / "out", shard_size=3, progress=lines.append)
    assert summary.samples == 8 and summary.rounds == 6 and summary.shards == 3 and summary.made == 3
    assert any("found reinforced_data/config.pth.tar" in line for line in lines)
    _check_sidecars(tmp_path / "out", folder, objs, config)
    _check_loader(tmp_path / "out", folder, objs, config)
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    imported = manifest["teacher"]["imported"]
    assert imported["variant"] == ("RRC" if variant == "rrc" else "RRC+RA/RE")
    assert imported["num_samples"] == 6 and imported["topk"] == 3 and imported["rounds_kept"] == 6
    assert imported["teachers"] == ["ig_resnext101_32x8d", "ig_resnext101_32x16d"]
    assert "ImageFolder" in imported["index_rule"]
    assert imported["metadata"]["sha256"] == hashlib.sha256((tmp_path / "meta.tar.gz").read_bytes()).hexdigest()
    assert [m["name"] for m in manifest["teacher"]["members"]] == imported["teachers"]
    if variant != "rrc":
        ops = {op["op"]: op for op in manifest["recipe"]["ops"]}
        assert ops["re"]["value"] == [0] and ops["ra"]["magnitude"] == 9 and "kernels" not in manifest["recipe"]
    assert not (tmp_path / "out" / ".import-spool").exists()


def test_folder_metadata_gives_the_same_shards(tmp_path, folder):
    config = config_dict("rrc+ra/re", rounds=5, topk=2, size=SIZE)
    write_metadata(tmp_path / "meta.tar.gz", folder, config)
    write_metadata(tmp_path / "meta", folder, config, as_dir=True)
    import_mldr(tmp_path / "meta.tar.gz", folder, tmp_path / "a", shard_size=4)
    import_mldr(tmp_path / "meta", folder, tmp_path / "b", shard_size=4)
    import_mldr(tmp_path / "meta" / "reinforced_data", folder, tmp_path / "c", shard_size=4)
    for name in ("train-000000.tar", "train-000001.tar"):
        a = (tmp_path / "a" / name).read_bytes()
        assert a == (tmp_path / "b" / name).read_bytes() == (tmp_path / "c" / name).read_bytes()


def test_mixing_variant_refused_then_dropped(tmp_path, folder):
    config = config_dict("rrc+ra/re+mix", rounds=24, topk=3, size=SIZE)
    objs = write_metadata(tmp_path / "meta.tar.gz", folder, config)
    with pytest.raises(UsageError, match=r"RRC\+RA/RE\+M\* is a mixing variant.*--drop-mixing"):
        import_mldr(tmp_path / "meta.tar.gz", folder, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    summary = import_mldr(tmp_path / "meta.tar.gz", folder, tmp_path / "out", drop_mixing=True, shard_size=3)
    counts = [sum(r["params"][0] is None for r in obj[1]) for obj in objs]
    assert summary.rounds == min(counts) > 0 and summary.total_rounds == 24
    assert f"kept the first {min(counts)}" in summary.format() and f"{min(counts)} to {max(counts)}" in summary.format()
    _check_sidecars(tmp_path / "out", folder, objs, config, rounds=min(counts))
    _check_loader(tmp_path / "out", folder, objs, config, rounds=min(counts))
    imported = json.loads((tmp_path / "out" / "manifest.json").read_text())["teacher"]["imported"]
    assert imported["rounds_kept"] == min(counts) and imported["non_mixing_rounds"]["max"] == max(counts)
    import_mldr(tmp_path / "meta.tar.gz", folder, tmp_path / "two", drop_mixing=True, rounds=2)
    _check_sidecars(tmp_path / "two", folder, objs, config, rounds=2)
    with pytest.raises(UsageError, match=r"has \d+ rounds without a mixing partner, fewer than the 24"):
        import_mldr(tmp_path / "meta.tar.gz", folder, tmp_path / "many", drop_mixing=True, rounds=24)
    assert not list((tmp_path / "many").glob("*.tar"))


def _zip(pickle_bytes: bytes, stem: str) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr(f"{stem}/data.pkl", pickle_bytes)
        zf.writestr(f"{stem}/version", "3\n")
    return buf.getvalue()


def test_malicious_pickles_refused(tmp_path, folder):
    marker = tmp_path / "pwned"
    # GLOBAL os.system, then REDUCE: what a hostile {index}.pth.tar would do.
    evil = b"\x80\x04\x95\x00\x00\x00\x00\x00\x00\x00\x00cos\nsystem\n(V" + f"touch {marker}".encode() + b"\ntR."
    config = config_dict("rrc", rounds=4, topk=2, size=SIZE)
    write_metadata(tmp_path / "meta.tar.gz", folder, config, edit=lambda i, obj: _zip(evil, "3.pth") if i == 3 else obj)
    with pytest.raises(
        MetadataError,
        match=r"meta\.tar\.gz: reinforced_data/3\.pth\.tar: refused: the pickle needs the global os\.system",
    ):
        import_mldr(tmp_path / "meta.tar.gz", folder, tmp_path / "out")
    assert not marker.exists()
    assert not list((tmp_path / "out").glob("*.tar")) and not (tmp_path / "out" / "manifest.json").exists()

    with pytest.raises(MetadataError, match="needs the global builtins.eval"):
        restricted_loads(pickle.dumps(_Evil(), protocol=4), "x.pth.tar")
    buf = io.BytesIO()
    torch.save((0, torch.zeros(2)), buf, pickle_protocol=4)  # a tensor: a global and a persistent id
    with pytest.raises(MetadataError, match="refused"):
        load_torch_save(buf.getvalue(), "0.pth.tar")
    with pytest.raises(MetadataError, match="not a torch.save zip container"):
        load_torch_save(pickle.dumps((0, [])), "0.pth.tar")
    # numpy values are inert placeholders, refused where a value is used
    np_box = (0, [{"params": [(np.int64(1), 2, 3, 4), True], "prob": ([0.5, 0.25], [1, 0])}] * 4)
    buf = io.BytesIO()
    torch.save(np_box, buf, pickle_protocol=4)
    obj = load_torch_save(buf.getvalue(), "0.pth.tar")
    from wds_reinforce.importers.mldr import convert_rounds

    with pytest.raises(MetadataError, match="crop boxes of type int, got .*numpy"):
        convert_rounds(obj, 0, MldrConfig.from_dict(config), "0.pth.tar")


class _Evil:
    def __reduce__(self):
        return (eval, ("1 + 1",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol 4")
def test_protocol_4_frames_read(tmp_path):
    obj = (7, [{"params": [(1, 2, 3, 4), True], "prob": ([0.5, 0.25], [3, 1])}] * 3)
    torch.save(obj, tmp_path / "7.pth.tar", pickle_protocol=4)
    data = (tmp_path / "7.pth.tar").read_bytes()
    with pytest.raises(Exception, match="Weights only load failed"):  # why this module exists
        torch.load(io.BytesIO(data), weights_only=True)
    assert load_torch_save(data, "7.pth.tar") == obj


@pytest.mark.parametrize("case", ["extra image", "missing file", "wrong index inside", "fewer images"])
def test_index_mismatch_is_an_error_before_output(tmp_path, folder, case):
    config = config_dict("rrc", rounds=3, topk=2, size=SIZE)
    n = len(ImageFolder(folder).samples)

    def edit(i, obj):
        if case == "missing file" and i == 4:
            return None
        if case == "wrong index inside" and i == 2:
            return (5, obj[1])
        return obj

    write_metadata(tmp_path / "meta.tar.gz", folder, config, edit=edit)
    if case == "extra image":
        make_folder(tmp_path / "extra", [[(60, 60)]])
        os.replace(tmp_path / "extra" / "c0" / "img_000.jpg", folder / "c2" / "img_009.jpg")
        error, match = IndexMismatchError, rf"{n} image records for the {n + 1} images.*none for index {n} .*img_009"
    elif case == "missing file":
        error, match = (
            IndexMismatchError,
            r"7 image records for the 8 images.*none for index 4 \(expected 4\.pth\.tar in .*meta\.tar\.gz",
        )
    elif case == "wrong index inside":
        error, match = MetadataError, r"meta\.tar\.gz: reinforced_data/2\.pth\.tar: holds index 5, but its name says 2"
    else:
        (folder / "c2" / "img_002.jpg").unlink()
        error, match = (
            IndexMismatchError,
            r"meta\.tar\.gz: reinforced_data/7\.pth\.tar has index 7, outside the 7 images",
        )
    with pytest.raises(error, match=match):
        import_mldr(tmp_path / "meta.tar.gz", folder, tmp_path / "out", shard_size=2)
    assert not list((tmp_path / "out").glob("**/*.tar")) and not (tmp_path / "out" / "manifest.json").exists()


def test_bad_magnitude_and_crop_refused(tmp_path, folder):
    config = config_dict("rrc+ra/re", rounds=3, topk=2, size=SIZE)

    def bad_magnitude(i, obj):
        if i == 1:
            obj[1][2]["params"][2] = [(5, 12.5), (0, 0.0)]  # Rotate 12.5 degrees: no bin of 31 over 0..30
        return obj

    write_metadata(tmp_path / "meta.tar.gz", folder, config, edit=bad_magnitude)
    with pytest.raises(MetadataError, match=r"meta\.tar\.gz: reinforced_data/1\.pth\.tar: round 2: RandAugment Rotate"):
        import_mldr(tmp_path / "meta.tar.gz", folder, tmp_path / "out")

    def bad_crop(i, obj):
        if i == 0:
            obj[1][1]["params"][0] = (0, 0, 500, 20)  # taller than the image
        return obj

    write_metadata(tmp_path / "crop.tar.gz", folder, config, edit=bad_crop)
    with pytest.raises(MetadataError, match=r"0\.pth\.tar: round 1: crop box \[0, 0, 500, 20\] does not fit the"):
        import_mldr(tmp_path / "crop.tar.gz", folder, tmp_path / "out")


def test_ranks_and_resume_give_the_same_shards(tmp_path, folder, monkeypatch):
    config = config_dict("rrc+ra/re", rounds=4, topk=2, size=SIZE)
    write_metadata(tmp_path / "meta.tar.gz", folder, config)
    import_mldr(tmp_path / "meta.tar.gz", folder, tmp_path / "one", shard_size=2)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    summary = import_mldr(tmp_path / "meta.tar.gz", folder, tmp_path / "two", shard_size=2)
    assert summary.made == 2 and not summary.manifest_written
    assert not (tmp_path / "two" / "manifest.json").exists()
    monkeypatch.setenv("RANK", "0")
    summary = import_mldr(tmp_path / "meta.tar.gz", folder, tmp_path / "two", shard_size=2)
    assert summary.made == 2 and summary.manifest_written
    for name in (f"train-{j:06d}.tar" for j in range(4)):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    (tmp_path / "two" / "train-000002.tar").write_bytes(b"torn")
    lines: list[str] = []
    summary = import_mldr(tmp_path / "meta.tar.gz", folder, tmp_path / "two", shard_size=2, progress=lines.append)
    assert summary.made == 1 and summary.reused == 3
    # progress counts what is left: one shard of two images, not the three reused
    done = [line for line in lines if " done (" in line]
    assert len(done) == 1 and done[0].startswith("import: shard 1/1 done (train-000002.tar); 2/2 images (100 %)")
    assert (tmp_path / "two" / "train-000002.tar").read_bytes() == (tmp_path / "one" / "train-000002.tar").read_bytes()
    with pytest.raises(UsageError, match="another job"):
        import_mldr(tmp_path / "meta.tar.gz", folder, tmp_path / "two", shard_size=3)


def _plain_shards(folder: Path, out: Path, keyed_by_index: bool) -> str:
    """The folder as two plain webdataset shards in a shuffled order, keyed by index or by class/file."""
    samples = ImageFolder(folder).samples
    order = np.random.default_rng(3).permutation(len(samples)).tolist()
    out.mkdir(parents=True)
    for s, part in enumerate((order[:5], order[5:])):
        with tarfile.open(out / f"plain-{s}.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
            for i in part:
                path, label = samples[i]
                key = f"{i:07d}" if keyed_by_index else os.path.splitext(os.path.relpath(path, folder))[0]
                image = (f"{key}{os.path.splitext(path)[1]}", Path(path).read_bytes())
                for name, data in (image, (f"{key}.cls", b"%d" % label)):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return str(out / "plain-{0..1}.tar")


@pytest.mark.parametrize("rule", ["key", "imagefolder"])
def test_plain_shards_as_the_train_split(tmp_path, folder, rule):
    config = config_dict("rrc+ra/re", rounds=3, topk=2, size=SIZE)
    objs = write_metadata(tmp_path / "meta.tar.gz", folder, config)
    pattern = _plain_shards(folder, tmp_path / "plain", keyed_by_index=rule == "key")
    summary = import_mldr(tmp_path / "meta.tar.gz", pattern, tmp_path / "out", index_rule=rule, copy_images=True)
    assert summary.shards == 2  # output shard j holds input shard j's samples, in their order
    assert summary.layout == "self-contained"
    index = {key: i for i, key in enumerate(_keys(folder))}
    for s in range(2):
        with (
            tarfile.open(tmp_path / "plain" / f"plain-{s}.tar") as plain,
            tarfile.open(tmp_path / "out" / f"train-{s:06d}.tar") as out,
        ):
            plain_keys = [m.name.split(".")[0].replace("/", "_") for m in plain if m.name.endswith(".cls")]
            assert [m.name.split(".")[0] for m in out if m.name.endswith(".cls")] == plain_keys
    for key, sample in _shards(tmp_path / "out").items():
        i = int(key) if rule == "key" else index[key]
        want = _expected(objs[i], config)
        sc = decode_sidecar(sample["dr.mp"])
        np.testing.assert_array_equal(sc.ops["rrc"], want["rrc"])
        np.testing.assert_array_equal(sc.idx, want["idx"])


def _tar_keys(path: Path) -> list[str]:
    """Sample keys of a tar in order, split as webdataset splits them (directory + name up to the first dot)."""
    with tarfile.open(path) as tar:
        keys = [posixpath_key(m.name) for m in tar if m.isfile()]
    return [k for n, k in enumerate(keys) if n == 0 or keys[n - 1] != k]


def posixpath_key(name: str) -> str:
    head, _, base = name.rpartition("/")
    return f"{head}/{base.split('.', 1)[0]}" if head else base.split(".", 1)[0]


def _sidecar_set_rows(out: Path) -> dict[str, Sidecar]:
    """Every sample's sidecar of a sidecar set, its round groups joined: key -> all rounds."""
    manifest = Manifest.from_json((out / "manifest.json").read_text())
    parts: dict[str, list] = {}
    for group in manifest.round_groups:
        for shard in group.shards:
            with tarfile.open(out / shard.name) as tar:
                for info in tar:
                    key = posixpath_key(info.name)
                    assert info.name == f"{key}.dr.mp"  # sidecars only: no image, no label
                    parts.setdefault(key, []).append(decode_sidecar(tar.extractfile(info).read(), key))
    return {
        key: Sidecar(
            ps[0].fingerprint,
            np.concatenate([p.idx for p in ps]),
            np.concatenate([p.prob for p in ps]),
            {c: np.concatenate([p.ops[c] for p in ps]) for c in ps[0].ops},
            ps[0].image_crc,
        )
        for key, ps in parts.items()
    }


@pytest.mark.parametrize("variant, group_rounds", [("rrc", None), ("rrc+ra/re", 2)])
def test_plain_shards_get_a_sidecar_set(tmp_path, folder, variant, group_rounds):
    """Shards as the train split: sidecars beside them (their keys, their order), no image copied, read back whole."""
    config = config_dict(variant, rounds=6, topk=3, size=SIZE)
    objs = write_metadata(tmp_path / "meta.tar.gz", folder, config)
    pattern = _plain_shards(folder, tmp_path / "plain", keyed_by_index=False)  # keys "c0/img_000": not sanitised
    plain = [tmp_path / "plain" / f"plain-{s}.tar" for s in range(2)]
    before = [p.read_bytes() for p in plain]
    out = tmp_path / "sets"
    summary = import_mldr(tmp_path / "meta.tar.gz", pattern, out, group_rounds=group_rounds)
    groups = 6 // (group_rounds or 6)
    assert summary.layout == "sidecar-sets" and summary.samples == 8 and summary.rounds == 6 and summary.made == 2
    assert f"sidecar set: {groups} round group(s)" in summary.format()
    assert [p.read_bytes() for p in plain] == before  # the input shards are only read

    manifest = Manifest.from_json((out / "manifest.json").read_text())
    assert manifest.layout == "sidecar-sets" and manifest.shards == [] and manifest.rounds == 6
    assert [im.name for im in manifest.image_shards] == [str(p.resolve()) for p in plain]
    assert [im.sha256 for im in manifest.image_shards] == [hashlib.sha256(b).hexdigest() for b in before]
    assert [(g.first_round, g.rounds) for g in manifest.round_groups] == [
        (g * (group_rounds or 6), group_rounds or 6) for g in range(groups)
    ]
    for g in manifest.round_groups:  # sidecar shard j: input shard j's keys in its order
        assert [_tar_keys(out / s.name) for s in g.shards] == [_tar_keys(p) for p in plain]
    files = [p for p in out.rglob("*") if p.is_file()]
    assert not [p for p in files if p.suffix in (".jpg", ".png")] and not (out / ".import-spool").exists()
    for path in (p for p in files if p.suffix == ".tar"):  # no copy of an image or label anywhere
        with tarfile.open(path) as tar:
            assert all(name.endswith(".dr.mp") for name in tar.getnames()), path
    assert manifest.teacher["imported"]["images_copied"] is False

    recipe = MldrConfig.from_dict(config).recipe
    index = {key.replace(os.sep, "/"): i for i, key in enumerate(_rel_keys(folder))}
    sidecars = _sidecar_set_rows(out)
    assert sorted(sidecars) == sorted(index)
    with tarfile.open(plain[0]) as t0, tarfile.open(plain[1]) as t1:
        images = {
            posixpath_key(m.name): t.extractfile(m).read() for t in (t0, t1) for m in t if not m.name.endswith(".cls")
        }
    for key, i in index.items():  # every stored parameter and top-k row, every round
        sc, want = sidecars[key], _expected(objs[i], config)
        assert sc.fingerprint == recipe.fingerprint and sc.image_crc == crc32c(images[key])
        np.testing.assert_array_equal(sc.idx, want["idx"])
        np.testing.assert_array_equal(sc.prob.view(np.uint16), want["prob"].view(np.uint16))
        assert set(sc.ops) == set(recipe.columns)
        for column in recipe.columns:
            np.testing.assert_array_equal(sc.ops[column], want[column], err_msg=f"{key} {column}")

    ds = ReinforcedDataset(str(out), keys=("__key__", "round", "idx", "prob", "image", "cls"), densify="sparse")
    labels = [label for _, label in ImageFolder(folder).samples]
    seen = set()
    for epoch in range(4):
        ds.set_epoch(epoch)
        for key, r, idx, prob, image, label in ds:
            i, want = index[key], _expected(objs[index[key]], config)
            assert idx.tolist() == want["idx"][r].tolist()
            assert prob.tolist() == want["prob"][r].astype(np.float32).tolist()
            assert int(label) == labels[i]
            params = {c: want[c][r] for c in ds.recipe.columns}
            assert torch.equal(image, replay(images[key], params, ds.recipe))
            seen.add((key, r))
    assert len(seen) > 8  # rounds differ across epochs (and across round groups)
    report = verify_shards(str(out), checks=0)
    assert report.problems == [], report.problems


def _rel_keys(folder: Path) -> list[str]:
    return [os.path.splitext(os.path.relpath(p, folder))[0] for p, _ in ImageFolder(folder).samples]


def test_sidecar_set_resumes_and_partitions(tmp_path, folder, monkeypatch):
    config = config_dict("rrc+ra/re", rounds=4, topk=2, size=SIZE)
    write_metadata(tmp_path / "meta.tar.gz", folder, config)
    pattern = _plain_shards(folder, tmp_path / "plain", keyed_by_index=False)
    one, two = tmp_path / "one", tmp_path / "two"
    import_mldr(tmp_path / "meta.tar.gz", pattern, one, group_rounds=2)
    names = [s.name for g in Manifest.from_json((one / "manifest.json").read_text()).round_groups for s in g.shards]
    assert names == [f"rounds-{a:05d}-{a + 1:05d}/train-{j:06d}.tar" for a in (0, 2) for j in (0, 1)]
    summary = import_mldr(tmp_path / "meta.tar.gz", pattern, one, group_rounds=2)
    assert summary.made == 0 and summary.reused == 2  # a rerun reuses every finished shard
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    summary = import_mldr(tmp_path / "meta.tar.gz", pattern, two, group_rounds=2)
    assert summary.made == 1 and not summary.manifest_written and not (two / "manifest.json").exists()
    monkeypatch.setenv("RANK", "0")
    summary = import_mldr(tmp_path / "meta.tar.gz", pattern, two, group_rounds=2)
    assert summary.made == 1 and summary.manifest_written
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    for name in names + ["manifest.json"]:
        if name != "manifest.json":
            assert (one / name).read_bytes() == (two / name).read_bytes()
    (two / names[3]).write_bytes(b"torn")  # group 1 of input shard 1: that input shard is redone
    summary = import_mldr(tmp_path / "meta.tar.gz", pattern, two, group_rounds=2)
    assert summary.made == 1 and summary.reused == 1
    assert (two / names[3]).read_bytes() == (one / names[3]).read_bytes()
    with pytest.raises(UsageError, match="another job"):
        import_mldr(tmp_path / "meta.tar.gz", pattern, two)  # other grouping: another job
    with pytest.raises(UsageError, match="group_rounds a divisor of the 4 rounds"):
        import_mldr(tmp_path / "meta.tar.gz", pattern, tmp_path / "three", group_rounds=3)
    assert not list((tmp_path / "three").glob("**/*.tar"))
    with pytest.raises(UsageError, match="group_rounds only for a sidecar set"):
        import_mldr(tmp_path / "meta.tar.gz", folder, tmp_path / "four", group_rounds=2)


def test_sidecar_set_image_not_covered_is_an_error_before_output(tmp_path, folder):
    config = config_dict("rrc", rounds=3, topk=2, size=SIZE)
    write_metadata(tmp_path / "meta.tar.gz", folder, config)
    pattern = _plain_shards(folder, tmp_path / "plain", keyed_by_index=False)
    with tarfile.open(tmp_path / "plain" / "plain-1.tar", "a") as tar:  # an image their metadata does not know
        for name, data in (("c2/zzz.jpg", (folder / "c2" / "img_000.jpg").read_bytes()), ("c2/zzz.cls", b"2")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with pytest.raises(
        IndexMismatchError, match=r"8 image records for the 9 images.*none for index 8 .*plain-1\.tar:c2/zzz"
    ):
        import_mldr(tmp_path / "meta.tar.gz", pattern, tmp_path / "out")
    assert not list((tmp_path / "out").glob("**/*.tar")) and not (tmp_path / "out" / "manifest.json").exists()


def test_folder_listing_is_torchvision_imagefolder(tmp_path):
    root = make_folder(tmp_path / "train", [[(40, 40), (40, 40)], [(40, 40)]])
    (root / "c0" / "sub").mkdir()
    (root / "c0" / "sub" / "a.jpg").write_bytes((root / "c0" / "img_000.jpg").read_bytes())
    (root / "c0" / "z.JPEG").write_bytes((root / "c0" / "img_000.jpg").read_bytes())
    (root / "c0" / ".hidden.jpg").write_bytes((root / "c0" / "img_000.jpg").read_bytes())
    (root / "c1" / "notes.txt").write_text("not an image")
    images = FolderImages(root)
    want = ImageFolder(root).samples
    assert [images.where(i) for i in range(len(images))] == [p for p, _ in want]
    assert images.labels == [label for _, label in want]
    assert images.exts[-2:] == ["jpg", "jpg"] and len(set(images.keys)) == len(images)


def test_config_checks(tmp_path, folder):
    config = config_dict("rrc+ra/re", rounds=3, topk=2, size=SIZE)
    crop = json.loads(json.dumps(config))
    crop["reinforce"]["image_augmentation"]["random_crop"] = {"size": 224, "padding": -1}
    with pytest.raises(UsageError, match=r"random_crop padding an int or 1, 2 or 4 ints >= 0, got -1"):
        MldrConfig.from_dict(crop)
    skipping = json.loads(json.dumps(config))
    skipping["reinforce"]["image_augmentation"]["rand_augment"]["p"] = 1.5
    with pytest.raises(UsageError, match="rand_augment p a probability, got 1.5"):
        MldrConfig.from_dict(skipping)
    odd = json.loads(json.dumps(config))
    odd["reinforce"]["image_augmentation"]["random_erase"]["mode"] = "rand"
    with pytest.raises(UsageError, match=r"random_erase has argument\(s\) \['mode'\]"):
        MldrConfig.from_dict(odd)
    typo = json.loads(json.dumps(config))
    typo["reinforce"]["image_augmentation"]["random_resize_crop"] = {"size": 224}  # their code ignores unknown names
    assert MldrConfig.from_dict(typo).ignored == ("random_resize_crop",)
    write_metadata(tmp_path / "meta.tar.gz", folder, config_dict("rrc", rounds=3, topk=2, size=SIZE, num_classes=5))
    with pytest.raises(UsageError, match="the images have 3 classes, their teacher 5"):
        import_mldr(tmp_path / "meta.tar.gz", folder, tmp_path / "out")


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run(
        [sys.executable, str(ROOT / "tools" / "import_mldr.py"), *args], capture_output=True, text=True, env=env
    )


def test_cli(tmp_path, folder):
    done = _cli("--help")
    assert done.returncode == 0 and "--drop-mixing" in done.stdout and "ImageFolder" in done.stdout
    done = _cli("--metadata", str(tmp_path / "nope.tar.gz"), "--images", str(folder), "--out", str(tmp_path / "o"))
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "not found" in done.stderr
    write_metadata(tmp_path / "mix.tar.gz", folder, config_dict("rrc+mix", rounds=4, topk=2, size=SIZE))
    done = _cli("--metadata", str(tmp_path / "mix.tar.gz"), "--images", str(folder), "--out", str(tmp_path / "o"))
    assert done.returncode == 2 and done.stderr.splitlines()[-1].startswith("import_mldr.py: error: ")
    assert "--drop-mixing" in done.stderr.splitlines()[-1] and done.stderr.count("error:") == 1
    write_metadata(tmp_path / "meta.tar.gz", folder, config_dict("rrc", rounds=4, topk=2, size=SIZE))
    done = _cli("--metadata", str(tmp_path / "meta.tar.gz"), "--images", str(folder), "--out", str(tmp_path / "o"))
    assert done.returncode == 0, done.stderr
    assert "imported RRC" in done.stdout and "bytes per round" in done.stdout


def test_config_given_skips_the_search_and_must_match(tmp_path, folder):
    config = config_dict("rrc", rounds=3, topk=2, size=SIZE)
    write_metadata(tmp_path / "meta.tar.gz", folder, config)
    with tarfile.open(tmp_path / "meta.tar.gz") as tar:
        (tmp_path / "config.pth.tar").write_bytes(tar.extractfile("reinforced_data/config.pth.tar").read())
    lines: list[str] = []
    out = tmp_path / "out"
    import_mldr(tmp_path / "meta.tar.gz", folder, out, config=tmp_path / "config.pth.tar", progress=lines.append)
    assert not any("found" in line for line in lines) and (out / "manifest.json").exists()
    torch.save(dict(config, batch_size=64), tmp_path / "other.pth.tar")
    with pytest.raises(
        UsageError, match=r"other\.pth\.tar differs from the metadata's own .*meta\.tar\.gz: reinforced_data/config"
    ):
        import_mldr(tmp_path / "meta.tar.gz", folder, tmp_path / "o2", config=tmp_path / "other.pth.tar")


def test_damaged_archive_is_an_error_before_output(tmp_path, folder):
    config = config_dict("rrc", rounds=3, topk=2, size=SIZE)
    write_metadata(tmp_path / "meta.tar.gz", folder, config)
    with tarfile.open(tmp_path / "meta.tar.gz") as tar:
        (tmp_path / "config.pth.tar").write_bytes(tar.extractfile("reinforced_data/config.pth.tar").read())
    data = (tmp_path / "meta.tar.gz").read_bytes()
    (tmp_path / "cut.tar.gz").write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(MetadataError, match=r"cut\.tar\.gz: cannot read the archive"):
        import_mldr(tmp_path / "cut.tar.gz", folder, tmp_path / "out", config=tmp_path / "config.pth.tar")
    assert not list((tmp_path / "out").glob("**/*.tar")) and not (tmp_path / "out" / ".import-spool").exists()


def test_replay_is_close_to_their_teacher_pixels():
    """What the README says: crops within a level or two, a few pixels far off only where RandAugment amplifies."""
    rrc = closeness("rrc", images=2, rounds=12, size=96)
    assert rrc["identical_pct"] > 95 and rrc["max"] <= 2
    ra_re = closeness("rrc+ra/re", images=2, rounds=12, size=96)
    assert ra_re["identical_pct"] > 93 and ra_re["over_1_level_pct"] < 1.5
