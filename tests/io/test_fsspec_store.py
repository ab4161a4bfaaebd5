"""Any fsspec store: read through the resuming reader (retries, pinned versions, a bound on blocked
calls) and written as a job's output. Local stores only: fsspec's ``memory://`` and ``testfs://``,
a local folder under a protocol of its own, with faults planned by the test."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import random
import threading
import time

import fsspec
import pytest
import webdataset as wds
from fsspec.implementations.local import LocalFileSystem

from wds_reinforce.core.errors import UsageError
from wds_reinforce.io import storage
from wds_reinforce.io.fsspec_store import FsspecOutput, gopen_fsspec, object_version
from wds_reinforce.io.remote import NetworkReadError, ObjectChangedError, ResumableReader
from wds_reinforce.io.storage import open_output, open_url, read_url


class StoreFS(LocalFileSystem):
    """A local folder as an fsspec store of its own protocol (``testfs:///abs/path``)."""

    protocol = "testfs"
    plan: list = []  # faults for the next reads: ("reset", at byte), ("block", Event), ("deny", None)
    opened: list = []  # the offset of each open (after its seek)

    def info(self, path, **kwargs):
        if self.plan and self.plan[0][0] == "deny":
            raise PermissionError(13, "denied by the test")
        return super().info(path, **kwargs)

    def _open(self, path, mode="rb", **kwargs):
        f = super()._open(path, mode, **kwargs)
        return _Faulty(f, self.plan.pop(0)) if "r" in mode and self.plan else f


class _Faulty:
    """A file that fails as planned: a connection reset at a byte, or a read that blocks until an Event."""

    def __init__(self, f, fault):
        self.f, (self.kind, self.arg) = f, fault
        StoreFS.opened.append(0)

    def seek(self, offset, whence=0):
        StoreFS.opened[-1] = offset
        return self.f.seek(offset, whence)

    def read(self, n=-1):
        if self.kind == "block":
            self.arg.wait()
            raise ConnectionAbortedError("released by the test")
        at = self.f.tell()
        if at + n > self.arg:
            data = self.f.read(self.arg - at)
            if data:
                return data
            raise ConnectionResetError(104, "reset by the test")
        return self.f.read(n)

    def close(self):
        self.f.close()


@pytest.fixture(autouse=True)
def stores(monkeypatch):
    fsspec.register_implementation("testfs", StoreFS, clobber=True)
    StoreFS.plan, StoreFS.opened = [], []
    monkeypatch.setenv("WDS_REINFORCE_BACKOFF", "0.001")
    monkeypatch.setenv("WDS_REINFORCE_BACKOFF_MAX", "0.002")
    yield
    fsspec.filesystem("memory").store.clear()


def _payload(n: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(n)


def test_any_fsspec_store_reads_through_the_resumable_reader(tmp_path):
    data = _payload(3_000_000)
    fsspec.filesystem("memory").pipe_file("/bucket/a.bin", data)
    (tmp_path / "a.bin").write_bytes(data)
    for url in ("memory://bucket/a.bin", f"testfs://{tmp_path}/a.bin", f"simplecache::testfs://{tmp_path}/a.bin"):
        with open_url(url) as stream:
            assert isinstance(stream, ResumableReader), url
            assert stream.read() == data and stream.size == len(data)
        assert wds.gopen(url).read() == data  # in webdataset's table too
    assert storage.scheme_of("simplecache::gs://b/k") == "simplecache" and storage.scheme_of("cache::x") == "file"


def test_webdataset_gs_and_hf_handlers_and_its_default_are_replaced():
    table = storage._gopen_schemes
    assert table["gs"] is table["hf"] is table["__default__"] is gopen_fsspec
    assert table["pipe"].__name__ == "gopen_pipe" and table["s3"] is storage.gopen_s3


def test_pipe_urls_still_read(tmp_path):
    (tmp_path / "a.bin").write_bytes(b"piped bytes")
    assert read_url(f"pipe:cat {tmp_path / 'a.bin'}") == b"piped bytes"


@pytest.mark.parametrize("scheme, module, extra", [("gs", "gcsfs", "gcs"), ("az", "adlfs", "azure")])
def test_a_missing_backend_names_the_extra_to_install(scheme, module, extra):
    if importlib.util.find_spec(module):
        pytest.skip(f"{module} is installed")
    for call in (read_url, open_output):
        with pytest.raises(UsageError, match=rf"pip install 'wds_reinforce\[{extra}\]'"):
            call(f"{scheme}://bucket/key")


def test_a_missing_object_an_unknown_scheme_and_a_final_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="memory://bucket/none.bin: not found"):
        read_url("memory://bucket/none.bin")
    with pytest.raises(UsageError, match="expected a URL scheme that webdataset or fsspec knows, got 'nosuch://b/k'"):
        read_url("nosuch://b/k")
    (tmp_path / "a.bin").write_bytes(b"x")
    StoreFS.plan = [("deny", None)] * 10
    with pytest.raises(OSError, match="PermissionError: .*denied by the test"):
        gopen_fsspec(f"testfs://{tmp_path}/a.bin")
    assert len(StoreFS.plan) == 10, "a permission error is not retried"


def test_a_reset_is_resumed_where_it_stopped(tmp_path):
    data = _payload(2_500_000, seed=1)
    (tmp_path / "a.bin").write_bytes(data)
    StoreFS.plan = [("reset", 1_200_000), ("reset", 2_000_000), ("reset", 10**9)]
    with open_url(f"testfs://{tmp_path}/a.bin") as stream:
        assert stream.read() == data and stream.faults == 2
    assert StoreFS.opened == [0, 1_200_000, 2_000_000]


def test_an_object_changed_before_a_resume_is_refused(tmp_path):
    path = tmp_path / "a.bin"
    path.write_bytes(_payload(2_000_000))
    StoreFS.plan = [("reset", 1_500_000)]
    with open_url(f"testfs://{tmp_path}/a.bin") as stream:
        assert len(stream.read(1_000_000)) == 1_000_000
        path.write_bytes(_payload(2_000_000, seed=2))  # a new version, before the reset
        os.utime(path, ns=(1, 1))
        with pytest.raises(ObjectChangedError, match="changed while being read .*at byte 1500000"):
            stream.read()


def test_an_object_changed_during_one_response_is_refused_at_its_end(tmp_path):
    path = tmp_path / "a.bin"
    path.write_bytes(_payload(3_000_000))
    with open_url(f"testfs://{tmp_path}/a.bin") as stream:
        head = stream.read(1_000_000)
        with open(path, "r+b") as f:  # overwritten in place: the open file now reads other bytes
            f.seek(2_000_000)
            f.write(b"\0" * 1_000_000)
        os.utime(path, ns=(1, 1))
        with pytest.raises(ObjectChangedError, match="changed while being read"):
            stream.read()
        assert stream.offset < 3_000_000, "the spliced end was not returned"
    assert len(head) == 1_000_000


def test_a_blocked_backend_call_is_ended_at_the_reads_bound(tmp_path, monkeypatch):
    (tmp_path / "a.bin").write_bytes(_payload(100_000))
    monkeypatch.setenv("WDS_REINFORCE_STALL_LIMIT", "0.3")
    release = threading.Event()
    StoreFS.plan = [("block", release)]  # a read that never answers, as a dead store's
    try:
        with pytest.raises(NetworkReadError, match=r"no answer from the store in 0.3 s \(WDS_REINFORCE_STALL_LIMIT\)"):
            read_url(f"testfs://{tmp_path}/a.bin")
    finally:
        release.set()


def _helpers() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name == "wds_reinforce-fsspec"}


def test_failed_opens_and_closed_readers_leave_no_helper_thread(tmp_path):
    before, count = _helpers(), threading.active_count()
    for _ in range(10):
        with pytest.raises(FileNotFoundError):
            open_url("memory://bucket/none.bin")
    (tmp_path / "a.bin").write_bytes(_payload(2_000_000))
    StoreFS.plan = [("deny", None)]
    with pytest.raises(OSError, match="denied by the test"):
        open_url(f"testfs://{tmp_path}/a.bin")
    StoreFS.plan = [("reset", 1_500_000)]
    with open_url(f"testfs://{tmp_path}/a.bin") as stream:  # the resume finds a new version: an empty body
        stream.read(1_000_000)
        os.utime(tmp_path / "a.bin", ns=(1, 1))
        with pytest.raises(ObjectChangedError):
            stream.read()
    deadline = time.monotonic() + 10
    for thread in _helpers() - before:  # each was told to end: they end without any waiting of ours
        thread.join(max(deadline - time.monotonic(), 0))
    assert not _helpers() - before and threading.active_count() <= count


def test_object_versions_prefer_identities_to_times():
    assert object_version({"size": 3, "generation": 7, "updated": "t", "mtime": 1.5}) == "generation=7"
    assert object_version({"size": 3, "mtime": 1.5, "ino": 9, "created": 2.0}) == "mtime=1.5 ino=9"
    assert object_version({"size": 3, "created": 2.0}) == "created=2.0"
    assert object_version({"size": 3}) is None


@pytest.mark.parametrize("kind", ["memory", "testfs"])
def test_fsspec_output_round_trip(kind, tmp_path):
    url = "memory://bucket/run" if kind == "memory" else f"testfs://{tmp_path}/store/run"
    out = open_output(url)
    assert isinstance(out, FsspecOutput)
    out.check_writable()
    staged = out.staging() / "f.tar.tmp"
    staged.write_bytes(b"shard bytes")
    sha = hashlib.sha256(b"shard bytes").hexdigest()
    out.finish_file(staged, "g/f.tar", sha)
    assert not staged.exists()
    assert read_url(f"{url}/g/f.tar") == b"shard bytes"
    assert out.verify("g/f.tar", {"bytes": 11, "sha256": sha})
    assert not out.verify("g/f.tar", {"bytes": 11, "sha256": "0" * 64})
    assert not out.verify("g/f.tar", {"bytes": 12, "sha256": sha})
    assert not out.verify("h.tar", {"bytes": 11, "sha256": sha})
    assert out.read_text("m.json") is None
    out.write_text("sub/m.json", "{}\n")
    assert out.read_text("sub/m.json") == "{}\n"
    out.close()
    if kind == "testfs":  # not an object store: written under a temporary name, then moved
        left = sorted(p.relative_to(tmp_path / "store").as_posix() for p in (tmp_path / "store").rglob("*"))
        assert left == ["run", "run/g", "run/g/f.tar", "run/sub", "run/sub/m.json"]


def test_webdataset_writers_write_to_fsspec_stores():
    with wds.gopen("memory://bucket/w.bin", "wb") as f:
        f.write(b"written by a webdataset writer")
    assert read_url("memory://bucket/w.bin") == b"written by a webdataset writer"


def test_an_output_that_cannot_be_written_is_refused_before_any_work(tmp_path):
    (tmp_path / "ro").mkdir()
    (tmp_path / "ro" / "file").write_text("x")
    with pytest.raises(UsageError, match="expected a writable output, got 'testfs://"):
        open_output(f"testfs://{tmp_path}/ro/file/run").check_writable()
