"""Tar shards as samples: what a cut tells, members read in place later, labels, patterns."""

from __future__ import annotations

import gzip
import io
import json
import tarfile

import pytest

from wds_reinforce.core.errors import FormatError
from wds_reinforce.io.shards import (
    LABEL_EXTS,
    ShardCut,
    Span,
    image_ext,
    local_shards,
    sample_label,
    samples,
)


def _tar(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


MEMBERS = [("a.jpg", b"A" * 700), ("a.cls", b"3"), ("b.jpg", b"B" * 300), ("b.cls", b"5"), ("c.jpg", b"C" * 10)]


def test_unread_members_become_spans_that_read_back_from_the_file(tmp_path):
    path = tmp_path / "s.tar"
    path.write_bytes(_tar(MEMBERS))
    with open(path, "rb") as f:
        got = list(samples(f, str(path), read=LABEL_EXTS.__contains__))
    assert [s["__key__"] for s in got] == ["a", "b", "c"]
    assert [s.get("cls") for s in got] == [b"3", b"5", None]
    assert all(isinstance(s["jpg"], Span) for s in got)
    assert [s["jpg"].read(str(path)) for s in got] == [b"A" * 700, b"B" * 300, b"C" * 10]


def test_a_compressed_shard_cannot_leave_members_for_later(tmp_path):
    data = gzip.compress(_tar(MEMBERS))
    assert [s["cls"] for s in samples(io.BytesIO(data)) if "cls" in s] == [b"3", b"5"]  # read whole: fine
    with pytest.raises(tarfile.ReadError, match="compressed shard"):
        list(samples(io.BytesIO(data), read=LABEL_EXTS.__contains__))


def test_a_cut_inside_a_member_names_the_sample_the_member_and_what_came_before():
    data = _tar(MEMBERS)
    cut = data.index(b"B" * 300) + 100  # inside b.jpg's data
    got: list[dict] = []
    with pytest.raises(ShardCut) as info:
        for sample in samples(io.BytesIO(data[:cut]), "u.tar"):
            got.append(sample)
    exc = info.value
    assert [s["__key__"] for s in got] == ["a"]
    assert (exc.key, exc.member, exc.after, exc.complete, exc.url) == ("b", "b.jpg", "a.cls", 1, "u.tar")
    assert "jpg" not in exc.pending and exc.message.startswith("ReadError: ")


def test_a_cut_between_members_leaves_the_pending_sample_to_the_caller():
    data = _tar(MEMBERS)
    cut = data.index(b"c.jpg")  # where c.jpg's header (its name first) begins
    with pytest.raises(ShardCut) as info:
        list(samples(io.BytesIO(data[:cut])))
    exc = info.value
    assert (exc.key, exc.member, exc.after, exc.complete) == ("b", None, "b.cls", 1)
    assert exc.pending["cls"] == b"5" and exc.pending["jpg"] == b"B" * 300


def test_a_sample_that_repeats_an_extension_is_a_format_error_with_its_key():
    data = _tar([("a.jpg", b"1"), ("a.JPG", b"2")])
    with pytest.raises(FormatError, match="repeats extension 'jpg'") as info:
        list(samples(io.BytesIO(data), "u.tar"))
    assert (info.value.key, info.value.url) == ("a", "u.tar")


@pytest.mark.parametrize(
    "members, label",
    [
        ({"cls": b" 7\n"}, 7),
        ({"json": json.dumps({"label": 4}).encode()}, 4),
        ({"cls": b"2", "json": b'{"label": 9}'}, 2),  # cls first
    ],
)
def test_labels(members, label):
    assert sample_label({"__key__": "k", **members}) == label


@pytest.mark.parametrize(
    "members, match",
    [
        ({"cls": b"cat"}, "cls 'cat' is not an integer"),
        ({"cls": b"-1"}, "label -1 is negative"),
        ({"cls": b"+3"}, "cls '\\+3' is not an integer"),
        ({"cls": b"1_0"}, "cls '1_0' is not an integer"),
        ({"json": b"{"}, "not JSON"),
        ({"json": b'{"label": true}'}, "no integer 'label'"),
        ({"json": b'{"label": "3"}'}, "no integer 'label'"),
        ({"jpg": b""}, "no 'cls' member"),
    ],
)
def test_bad_labels_say_what_is_wrong(members, match):
    with pytest.raises(ValueError, match=match):
        sample_label({"__key__": "k", **members})


def test_patterns_expand_braces_then_globs_and_keep_other_names(tmp_path):
    for name in ("a-0.tar", "a-1.tar", "b-0.tar", "b-1.tar"):
        (tmp_path / name).write_bytes(b"")
    assert local_shards(str(tmp_path / "{b,a}-*.tar")) == [
        str(tmp_path / n) for n in ("b-0.tar", "b-1.tar", "a-0.tar", "a-1.tar")
    ]
    assert local_shards(str(tmp_path / "a-{0..1}.tar")) == [str(tmp_path / "a-0.tar"), str(tmp_path / "a-1.tar")]
    assert local_shards(str(tmp_path / "missing.tar")) == [str(tmp_path / "missing.tar")]


def test_image_extensions_are_stored_lower_case_with_jpeg_as_jpg():
    assert [image_ext(n) for n in ("x/a.JPEG", "b.jpg", "c.PNG", "d.webp")] == ["jpg", "jpg", "png", "webp"]
