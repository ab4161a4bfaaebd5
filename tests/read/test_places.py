"""Every sample bound to its place: swapped, overwritten, spliced, longer and shorter shards, and labels.

Shards come from tests/shardmaker.py (4 shards x 3 samples), bound as the producer writes them
(each sidecar records its shard, its position and its label's checksum) or, with
``bound=False``, as sidecars written before. Servers listen on 127.0.0.1 only.
"""

from __future__ import annotations

import http.server
import io
import shutil
import tarfile
import threading
from pathlib import Path

import pytest

from tests.shardmaker import make_shards
from wds_reinforce.core.errors import DataError
from wds_reinforce.read.dataset import ReinforcedDataset
from wds_reinforce.read.options import SkipCounter

R = 3


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("bound"), rounds=R, record_pixels=False)


@pytest.fixture(scope="module")
def unbound(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("unbound"), rounds=R, record_pixels=False, bound=False)


pytestmark = pytest.mark.usefixtures("loopback_only")


def _members(path: Path) -> list[tuple[str, bytes]]:
    with tarfile.open(path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar]


def _samples(path: Path) -> list[list[tuple[str, bytes]]]:
    """A shard's members grouped by key, in order."""
    out: list[list[tuple[str, bytes]]] = []
    for name, data in _members(path):
        if not out or out[-1][0][0].split(".")[0] != name.split(".")[0]:
            out.append([])
        out[-1].append((name, data))
    return out


def _tar(samples: list[list[tuple[str, bytes]]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for members in samples:
            for name, data in members:
                info = tarfile.TarInfo(name)
                info.size, info.mtime = len(data), 0
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _copy(made, dest: Path) -> Path:
    shutil.copytree(made.root, dest)
    return dest


def _read(source, **kwargs) -> tuple[list[str], SkipCounter]:
    counter = SkipCounter()
    rows = [k for (k,) in ReinforcedDataset(source, keys=("__key__",), handler=counter, **kwargs)]
    return rows, counter


def test_a_shard_swapped_for_another_of_the_same_count_is_refused_and_counted(made, tmp_path):
    root = _copy(made, tmp_path / "copy")
    shutil.copy(root / "shard-000002.tar", root / "shard-000001.tar")
    with pytest.raises(DataError, match=r"shard-000001.tar: sample 's02_0000': .*made for shard 2, not this one"):
        list(ReinforcedDataset(str(root), keys=("__key__",)))
    rows, counter = _read(str(root))
    assert rows == [k for k in made.keys if not k.startswith("s01_")]  # shard 2's samples once, not twice
    assert (counter.samples, counter.foreign) == (3, 3), counter.last
    assert counter.count == 4  # three refused samples, then the shard's loss


def test_extra_and_foreign_samples_are_counted_beside_the_real_losses(made, tmp_path):
    root = _copy(made, tmp_path / "copy")
    own, other = _samples(root / "shard-000001.tar"), _samples(root / "shard-000002.tar")
    # sample 1 lost; sample 0 again after sample 2; another shard's sample at the end
    (root / "shard-000001.tar").write_bytes(_tar([own[0], own[2], own[0], other[0]]))
    rows, counter = _read(str(root))
    assert rows == [k for k in made.keys if k != "s01_0001"]
    assert (counter.samples, counter.foreign) == (1, 2), counter.last
    assert "expected 3 samples (per the manifest), got 2 (and 2 refused as not its own): positions 1 missing" in (
        counter.last
    )


def test_a_shard_longer_than_the_manifest_refuses_the_extras(made, unbound, tmp_path):
    why = {id(made): "position 2 comes again", id(unbound): "past the 3 samples the manifest lists"}
    for data in (made, unbound):
        root = _copy(data, tmp_path / str(len(list(tmp_path.iterdir()))))
        own = _samples(root / "shard-000003.tar")
        extra = [[(name.replace("s03_0002", "s03_0009"), d) for name, d in own[2]]]
        (root / "shard-000003.tar").write_bytes(_tar(own + extra))
        rows, counter = _read(str(root))
        assert rows == data.keys, counter.last  # nothing past the count is yielded
        assert (counter.samples, counter.foreign) == (0, 1), counter.last
        assert "s03_0009" in counter.last and why[id(data)] in counter.last


def test_sidecars_written_before_places_keep_reading(unbound):
    rows, counter = _read(str(unbound.root))
    assert rows == unbound.keys and counter.count == 0
    assert all(sc.place is None and sc.label_crc is None for sc in unbound.sidecars.values())


@pytest.mark.parametrize("bound", [True, False])
def test_a_flipped_label_byte_is_refused_where_the_sidecar_covers_it(tmp_path, bound):
    flip = lambda k, ext, d: bytes([d[0] ^ 0x01]) + d[1:] if (k, ext) == ("s02_0001", "cls") else d  # noqa: E731
    made = make_shards(tmp_path, rounds=R, mutate=flip, record_pixels=False, bound=bound)
    rows, counter = _read(made.pattern, p=0.0)  # original-image epochs: the label is the target
    if bound:
        assert rows == [k for k in made.keys if k != "s02_0001"]
        assert counter.count == counter.samples == 1 and "label member 'cls'" in counter.last
    else:  # sidecars written before the label checksum: read as they always were
        assert rows == made.keys and counter.count == 0


def test_an_s3_object_overwritten_with_another_shard_is_refused(made, s3_env):
    import boto3

    client = boto3.client("s3", endpoint_url=s3_env)
    client.create_bucket(Bucket="places")
    for path in sorted(made.root.iterdir()):
        client.upload_file(str(path), "places", f"set/{path.name}")
    counter = SkipCounter()
    ds = ReinforcedDataset("s3://places/set/manifest.json", keys=("__key__",), handler=counter)
    client.upload_file(str(made.root / "shard-000000.tar"), "places", "set/shard-000003.tar")  # after opening
    rows = [k for (k,) in ds]
    assert rows == [k for k in made.keys if not k.startswith("s03_")]
    assert (counter.samples, counter.foreign) == (3, 3), counter.last


class _SplicingHandler(http.server.BaseHTTPRequestHandler):
    """Serves files without ETag or Last-Modified; shard 1's body is cut after its first sample, and
    the resumed (ranged) read gets shard 2's bytes from the same sample on, padded with zeros
    (two zero blocks end a tar) to the length the range asks for: other bytes of the same length."""

    def log_message(self, *args):
        pass

    def do_GET(self):
        root: Path = self.server.root
        data = (root / self.path.lstrip("/")).read_bytes()
        if not self.path.endswith("shard-000001.tar"):
            return self._send(200, data, len(data))
        cut = data.index(b"s01_0001.jpg")  # the second sample's first header
        if self.headers.get("Range") is None:
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data[:cut])
            self.close_connection = True
            return
        start = int(self.headers["Range"].split("=")[1].split("-")[0])
        assert start == cut
        other = (root / "shard-000002.tar").read_bytes()
        spliced = other[other.index(b"s02_0001.jpg") :][: len(data) - start]
        self._send(206, spliced.ljust(len(data) - start, b"\0"), len(data), start)

    def _send(self, status, body, total, start=0):
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{total - 1}/{total}")
        self.end_headers()
        self.wfile.write(body)


def test_a_resume_that_gets_another_objects_bytes_yields_nothing_foreign(made, monkeypatch):
    monkeypatch.setenv("WDS_REINFORCE_BACKOFF", "0.01")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _SplicingHandler)
    server.root = made.root
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        rows, counter = _read(f"http://127.0.0.1:{server.server_address[1]}/manifest.json")
    finally:
        server.shutdown()
        server.server_close()
    assert rows == [k for k in made.keys if k not in ("s01_0001", "s01_0002")]  # nothing of shard 2's twice
    assert counter.samples == 2, counter.last  # exactly shard 1's two samples after the cut
    assert counter.foreign >= 1, counter.last  # shard 2's spliced samples, refused


def test_sidecars_written_before_places_are_still_checked_by_key(unbound, tmp_path):
    root = _copy(unbound, tmp_path / "copy")
    shutil.copy(root / "shard-000002.tar", root / "shard-000001.tar")  # its first key is not the manifest's
    own = _samples(root / "shard-000003.tar")
    (root / "shard-000003.tar").write_bytes(_tar([own[0], own[1], own[0], own[2]]))  # a key again
    rows, counter = _read(str(root))
    assert rows == [k for k in unbound.keys if not k.startswith("s01_")]
    assert (counter.samples, counter.foreign) == (3, 4), counter.last
    assert "its key comes again" in counter.last


def _bare(members: list[tuple[str, bytes]]) -> list[tuple[str, bytes]]:
    return [(name, data) for name, data in members if not name.endswith(".dr.mp")]


def test_a_sample_without_a_readable_sidecar_is_lost_in_a_gap_and_foreign_past_the_end(made, tmp_path):
    root = _copy(made, tmp_path / "copy")
    own, other = _samples(root / "shard-000001.tar"), _samples(root / "shard-000002.tar")
    damaged = [(n, b"\x8b not a sidecar" if n.endswith(".dr.mp") else d) for n, d in own[1]]
    # position 1's sidecar damaged (a lost sample, counted once); a bare sample after the last position (foreign)
    (root / "shard-000001.tar").write_bytes(_tar([own[0], damaged, own[2], _bare(other[0])]))
    rows, counter = _read(str(root))
    assert rows == [k for k in made.keys if k != "s01_0001"]
    assert (counter.samples, counter.foreign) == (1, 1), counter.last
    assert "s02_0000" in counter.last and "no position is free" in counter.last


def test_with_places_in_the_manifest_a_sample_without_one_is_foreign(made, unbound, tmp_path):
    assert made.manifest.places and not unbound.manifest.places
    root = _copy(made, tmp_path / "copy")
    stray = _samples(unbound.root / "shard-000000.tar")[0]  # the same sample, its sidecar written before places
    own = _samples(root / "shard-000000.tar")
    (root / "shard-000000.tar").write_bytes(_tar([[(n.replace("s00_0000", "s00_9999"), d) for n, d in stray], *own]))
    rows, counter = _read(str(root))
    assert rows == made.keys  # only the stray is refused, not the shard's own samples after it
    assert (counter.count, counter.samples, counter.foreign) == (1, 0, 1), counter.last
    assert "records no place" in counter.last


def test_an_unreadable_extra_past_an_old_shards_count_is_foreign(unbound, tmp_path):
    root = _copy(unbound, tmp_path / "copy")
    own, other = _samples(root / "shard-000001.tar"), _samples(root / "shard-000002.tar")
    (root / "shard-000001.tar").write_bytes(_tar([*own, _bare(other[0])]))
    rows, counter = _read(str(root))
    assert rows == unbound.keys
    assert (counter.samples, counter.foreign) == (0, 1), counter.last
