"""No network read waits forever: the low-speed limit and the bound per read (``io.retry`` through
``io.remote``), against real servers on 127.0.0.1 that go silent or trickle, over HTTP and S3."""

from __future__ import annotations

import http.server
import os
import random
import re
import socket
import threading
import time
from pathlib import Path

import pytest

from tests.shardmaker import make_shards
from tests.token_server import send_ranged_headers
from wds_reinforce.core.errors import UsageError
from wds_reinforce.io import storage
from wds_reinforce.io.remote import NetworkReadError, s3_client
from wds_reinforce.io.retry import Pace, RetryPolicy
from wds_reinforce.io.storage import gopen_http, gopen_s3, read_url
from wds_reinforce.read.dataset import ReinforcedDataset
from wds_reinforce.read.options import SkipCounter

SPEED_LIMIT, SPEED_TIME, STALL_LIMIT, TIMEOUT = 1000, 0.3, 1.5, 0.5
BOUND = STALL_LIMIT + TIMEOUT  # the most the reader promises (about STALL_LIMIT); tests allow 2 s more when busy
TRICKLE = 0.02  # seconds between two bytes of a trickle: 50 bytes/s, far under the limit
HEADER_PACE, HANG = 0.2, 8.0  # a header byte (or a 100 Continue) every 0.2 s, well inside TIMEOUT, for 8 s at most


@pytest.fixture(autouse=True)
def small_limits(monkeypatch):
    """Small limits, so that giving up takes a second or two; retries enough that only the bound ends a read."""
    for name, value in {
        "WDS_REINFORCE_RETRIES": "50",
        "WDS_REINFORCE_BACKOFF": "0.001",
        "WDS_REINFORCE_BACKOFF_MAX": "0.004",
        "WDS_REINFORCE_TIMEOUT": str(TIMEOUT),
        "WDS_REINFORCE_SPEED_LIMIT": str(SPEED_LIMIT),
        "WDS_REINFORCE_SPEED_TIME": str(SPEED_TIME),
        "WDS_REINFORCE_STALL_LIMIT": str(STALL_LIMIT),
        "NO_PROXY": "127.0.0.1",
        "no_proxy": "127.0.0.1",
    }.items():
        monkeypatch.setenv(name, value)


class _StallingHandler(http.server.BaseHTTPRequestHandler):
    """Serves ``server.files`` (with Range), each path as ``server.modes`` says:

    - ``ok``: at once; ``dead``: accepts and never answers (until teardown);
    - ``trickle``: the headers, then one byte every ``TRICKLE`` seconds;
    - ``slow``: ``piece`` bytes every ``TRICKLE`` seconds (fast enough), the connection cut after ``cut`` bytes;
    - ``cut-dead`` / ``cut-trickle``: the first response sends ``cut`` bytes at once, then goes silent (and
      every later request is ``dead``) or trickles (and every later request is ``trickle``);
    - ``continue`` / ``headers``: never finishes its headers: a ``100 Continue`` (which http.client skips
      and reads on) or one more byte of a header line every ``HEADER_PACE`` seconds, for ``HANG`` seconds
      (so that a reader without a watchdog fails its test rather than hangs it), then closes.
    """

    def log_message(self, *args):
        pass

    def do_GET(self):
        srv = self.server
        path = self.path.split("?")[0]
        with srv.lock:
            srv.requests.append((path, self.headers.get("Range")))
            first = path not in srv.seen
            srv.seen.add(path)
        mode = srv.modes.get(path, "ok")
        if mode.startswith("cut-"):
            mode = "cut" if first else mode.removeprefix("cut-")
        if mode == "dead":
            srv.release.wait()
            return
        if mode in ("continue", "headers"):
            self._hang(mode)
            return
        data = srv.files.get(path)
        if data is None:
            self.send_error(404)
            return
        start = send_ranged_headers(self, len(data), '"v1"')
        self._send(data[start:], mode)

    def _hang(self, mode: str) -> None:
        first, again = (
            (b"", b"HTTP/1.1 100 Continue\r\n\r\n") if mode == "continue" else (b"HTTP/1.1 200 OK\r\nX-", b"a")
        )
        try:
            self.wfile.write(first)
            for _ in range(int(HANG / HEADER_PACE)):
                self.wfile.write(again)
                self.wfile.flush()
                if self.server.release.wait(HEADER_PACE):  # a pace, not a synchronisation: teardown ends it
                    break
        except OSError:  # the reader gave up on this response and closed it
            pass
        self.close_connection = True

    def _send(self, body: bytes, mode: str) -> None:
        srv = self.server
        try:
            if mode == "ok":
                self.wfile.write(body)
            elif mode == "cut":
                self.wfile.write(body[: srv.cut])
                self.wfile.flush()
                srv.release.wait()
            else:
                piece, end = (1, len(body)) if mode == "trickle" else (srv.piece, min(len(body), srv.cut))
                for at in range(0, end, piece):
                    self.wfile.write(body[at : at + piece])
                    self.wfile.flush()
                    if srv.release.wait(TRICKLE):  # a pace, not a synchronisation: teardown ends it
                        break
        except OSError:  # the reader gave up on this response and closed it
            pass
        self.close_connection = True


@pytest.fixture
def stalling():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _StallingHandler)
    server.daemon_threads = True
    server.lock, server.release, server.requests, server.seen = threading.Lock(), threading.Event(), [], set()
    server.files, server.modes, server.cut, server.piece = {}, {}, 1 << 40, 100
    server.base = f"http://127.0.0.1:{server.server_address[1]}"

    def put(name: str, data: bytes, mode: str = "ok") -> str:
        server.files["/" + name], server.modes["/" + name] = data, mode
        return f"{server.base}/{name}"

    server.put = put
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.release.set()  # the blocked handlers return
        server.shutdown()
        server.server_close()
        thread.join()


def _payload(n: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(n)


def _read_all(url: str, how: str) -> bytes:
    if how == "read_url":  # a manifest read
        return read_url(url)
    if how == "s3":
        return gopen_s3(url).read()
    return gopen_http(url).read()


def _gives_up_within_the_bound(url: str, how: str) -> NetworkReadError:
    began = time.monotonic()
    with pytest.raises(
        NetworkReadError, match=rf"cannot read {re.escape(url)} at byte \d+.* without good progress"
    ) as info:
        _read_all(url, how)
    elapsed = time.monotonic() - began
    assert STALL_LIMIT * 0.9 <= elapsed < BOUND + 2.0, elapsed  # the bound, not the retries, ended it
    return info.value


@pytest.mark.parametrize("how", ["gopen_http", "read_url"])
def test_a_server_that_never_answers_is_given_up_on_within_the_bound(stalling, how):
    url = stalling.put("manifest.json", b"{}", mode="dead")
    error = _gives_up_within_the_bound(url, how)
    assert error.offset == 0 and ("timed out" in error.cause or "watchdog" in error.cause)  # the bound ends the last
    assert len(stalling.requests) >= 2  # a silence of TIMEOUT is a fault: retried until the bound


@pytest.mark.parametrize("how", ["gopen_http", "read_url"])
@pytest.mark.parametrize("mode", ["continue", "headers"])
def test_a_server_that_never_finishes_its_headers_is_given_up_on_within_the_bound(stalling, mode, how):
    url = stalling.put("a.bin", _payload(1000), mode=mode)
    error = _gives_up_within_the_bound(url, how)  # each byte came well inside TIMEOUT: only the watchdog ends it
    assert error.offset == 0 and error.cause.startswith("the watchdog ended a blocked call"), error.cause


def test_a_host_with_many_addresses_costs_one_bound_not_one_timeout_each(stalling, monkeypatch):
    listener = socket.create_server(("127.0.0.1", 0), backlog=0)
    filler = socket.create_connection(listener.getsockname())  # the accept queue is full: a connect now hangs
    real = socket.getaddrinfo
    monkeypatch.setattr(socket, "getaddrinfo", lambda host, port, *args: real("127.0.0.1", port, *args) * 10)
    monkeypatch.setenv("no_proxy", "*")
    try:  # ten addresses x TIMEOUT would be 5 s per attempt
        error = _gives_up_within_the_bound(f"http://many.invalid:{listener.getsockname()[1]}/a.bin", "gopen_http")
    finally:
        filler.close()
        listener.close()
    assert error.offset == 0 and "timed out" in error.cause


@pytest.mark.parametrize("how", ["gopen_http", "read_url"])
def test_a_trickling_server_is_abandoned_per_response_and_given_up_on_within_the_bound(stalling, how):
    data = _payload(1000)
    url = stalling.put("a.bin", data, mode="trickle")
    error = _gives_up_within_the_bound(url, how)
    assert 0 < error.offset < len(data)
    # each response was abandoned as too slow after SPEED_TIME and the read resumed where it stopped
    offsets = [0 if r is None else int(r.removeprefix("bytes=").rstrip("-")) for _, r in stalling.requests]
    assert len(offsets) >= 3 and offsets == sorted(offsets) and offsets[-1] > 0, offsets


def test_slow_but_fast_enough_reads_whole_past_the_bound_despite_cuts(stalling):
    data = _payload(15_000)
    stalling.piece, stalling.cut = 100, 4000  # 5000 bytes/s (5x the limit); every response cut after 4000 bytes
    url = stalling.put("a.bin", data, mode="slow")
    began = time.monotonic()
    with gopen_http(url) as stream:
        assert stream.read() == data  # whole and in order, however a busy machine paced the responses
        assert stream.faults >= 3  # the cuts, resumed
    assert time.monotonic() - began > STALL_LIMIT  # longer than the bound: good progress kept it going
    offsets = [0 if r is None else int(r.removeprefix("bytes=").rstrip("-")) for _, r in stalling.requests]
    assert offsets[0] == 0 and offsets == sorted(offsets) and offsets[-1] >= 12_000, offsets


def test_a_server_under_the_speed_limit_is_given_up_on_within_the_bound_whatever_the_reconnects(stalling):
    data = _payload(4000)
    stalling.piece = 8  # 400 bytes/s: each response is dropped as too slow after SPEED_TIME, and the read resumed
    url = stalling.put("a.bin", data, mode="slow")
    error = _gives_up_within_the_bound(url, "gopen_http")  # it would take 10 s to read whole
    assert 0 < error.offset < len(data) and len(stalling.requests) >= 3


def test_watched_reads_leave_no_thread_or_socket_behind(stalling):
    data = _payload(3000)
    url = stalling.put("a.bin", data)

    def ours() -> list:
        return [t for t in threading.enumerate() if "process_request_thread" not in t.name]  # not the server's

    assert gopen_http(url).read() == data  # starts the process's one watchdog thread
    threads, files = ours(), len(os.listdir("/proc/self/fd"))
    for _ in range(200):
        with gopen_http(url) as stream:
            assert b"".join(iter(lambda: stream.read(100), b"")) == data  # 30 watched reads each
    assert ours() == threads
    assert len(os.listdir("/proc/self/fd")) < files + 10  # a leak would be hundreds (the server's own are closing)


@pytest.fixture
def s3_at(monkeypatch, stalling):
    """boto3 pointed at the stalling server (fake credentials, no other address)."""
    for name, value in {
        "AWS_ENDPOINT_URL": stalling.base,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
    }.items():
        monkeypatch.setenv(name, value)
    for name in ("AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_MAX_ATTEMPTS"):
        monkeypatch.delenv(name, raising=False)
    return stalling


@pytest.mark.parametrize("mode", ["dead", "trickle", "continue", "headers"])
def test_s3_reads_are_bounded_too(s3_at, mode):
    s3_at.put("store/obj.bin", _payload(1000), mode=mode)
    error = _gives_up_within_the_bound("s3://store/obj.bin", "s3")
    assert (error.offset == 0) == (mode != "trickle")
    reader = s3_client(TIMEOUT)
    assert reader is not s3_client() and reader.meta.config.read_timeout == TIMEOUT
    assert reader.meta.config.retries["total_max_attempts"] == 1  # the reader's retries, not botocore's too


def _self_signed(folder: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and its key, made here (nothing is fetched)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path


def test_https_and_s3_over_tls_read_whole_and_a_tls_header_trickle_is_given_up_on(s3_at, tmp_path, monkeypatch):
    import ssl

    cert, key = _self_signed(tmp_path)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    s3_at.socket = context.wrap_socket(s3_at.socket, server_side=True)
    base = s3_at.base.replace("http://", "https://")
    for name, value in {"AWS_ENDPOINT_URL": base, "AWS_CA_BUNDLE": str(cert), "SSL_CERT_FILE": str(cert)}.items():
        monkeypatch.setenv(name, value)
    data = _payload(50_000)
    s3_at.put("store/a.bin", data)
    for _ in range(3):  # a TLS socket is watched through a duplicate of its descriptor
        assert gopen_s3("s3://store/a.bin").read() == data
        assert gopen_http(f"{base}/store/a.bin").read() == data
    s3_at.put("store/h.bin", data, mode="headers")
    _gives_up_within_the_bound("s3://store/h.bin", "s3")


@pytest.mark.parametrize("mode", ["cut-dead", "cut-trickle"])
def test_a_shard_given_up_on_mid_way_is_counted_as_lost(stalling, tmp_path, mode):
    made = make_shards(tmp_path / "set", num_shards=3, per_shard=4, rounds=2, record_pixels=False)
    for path in sorted(Path(made.root).iterdir()):
        stalling.put(path.name, path.read_bytes(), mode=mode if path.name == "shard-000001.tar" else "ok")
    stalling.cut = len(stalling.files["/shard-000001.tar"]) // 2
    counter = SkipCounter()
    began = time.monotonic()
    rows = [key for (key,) in ReinforcedDataset(f"{stalling.base}/manifest.json", keys=("__key__",), handler=counter)]
    assert time.monotonic() - began < BOUND + 4.0  # one bound for the one shard; the others read at once
    assert rows[:4] == made.keys[:4] and rows[-4:] == made.keys[-4:] and len(rows) < 12
    assert counter.count == 1 and "shard-000001.tar" in counter.last and "without good progress" in counter.last
    assert counter.samples == len(made.keys) - len(rows)  # exactly what the epoch did not yield


def test_only_time_inside_the_reader_counts():
    now = [0.0]
    pace = Pace(RetryPolicy(speed_limit=100, speed_time=10, stall_limit=60), clock=lambda: now[0])
    pace.enter()
    now[0] += 5
    assert pace.arrived(600) is None  # 600 bytes in 5 s: fast, but less than a window's 1000
    pace.leave()
    now[0] += 3600  # the consumer trains for an hour between two reads
    pace.enter()
    assert pace.stalled() == 5 and not pace.overdue()
    now[0] += 6
    assert pace.arrived(10) is not None  # 610 bytes in 11 s of its own time: under 100 bytes/s
    pace.attempt()  # the reader abandoned that response and asks again
    assert pace.arrived(400) is None and pace.stalled() == 11  # 1010 bytes in 11 s: still under 100 bytes/s
    assert pace.arrived(100) is None and pace.stalled() == 0  # 1110 bytes in 11 s: good progress
    now[0] += 61
    assert pace.overdue() and pace.stalled() == 61


@pytest.mark.parametrize(
    "name, value, expected",
    [
        ("WDS_REINFORCE_SPEED_LIMIT", "-1", "a number >= 0.0"),
        ("WDS_REINFORCE_SPEED_TIME", "0", "a number >= 0.001"),
        ("WDS_REINFORCE_STALL_LIMIT", "soon", "a number >= 0.001"),
    ],
)
def test_bad_settings_are_one_line_usage_errors(monkeypatch, name, value, expected):
    monkeypatch.setenv(name, value)
    with pytest.raises(UsageError, match=rf"^expected {name} to be {re.escape(expected)}, got '{value}'$"):
        storage.check_settings()


@pytest.mark.parametrize("rate, cut_every, gives_up", [(500, None, True), (999, 10, True), (2000, 10, False)])
def test_good_progress_is_the_limit_met_on_average_whatever_the_reconnects(rate, cut_every, gives_up):
    """A read under the limit ends within the bound, however its responses come and go; one above it on
    average (responses of 10 s at 2000 bytes/s, each cut and followed by 5 s of reconnecting) never does."""
    now = [0.0]
    pace = Pace(RetryPolicy(speed_limit=1000, speed_time=30, stall_limit=90), clock=lambda: now[0])
    pace.enter()
    pace.attempt()
    response, drops = 0, 0
    for _ in range(600):
        if pace.overdue():
            break
        now[0] += 1
        response += 1
        if pace.arrived(rate) is not None or response == cut_every:  # too slow, or cut: reconnect
            drops += 1
            now[0] += 5 if cut_every else 0
            pace.attempt()
            response = 0
    assert pace.overdue() == gives_up and (now[0] <= 96 if gives_up else now[0] >= 600), (now[0], drops)


def test_a_url_http_client_cannot_send_is_refused_at_once(monkeypatch):
    """A control character in the path is no transient fault: refused before any retry."""
    from wds_reinforce.core.errors import UsageError
    from wds_reinforce.io.storage import read_url

    monkeypatch.setenv("WDS_REINFORCE_RETRIES", "6")
    monkeypatch.setenv("WDS_REINFORCE_BACKOFF", "30")  # a retry would take minutes
    with pytest.raises(UsageError, match="expected a URL http.client can send, got 'http://127.0.0.1:9/a"):
        read_url("http://127.0.0.1:9/a\x01 b")
