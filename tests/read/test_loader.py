"""The streaming loader: exact replay, the round schedule, URL kinds, bad data, interop.

Shards are made by tests/shardmaker.py (fake teacher outputs, the real recipe sampling and
replay), tiny: 4 shards x 3 samples of ~50x60 JPEGs, 32x32 output, 3 rounds. Servers (HTTP,
moto S3) listen on 127.0.0.1 only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import http.server
import threading
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds

from tests.shardmaker import make_shards
from wds_reinforce.core.augment import Recipe, normalize
from wds_reinforce.core.errors import DataError, MismatchError, UsageError
from wds_reinforce.core.format import FormatError, Manifest, decode_sidecar, encode_sidecar
from wds_reinforce.core.schedule import round_for
from wds_reinforce.core.targets import densify, one_hot
from wds_reinforce.layouts import read_manifest
from wds_reinforce.read.dataset import DEFAULT_SHUFFLE, ReinforcedDataset
from wds_reinforce.read.loader import (
    SkipCounter,
    decode_sidecars,
    make_targets,
    pick_rounds,
    reinforce_stages,
    replay_images,
)

R = 3  # rounds in the test shards
META = ("image", "target", "__key__", "round")


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("shards"), rounds=R)


pytestmark = pytest.mark.usefixtures("loopback_only")


def collect(ds) -> list[tuple]:
    return [tuple(x) for x in ds]


def by_key(rows) -> dict[str, tuple]:
    return {row[2]: row for row in rows}


# ----------------------------------------------------------------------------------------
# Exact replay


@pytest.mark.parametrize("decode", ["full", "reduced"])
def test_replay_equals_producer_pixels_for_every_round(tmp_path, decode):
    made = make_shards(tmp_path, rounds=R, decode=decode, num_shards=2, image_hw=(72, 90))
    ds = ReinforcedDataset(str(tmp_path), keys=META)
    seen = defaultdict(list)
    for epoch in range(R):
        ds.set_epoch(epoch)
        rows = collect(ds)
        assert sorted(r[2] for r in rows) == sorted(made.keys)
        for img, target, key, rnd in rows:
            assert img.dtype == torch.uint8 and img.shape == (3, 32, 32)
            assert torch.equal(img, made.pixels[(key, rnd)]), f"{key} round {rnd} differs"
            sc = made.sidecars[key]
            torch.testing.assert_close(target, densify(sc.idx[rnd], sc.prob[rnd], made.manifest.num_classes))
            seen[key].append(rnd)
    assert all(sorted(v) == list(range(R)) for v in seen.values())


def test_float_output_is_normalised_uint8(made):
    a = collect(ReinforcedDataset(made.pattern, keys=("image", "__key__")))
    b = collect(
        ReinforcedDataset(made.pattern, keys=("image", "__key__"), output="float", mean=(0.5,) * 3, std=(0.25,) * 3)
    )
    for (u8, ka), (f, kb) in zip(a, b):
        assert ka == kb and f.dtype == torch.float32
        torch.testing.assert_close(f, normalize(u8, (0.5,) * 3, (0.25,) * 3))


def test_float_output_defaults_to_the_recipes_normalisation(tmp_path):
    """A recipe naming its normalisation (cifar100+: CIFAR's mean/std) is what float output uses; else ImageNet's."""
    from wds_reinforce.core.augment import IMAGENET_MEAN, IMAGENET_STD, Recipe
    from wds_reinforce.core.augment.recipe import CIFAR100_MEAN, CIFAR100_STD

    cifar = make_shards(tmp_path / "c", num_shards=1, per_shard=2, rounds=2, recipe=Recipe.from_spec("cifar100+"))
    plain = make_shards(tmp_path / "p", num_shards=1, per_shard=2, rounds=2)
    for made, mean, std in ((cifar, CIFAR100_MEAN, CIFAR100_STD), (plain, IMAGENET_MEAN, IMAGENET_STD)):
        u8 = collect(ReinforcedDataset(made.pattern, keys=("image", "__key__")))
        f = collect(ReinforcedDataset(made.pattern, keys=("image", "__key__"), output="float"))
        assert len(u8) == 2 and [k for _, k in u8] == [k for _, k in f]
        for (a, _), (b, _) in zip(u8, f):
            torch.testing.assert_close(b, normalize(a, mean, std))


def test_sparse_targets_densify_on_the_batch_to_the_dense_ones(made):
    dense = collect(ReinforcedDataset(made.pattern, p=0.5, label_smoothing=0.1, keys=("target", "round")))
    loader = torch.utils.data.DataLoader(
        ReinforcedDataset(made.pattern, p=0.5, label_smoothing=0.1, densify="sparse"), batch_size=5
    )
    batches = [densify(idx, prob, made.manifest.num_classes) for _, idx, prob in loader]
    torch.testing.assert_close(torch.cat(batches), torch.stack([t for t, _ in dense]))
    assert {r for _, r in dense} & {-1} and {r for _, r in dense} - {-1}, "p=0.5 should mix both kinds"


def test_p_zero_gives_originals_with_one_hot_targets(made):
    rows = collect(
        ReinforcedDataset(made.pattern, p=0.0, label_smoothing=0.1, keys=("image", "target", "__key__", "round"))
    )
    again = collect(
        ReinforcedDataset(made.pattern, p=0.0, label_smoothing=0.1, keys=("image", "target", "__key__", "round"))
    )
    for (img, target, key, rnd), (img2, *_rest) in zip(rows, again):
        assert rnd == -1 and img.shape == (3, 32, 32)
        assert torch.equal(img, img2), "the original-image augmentation is seeded, not random"
        torch.testing.assert_close(target, one_hot(made.labels[key], made.manifest.num_classes, 0.1))
    zeros = collect(
        ReinforcedDataset(made.pattern, p=0.0, label_smoothing=0.1, densify="zeros", keys=("target", "__key__"))
    )
    for target, key in zeros:
        torch.testing.assert_close(target, one_hot(made.labels[key], made.manifest.num_classes, 0.1))


# ----------------------------------------------------------------------------------------
# Schedule through DataLoader workers and ranks


def _rounds_per_epoch(ds, loader, epochs) -> list[dict[str, int]]:
    out = []
    for epoch in range(epochs):
        ds.set_epoch(epoch)
        rows = [(key, int(rnd)) for _, _, key, rnd in loader]
        keys = [k for k, _ in rows]
        assert len(keys) == len(set(keys)), "a sample came twice in one epoch"
        out.append(dict(rows))
    return out


@pytest.mark.parametrize(
    "workers,persistent,context", [(0, False, None), (2, False, None), (2, True, None), (2, True, "spawn")]
)
def test_schedule_covers_all_rounds_with_workers(made, workers, persistent, context):
    ds = ReinforcedDataset(made.pattern, keys=META, shardshuffle=True, shuffle=4)
    loader = torch.utils.data.DataLoader(
        ds, batch_size=None, num_workers=workers, persistent_workers=persistent, multiprocessing_context=context
    )
    epochs = _rounds_per_epoch(ds, loader, R + 1)
    for key in made.keys:
        first_cycle = [e[key] for e in epochs[:R]]
        assert sorted(first_cycle) == list(range(R)), f"{key}: {first_cycle}"
        assert all(e[key] == round_for(0, key, i, R) for i, e in enumerate(epochs))


def test_simulated_world_size_two_gets_equal_disjoint_halves(made, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    per_rank = []
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        ds = ReinforcedDataset(made.pattern, keys=META, shardshuffle=True)
        loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2)
        per_rank.append(_rounds_per_epoch(ds, loader, R))
    for epoch in range(R):
        a, b = per_rank[0][epoch], per_rank[1][epoch]
        assert len(a) == len(b) == len(made.keys) // 2
        assert not a.keys() & b.keys() and a.keys() | b.keys() == set(made.keys)
        assert all(r == round_for(0, k, epoch, R) for k, r in {**a, **b}.items())


def test_fewer_shards_than_ranks_times_workers_is_an_error(made, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    ds = ReinforcedDataset(made.urls[:2], keys=META)
    exc = _first_error(torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2))
    assert isinstance(exc, ValueError)
    assert "expected at least 4 shards for 2 rank(s) x 2 worker(s), got 2" in str(exc)


def _first_error(loader) -> BaseException | None:
    # Drop the traceback before returning: it would keep the loader iterator (and its worker
    # processes) alive, and torch then takes seconds to shut them down later.
    it = iter(loader)
    try:
        next(it)
    except Exception as exc:  # noqa: BLE001
        exc.__traceback__ = None
        return exc
    finally:
        del it
    return None


# ----------------------------------------------------------------------------------------
# Plain webdataset and timm


def test_stages_compose_into_a_plain_webdataset(made):
    stages = reinforce_stages(made.manifest, epoch=1)
    ds = (
        wds.WebDataset(made.pattern, shardshuffle=False)
        .compose(*stages)
        .to_tuple("image", "target", "__key__", "round")
    )
    ours = ReinforcedDataset(made.pattern, epoch=1, keys=META)
    for (a, ta, ka, ra), (b, tb, kb, rb) in zip(collect(ds), collect(ours), strict=True):
        assert ka == kb and ra == rb and torch.equal(a, b) and torch.equal(ta, tb)


def test_plain_webdataset_reads_the_shards(made):
    ds = wds.WebDataset(made.pattern, shardshuffle=False).decode("pil").to_tuple("jpg", "cls", "__key__")
    rows = collect(ds)
    assert [k for *_, k in rows] == made.keys
    assert all(img.mode == "RGB" and cls == made.labels[k] for img, cls, k in rows)
    sample = next(iter(wds.WebDataset(made.pattern, shardshuffle=False).decode()))
    assert isinstance(sample["dr.mp"], dict) and sample["dr.mp"]["v"] == 1


def test_timm_reads_the_shards_via_info_json(made):
    timm_data = pytest.importorskip("timm.data")
    ds = timm_data.create_dataset("wds/tiny", root=str(made.root), split="train", batch_size=1)
    rows = list(ds)
    assert len(rows) == len(made.keys)
    assert sorted(label for _, label in rows) == sorted(made.labels.values())


# ----------------------------------------------------------------------------------------
# URL kinds: brace pattern, manifest path, http, s3


def test_sources_resolve_to_the_same_samples(made):
    expect = collect(ReinforcedDataset(made.pattern, keys=("__key__", "round")))
    assert collect(ReinforcedDataset(str(made.root / "manifest.json"), keys=("__key__", "round"))) == expect
    assert collect(ReinforcedDataset(made.urls, keys=("__key__", "round"))) == expect
    assert collect(ReinforcedDataset(made.urls[:1], manifest=made.manifest, keys=("__key__", "round"))) == expect[:3]


def test_missing_manifest_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="shard-{000000..000001}.tar', which does not exist$"):
        ReinforcedDataset(str(tmp_path / "shard-{000000..000001}.tar"))
    (tmp_path / "shard-000000.tar").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="manifest.json beside them .*: cannot read .*manifest.json"):
        ReinforcedDataset(str(tmp_path / "shard-{000000..000001}.tar"))


@pytest.mark.parametrize("given", ["missing/dir", "missingdir", "missing/dir/"])
def test_missing_source_names_the_path_given(tmp_path, monkeypatch, given):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError) as info:
        ReinforcedDataset(given)
    assert f"got {given!r}, which does not exist" in str(info.value)
    assert "folder or URL prefix holding manifest.json" in str(info.value)


class _Silent(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass


@contextlib.contextmanager
def _answering(status: int):
    """A server on 127.0.0.1 that answers every GET with ``status``; yields its root URL."""

    class Handler(_Silent):
        def do_GET(self):
            self.send_error(status)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_http_shards_without_a_manifest_say_one_is_needed(monkeypatch):
    monkeypatch.setenv("WDS_REINFORCE_RETRIES", "0")
    with _answering(404) as root, pytest.raises(FileNotFoundError) as info:
        ReinforcedDataset(f"{root}/x.tar")
    message = str(info.value)
    assert f"got '{root}/x.tar'" in message and f"cannot read {root}/manifest.json" in message
    assert "manifest.json beside them (else pass manifest=)" in message


def test_http_shards_whose_manifest_cannot_be_fetched_say_what_it_was_for(monkeypatch):
    from wds_reinforce.io.retry import NetworkReadError

    monkeypatch.setenv("WDS_REINFORCE_RETRIES", "0")
    with _answering(503) as root, pytest.raises(NetworkReadError) as info:
        ReinforcedDataset(f"{root}/x.tar")
    assert f"cannot read {root}/manifest.json" in str(info.value)
    assert "reading the manifest beside the shards given" in str(info.value)
    assert info.value.url == f"{root}/manifest.json"


def assert_same_as_local(made, url_pattern, manifest_url):
    local = collect(ReinforcedDataset(made.pattern, epoch=2, keys=META))
    for source in (url_pattern, manifest_url):
        remote = collect(ReinforcedDataset(source, epoch=2, keys=META))
        assert len(remote) == len(local) == len(made.keys)
        for (a, ta, ka, ra), (b, tb, kb, rb) in zip(local, remote):
            assert (ka, ra) == (kb, rb) and torch.equal(a, b) and torch.equal(ta, tb)
    assert read_manifest(manifest_url).to_json() == made.manifest.to_json()


@pytest.fixture
def http_root(made, monkeypatch):
    for name in ("NO_PROXY", "no_proxy"):  # curl must not send 127.0.0.1 through a proxy
        monkeypatch.setenv(name, "127.0.0.1")
    handler = functools.partial(_QuietHandler, directory=str(made.root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def test_http_streaming_equals_local(made, http_root):
    assert_same_as_local(made, f"{http_root}/shard-{{000000..000003}}.tar", f"{http_root}/manifest.json")
    with pytest.raises(FileNotFoundError, match="cannot read http://127.0.0.1"):
        read_manifest(f"{http_root}/nope/manifest.json")


def test_a_set_url_reads_with_or_without_the_trailing_slash(made, http_root):
    keys = sorted(k for (k,) in ReinforcedDataset(f"{http_root}/manifest.json", keys=("__key__",)))
    assert keys == sorted(made.keys)
    for folder in (http_root, f"{http_root}/"):
        assert sorted(k for (k,) in ReinforcedDataset(folder, keys=("__key__",))) == keys


@pytest.mark.parametrize(
    "url, folder",
    [
        ("s3://b/set", True),
        ("hf://datasets/org/name", True),
        ("https://h/set/", True),
        ("https://h/set/shard-000.tar?X-Amz-Credential=AKIA/2024/us-east-1/s3/aws4_request", False),
        ("https://h/x.tgz", False),
        ("https://h/x-{000..003}.tar", False),
        ("pipe:curl -s -H 'X: a/b' https://h/x", False),
        ("data/set", False),  # local paths: a folder is one that exists
    ],
)
def test_which_urls_name_a_sets_folder(url, folder):
    from wds_reinforce.read.dataset import _names_folder

    assert _names_folder(url) is folder


class _DyingHandler(_QuietHandler):
    """Serves the manifest and the first shard, cuts the second mid-body, then answers nothing."""

    def do_GET(self):
        state = self.server.state
        if self.path.endswith(".tar"):
            state["tars"] += 1
            if state["tars"] == 2 or state["dead"]:
                state["dead"] = True
                if state["tars"] == 2:
                    data = (Path(self.directory) / self.path.lstrip("/")).read_bytes()
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data[: len(data) // 2])
                self.close_connection = True
                return
        super().do_GET()


def test_server_dying_mid_epoch_counts_exactly_the_lost_samples(made, monkeypatch):
    for name, value in {
        "NO_PROXY": "127.0.0.1",
        "no_proxy": "127.0.0.1",
        "WDS_REINFORCE_RETRIES": "1",
        "WDS_REINFORCE_BACKOFF": "0.01",
        "WDS_REINFORCE_BACKOFF_MAX": "0.01",
    }.items():
        monkeypatch.setenv(name, value)
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(_DyingHandler, directory=str(made.root))
    )
    server.state = {"tars": 0, "dead": False}
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        counter = SkipCounter()
        url = f"http://127.0.0.1:{server.server_address[1]}/manifest.json"
        rows = [k for (k,) in ReinforcedDataset(url, keys=("__key__",), handler=counter)]
    finally:
        server.shutdown()
        server.server_close()
    assert rows[:3] == made.keys[:3] and rows == made.keys[: len(rows)]  # shard 0 whole, then what shard 1 had
    assert len(rows) < 6
    assert counter.count == 3, counter.last  # shard 1's tail, shards 2 and 3: one error each
    assert counter.samples == len(made.keys) - len(rows)  # exactly what the epoch did not yield
    assert "shard-000003.tar" in counter.last and "0x" not in counter.last


def test_s3_streaming_equals_local(made, s3_env):
    import boto3

    client = boto3.client("s3", endpoint_url=s3_env)
    client.create_bucket(Bucket="data")
    for path in sorted(made.root.iterdir()):
        client.upload_file(str(path), "data", f"tiny/{path.name}")
    assert_same_as_local(made, "s3://data/tiny/shard-{000000..000003}.tar", "s3://data/tiny/manifest.json")
    with pytest.raises(FileNotFoundError, match="s3://data/tiny/nope.json"):
        read_manifest("s3://data/tiny/nope.json")
    # the scheme also writes (upload on close), and timm's _info.json reader sees s3 too
    with wds.gopen("s3://data/copy/x.bin", "wb") as f:
        f.write(b"hello")
    assert wds.gopen("s3://data/copy/x.bin").read() == b"hello"


# ----------------------------------------------------------------------------------------
# Bad data


def _flip_all_prob_high_bytes(data: bytes) -> bytes:
    # 'prob' is the bin after the key a4 'prob' c4 len; flipping each fp16's high byte makes it negative or huge
    at = data.index(b"\xa4prob") + 5
    assert data[at] == 0xC4
    n, start = data[at + 1], at + 2
    body = bytearray(data)
    for i in range(start + 1, start + n, 2):
        body[i] ^= 0xFF
    return bytes(body)


def _drop_column(data: bytes, name: str) -> bytes:
    sc = decode_sidecar(data)
    ops = {k: v for k, v in sc.ops.items() if k != name}
    return encode_sidecar(dataclasses.replace(sc, ops=ops))


CORRUPTIONS = {
    "missing_op_column": lambda k, ext, d: _drop_column(d, "flip") if ext == "dr.mp" else d,
    "sidecar_header": lambda k, ext, d: bytes([d[0] ^ 0xFF]) + d[1:] if ext == "dr.mp" else d,
    "sidecar_prob": lambda k, ext, d: _flip_all_prob_high_bytes(d) if ext == "dr.mp" else d,
    "bad_jpeg": lambda k, ext, d: b"\xff\xd8\xff" + bytes(range(256)) * 4 if ext == "jpg" else d,
    "not_an_image": lambda k, ext, d: b"this is not an image" if ext == "jpg" else d,
    "missing_sidecar": lambda k, ext, d: None if ext == "dr.mp" else d,
}
BAD_KEY = "s01_0001"


@pytest.fixture(params=sorted(CORRUPTIONS))
def corrupt(request, tmp_path):
    name = request.param
    fn = CORRUPTIONS[name]
    mutate = lambda k, ext, d: fn(k, ext, d) if k == BAD_KEY else d  # noqa: E731
    return make_shards(tmp_path, rounds=R, mutate=mutate, record_pixels=False)


def test_corrupt_sample_raises_with_key_and_url(corrupt):
    ds = ReinforcedDataset(corrupt.pattern, keys=("__key__",))
    with pytest.raises(DataError, match=f"shard-000001.tar: sample .{BAD_KEY}.: "):
        collect(ds)


def test_corrupt_sample_is_skipped_and_counted(corrupt):
    counter = SkipCounter()
    rows = collect(ReinforcedDataset(corrupt.pattern, keys=("__key__",), handler=counter))
    assert [k for (k,) in rows] == [k for k in corrupt.keys if k != BAD_KEY]
    assert counter.count == 1 and counter.samples == 1 and BAD_KEY in counter.last


@pytest.mark.parametrize("kind", ["single_byte", "multi_byte", "image_byte"])
def test_every_flipped_byte_is_caught_with_key_and_url(tmp_path, kind):
    """Each sample gets its own damage (a different position, a different flip); none may pass."""
    rng = np.random.default_rng({"single_byte": 1, "multi_byte": 2, "image_byte": 3}[kind])
    ext = "jpg" if kind == "image_byte" else "dr.mp"

    def damage(key, member_ext, data):
        if member_ext != ext:
            return data
        bad = bytearray(data)
        count = 1 if kind != "multi_byte" else int(rng.integers(2, 9))
        for i in rng.choice(len(data), size=count, replace=False):
            bad[i] ^= int(rng.integers(1, 256))
        return bytes(bad)

    tried = caught = 0
    for trial in range(4):
        made = make_shards(tmp_path / str(trial), rounds=R, mutate=damage, record_pixels=False, seed=trial)
        counter = SkipCounter()
        rows = collect(ReinforcedDataset(made.pattern, keys=("__key__",), handler=counter))
        tried += len(made.keys)
        caught += counter.samples
        assert rows == [], f"damaged samples passed: {rows}"
        assert counter.count == len(made.keys)
    assert caught == tried == 48
    made = make_shards(tmp_path / "one", rounds=R, mutate=damage, record_pixels=False)
    with pytest.raises(DataError, match=r"shard-000000.tar: sample 's00_0000': .*(checksum|msgpack|bytes)"):
        collect(ReinforcedDataset(made.pattern, keys=("__key__",)))


def test_skips_are_counted_across_workers(tmp_path):
    mutate = lambda k, ext, d: b"not an image" if ext == "jpg" and k.endswith("_0001") else d  # noqa: E731
    made = make_shards(tmp_path, rounds=R, mutate=mutate, record_pixels=False)
    counter = SkipCounter()
    loader = torch.utils.data.DataLoader(
        ReinforcedDataset(made.pattern, keys=("__key__",), handler=counter), batch_size=None, num_workers=2
    )
    keys = sorted(k for (k,) in loader)
    assert keys == sorted(k for k in made.keys if not k.endswith("_0001"))
    assert counter.count == counter.samples == 4


@pytest.mark.parametrize("cut", ["mid_member", "member_boundary"])
def test_truncated_shard_is_detected(made, tmp_path, cut):
    data = Path(made.urls[1]).read_bytes()
    if cut == "mid_member":
        end = data.index(b"s01_0001.jpg") + 512 + 100  # inside the second sample's image
    else:
        end = data.index(b"s01_0002.jpg")  # the header of the third sample: a clean member boundary
    for i, url in enumerate(made.urls):
        (tmp_path / Path(url).name).write_bytes(data[:end] if i == 1 else Path(url).read_bytes())
    (tmp_path / "manifest.json").write_text(made.manifest.to_json())
    with pytest.raises(Exception, match="shard-000001.tar"):
        collect(ReinforcedDataset(str(tmp_path), keys=("__key__",)))
    counter = SkipCounter()
    rows = [k for (k,) in ReinforcedDataset(str(tmp_path), keys=("__key__",), handler=counter)]
    # At a member boundary the sample before the cut looks whole, but nothing shows that no
    # member of it is missing (the end-of-archive marker is gone): it is not yielded either.
    lost = {"s01_0001", "s01_0002"}
    assert rows == [k for k in made.keys if k not in lost]
    assert counter.count == 1 and counter.samples == len(lost), counter.last  # one error, exactly what was lost
    assert "0x" not in counter.last


@pytest.mark.parametrize("damage", ["empty_tar_1024", "empty_tar_10240", "zero_bytes", "deleted", "garbage"])
def test_a_lost_shard_is_an_error_counting_exactly_its_samples(made, tmp_path, damage):
    for url in made.urls:
        (tmp_path / Path(url).name).write_bytes(Path(url).read_bytes())
    (tmp_path / "manifest.json").write_text(made.manifest.to_json())
    victim = tmp_path / Path(made.urls[2]).name
    if damage == "deleted":
        victim.unlink()
    else:
        size = {"empty_tar_1024": 1024, "empty_tar_10240": 10240, "zero_bytes": 0}.get(damage)
        victim.write_bytes(bytes(size) if size is not None else b"not a tar archive at all" * 50)
    with pytest.raises(DataError, match=r"shard-000002.tar: expected 3 samples \(per the manifest\), got 0") as info:
        collect(ReinforcedDataset(str(tmp_path), keys=("__key__",)))
    assert info.value.samples == 3 and "0x" not in str(info.value)
    counter = SkipCounter()
    rows = [k for (k,) in ReinforcedDataset(str(tmp_path), keys=("__key__",), handler=counter)]
    assert rows == [k for k in made.keys if not k.startswith("s02_")]
    assert (counter.count, counter.samples) == (1, 3), counter.last


def test_separate_stages_equal_the_one_stage_with_originals_and_a_seed(made):
    """decode_sidecars -> pick_rounds -> replay_images -> make_targets gives what reinforce gives."""
    recipe = Recipe.from_dict(made.manifest.recipe)
    ds = wds.WebDataset(made.urls, shardshuffle=False).compose(
        decode_sidecars(fingerprint=recipe.fingerprint, rounds=R, recipe=recipe),
        pick_rounds(seed=5, epoch=2, p=0.5),
        replay_images(recipe=recipe),
        make_targets(num_classes=made.manifest.num_classes, label_smoothing=0.1),
    )
    staged = [(s["__key__"], s["round"], s["image"], s["target"]) for s in ds]
    whole = collect(ReinforcedDataset(made.pattern, seed=5, epoch=2, p=0.5, label_smoothing=0.1, keys=META))
    assert {r for _, r, _, _ in staged} >= {-1} and len(staged) == len(whole)
    for (ka, ra, a, ta), (b, tb, kb, rb) in zip(staged, whole):
        assert (ka, ra) == (kb, rb) and torch.equal(a, b) and torch.equal(ta, tb)


def test_usage_errors_while_reading_shards_are_never_skipped(made, tmp_path, monkeypatch):
    counter = SkipCounter()
    ds = ReinforcedDataset(["s3://only-a-bucket"], manifest=made.manifest, keys=("__key__",), handler=counter)
    with pytest.raises(UsageError, match="expected an s3://bucket/key URL"):
        collect(ds)
    with pytest.raises(
        UsageError, match="expected a URL scheme that webdataset or fsspec knows, got 'nosuch://x/shard.tar'"
    ):
        collect(ReinforcedDataset(["nosuch://x/shard.tar"], manifest=made.manifest, handler=counter))
    assert counter.count == 0
    monkeypatch.setenv("WDS_REINFORCE_RETRIES", "five")
    with pytest.raises(UsageError, match="WDS_REINFORCE_RETRIES"):
        ReinforcedDataset(made.pattern)


def test_a_located_error_keeps_where_it_was_raised(corrupt_sidecar):
    with pytest.raises(DataError) as info:
        collect(ReinforcedDataset(corrupt_sidecar.pattern, keys=("__key__",)))
    frames = [f.name for f in info.traceback]
    assert "decode_sidecar" in frames or "_check_integrity" in frames, frames


@pytest.fixture
def corrupt_sidecar(tmp_path):
    flip = lambda k, ext, d: d[:20] + bytes([d[20] ^ 1]) + d[21:] if ext == "dr.mp" else d  # noqa: E731
    return make_shards(tmp_path, rounds=R, mutate=flip, record_pixels=False)


def test_a_missing_shard_names_its_file_error(made, tmp_path):
    for url in made.urls[:2]:
        (tmp_path / Path(url).name).write_bytes(Path(url).read_bytes())
    (tmp_path / "manifest.json").write_text(made.manifest.to_json())
    with pytest.raises(DataError, match="got 0: FileNotFoundError: .*No such file"):
        collect(ReinforcedDataset(str(tmp_path), keys=("__key__",)))


def test_fluent_shuffle_and_batched(made):
    ds = ReinforcedDataset(made.pattern, seed=3).shuffle(5).batched(4)
    batches = collect(ds)
    assert len(batches) == 3
    images, targets = batches[0]
    assert images.shape == (4, 3, 32, 32) and images.dtype == torch.uint8
    assert targets.shape == (4, made.manifest.num_classes) and targets.dtype == torch.float32


def test_resampled_with_epoch_yields_the_requested_count(made):
    ds = ReinforcedDataset(made.pattern, resampled=True, keys=("__key__", "round")).with_epoch(20)
    rows = collect(ds)
    assert len(rows) == 20 and all(r == round_for(0, k, 0, R) for k, r in rows)
    again = collect(ReinforcedDataset(made.pattern, resampled=True, keys=("__key__", "round")).with_epoch(20))
    assert again == rows, "resampling is seeded, not drawn from time and pid"


def test_a_stage_order_bug_is_not_swallowed_by_a_skipping_handler(made):
    """KeyError from a missing earlier stage is a bug: it propagates even with SkipCounter."""
    counter = SkipCounter()
    recipe = Recipe.from_dict(made.manifest.recipe)
    ds = wds.WebDataset(made.urls, shardshuffle=False).compose(
        decode_sidecars(fingerprint=recipe.fingerprint, handler=counter),
        replay_images(recipe=recipe, handler=counter),  # pick_rounds left out
    )
    with pytest.raises(KeyError, match="round"):
        next(iter(ds))
    assert counter.count == 0


def test_recipe_mismatch_is_an_error_at_the_first_sample_even_when_skipping(made, tmp_path):
    other = make_shards(tmp_path, rounds=R, recipe="rrc+ra/re", record_pixels=False)
    ds = ReinforcedDataset(other.pattern, manifest=made.manifest, handler=SkipCounter())
    with pytest.raises(MismatchError, match="shard-000000.tar: sample 's00_0000': recipe fingerprint"):
        next(iter(ds))  # the manifest's own recipe check passes; the sidecars disagree
    stage = decode_sidecars(fingerprint=bytes.fromhex(made.manifest.fingerprint), handler=SkipCounter())
    samples = [{"__key__": "k", "__url__": "u", "dr.mp": _sidecar_bytes(other)}]
    with pytest.raises(MismatchError, match="u: sample 'k': recipe fingerprint .* differs from the manifest's"):
        list(stage(iter(samples)))


def _sidecar_bytes(made) -> bytes:
    from wds_reinforce.core.format import encode_sidecar

    return encode_sidecar(next(iter(made.sidecars.values())))


def test_unknown_sidecar_version_is_an_error_at_the_first_sample(made):
    import msgpack

    body = msgpack.unpackb(_sidecar_bytes(made))
    body["v"] = 99
    stage = decode_sidecars(fingerprint=bytes.fromhex(made.manifest.fingerprint), handler=SkipCounter())
    with pytest.raises(MismatchError, match="sidecar format version 99, this reader knows 1"):
        list(stage(iter([{"__key__": "k", "__url__": "u", "dr.mp": msgpack.packb(body)}])))


def test_manifest_recipe_that_this_version_fingerprints_differently_is_refused(made):
    bad = Manifest.from_json(made.manifest.to_json())
    bad.fingerprint = "00" * 8
    with pytest.raises(FormatError, match="replay would not match"):
        ReinforcedDataset(made.pattern, manifest=bad)


def test_bad_arguments_fail_early(made):
    with pytest.raises(ValueError, match="expected densify in"):
        ReinforcedDataset(made.pattern, densify="dense")
    with pytest.raises(ValueError, match="expected p a probability"):
        ReinforcedDataset(made.pattern, p=1.5)
    with pytest.raises(ValueError, match="expected output in"):
        ReinforcedDataset(made.pattern, output="fp16")
    with pytest.raises(UsageError, match=r"expected shuffle a buffer size >= 0 \(or True / False\), got -1"):
        ReinforcedDataset(made.pattern, shuffle=-1)


def test_shuffle_takes_a_bool_as_torch_and_webdataset_users_write_it(made):
    """shuffle=False reads in shard order, shuffle=True uses the default buffer: the same samples, mixed."""
    keys = lambda **kw: [k for (k,) in ReinforcedDataset(made.pattern, keys=("__key__",), **kw)]  # noqa: E731
    in_order = keys(shuffle=False)
    assert in_order == keys(shuffle=0) == made.keys
    mixed = keys(shuffle=True)
    assert sorted(mixed) == sorted(in_order) and mixed != in_order
    assert mixed == keys(shuffle=DEFAULT_SHUFFLE)
