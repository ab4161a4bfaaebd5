from __future__ import annotations

import gzip
import io
import json
import tarfile

import pytest

from tests.conftest import encode, photo_like
from tests.producer_data import CLASSES, make_image_folder, make_wds_shard
from wds_reinforce.produce.sources import (
    ImageFolderSource,
    SourceSampleError,
    WebDatasetSource,
    open_source,
    sanitize_key,
)


def _tar(path, members):
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_imagefolder_order_labels_keys_and_bytes(tmp_path):
    root = make_image_folder(tmp_path / "src", per_class=3)
    src = open_source(str(root))
    assert isinstance(src, ImageFolderSource)
    assert src.class_names == list(CLASSES)
    assert len(src) == 3 * 3 + 1
    samples = list(src.slice(0, len(src)))
    keys = [s.key for s in samples]
    assert keys[:3] == ["cat_img_0", "cat_img_1", "cat_img_2"]
    assert "dog_broken" in keys
    assert len(set(keys)) == len(keys) and not any("." in k for k in keys)
    assert [s.label for s in samples] == sorted(s.label for s in samples)
    assert samples[1].ext == "png" and samples[0].ext == "jpg"
    assert samples[0].data == (root / "cat" / "img.0.jpg").read_bytes()  # never re-encoded
    assert [s.key for s in src.slice(4, 7)] == keys[4:7]
    # Same order from a second listing: slices are a pure function of the tree.
    assert [s.key for s in open_source(str(root)).slice(0, 99)] == keys


def test_imagefolder_keys_unique_after_sanitising(tmp_path):
    (tmp_path / "a b").mkdir()
    data = encode(photo_like(32, 32, 0))
    for name in ("x.jpg", "x.png", "x y.jpg", "x_y.jpg"):
        (tmp_path / "a b" / name).write_bytes(data)
    keys = [s.key for s in ImageFolderSource(tmp_path).slice(0, 10)]
    assert len(set(keys)) == 4 and all("." not in k and " " not in k for k in keys)


def test_sanitize_key_is_short_and_dot_free():
    key = sanitize_key("dir/" + "a.b" * 100)
    assert len(key) <= 80 and "." not in key
    assert sanitize_key("dir/" + "a.b" * 100) == key
    assert sanitize_key("x" * 200) != sanitize_key("x" * 201)


def test_webdataset_source_reads_cls_json_and_brace_patterns(tmp_path):
    img = [encode(photo_like(32, 36, i)) for i in range(4)]
    _tar(tmp_path / "s-0.tar", [("a.jpg", img[0]), ("a.cls", b"2"), ("b.png", img[1]), ("b.json", b'{"label": 1}')])
    _tar(tmp_path / "s-1.tar", [("c.jpeg", img[2]), ("c.cls", b"0"), ("e.webp", img[3]), ("e.cls", b"1")])
    src = open_source(str(tmp_path / "s-{0..1}.tar"))
    assert isinstance(src, WebDatasetSource)
    got = [(s.key, s.label, s.ext, s.data) for s in src.slice(0, 10)]
    assert got == [("a", 2, "jpg", img[0]), ("b", 1, "png", img[1]), ("c", 0, "jpg", img[2]), ("e", 1, "webp", img[3])]
    assert src.class_names == ["0", "1", "2"]
    assert len(open_source(f"wds:{tmp_path}/s-*.tar")) == 4


def test_webdataset_sample_without_image_is_listed_not_dropped(tmp_path):
    src = open_source(str(make_wds_shard(tmp_path / "s.tar", per_class=1, no_image=("nopic",))))
    assert [src.key(i) for i in range(len(src))] == ["s0_0", "nopic", "s1_0", "s2_0"]
    assert [src[i].label for i in (0, 2, 3)] == [0, 1, 2]
    with pytest.raises(
        SourceSampleError,
        match=r"no image member \(jpg/jpeg/png/webp\); members: \['cls', 'txt'\] \(sample 'nopic' in .*s\.tar\)",
    ) as info:
        src[1]
    assert (
        info.value.key == "nopic"
        and info.value.reason == "no image member (jpg/jpeg/png/webp); members: ['cls', 'txt']"
    )
    # The listing (and so the job's identity) includes it.
    assert (
        src.index_digest()
        != open_source(str(make_wds_shard(tmp_path / "t.tar", per_class=1, no_image=()))).index_digest()
    )


def test_webdataset_source_class_names_from_manifest(tmp_path):
    _tar(tmp_path / "s.tar", [("a.jpg", encode(photo_like(32, 32, 0))), ("a.cls", b"0")])
    (tmp_path / "manifest.json").write_text(json.dumps({"class_names": ["x", "y"]}))
    assert WebDatasetSource(str(tmp_path / "s.tar")).class_names == ["x", "y"]


def test_food101_layout_without_download(tmp_path):
    base = tmp_path / "food-101"
    meta = {"apple_pie": ["apple_pie/11", "apple_pie/2"], "bibimbap": ["bibimbap/5"]}
    (base / "meta").mkdir(parents=True)
    (base / "meta" / "train.json").write_text(json.dumps(meta))
    for rels in meta.values():
        for rel in rels:
            (base / "images" / rel).parent.mkdir(parents=True, exist_ok=True)
            (base / "images" / f"{rel}.jpg").write_bytes(encode(photo_like(32, 32, len(rel))))
    src = open_source(f"food101:{tmp_path}")
    assert src.class_names == ["apple_pie", "bibimbap"]
    assert [(s.key, s.label) for s in src.slice(0, 9)] == [("apple_pie_11", 0), ("apple_pie_2", 0), ("bibimbap_5", 1)]
    assert src[2].data == (base / "images" / "bibimbap" / "5.jpg").read_bytes()


def test_cifar100_arrays_become_lossless_deterministic_png(tmp_path):
    """CIFAR's own pickled batches (built by hand, opcode by opcode) are read without pickle, in order."""
    import numpy as np
    from PIL import Image

    from tests.mldr_plus import cifar_root

    images, labels = cifar_root(tmp_path, 3)
    src = open_source(f"cifar100:{tmp_path}")
    assert len(src) == 3 and src.num_classes == 100 and src.class_names[7] == "class_7"
    s = src[2]
    assert (s.key, s.label, s.ext) == ("train_00002", labels[2], "png")
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(s.data))), images[2])
    assert src[2].data == s.data


def test_cifar100_pickle_with_code_is_refused_not_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "cifar-100-python").mkdir()
    evil = b"cos\nsystem\n(S'touch hacked'\ntR."  # a pickle that would call os.system
    (tmp_path / "cifar-100-python" / "train").write_bytes(evil)
    (tmp_path / "cifar-100-python" / "meta").write_bytes(evil)
    with pytest.raises(ValueError, match="cannot open cifar100 .*system"):
        open_source(f"cifar100:{tmp_path}")
    assert not (tmp_path / "hacked").exists()


@pytest.mark.parametrize(
    "spec, match",
    [
        ("{tmp}/missing", "not found"),
        ("{tmp}/empty", "empty source"),
        ("nosuchsource:{tmp}", "unknown source 'nosuchsource'"),
        ("{tmp}/nope-{{0..1}}.tar", "expected existing webdataset shard"),
        ("cifar100:{tmp}/empty", "cannot open cifar100"),
        ("{tmp}/text.tar", r"expected webdataset \.tar shards, got .*text\.tar: ReadError"),
        ("{tmp}/zero.tar", r"expected webdataset \.tar shards, got .*zero\.tar: ReadError: empty file"),
        ("{tmp}/s-{{0..1}}.tar", r"expected webdataset \.tar shards, got .*s-1\.tar: ReadError"),
        ("{tmp}/captions.tar", r"expected webdataset samples with an image member \(jpg/jpeg/png/webp\), got none"),
        ("{tmp}/gz.tar", r"got .*gz\.tar: ReadError: a compressed shard, whose members cannot be read in place"),
        ("{tmp}/neg.tar", r"expected an integer label for every sample in .*neg\.tar, got sample 'a': label -1 is neg"),
    ],
)
def test_open_source_errors(tmp_path, spec, match):
    (tmp_path / "empty").mkdir()
    (tmp_path / "text.tar").write_text("not a tar file, just some words\n" * 40)
    (tmp_path / "zero.tar").write_bytes(b"")
    _tar(tmp_path / "s-0.tar", [("a.jpg", encode(photo_like(32, 32, 0))), ("a.cls", b"0")])
    (tmp_path / "s-1.tar").write_bytes(bytes(range(256)) * 8)
    _tar(tmp_path / "captions.tar", [("a.txt", b"x"), ("a.cls", b"0"), ("b.txt", b"y")])
    _tar(tmp_path / "neg.tar", [("a.jpg", encode(photo_like(32, 32, 0))), ("a.cls", b"-1")])
    (tmp_path / "gz.tar").write_bytes(gzip.compress((tmp_path / "s-0.tar").read_bytes()))
    with pytest.raises(ValueError, match=match):
        open_source(spec.format(tmp=tmp_path))
