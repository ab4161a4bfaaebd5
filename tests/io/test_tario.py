"""The lean tar reader against tarfile: same members, same names, and every cut raises.

Archives are written by tarfile in its three formats (ustar with prefix-split names, GNU with
long-name headers, pax with path/size records and a global header), compressed three ways,
and read through file objects that return short reads. Cuts are fuzzed at random offsets and
at every block boundary: a cut before the end-of-archive marker always raises
``tarfile.ReadError``, after it never, and what was read before the error is a prefix of the
members with their data whole.
"""

from __future__ import annotations

import functools
import gzip
import http.server
import io
import random
import tarfile
import threading
import tracemalloc
from pathlib import Path

import pytest
import webdataset as wds

from tests.shardmaker import make_shards
from wds_reinforce.core.errors import DataError, FormatError
from wds_reinforce.io.shards import HashingReader, ShardCut
from wds_reinforce.io.shards import samples as _shard_samples
from wds_reinforce.io.storage import open_url
from wds_reinforce.io.tario import BLOCK, MAX_MEMBER_BYTES, iter_members
from wds_reinforce.read.dataset import ReinforcedDataset
from wds_reinforce.read.options import SkipCounter

SEED = 20261123


def _archive(fmt: int, compress: str = "", seed: int = 0) -> bytes:
    """Regular files of awkward sizes and names, a directory, a symlink, a hard link and a FIFO."""
    rng = random.Random(seed)
    buf = io.BytesIO()
    long_dir = "d" * 60 + "/" + "e" * 60  # > 100 characters: ustar splits it into prefix + name
    names = [
        "a.jpg",
        "a.cls",
        "b.dr.mp",
        f"{long_dir}/key.jpg",
        "x" * 120 + ".txt",  # a name no ustar prefix can hold: GNU long name or pax path
        "ünïcode/ключ.json",
        "sizes/s0.bin",
    ]
    sizes = [0, 1, 511, 512, 513, 1024, 5000, 70000]
    mode = f"w:{compress}" if compress else "w"
    with tarfile.open(fileobj=buf, mode=mode, format=fmt) as tar:
        if fmt == tarfile.PAX_FORMAT:
            tar.pax_headers = {"comment": "global header"}
        for i, name in enumerate(names + [f"sizes/s{n}.bin" for n in sizes]):
            if fmt == tarfile.USTAR_FORMAT and (len(name) > 100 and "/" not in name or not name.isascii()):
                continue  # ustar cannot store these
            data = bytes(rng.getrandbits(8) for _ in range(sizes[i % len(sizes)]))
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 0
            if fmt == tarfile.PAX_FORMAT and i == 2:
                info.pax_headers = {"comment": "x" * 300}  # a local pax header that sets nothing we read
            tar.addfile(info, io.BytesIO(data))
            if i == 1:
                for kind in (tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.FIFOTYPE):
                    other = tarfile.TarInfo(f"other{kind.decode()}")
                    other.type = kind
                    if kind == tarfile.SYMTYPE:  # a long target: a GNU long-link (K) header, a pax linkpath
                        other.linkname = "a.jpg" if fmt == tarfile.USTAR_FORMAT else "y" * 150 + "/a.jpg"
                    elif kind == tarfile.LNKTYPE:
                        other.linkname = "a.jpg"
                    tar.addfile(other)
    return buf.getvalue()


def _tarfile_members(data: bytes) -> list[tuple[str, bytes]]:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r|*") as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar if m.isreg()]


def _lean(fileobj) -> list[tuple[str, bytes]]:
    return [(m.name, m.read()) for m in iter_members(fileobj)]


class _Trickle:
    """A raw-like stream: ``read`` returns at most ``most`` bytes, and there is no ``readinto``."""

    def __init__(self, data: bytes, most: int):
        self.data, self.pos, self.most = data, 0, most

    def read(self, size: int = -1) -> bytes:
        size = self.most if size is None or size < 0 else min(size, self.most)
        out = self.data[self.pos : self.pos + size]
        self.pos += len(out)
        return out


FORMATS = {"ustar": tarfile.USTAR_FORMAT, "gnu": tarfile.GNU_FORMAT, "pax": tarfile.PAX_FORMAT}


@pytest.mark.parametrize("compress", ["", "gz", "bz2", "xz"])
@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_same_members_as_tarfile(fmt, compress):
    data = _archive(FORMATS[fmt], compress)
    expected = _tarfile_members(data)
    assert len(expected) >= 12
    assert fmt == "ustar" or any(len(name) > 100 and "/" not in name for name, _ in expected)
    assert _lean(io.BytesIO(data)) == expected
    assert _lean(io.BufferedReader(io.BytesIO(data), 64)) == expected
    assert _lean(_Trickle(data, 7)) == expected


def test_long_names_take_each_format_s_route():
    gnu = _archive(tarfile.GNU_FORMAT)
    kinds = [gnu[i + 156 : i + 157] for i in range(0, len(gnu), BLOCK) if gnu[i + 257 : i + 263] == b"ustar "]
    assert kinds.count(b"K") == 1 and kinds.count(b"L") >= 2  # a long link target and long names
    for fmt, marker in [("ustar", None), ("gnu", b"././@LongLink"), ("pax", b"path=")]:
        data = _archive(FORMATS[fmt])
        assert marker is None or marker in data, fmt
        names = [name for name, _ in _lean(io.BytesIO(data))]
        assert "d" * 60 + "/" + "e" * 60 + "/key.jpg" in names, fmt  # the ustar prefix, or the long name


def test_unread_members_are_skipped_and_cannot_be_read_later():
    data = _archive(tarfile.PAX_FORMAT)
    expected = _tarfile_members(data)
    kept = []
    passed = None
    for i, member in enumerate(iter_members(io.BytesIO(data))):
        if i % 2:
            kept.append((member.name, member.read()))
        elif passed is None:
            passed = member
    assert kept == expected[1::2]
    with pytest.raises(tarfile.ReadError, match="was passed over"):
        passed.read()


def test_cuts_raise_before_the_end_marker_and_never_after():
    rng = random.Random(SEED)
    for fmt in sorted(FORMATS):
        data = _archive(FORMATS[fmt], seed=1)
        expected = _tarfile_members(data)
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            tar.getmembers()
            marker = tar.offset  # the first zero block
        assert data[marker : marker + BLOCK] == bytes(BLOCK)
        cuts = set(range(0, len(data), BLOCK)) | {rng.randrange(len(data)) for _ in range(200)}
        cuts |= {c + d for c in range(0, len(data), BLOCK) for d in (-1, 1, 100)}
        for cut in sorted(c for c in cuts if 0 <= c <= len(data)):
            got = []
            try:
                for member in iter_members(io.BytesIO(data[:cut])):
                    got.append((member.name, member.read()))
            except tarfile.ReadError as exc:
                assert cut < marker + BLOCK, f"seed {SEED}, {fmt}: a whole archive cut at {cut} raised {exc}"
                assert ("empty file" if cut == 0 else "it is cut") in str(exc), (cut, exc)
                assert got == expected[: len(got)], f"seed {SEED}, {fmt}, cut {cut}"
                continue
            assert cut >= marker + BLOCK, f"seed {SEED}, {fmt}: cut at {cut} (marker at {marker}) did not raise"
            assert got == expected


@pytest.mark.parametrize("compress", ["gz", "bz2", "xz"])
def test_a_cut_or_damaged_compressed_archive_raises(compress):
    data = _archive(tarfile.GNU_FORMAT, compress)
    with pytest.raises(tarfile.ReadError, match="inside its compressed data: it is cut"):
        list(iter_members(io.BytesIO(data[: len(data) // 2])))
    damaged = bytearray(data)
    damaged[len(data) // 2 : len(data) // 2 + 64] = bytes(64)
    with pytest.raises(tarfile.ReadError):
        _lean(io.BytesIO(bytes(damaged)))


@pytest.mark.parametrize(
    "data, match",
    [
        (b"", "empty file"),
        (b"not a tar archive at all" * 50, "invalid header"),
        (bytes(100), "inside a header"),
    ],
)
def test_what_is_no_tar_archive_raises(data, match):
    with pytest.raises(tarfile.ReadError, match=match):
        list(iter_members(io.BytesIO(data)))


def test_a_damaged_header_raises():
    data = bytearray(_archive(tarfile.GNU_FORMAT))
    data[1] ^= 0xFF  # the first name's second byte: the checksum no longer holds
    with pytest.raises(tarfile.ReadError, match="bad checksum"):
        list(iter_members(io.BytesIO(bytes(data))))


def test_shard_samples_equal_webdataset_s(tmp_path):
    made = make_shards(tmp_path, rounds=2, num_shards=2, record_pixels=False)
    for url in made.urls:
        with open(url, "rb") as stream:
            ours = list(_shard_samples(stream, url))
        theirs = list(wds.WebDataset(url, shardshuffle=False, nodesplitter=None, workersplitter=None))
        assert len(ours) == len(theirs) == 3
        for a, b in zip(ours, theirs):
            assert {k: v for k, v in a.items() if not k.startswith("__")} == {
                k: v for k, v in b.items() if not k.startswith("__")
            }
            assert a["__key__"] == b["__key__"] and a["__url__"] == url


# ----------------------------------------------------------------------------------------
# Sizes claimed by headers: checked before anything is allocated


def _claim(data: bytes, member: str, size: int) -> bytes:
    """``data`` with ``member``'s header claiming ``size`` bytes in GNU base-256 (checksum redone)."""
    out = bytearray(data)
    at = out.index(member.encode() + b"\0")
    assert at % BLOCK == 0
    out[at + 124 : at + 136] = b"\x80" + size.to_bytes(11, "big")
    out[at + 148 : at + 156] = b" " * 8
    out[at + 148 : at + 156] = b"%06o\0 " % sum(out[at : at + BLOCK])
    return bytes(out)


def _keys_of(stream, url: str = "x.tar") -> list[str]:
    return [s["__key__"] for s in _shard_samples(stream, url)]


def test_a_header_claiming_a_terabyte_is_a_format_error_not_a_memory_error(tmp_path):
    made = make_shards(tmp_path, rounds=2, num_shards=1, record_pixels=False)
    path = Path(made.urls[0])
    data = _claim(path.read_bytes(), "s00_0001.jpg", 1 << 40)
    at = data.index(b"s00_0001.jpg\0")
    info = tarfile.TarInfo.frombuf(data[at : at + BLOCK], "utf-8", "surrogateescape")  # a valid header
    assert (info.name, info.size) == ("s00_0001.jpg", 1 << 40)
    path.write_bytes(data)
    match = rf"member 's00_0001.jpg' claims {1 << 40} bytes, over the {MAX_MEMBER_BYTES}-byte limit"
    with open(path, "rb") as f, pytest.raises(FormatError, match=match):  # a local file
        _keys_of(f)
    for stream in (_Trickle(data, 4096), io.BytesIO(gzip.compress(data))):  # unknown size; compressed
        with pytest.raises(FormatError, match=match):
            _keys_of(stream)


class _Served:
    """``root`` over HTTP on 127.0.0.1 (Content-Length announced), for a ``with`` block."""

    def __init__(self, root: Path):
        handler = functools.partial(_QuietHandler, directory=str(root))
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)

    def __enter__(self) -> str:
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def test_a_header_claiming_more_than_the_shard_holds_is_a_cut_found_unread(tmp_path, monkeypatch):
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.setenv(name, "127.0.0.1")
    made = make_shards(tmp_path, rounds=2, num_shards=1, record_pixels=False)
    path = Path(made.urls[0])
    claimed = 200 << 20  # under the cap, far over the shard
    path.write_bytes(_claim(path.read_bytes(), "s00_0002.jpg", claimed))
    left = path.stat().st_size - path.read_bytes().index(b"s00_0002.jpg\0") - BLOCK
    match = rf"inside member 's00_0002.jpg', which claims {claimed} bytes where {left} are left: it is cut"
    tracemalloc.start()
    try:
        with open(path, "rb") as f, pytest.raises(ShardCut, match=match) as info:
            _keys_of(f)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20, peak  # nothing of the claimed size was allocated
    assert (info.value.key, info.value.member, info.value.complete) == ("s00_0002", "s00_0002.jpg", 2)
    with open(path, "rb") as f, pytest.raises(tarfile.ReadError, match=match):  # passed over: the same cut
        [m.name for m in iter_members(f)]
    with _Served(tmp_path) as base:  # a remote reader's announced size, through a hashing wrapper too
        for wrap in (lambda s: s, HashingReader):
            stream = open_url(f"{base}/{path.name}")
            assert stream.size == path.stat().st_size
            with stream, pytest.raises(ShardCut, match=match):
                _keys_of(wrap(stream))


def test_a_member_passed_over_in_a_compressed_stream_is_read_in_pieces():
    big = bytes(64 << 20)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in (("a.bin", big), ("b.txt", b"after")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    tracemalloc.start()
    try:
        got = [(m.name, m.read() if m.name == "b.txt" else None) for m in iter_members(io.BytesIO(buf.getvalue()))]
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert got == [("a.bin", None), ("b.txt", b"after")]
    assert peak < 16 << 20, peak  # never the 64 MiB member whole


def test_the_loader_counts_a_shard_with_a_huge_member_header_exactly(tmp_path):
    made = make_shards(tmp_path / "src", rounds=2, num_shards=3, record_pixels=False)
    for url in made.urls:
        data = Path(url).read_bytes()
        if url.endswith("shard-000001.tar"):
            data = _claim(data, "s01_0002.jpg", 1 << 40)  # the third sample's image
        (tmp_path / Path(url).name).write_bytes(data)
    (tmp_path / "manifest.json").write_text(made.manifest.to_json())
    with pytest.raises(DataError, match=r"shard-000001.tar: expected 3 samples \(per the manifest\), got 1: member"):
        list(ReinforcedDataset(str(tmp_path), keys=("__key__",)))
    counter = SkipCounter()
    rows = [k for (k,) in ReinforcedDataset(str(tmp_path), keys=("__key__",), handler=counter)]
    # The sample before the damaged header is never known whole (as at a cut): it is lost too.
    lost = {"s01_0001", "s01_0002"}
    assert rows == [k for k in made.keys if k not in lost]
    assert (counter.count, counter.samples) == (1, len(lost)), counter.last
    assert "claims 1099511627776 bytes" in counter.last


def test_a_claim_over_a_stream_of_unknown_length_allocates_only_what_arrives(tmp_path):
    made = make_shards(tmp_path, rounds=2, num_shards=1, record_pixels=False)
    claimed = 200 << 20  # under the cap, far over the shard; no length to check it against
    data = _claim(Path(made.urls[0]).read_bytes(), "s00_0002.jpg", claimed)
    for stream in (HashingReader(_Trickle(data, 1 << 16)), io.BytesIO(gzip.compress(data))):
        tracemalloc.start()
        try:
            with pytest.raises(ShardCut, match="s00_0002.*cut"):
                _keys_of(stream)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 8 << 20, peak  # read in pieces, never the claimed size at once
