"""CIFAR-100+ (resize, random_crop), RandAugment with p < 1, and Flowers/Food as their code ran them (no crop).

These use the ops ``resize``, ``random_crop``, ``center_crop`` and RandAugment's ``p``.
"""

from __future__ import annotations

import json

import pytest

from tests.importers.test_mldr_plus import (
    FLOWER_LABELS,
    FLOWER_SIZES,
    FLOWER_TRNID,
    check_import,
    their_files,
    write_archive,
)
from tests.mldr_plus import cifar_root, flowers_root, plus_config
from wds_reinforce import ReinforcedDataset
from wds_reinforce.core.augment import CIFAR100_MEAN, CIFAR100_STD, IMAGENET_MEAN, Recipe, replay
from wds_reinforce.core.errors import UsageError
from wds_reinforce.importers.datasets import open_dataset
from wds_reinforce.importers.mldr import MetadataError, MldrConfig, convert_rounds, import_mldr


@pytest.mark.parametrize("p_ra", [1.0, 0.5])
def test_cifar100_plus_imports_every_parameter(tmp_path, p_ra):
    cifar_root(tmp_path / "data", 4, seed=3)
    images = open_dataset("cifar100", str(tmp_path / "data"))
    config = plus_config("cifar100", rounds=6, topk=3, p_ra=p_ra)
    objs, files = their_files(images, config, "torch")
    write_archive(tmp_path / "meta.tar.gz", files, "tar.gz")
    summary = import_mldr(tmp_path / "meta.tar.gz", f"cifar100:{tmp_path / 'data'}", tmp_path / "out")
    assert summary.variant == "Resize+RandomCrop+RA/RE" and summary.rounds == 6
    check_import(tmp_path / "out", images, objs, config)
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    ops = {op["op"]: op for op in manifest["recipe"]["ops"]}
    assert ops["resize"]["size"] in (224, [224, 224]) and ops["random_crop"]["padding"] == 16
    assert ops["ra"].get("p", 1.0) == p_ra and manifest["recipe"]["size"] == [224, 224]
    if p_ra < 1:  # some rounds skipped RandAugment: an all-zero row
        skipped = [r for obj in objs for r in obj[1] if r["params"][3] is None]
        assert skipped, "the seeds drew no skipped round; pick others"
    assert manifest["recipe"]["normalize"] == {"mean": list(CIFAR100_MEAN), "std": list(CIFAR100_STD)}
    ds = ReinforcedDataset(str(tmp_path / "out"), keys=("__key__", "round", "image"), densify="sparse")
    assert ds.recipe.mean == CIFAR100_MEAN and ds.recipe.std == CIFAR100_STD
    for key, r, image in ds:
        i = images.keys.index(key)
        rows = _rows(objs[i], ds.recipe.columns, r)
        assert image.shape == (3, 224, 224)
        assert (image == replay(images.read(i), rows, ds.recipe)).all()


def test_imported_recipe_keeps_their_normalisation():
    """Their Normalize's mean and std become the recipe's (outside the fingerprint), as the preset's."""
    recipe = MldrConfig.from_dict(plus_config("cifar100")).recipe
    preset = Recipe.from_spec("cifar100+")
    assert (recipe.mean, recipe.std) == (CIFAR100_MEAN, CIFAR100_STD) == (preset.mean, preset.std)
    assert recipe.fingerprint.hex() == "da13f9be0ec387ea"  # as imported before the normalisation was kept
    bare = {k: v for k, v in recipe.to_dict().items() if k != "normalize"}
    assert Recipe.from_dict(bare).fingerprint == recipe.fingerprint and Recipe.from_dict(bare).mean == IMAGENET_MEAN
    config = plus_config("cifar100")
    config["reinforce"]["image_augmentation"]["normalize"]["mean"] = [0.5, 0.5]
    with pytest.raises(UsageError, match="does not make a recipe here: expected normalize"):
        MldrConfig.from_dict(config)


def test_config_walked_reference_by_reference_is_bounded():
    """A config pickle can refer to one list again and again: 2**40 paths in a few hundred bytes, which
    the manifest's JSON (and comparing two configs) would walk one by one."""
    shared: list = []
    for _ in range(40):
        shared = [shared, shared]
    config = plus_config("cifar100")
    config["reinforce"]["image_augmentation"]["normalize"]["inplace"] = shared
    with pytest.raises(UsageError, match=r"config\.pth\.tar: expected their config, got one of more than 100000"):
        MldrConfig.from_dict(config)


def _rows(obj, columns, r):
    from tests.mldr_plus import expected_columns

    want = expected_columns(obj, columns)
    return {c: want[c][r] for c in columns}


def test_random_crop_offset_outside_the_padded_image_is_refused():
    config = plus_config("cifar100", rounds=2, topk=2)
    mldr = MldrConfig.from_dict(config)
    rounds = [{"params": [(224,), (0, 33), True, None, None], "prob": ([0.5, 0.25], [1, 2])}] * 2
    with pytest.raises(MetadataError, match=r"round 0: random_crop offset \[0, 33\] does not fit"):
        convert_rounds((0, rounds), 0, mldr, "0.pth.tar", (32, 32))
    bad = [{"params": [(96,), (0, 0), True, None, None], "prob": ([0.5, 0.25], [1, 2])}] * 2
    with pytest.raises(MetadataError, match="expected resize's size"):
        convert_rounds((0, bad), 0, mldr, "0.pth.tar", (32, 32))


def test_flowers_as_their_code_ran_it_has_no_crop_and_is_refused(tmp_path):
    """Their yaml's random_resize_crop is skipped by their code: rounds are flip, RA, RE at each image's own
    size, which no fixed-size recipe replays; the import says so in one line and writes nothing."""
    flowers_root(tmp_path / "data", FLOWER_SIZES, FLOWER_TRNID, FLOWER_LABELS)
    images = open_dataset("flowers102", str(tmp_path / "data"))
    config = plus_config("flowers102", rounds=3, topk=2, crop="random_resize_crop")
    refused = "no crop or resize .their code skipped random_resize_crop.*own size"
    with pytest.raises(UsageError, match=refused):
        MldrConfig.from_dict(config)
    objs, files = their_files(images, config, "torch")
    assert all(len(r["params"]) == 3 for obj in objs for r in obj[1])
    write_archive(tmp_path / "meta.tar.gz", files, "tar.gz")
    with pytest.raises(UsageError, match=refused):
        import_mldr(tmp_path / "meta.tar.gz", f"flowers102:{tmp_path / 'data'}", tmp_path / "out")
    assert not (tmp_path / "out" / "manifest.json").exists()
