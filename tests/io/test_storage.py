"""URL reading (``storage`` and its resumable ``remote`` streams) and output writing: local, http (a real
server) and s3 (moto), all on 127.0.0.1."""

from __future__ import annotations

import functools
import hashlib
import http.server
import io
import random
import re
import socket
import struct
import sys
import tarfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

import boto3
import pytest
import webdataset as wds

from wds_reinforce.core.errors import UsageError
from wds_reinforce.core.format import Manifest, ShardInfo
from wds_reinforce.io import storage
from wds_reinforce.io.outputs import LocalOutput, S3Output, sha256_file
from wds_reinforce.io.remote import NetworkReadError, ObjectChangedError, ResumableReader, RetryPolicy, s3_client
from wds_reinforce.io.storage import gopen_http, gopen_s3, join_url, open_output, read_url
from wds_reinforce.layouts import manifest_url, read_manifest, shard_urls


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


class _serving:
    """Run a socketserver in a thread for a ``with`` block (short poll: shutdown is quick)."""

    def __init__(self, server):
        self.server = server

    def __enter__(self):
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
        return self.server

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(autouse=True)
def fast_retries(monkeypatch):
    """Tiny backoffs, so that retry tests take milliseconds (the policy is read at each open)."""
    for name, value in {
        "WDS_REINFORCE_RETRIES": "5",
        "WDS_REINFORCE_BACKOFF": "0.001",
        "WDS_REINFORCE_BACKOFF_MAX": "0.004",
        "WDS_REINFORCE_TIMEOUT": "10",
        "NO_PROXY": "127.0.0.1",
        "no_proxy": "127.0.0.1",
    }.items():
        monkeypatch.setenv(name, value)


@pytest.fixture
def served(tmp_path, monkeypatch):
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.setenv(name, "127.0.0.1")
    (tmp_path / "a.bin").write_bytes(b"hello bytes")
    handler = functools.partial(_QuietHandler, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    with _serving(server):
        yield f"http://127.0.0.1:{server.server_address[1]}"


@pytest.fixture
def bucket(s3_env):
    boto3.client("s3", endpoint_url=s3_env).create_bucket(Bucket="store")
    return "store"


def test_read_url_local_file_and_http(tmp_path, served):
    (tmp_path / "a.bin").write_bytes(b"hello bytes")
    assert read_url(str(tmp_path / "a.bin")) == b"hello bytes"
    assert read_url(f"file:{tmp_path / 'a.bin'}") == b"hello bytes"
    assert read_url(f"{served}/a.bin") == b"hello bytes"
    with pytest.raises(FileNotFoundError, match="cannot read .*missing.bin"):
        read_url(str(tmp_path / "missing.bin"))
    with pytest.raises(FileNotFoundError, match="cannot read .*/nope.bin"):
        read_url(f"{served}/nope.bin")


def test_s3_scheme_reads_and_writes_through_one_client(bucket):
    with wds.gopen(f"s3://{bucket}/x/y.bin", "wb") as f:
        f.write(b"payload")
    assert read_url(f"s3://{bucket}/x/y.bin") == b"payload"
    with pytest.raises(FileNotFoundError, match="NoSuchKey"):
        read_url(f"s3://{bucket}/x/none.bin")
    assert s3_client() is s3_client()  # one client per process
    assert S3Output(f"s3://{bucket}/p").client is s3_client()  # the producer's output uses it too
    with pytest.raises(UsageError, match="expected an s3://bucket/key URL"):
        storage.gopen_s3("s3://only-bucket")


def test_manifest_urls():
    assert manifest_url("s3://b/p") == "s3://b/p/manifest.json"
    assert manifest_url("http://h/p/") == "http://h/p/manifest.json"
    assert manifest_url("x/m.json") == "x/m.json"
    assert join_url("", "a.tar") == "a.tar"
    m = Manifest({}, "00" * 8, {}, 3, 1, 1, 0, shards=[ShardInfo("s-0.tar", 1, 1, "", "", "")])
    assert shard_urls("http://h/p/manifest.json", m) == ["http://h/p/s-0.tar"]


def test_read_manifest_errors(tmp_path):
    (tmp_path / "empty.json").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="empty response"):
        read_manifest(str(tmp_path / "empty.json"))


@pytest.mark.parametrize("kind", ["local", "s3"])
def test_output_round_trip(kind, tmp_path, request):
    if kind == "local":
        out = open_output(tmp_path / "out")
        assert isinstance(out, LocalOutput)
    else:
        out = open_output(f"s3://{request.getfixturevalue('bucket')}/run")
        assert isinstance(out, S3Output)
    out.check_writable()
    staged = out.staging() / "f.tar.tmp"
    staged.write_bytes(b"shard bytes")
    sha = sha256_file(staged)
    assert sha == hashlib.sha256(b"shard bytes").hexdigest()
    out.finish_file(staged, "f.tar", sha)
    assert out.verify("f.tar", {"bytes": 11, "sha256": sha})
    assert not out.verify("f.tar", {"bytes": 11, "sha256": "0" * 64})
    assert not out.verify("g.tar", {"bytes": 11, "sha256": sha})
    assert out.read_text("m.json") is None
    out.write_text("sub/m.json", "{}\n")
    assert out.read_text("sub/m.json") == "{}\n"
    out.close()


def test_output_errors(tmp_path, bucket):
    (tmp_path / "file").write_text("x")
    with pytest.raises(UsageError, match="to be a directory, got a file"):
        open_output(tmp_path / "file").check_writable()
    with pytest.raises(UsageError, match="expected a writable output, got 's3://no-such-bucket/x'"):
        open_output("s3://no-such-bucket/x").check_writable()
    with pytest.raises(UsageError, match="expected an output folder or s3://bucket/prefix"):
        open_output("")


def test_the_scheme_table_says_what_can_be_written(tmp_path):
    assert [storage.scheme_of(u) for u in ("a/b.tar", "/a/b", "file:/a", "HTTP://h/x", "s3://b/k", "pipe:cat x")] == [
        "file",
        "file",
        "file",
        "http",
        "s3",
        "pipe",
    ]
    local = open_output(f"file:{tmp_path}")
    assert isinstance(local, LocalOutput) and local.root == tmp_path  # file: names a local folder
    assert open_output(f"file://{tmp_path}").root == tmp_path  # file:///abs
    # a colon in a folder name is no scheme unless the scheme is known or followed by //
    assert [storage.scheme_of(u) for u in ("out:v2", "run:2/x", "gs://b/k", "c:\\data")] == [
        "file",
        "file",
        "gs",
        "file",
    ]
    assert open_output("out:v2").root == Path("out:v2")
    assert open_output(f"file:{tmp_path}/run#1").root == tmp_path / "run#1"  # the path as written


def test_a_folder_with_a_colon_is_written_and_read_back(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = open_output("out:v2")
    out.check_writable()
    out.write_text("manifest.json", "{}")
    assert (tmp_path / "out:v2" / "manifest.json").read_text() == "{}"
    assert read_url("out:v2/manifest.json") == b"{}"
    with pytest.raises(UsageError, match=r"s3:// or another fsspec store, got 'http://h/out' \(http:// cannot be"):
        open_output("http://h/out")
    with pytest.raises(UsageError, match="pipe:// cannot be written"):
        open_output("pipe:cat > x")


# ----------------------------------------------------------------------------------------
# Retry policy


def test_retry_policy_defaults_env_and_backoff(monkeypatch):
    for name in ("RETRIES", "BACKOFF", "BACKOFF_MAX", "TIMEOUT"):
        monkeypatch.delenv(f"WDS_REINFORCE_{name}")
    assert RetryPolicy.from_env() == RetryPolicy(
        retries=5, backoff=0.5, backoff_max=8.0, timeout=30.0, speed_limit=1000.0, speed_time=30.0, stall_limit=90.0
    )
    monkeypatch.setenv("WDS_REINFORCE_RETRIES", "2")
    monkeypatch.setenv("WDS_REINFORCE_BACKOFF", "0.25")
    assert RetryPolicy.from_env().retries == 2 and RetryPolicy.from_env().backoff == 0.25
    policy = RetryPolicy(backoff=0.5, backoff_max=8.0)
    for failure, base in [(1, 0.5), (2, 1.0), (3, 2.0), (4, 4.0), (5, 8.0), (6, 8.0), (200, 8.0)]:
        assert base / 2 <= policy.delay(failure) <= base  # doubling, capped, jittered to 50-100 %
    monkeypatch.setenv("WDS_REINFORCE_RETRIES", "many")
    with pytest.raises(UsageError, match="expected WDS_REINFORCE_RETRIES to be an integer >= 0, got 'many'"):
        RetryPolicy.from_env()
    monkeypatch.setenv("WDS_REINFORCE_RETRIES", "1")
    monkeypatch.setenv("WDS_REINFORCE_BACKOFF", "-1")
    with pytest.raises(UsageError, match="expected WDS_REINFORCE_BACKOFF to be a number >= 0.0, got '-1'"):
        RetryPolicy.from_env()


# ----------------------------------------------------------------------------------------
# HTTP faults, from a real server on 127.0.0.1


@dataclass
class Faults:
    """What the faulty server does to the next requests (each count is used up one request at a time)."""

    statuses: int = 0  # answer `status` to this many requests
    status: int = 503
    resets: int = 0  # send the object up to byte `at`, then reset the connection (RST)
    shorts: int = 0  # send the object up to byte `at` under the full Content-Length, then close cleanly
    at: int = 0
    ignore_range: bool = False  # answer 200 and the whole object to a ranged request
    requests: list = field(default_factory=list)  # the Range header of each request (None: no Range)


class _FaultyHandler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        srv, rng = self.server, self.headers.get("Range")
        f = srv.faults
        with srv.lock:
            f.requests.append(rng)
            fault = next((kind for kind in ("statuses", "resets", "shorts") if getattr(f, kind)), None)
            if fault:
                setattr(f, fault, getattr(f, fault) - 1)
        data = srv.files.get(self.path)
        if data is None or fault == "statuses":
            self.send_error(404 if data is None else f.status)
            return
        start = 0
        asked = re.fullmatch(r"bytes=(\d+)-", rng or "")
        if asked and not f.ignore_range:
            start = int(asked.group(1))
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(data) - start))
        self.send_header("ETag", srv.etags[self.path])
        self.end_headers()
        if fault is None:
            self.wfile.write(data[start:])
            return
        self.wfile.write(data[start : max(start, f.at)])
        self.close_connection = True
        if fault == "resets":  # an abortive close: the client sees ECONNRESET
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.rfile.close()
            self.connection.close()


@pytest.fixture
def faulty():
    """A server of in-memory files with Range support and a fault plan (``server.faults``)."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _FaultyHandler)
    server.daemon_threads = True
    server.lock, server.faults, server.files, server.etags = threading.Lock(), Faults(), {}, {}
    server.base = f"http://127.0.0.1:{server.server_address[1]}"

    def put(name: str, data: bytes, etag: str = '"v1"') -> str:
        server.files["/" + name], server.etags["/" + name] = data, etag
        return f"{server.base}/{name}"

    server.put = put
    with _serving(server):
        yield server


def _payload(n: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(n)


def _resumed_at(requests: list) -> list[int]:
    """The offset each request asked for (0: no Range); a reset may lose bytes in flight, so the
    resumed offsets after a reset at byte ``at`` are anywhere in [0, at], never decreasing."""
    offsets = [0 if r is None else int(re.fullmatch(r"bytes=(\d+)-", r).group(1)) for r in requests]
    assert offsets == sorted(offsets), requests
    return offsets


def _read_in_pieces(stream, piece: int = 10240) -> bytes:  # as tarfile reads
    out = bytearray()
    while chunk := stream.read(piece):
        out += chunk
    return bytes(out)


@pytest.mark.parametrize("resets", [1, 3])
def test_http_resumes_after_connection_resets(faulty, resets):
    data = _payload(200_000)
    url = faulty.put("a.bin", data)
    faulty.faults = Faults(resets=resets, at=20_000)
    with gopen_http(url) as stream:
        assert isinstance(stream, ResumableReader)
        assert _read_in_pieces(stream) == data
        assert stream.faults == resets and stream.offset == stream.size == len(data)
    offsets = _resumed_at(faulty.faults.requests)
    assert len(offsets) == resets + 1 and offsets[-1] <= 20_000


def test_http_retries_5xx_then_reads_everything(faulty):
    data = _payload(50_000)
    url = faulty.put("a.bin", data)
    faulty.faults = Faults(statuses=2, status=503)
    assert read_url(url) == data  # read_url goes through the same reader
    assert faulty.faults.requests == [None, None, None]


def test_http_body_shorter_than_content_length_is_resumed(faulty):
    data = _payload(100_000)
    url = faulty.put("a.bin", data)
    faulty.faults = Faults(shorts=1, at=30_000)
    assert wds.gopen(url).read() == data  # registered in webdataset's gopen table
    assert faulty.faults.requests == [None, "bytes=30000-"]


def test_the_retry_log_line_says_the_offset_once(faulty, caplog):
    url = faulty.put("a.bin", _payload(100_000))
    faulty.faults = Faults(shorts=1, at=30_000)
    with caplog.at_level("WARNING", logger="wds_reinforce.io.remote"):
        assert len(read_url(url)) == 100_000
    (line,) = [r.getMessage() for r in caplog.records]
    assert line.startswith(f"{url} at byte 30000 of 100000: the response ended before its announced size")
    assert line.count("at byte") == 1 and line.count("30000") == 1 and "; retry 1 of 5 in " in line


@pytest.mark.parametrize("resets", [1, 2])
def test_http_server_that_ignores_range_never_duplicates_bytes(faulty, resets):
    data = _payload(100_000)
    url = faulty.put("a.bin", data)
    faulty.faults = Faults(resets=resets, at=20_000, ignore_range=True)
    with gopen_http(url) as stream:
        buf = bytearray(7000)
        out = bytearray()
        while n := stream.readinto(buf):
            out += buf[:n]
    assert bytes(out) == data  # the resent prefix was skipped, not returned twice
    offsets = _resumed_at(faulty.faults.requests)
    assert len(offsets) == resets + 1 and offsets[-1] <= 20_000


def test_http_faults_beyond_the_budget_name_url_offset_attempts_and_cause(faulty, monkeypatch):
    monkeypatch.setenv("WDS_REINFORCE_RETRIES", "2")
    data = _payload(100_000)
    url = faulty.put("a.bin", data)
    faulty.faults = Faults(statuses=10, status=503)
    with pytest.raises(NetworkReadError, match=rf"cannot read {url} at byte 0 after 3 attempts: HTTP 503"):
        gopen_http(url)
    assert len(faulty.faults.requests) == 3
    faulty.faults = Faults(resets=10, at=0)  # every response reset right after its headers
    with pytest.raises(NetworkReadError, match=rf"{url} at byte 0( of 100000)? after 3 attempts: .*(?i:reset)") as info:
        gopen_http(url).read()
    assert isinstance(info.value, OSError) and info.value.offset == 0 and info.value.attempts == 3
    assert faulty.faults.requests == [None, None, None]
    faulty.faults = Faults(shorts=10, at=5_000)  # read_url: the network error, not "missing"
    with pytest.raises(NetworkReadError, match=rf"{url} at byte 5000 of 100000 after 3 .*ended before its announced"):
        read_url(url)


def test_http_missing_or_forbidden_is_not_retried(faulty):
    url = faulty.put("a.bin", b"x")
    with pytest.raises(FileNotFoundError, match=rf"{faulty.base}/nope.bin: HTTP 404"):
        gopen_http(f"{faulty.base}/nope.bin")
    with pytest.raises(FileNotFoundError, match=rf"cannot read {faulty.base}/nope.bin"):
        read_url(f"{faulty.base}/nope.bin")
    faulty.faults = Faults(statuses=5, status=403)
    with pytest.raises(OSError, match=rf"{url}: HTTP 403") as info:
        gopen_http(url)
    assert not isinstance(info.value, NetworkReadError)
    assert faulty.faults.requests == [None]


def test_http_object_replaced_mid_read_is_an_error(faulty):
    url = faulty.put("a.bin", _payload(100_000))
    faulty.faults = Faults(resets=1, at=20_000)
    stream = gopen_http(url)
    assert len(stream.read(1000)) == 1000
    faulty.put("a.bin", _payload(100_000, seed=1), etag='"v2"')
    with pytest.raises(ObjectChangedError, match=rf'{url} changed while being read \(was "v1", now "v2"'):
        stream.read()
    stream.close()
    with pytest.raises(ValueError, match="closed"):
        stream.read(1)


def _tar_shard(samples: int = 8) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for i in range(samples):
            for ext, payload in (("bin", _payload(9000 + 1000 * i, seed=i)), ("cls", str(i).encode())):
                info = tarfile.TarInfo(f"s{i:03d}.{ext}")
                info.size, info.mtime = len(payload), 0
                tar.addfile(info, io.BytesIO(payload))
    return buf.getvalue()


def test_webdataset_over_http_yields_the_same_samples_despite_a_reset(faulty):
    url = faulty.put("shard-000000.tar", _tar_shard())
    clean = list(wds.WebDataset(url, shardshuffle=False))
    assert len(clean) == 8 and faulty.faults.requests == [None]
    faulty.faults = Faults(resets=1, at=50_000)  # mid-shard, inside a member
    assert list(wds.WebDataset(url, shardshuffle=False)) == clean
    offsets = _resumed_at(faulty.faults.requests)
    assert len(offsets) == 2 and 0 < offsets[1] <= 50_000


def test_url_schemes_keep_a_users_own_mapping():
    schemes = sys.modules["webdataset.gopen"].gopen_schemes  # (webdataset.gopen the attribute is the function)
    assert schemes["http"] is gopen_http and schemes["https"] is gopen_http and schemes["s3"] is gopen_s3
    mine = lambda url, mode="rb", bufsize=8192, **kw: None
    saved = dict(schemes)
    try:
        schemes["s3"] = schemes["http"] = mine
        storage.register_url_schemes()
        assert schemes["s3"] is mine and schemes["http"] is mine
        storage.register_url_schemes(force=True)
        assert schemes["s3"] is gopen_s3 and schemes["http"] is gopen_http
    finally:
        schemes.clear()
        schemes.update(saved)


# ----------------------------------------------------------------------------------------
# S3 faults: a TCP proxy on 127.0.0.1 in front of the moto server breaks real responses


_SLOW_DOWN = (
    b"<?xml version='1.0' encoding='UTF-8'?>\n<Error><Code>SlowDown</Code>"
    b"<Message>Please reduce your request rate.</Message><RequestId>proxy</RequestId></Error>"
)


class _BreakingProxy:
    """Forwards S3 requests to moto; can answer a GET with 503 SlowDown itself (``throttles``), or
    reset the connection after ``cut`` bytes of its response (``resets``). Records each GET's headers."""

    def __init__(self, upstream: str):
        host, port = upstream.removeprefix("http://").split(":")
        self.upstream = (host, int(port))
        self.throttles = self.resets = 0
        self.cut = 64 << 10
        self.gets: list[dict[str, str]] = []
        self.lock = threading.Lock()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.upstream)
            self.sockets += [client, upstream]
            state = {"cut": None}
            threading.Thread(target=self._requests, args=(client, upstream, state), daemon=True).start()
            threading.Thread(target=self._responses, args=(upstream, client, state), daemon=True).start()

    def _requests(self, client, upstream, state):
        pending = b""
        while True:
            try:
                data = client.recv(65536)
            except OSError:
                data = b""
            if not data:
                _shut(upstream)
                return
            pending += data
            while b"\r\n\r\n" in pending:  # the reader sends bodiless GETs only
                head, pending = pending.split(b"\r\n\r\n", 1)
                lines = head.decode("latin-1").split("\r\n")
                assert lines[0].startswith("GET "), lines[0]
                headers = dict(line.split(": ", 1) for line in lines[1:])
                with self.lock:
                    self.gets.append({k.lower(): v for k, v in headers.items()})
                    throttle, reset = self.throttles > 0, self.throttles == 0 and self.resets > 0
                    self.throttles -= throttle
                    self.resets -= reset
                if throttle:
                    client.sendall(
                        b"HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\nConnection: close\r\n"
                        + f"Content-Length: {len(_SLOW_DOWN)}\r\n\r\n".encode()
                        + _SLOW_DOWN
                    )
                    _shut(client)
                    _shut(upstream)
                    return
                state["cut"] = self.cut if reset else None
                upstream.sendall(head + b"\r\n\r\n")

    def _responses(self, upstream, client, state):
        while True:
            try:
                data = upstream.recv(65536)
            except OSError:
                data = b""
            if not data:
                _shut(client)
                return
            cut = state["cut"]
            if cut is not None and len(data) >= cut:
                client.sendall(data[:cut])
                client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                _shut(client, socket.SHUT_RD)  # wakes the other pump; the close then sends RST
                client.close()
                _shut(upstream)
                return
            if cut is not None:
                state["cut"] = cut - len(data)
            try:
                client.sendall(data)
            except OSError:
                return

    def close(self):
        self.listener.close()
        for sock in self.sockets:
            _shut(sock)
            sock.close()


def _shut(sock: socket.socket, how: int = socket.SHUT_RDWR) -> None:
    try:
        sock.shutdown(how)
    except OSError:
        pass


@pytest.fixture
def proxied(bucket, s3_env, monkeypatch):
    """(proxy, url of a 256 KiB object): s3_client() talks to moto through the proxy, with botocore's
    own retries off so that the reader's are the ones under test."""
    data = _payload(256 << 10, seed=3)
    boto3.client("s3", endpoint_url=s3_env).put_object(Bucket=bucket, Key="obj.bin", Body=data)
    proxy = _BreakingProxy(s3_env)
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    yield proxy, f"s3://{bucket}/obj.bin", data
    proxy.close()


def test_s3_resumes_after_mid_stream_resets_with_ranged_gets(proxied):
    proxy, url, data = proxied
    proxy.resets = 2
    with gopen_s3(url) as stream:
        assert _read_in_pieces(stream) == data
        assert stream.faults == 2
    ranges = [get.get("range") for get in proxy.gets]
    offsets = _resumed_at(ranges)
    assert len(offsets) == 3 and ranges[0] is None and offsets[1] > 0  # each re-GET is ranged, from where it stopped
    assert "if-match" not in proxy.gets[0] and proxy.gets[1]["if-match"] == proxy.gets[2]["if-match"] != ""


def test_s3_throttling_is_retried_and_then_named(proxied, monkeypatch):
    proxy, url, data = proxied
    proxy.throttles = 2
    assert read_url(url) == data
    assert [get.get("range") for get in proxy.gets] == [None, None, None]
    monkeypatch.setenv("WDS_REINFORCE_RETRIES", "1")
    proxy.throttles = 5
    with pytest.raises(NetworkReadError, match=rf"cannot read {url} at byte 0 after 2 attempts: SlowDown \(HTTP 503\)"):
        gopen_s3(url)
    assert len(proxy.gets) == 5
    proxy.throttles, proxy.gets = 0, []
    with pytest.raises(FileNotFoundError, match=r"s3://store/none.bin: NoSuchKey"):
        gopen_s3("s3://store/none.bin")
    assert len(proxy.gets) == 1  # missing is final: no retries


def test_s3_object_replaced_mid_read_is_an_error(proxied, s3_env):
    proxy, url, data = proxied
    proxy.resets = 1
    stream = gopen_s3(url)
    assert stream.read(1000) == data[:1000]
    boto3.client("s3", endpoint_url=s3_env).put_object(Bucket="store", Key="obj.bin", Body=data[::-1])
    with pytest.raises(ObjectChangedError, match=rf"{url} changed while being read \(no longer ETag .* at byte \d+\)"):
        stream.read()  # the re-GET carried If-Match: moto answered 412 PreconditionFailed
    stream.close()


def test_network_read_error_survives_pickling():
    import pickle

    err = pickle.loads(pickle.dumps(NetworkReadError("cannot read u at byte 3 after 2 attempts: x", "u", 3, 2, "x")))
    assert isinstance(err, OSError) and str(err).startswith("cannot read u") and (err.offset, err.attempts) == (3, 2)
