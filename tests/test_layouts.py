"""The layout table: how each layout lists a set's units, pairs a sample's parts, and what it checks."""

from __future__ import annotations

import dataclasses
import json

import pytest

from wds_reinforce.core.errors import FormatError, UsageError
from wds_reinforce.core.format import Manifest, RoundGroup, ShardInfo, SkippedInput, TeacherSet
from wds_reinforce.layouts import (
    LAYOUTS,
    SELF_CONTAINED,
    SIDECAR_SETS,
    Part,
    Unit,
    layout_of,
    num_samples,
    parse_manifest,
    read_manifest,
)


def _info(name: str, samples: int = 3) -> ShardInfo:
    return ShardInfo(name, samples, 100, "0" * 64, "a", "c")


def _self_contained() -> Manifest:
    return Manifest({}, "00" * 8, {}, 3, 4, 2, 0, shards=[_info("train-000000.tar"), _info("train-000001.tar", 2)])


def _sidecar_set(teachers: int = 1) -> Manifest:
    images = [_info("/data/images-000000.tar", 4), _info("http://h/images-000001.tar", 3)]
    groups = [
        RoundGroup(
            g * 2, 2, [_info(f"rounds-{g * 2:05d}-{g * 2 + 1:05d}/train-{i:06d}.tar", n) for i, n in enumerate((3, 3))]
        )
        for g in range(2)
    ]
    sets = [
        TeacherSet(f"t{t}", {}, [[_info(f"teachers/t{t}/{s.name}") for s in g.shards] for g in groups])
        for t in range(teachers)
    ]
    return Manifest(
        {}, "00" * 8, {}, 3, 4, 2, 0,
        skipped=[SkippedInput("gone", "no image")],
        layout=SIDECAR_SETS, image_shards=images, round_groups=groups, teacher_sets=sets,
    )  # fmt: skip


def test_the_table_knows_both_layouts_and_refuses_others(tmp_path):
    assert LAYOUTS.names() == [SELF_CONTAINED, SIDECAR_SETS]
    path = tmp_path / "manifest.json"
    path.write_text(dataclasses.replace(_self_contained(), layout="rows-in-a-database").to_json())
    with pytest.raises(FormatError, match=r"unknown layout 'rows-in-a-database'; this reader knows \['self-contained"):
        read_manifest(str(path))


def test_sizes_come_from_the_layout():
    sc, sets = _self_contained(), _sidecar_set()
    assert num_samples(sc) == 5 and layout_of(sc).group_rounds(sc) == 4
    assert num_samples(sets) == 7 and layout_of(sets).group_rounds(sets) == 2  # image shards hold the skipped too
    assert [f.name for f in layout_of(sets).made_files(sets)][:2] == [
        "rounds-00000-00001/train-000000.tar",
        "rounds-00000-00001/train-000001.tar",
    ]
    assert layout_of(sc).skipped(sc) == frozenset() and layout_of(sets).skipped(sets) == {"gone"}


def test_self_contained_units_lie_beside_the_manifest_and_mirrors_are_counted_when_listed():
    sc = _self_contained()
    layout = layout_of(sc)
    units = layout.units(sc, "http://h/set")
    assert [(u.images.url, u.samples, u.sidecars(0)) for u in units] == [
        ("http://h/set/train-000000.tar", 3, ()),
        ("http://h/set/train-000001.tar", 2, ()),
    ]
    picked = layout.select(units, ["s3://mirror/set/train-000001.tar", "s3://mirror/other.tar"])
    assert [(u.images.url, u.samples) for u in picked] == [
        ("s3://mirror/set/train-000001.tar", 2),
        ("s3://mirror/other.tar", None),
    ]
    with pytest.raises(UsageError, match="expected teacher=0 for a self-contained data set"):
        layout.units(sc, "", teacher=1)


def test_sidecar_set_units_pair_each_image_shard_with_its_groups_and_teachers():
    sets = _sidecar_set(teachers=2)
    layout = layout_of(sets)
    units = layout.units(sets, "s3://b/set", teacher="mean")
    assert [u.images.url for u in units] == ["/data/images-000000.tar", "http://h/images-000001.tar"]
    assert [u.samples for u in units] == [3, 3]  # the samples with sidecars, not the image shard's 4
    assert [p.url for p in units[1].sidecars(1)] == [
        "s3://b/set/rounds-00002-00003/train-000001.tar",
        "s3://b/set/teachers/t0/rounds-00002-00003/train-000001.tar",
        "s3://b/set/teachers/t1/rounds-00002-00003/train-000001.tar",
    ]
    assert [len(u.sidecars(0)) for u in layout.units(sets, "", teacher=2)] == [2, 2]
    assert layout.select(units, ["images-000001.tar"]) == [units[1]]
    with pytest.raises(UsageError, match="expected image shards the manifest lists, got 'other.tar'"):
        layout.select(units, ["other.tar"])
    with pytest.raises(UsageError, match=r"expected teacher 'mean' or one of 0 \(the manifest's teacher\), 1 \(t0\)"):
        layout.units(sets, "", teacher=3)
    assert layout.group(sets, seed=0, epoch=0) in (0, 1) and layout_of(_self_contained()).group(sets, 0, 5) == 0


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda m: dataclasses.replace(m, image_shards=[]), "must list image_shards and round_groups"),
        (lambda m: dataclasses.replace(m, rounds=6), "round groups hold 4 rounds, the manifest says 6"),
        (
            lambda m: dataclasses.replace(
                m, round_groups=[m.round_groups[0], dataclasses.replace(m.round_groups[1], first_round=3)]
            ),
            "round groups must tile the rounds in equal steps, got one at 3",
        ),
        (
            lambda m: dataclasses.replace(
                m, round_groups=[dataclasses.replace(g, shards=g.shards[:1]) for g in m.round_groups]
            ),
            "round group 0 lists 1 shards for 2 image shards",
        ),
        (
            lambda m: dataclasses.replace(m, teacher_sets=[dataclasses.replace(m.teacher_sets[0], groups=[[]])]),
            "teacher set 't0' does not match the round groups and image shards",
        ),
    ],
)
def test_a_sidecar_set_manifest_must_fit_its_layout(change, message):
    text = change(_sidecar_set()).to_json()
    assert json.loads(text)["layout"] == SIDECAR_SETS
    with pytest.raises(FormatError, match=message):
        parse_manifest(text, "sets/manifest.json")
    parse_manifest(_sidecar_set().to_json())  # unchanged, it fits


def test_a_unit_without_groups_reads_its_shard_alone():
    unit = Unit(Part("a.tar"))
    assert unit.sidecars(0) == () and unit.samples is None


@pytest.mark.parametrize("given", ["missing/dir", "missingdir", "missing/dir/"])
def test_every_reader_of_a_set_names_the_location_given(tmp_path, monkeypatch, given):
    """verify, the rounds picture, train.py's --recipe SHARDS and load_manifest all say the path as typed."""
    from wds_reinforce.cli.training import resolve_recipe
    from wds_reinforce.layouts import load_manifest
    from wds_reinforce.read.picture import draw_rounds
    from wds_reinforce.read.verify import verify_shards

    monkeypatch.chdir(tmp_path)
    for read in (
        load_manifest,
        verify_shards,
        lambda where: draw_rounds(where, str(tmp_path / "x.png")),
    ):
        with pytest.raises(FileNotFoundError) as info:
            read(given)
        assert str(info.value) == (
            f"expected a folder or URL prefix holding manifest.json, or a manifest .json, got {given!r}, "
            "which does not exist"
        )
    with pytest.raises(
        FileNotFoundError, match=f"expected --recipe a preset .*got {given!r}: no such preset, file or folder$"
    ):
        resolve_recipe(given, None, None)
