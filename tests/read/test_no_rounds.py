"""A sample whose sidecar has no rounds (n = 0): the loader gives it its original image and label
every epoch, as an original-image epoch does; verify accepts it; a mixing recipe cannot."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from tests.shardmaker import make_shards
from wds_reinforce.core.augment import Recipe, replay
from wds_reinforce.core.decode import SourceImage
from wds_reinforce.core.errors import FormatError
from wds_reinforce.core.format import Sidecar, decode_sidecar, encode_sidecar
from wds_reinforce.core.schedule import original_rng
from wds_reinforce.io.shards import samples
from wds_reinforce.read.dataset import ReinforcedDataset
from wds_reinforce.read.options import LoaderOptions, ReplayPlan
from wds_reinforce.read.steps import choose_round, sample_sidecar
from wds_reinforce.read.verify import verify_shards

BARE = "s01_0001"  # the sample whose sidecar keeps no round


def _none_kept(sc: Sidecar) -> Sidecar:
    return dataclasses.replace(sc, idx=sc.idx[:0], prob=sc.prob[:0], ops={c: v[:0] for c, v in sc.ops.items()})


def _bare(key: str, ext: str, data: bytes) -> bytes:
    return encode_sidecar(_none_kept(decode_sidecar(data))) if (key, ext) == (BARE, "dr.mp") else data


@pytest.mark.parametrize("p", [1.0, 0.5])
def test_a_sample_without_rounds_is_its_original_image_every_epoch(tmp_path, p):
    made = make_shards(tmp_path, rounds=3, num_shards=2, mutate=_bare)
    ds = ReinforcedDataset(str(tmp_path), keys=("__key__", "round", "image", "target"), p=p)
    fallback = Recipe.from_spec("rrc", size=made.recipe.size, decode=made.recipe.decode)  # the loader's default
    with open(made.urls[1], "rb") as f:
        jpg = next(s for s in samples(f) if s["__key__"] == BARE)["jpg"]
    rounds = set()
    for epoch in range(3):
        ds.set_epoch(epoch)
        rows = {key: (r, image, target) for key, r, image, target in ds}
        assert sorted(rows) == sorted(made.keys)
        r, image, target = rows[BARE]
        assert r == -1
        assert torch.equal(target, torch.nn.functional.one_hot(torch.tensor(made.labels[BARE]), 10).float())
        rng = original_rng(0, BARE, epoch)
        rng.random()
        assert torch.equal(image, replay(jpg, fallback.sample(rng, SourceImage(jpg).size), fallback))
        for key, (r, image, _) in rows.items():
            if key != BARE and r >= 0:
                assert torch.equal(image, made.pixels[(key, r)])
                rounds.add(r)
    assert rounds == {0, 1, 2}
    assert verify_shards(str(tmp_path), checks=0).problems == []
    plan = ReplayPlan(LoaderOptions(p=p))
    assert all(choose_round(plan, BARE, epoch, 0) == (-1, -1) for epoch in range(20))


def test_other_round_counts_and_a_mixing_recipe_are_still_refused(tmp_path):
    made = make_shards(tmp_path, rounds=3, num_shards=1, record_pixels=False)
    sc = made.sidecars[made.keys[0]]
    plan = ReplayPlan(LoaderOptions(), recipe=made.recipe, rounds=3, topk=3)
    two = dataclasses.replace(sc, idx=sc.idx[:2], prob=sc.prob[:2], ops={c: v[:2] for c, v in sc.ops.items()})
    label = str(made.labels[made.keys[0]]).encode()  # the sidecars cover it
    with pytest.raises(FormatError, match="sidecar has 2 rounds, the manifest says 3"):
        sample_sidecar({"__key__": "k", "cls": label, "dr.mp": encode_sidecar(two)}, plan, first=False)
    bare = {"__key__": "k", "cls": label, "dr.mp": encode_sidecar(_none_kept(sc))}
    assert sample_sidecar(bare, plan, first=False).rounds == 0
    mixing = Recipe.from_spec("rrc+mix", size=made.recipe.size)
    bare = Sidecar(mixing.fingerprint, np.zeros((0, 3), np.uint16), np.zeros((0, 3), np.float16), {}, 1, 2)
    plan = ReplayPlan(LoaderOptions(), recipe=mixing, fingerprint=mixing.fingerprint, rounds=3, topk=3)
    with pytest.raises(FormatError, match="no rounds, which a mixing recipe's pairing window cannot do without"):
        sample_sidecar({"__key__": "k", "dr.mp": encode_sidecar(bare)}, plan, first=False)
