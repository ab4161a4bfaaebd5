"""ml-dr ``--drop-mixing`` when an image has no round without a mixing partner: it is imported
without rounds (a sidecar of n = 0), and the loader gives it its original image and label every
epoch, while the other images keep their rounds as before. Self-contained and as a sidecar set."""

from __future__ import annotations

import copy
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.datasets import ImageFolder

from tests.importers.test_mldr import SIZE, SIZES, _expected, _keys, _rel_keys, _shards, _sidecar_set_rows
from tests.mldr_archive import config_dict, make_folder, write_metadata, write_plain_shards
from wds_reinforce import ReinforcedDataset, decode_sidecar
from wds_reinforce.core.augment import Recipe, replay
from wds_reinforce.core.decode import SourceImage
from wds_reinforce.core.errors import UsageError
from wds_reinforce.core.format import crc32c
from wds_reinforce.core.schedule import original_rng
from wds_reinforce.importers.mldr import MldrConfig, import_mldr
from wds_reinforce.produce.teacher import load_teacher
from wds_reinforce.produce.teacher_sets import add_teacher_set
from wds_reinforce.read.verify import verify_shards

ALL_MIXED = 4  # this image's rounds all get a mixing partner (c1/img_001, a PNG of class 1)
EPOCHS = 3


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    return make_folder(tmp_path / "train", SIZES)


def _only_mixed(which):
    """An ``edit`` that gives every round of the images ``which`` accepts a mixing partner (in place)."""

    def edit(index, obj):
        if which(index):
            rounds = obj[1]
            mixed = [r for r in rounds if r["params"][0] is not None]
            for n, rnd in enumerate(rounds):
                if rnd["params"][0] is None:
                    rnd["params"] = copy.deepcopy(mixed[n % len(mixed)]["params"])
        return obj

    return edit


def _original_view(data: bytes, key: str, epoch: int, recipe: Recipe) -> torch.Tensor:
    """What an original-image epoch gives (the loader's default fallback: RRC + flip, seed 0)."""
    fallback = Recipe.from_spec("rrc", size=recipe.size, decode=recipe.decode)
    rng = original_rng(0, key, epoch)
    rng.random()  # the coin: the parameters follow it
    return replay(data, fallback.sample(rng, SourceImage(data).size), fallback)


def _check_loader(out: Path, index: dict[str, int], images: dict[str, bytes], objs: list, config: dict, keep: int):
    """Every epoch: the image without rounds is its original view with a one-hot target; the others their rounds."""
    ds = ReinforcedDataset(str(out), keys=("__key__", "round", "idx", "prob", "image", "cls"), densify="sparse")
    labels = [label for _, label in ImageFolder(out.parent / "train").samples]  # the ``folder`` fixture's
    seen = set()
    for epoch in range(EPOCHS):
        ds.set_epoch(epoch)
        rows = list(ds)
        assert sorted(key for key, *_ in rows) == sorted(index)
        for key, r, idx, prob, image, label in rows:
            i = index[key]
            assert int(label) == labels[i]
            if i == ALL_MIXED:
                assert r == -1
                assert idx.tolist()[0] == labels[i] and prob.tolist() == [1.0, 0.0, 0.0]
                assert torch.equal(image, _original_view(images[key], key, epoch, ds.recipe)), epoch
                continue
            want = _expected(objs[i], config, keep)
            assert 0 <= r < keep
            assert idx.tolist() == want["idx"][r].tolist()
            assert prob.tolist() == want["prob"][r].astype(np.float32).tolist()
            assert torch.equal(image, replay(images[key], {c: want[c][r] for c in ds.recipe.columns}, ds.recipe))
            seen.add((key, r))
    assert len({key for key, _ in seen}) == len(index) - 1 and len(seen) > len(index)


def _check_rounds(sidecars: dict, index: dict[str, int], images: dict[str, bytes], objs, config, keep: int) -> None:
    """The image without rounds: n = 0 with its checksum and every column empty; the others as before."""
    recipe = MldrConfig.from_dict(config).recipe
    for key, i in index.items():
        sc = sidecars[key]
        assert sc.fingerprint == recipe.fingerprint and sc.image_crc == crc32c(images[key]) and sc.topk == 3
        assert set(sc.ops) == set(recipe.columns)
        if i == ALL_MIXED:
            assert sc.rounds == 0 and sc.idx.shape == sc.prob.shape == (0, 3)
            assert all(col.shape[0] == 0 for col in sc.ops.values())
            continue
        want = _expected(objs[i], config, keep)
        np.testing.assert_array_equal(sc.idx, want["idx"])
        np.testing.assert_array_equal(sc.prob.view(np.uint16), want["prob"].view(np.uint16))
        for column in recipe.columns:
            np.testing.assert_array_equal(sc.ops[column], want[column], err_msg=f"{key} {column}")


def _kept_counts(objs: list) -> list[int]:
    return [sum(r["params"][0] is None for r in obj[1]) for obj in objs]


def test_an_image_with_only_mixed_rounds_is_imported_without_rounds(tmp_path, folder):
    config = config_dict("rrc+ra/re+mix", rounds=16, topk=3, size=SIZE)
    objs = write_metadata(tmp_path / "meta.tar.gz", folder, config, edit=_only_mixed(lambda i: i == ALL_MIXED))
    counts = _kept_counts(objs)
    keep = min(c for c in counts if c)
    assert counts[ALL_MIXED] == 0 and keep > 1
    out = tmp_path / "out"
    summary = import_mldr(tmp_path / "meta.tar.gz", folder, out, drop_mixing=True, shard_size=3)
    assert summary.samples == 8 and summary.rounds == keep and summary.without_rounds == 1
    assert "1 image(s) kept no round: imported without rounds" in summary.format()
    imported = json.loads((out / "manifest.json").read_text())["teacher"]["imported"]
    assert imported["images_without_rounds"] == 1 and imported["rounds_kept"] == keep
    assert imported["non_mixing_rounds"]["min"] == 0 and imported["non_mixing_rounds"]["max"] == max(counts)

    samples = _shards(out)
    index = {key: i for i, key in enumerate(_keys(folder))}
    images = {key: s["jpg" if "jpg" in s else "png"] for key, s in samples.items()}
    sidecars = {key: decode_sidecar(s["dr.mp"], key) for key, s in samples.items()}
    _check_rounds(sidecars, index, images, objs, config, keep)
    _check_loader(out, index, images, objs, config, keep)
    report = verify_shards(str(out), checks=0)
    assert report.problems == [], report.problems


def test_an_image_with_only_mixed_rounds_gets_sidecars_of_none_in_a_sidecar_set(tmp_path, folder):
    config = config_dict("rrc+ra/re+mix", rounds=16, topk=3, size=SIZE)
    objs = write_metadata(tmp_path / "meta.tar.gz", folder, config, edit=_only_mixed(lambda i: i == ALL_MIXED))
    keep = min(c for c in _kept_counts(objs) if c)
    pattern = write_plain_shards(folder, tmp_path / "plain", shard_size=3)
    out = tmp_path / "out"
    summary = import_mldr(tmp_path / "meta.tar.gz", pattern, out, drop_mixing=True, group_rounds=1)
    assert summary.layout == "sidecar-sets" and summary.rounds == keep and summary.groups == keep
    assert summary.without_rounds == 1

    index = {key.replace(os.sep, "/"): i for i, key in enumerate(_rel_keys(folder))}
    images = {}
    for path in sorted((tmp_path / "plain").glob("*.tar")):
        with tarfile.open(path) as tar:
            images.update({m.name.rsplit(".", 1)[0]: tar.extractfile(m).read() for m in tar if "cls" not in m.name})
    _check_rounds(_sidecar_set_rows(out), index, images, objs, config, keep)
    _check_loader(out, index, images, objs, config, keep)
    report = verify_shards(str(out), checks=0)
    assert report.problems == [], report.problems

    # another teacher's targets beside it: none for the image without rounds, its original view still
    classes = json.loads((out / "manifest.json").read_text())["num_classes"]
    second = load_teacher("timm:test_resnet", num_classes=classes, device="cpu")
    add_teacher_set(str(out), second, "second", progress=False)
    ds = ReinforcedDataset(str(out), teacher=1, keys=("__key__", "round", "teacher_sidecars"))
    rows = {key: (r, extras) for key, r, extras in ds}
    assert len(rows) == len(index) and all(len(extras) == 1 for _, extras in rows.values())
    bare = next(key for key, i in index.items() if i == ALL_MIXED)
    assert rows[bare][0] == -1 and rows[bare][1][0].rounds == 0 and rows[bare][1][0].place is not None


def test_no_image_with_an_unmixed_round_is_still_nothing_to_import(tmp_path, folder):
    config = config_dict("rrc+mix", rounds=4, topk=2, size=SIZE)
    write_metadata(tmp_path / "meta.tar.gz", folder, config, edit=_only_mixed(lambda i: True))
    with pytest.raises(UsageError, match=r"has 0 rounds without a mixing partner, and neither has any other image"):
        import_mldr(tmp_path / "meta.tar.gz", folder, tmp_path / "out", drop_mixing=True)
    assert not list((tmp_path / "out").glob("**/*.tar")) and not (tmp_path / "out" / "manifest.json").exists()
