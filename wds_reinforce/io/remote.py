"""Remote reads that survive transient faults: the S3 client, HTTP and S3 streams, retries.

``ResumableReader`` is a stream over an ``http(s)://``, ``s3://`` or fsspec object that survives
connection resets, 5xx, S3 throttling, a body shorter than its Content-Length and a response
too slow to be worth waiting for, by retrying with exponential backoff and resuming with a
ranged request where it stopped, so a fault never changes the bytes read; and that gives up
(``NetworkReadError``) rather than wait forever: ``retry`` holds the policy (the
``WDS_REINFORCE_*`` settings) and the watchdog that ends a socket call blocked past the bound.
``s3_client`` is the one place that builds an S3 client: boto3's standard credential chain and
region, with the endpoint from ``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL`` when set (MinIO,
Ceph, moto, ...). ``storage`` is the public door to these.

S3 reads use a client of their own settings (the timeout; botocore's retries off: the reader's
count) and take the body from botocore's urllib3 response (``read1``, one socket read at a time:
urllib3 >= 2.1), past its ``StreamingBody``, so botocore's checks of a response (its length, a
checksum) are skipped: the reader checks the length, and the shards carry CRCs and a sha256.
"""

from __future__ import annotations

import http.client
import io
import logging
import os
import re
import ssl
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

from wds_reinforce.core.errors import UsageError
from wds_reinforce.io.auth import authorized_open, authorized_opener, http_headers
from wds_reinforce.io.retry import (
    BACKOFF,
    BACKOFF_MAX,
    RETRIES,
    SPEED_LIMIT,
    SPEED_TIME,
    STALL_LIMIT,
    TIMEOUT,
    NetworkReadError,
    Pace,
    RetryPolicy,
    Watch,
    watch_s3_client,
    watched_opener,
)

__all__ = [
    "RETRIES",
    "BACKOFF",
    "BACKOFF_MAX",
    "TIMEOUT",
    "SPEED_LIMIT",
    "SPEED_TIME",
    "STALL_LIMIT",
    "RetryPolicy",
    "NetworkReadError",
    "ObjectChangedError",
    "ResumableReader",
    "s3_client",
    "s3_location",
    "open_http",
    "open_s3",
]

_log = logging.getLogger(__name__)

# ----------------------------------------------------------------------------------------
# S3 client


_S3_CLIENTS: dict[tuple[int, str | None, float | None], Any] = {}


def s3_client(timeout: float | None = None) -> Any:
    """The process's boto3 S3 client (one per process and endpoint: clients are not fork-safe).

    With ``timeout``: the readers' client, with that connect and read timeout and botocore's own
    retries off (a ``ResumableReader`` retries, within its bound; botocore's would multiply it).
    """
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None
    slot = (os.getpid(), endpoint, timeout)
    client = _S3_CLIENTS.get(slot)
    if client is None:
        import boto3
        from botocore.config import Config

        config = None
        if timeout is not None:
            config = Config(connect_timeout=timeout, read_timeout=timeout, retries={"total_max_attempts": 1})
        client = boto3.session.Session().client("s3", endpoint_url=endpoint, config=config)
        if timeout is not None:
            watch_s3_client(client)
        for other in [key for key in _S3_CLIENTS if key[:2] != slot[:2]]:
            del _S3_CLIENTS[other]
        _S3_CLIENTS[slot] = client
    return client


def s3_location(url: str) -> tuple[str, str]:
    parsed = urlparse(url)
    bucket, key = parsed.netloc, parsed.path.lstrip("/")
    if parsed.scheme != "s3" or not bucket or not key:
        raise UsageError(f"expected an s3://bucket/key URL, got {url!r}")
    return bucket, key


# ----------------------------------------------------------------------------------------
# Resumable reading: errors, the reader and its two sources (HTTP, S3)

_CHUNK = 1 << 20


class ObjectChangedError(OSError):
    """The object behind a URL changed (ETag, Last-Modified or size) between two requests of one read."""


class _Transient(Exception):
    """A fault worth retrying, raised by a source's ``open``; ``str()`` is the cause to report."""


@dataclass
class _Opened:
    body: Any  # has read1(n) -> bytes (one socket read at most), close()
    start: int  # the object offset of the body's first byte (0 when the server ignored Range)
    total: int | None  # the object's size, when the response says
    version: str | None  # ETag or Last-Modified, to notice an object replaced mid-read


def _describe(exc: BaseException) -> str:
    return str(exc) if isinstance(exc, _Transient) else f"{type(exc).__name__}: {exc}"


class ResumableReader(io.RawIOBase):
    """A read-only stream over one URL that retries transient faults and resumes where it stopped.

    The first request is made here, so a missing object raises ``FileNotFoundError`` at open.
    A source with a ``close()`` has it called when the reader closes or its open fails.
    A fault (an error while opening or reading, a body that ends before the size the server
    announced, or a response slower than the policy's speed limit) closes the response, waits
    (``RetryPolicy.delay``) and re-requests the rest with a ranged request from the current
    offset; a server that answers a ranged request with the whole object has the already-read
    prefix skipped. The bytes returned are always exactly the object's. ``read(n)`` returns
    ``n`` bytes unless the object ends first, taken one socket read at a time so that the
    policy's clock (``retry.Pace``) is checked as bytes arrive; a call blocked when the read
    reaches its bound (connecting, headers, a chunk-size line) is ended by ``retry.Watch``.

    Raises (from ``read``):
        NetworkReadError: ``policy.retries`` retries in a row made no progress, or the read went
            ``policy.stall_limit`` seconds without good progress.
        ObjectChangedError: the object changed between two requests.
    """

    def __init__(self, source: Any, policy: RetryPolicy | None = None):
        super().__init__()
        self.url: str = source.url
        self.faults = 0  # transient faults recovered from (or not) so far
        self._source = source
        self._errors: tuple[type[BaseException], ...] = tuple(source.read_errors)  # of a body's read1()
        self._policy = policy if policy is not None else RetryPolicy.from_env()
        self._pace = Pace(self._policy)
        self._watch = Watch(self._pace.left)  # ends a call blocked past the bound (headers, chunk sizes, ...)
        self._pos = 0
        self._end: int | None = None
        self._version: str | None = None
        self._body: Any = None
        try:
            self._fill(0)  # opens, with retries
        except BaseException:
            self.close()  # the caller never gets the reader to close
            raise

    @property
    def offset(self) -> int:
        """Bytes received so far (all returned, unless a read raised)."""
        return self._pos

    @property
    def size(self) -> int | None:
        """The object's size, when the server said."""
        return self._end

    def readable(self) -> bool:
        return True

    def read(self, size: int | None = -1) -> bytes:
        if size is None or size < 0:
            return self.readall()
        if self.closed:
            raise ValueError(f"read of closed stream {self.url}")
        return self._fill(size)

    def readall(self) -> bytes:
        chunks = []
        while True:
            data = self.read(_CHUNK)
            if not data:
                return b"".join(chunks)
            chunks.append(data)

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        n = len(data)
        memoryview(buffer).cast("B")[:n] = data
        return n

    def close(self) -> None:
        self._drop_body()
        getattr(self._source, "close", lambda: None)()  # (the fsspec source's helper thread)
        super().close()

    def __str__(self) -> str:  # webdataset puts this in its error messages
        return f"<{self.url} at byte {self._pos}>"

    def _short(self) -> _Transient:
        return _Transient("the response ended before its announced size, without an error")

    def _drop_body(self) -> None:
        body, self._body = self._body, None
        if body is not None:
            try:
                body.close()
            except Exception:  # closing a broken connection may raise; it is being dropped anyway
                pass
        self._watch.release()

    def _fill(self, size: int) -> bytes:
        """Up to ``size`` bytes (fewer only at the end), through fresh requests after faults; the
        reader's clock runs only in here."""
        self._pace.enter()
        try:
            pieces: list[bytes] = []
            with self._watch:
                self._retrying(size, pieces)
        finally:
            self._pace.leave()
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)

    def _retrying(self, size: int, pieces: list[bytes]) -> None:
        """Append the bytes to ``pieces``; on a fault, back off and resume (or give up)."""
        failures, streak_at = 0, self._pos
        while True:
            try:
                if self._body is None:
                    self._body = self._open()
                if self._pull(size - sum(map(len, pieces)), pieces):
                    return
                fault: BaseException = self._short()
            except _Transient as exc:
                fault = exc
            except self._errors as exc:
                if self._body is None and not self._watch.fired:
                    raise  # from the source's open: not worth retrying (missing, forbidden, changed)
                fault = exc
            if self._watch.cut:  # the watchdog ended a blocked call: the read is past its bound
                ended = _Transient(f"the watchdog ended a blocked call ({_describe(fault)})")
                ended.__cause__, fault = fault, ended
            self.faults += 1
            self._drop_body()
            failures = failures + 1 if self._pos == streak_at else 1  # any progress starts a new streak
            streak_at = self._pos
            wait = self._policy.delay(failures)
            if failures > self._policy.retries or self._pace.overdue(wait) or self._watch.fired:
                raise self._give_up(fault, failures)
            at = f"{self._pos}" + (f" of {self._end}" if self._end is not None else "")
            retry = f"retry {failures} of {self._policy.retries} in {wait:.2f} s"
            _log.warning("%s at byte %s: %s; %s", self.url, at, _describe(fault), retry)
            time.sleep(wait)

    def _pull(self, size: int, pieces: list[bytes]) -> bool:
        """Append up to ``size`` bytes of the open body to ``pieces``, one socket read at a time.

        True when done: ``size`` bytes, or the object's end; False when the body ended short.
        Raises ``_Transient`` for a response too slow or a read past its bound.
        """
        while size > 0:
            data = self._body.read1(size)
            if not data:  # the end, unless the watchdog cut the connection
                done = not self._watch.fired and (self._end is None or self._pos >= self._end)
                if done:
                    self._watch.release()  # nothing more to watch: let the connection's descriptor go
                return done
            self._pos += len(data)
            size -= len(data)
            pieces.append(data)
            self._pace_check(len(data))
        return True

    def _pace_check(self, arrived: int) -> None:
        slow = self._pace.arrived(arrived)
        if slow is None and self._pace.overdue():
            slow = f"no good progress for {self._pace.stalled():.1f} s"
        if slow is not None:
            raise _Transient(slow)

    def _give_up(self, fault: BaseException, failures: int) -> NetworkReadError:
        cause = _describe(fault)
        real = fault.__cause__ if isinstance(fault, _Transient) and fault.__cause__ else fault
        of = f" of {self._end}" if self._end is not None else ""
        why = f"after {failures} attempts"
        if failures <= self._policy.retries:  # the bound ended it: attempts that each made a little progress
            why = (
                f"after {self._pace.stalled():.1f} s without good progress (the bound:"
                f" WDS_REINFORCE_STALL_LIMIT={self._policy.stall_limit:g} s)"
            )
        error = NetworkReadError(
            f"cannot read {self.url} at byte {self._pos}{of} {why}: {cause}", self.url, self._pos, failures, cause
        )
        error.__cause__ = real
        return error

    def _open(self) -> Any:
        """A response body positioned at ``self._pos``: raises ``_Transient`` for faults worth retrying."""
        if self._end is not None and self._pos >= self._end:
            return io.BytesIO()  # nothing left to ask for
        self._pace.attempt()
        opened = self._source.open(self._pos, self._version)
        try:
            if self._watch.fired:  # headers cut short: the response is not to be trusted
                raise _Transient("the read went past its bound while the request was under way")
            self._check(opened)
            skip = self._pos - opened.start  # a server that ignores Range resends what we already have
            while skip:
                try:
                    data = opened.body.read1(min(skip, _CHUNK))
                except self._errors as exc:
                    raise _Transient(_describe(exc)) from exc
                if not data:
                    raise _Transient(
                        f"the response ended at byte {self._pos - skip} while skipping to byte {self._pos}"
                        " (the server ignored Range)"
                    )
                skip -= len(data)
                self._pace_check(len(data))
        except BaseException:
            opened.body.close()
            raise
        return opened.body

    def _check(self, opened: _Opened) -> None:
        if self._pos == 0 and self._version is None:
            self._version = opened.version
        elif opened.version is not None and self._version is not None and opened.version != self._version:
            raise ObjectChangedError(
                f"{self.url} changed while being read (was {self._version}, now {opened.version} at byte {self._pos})"
            )
        if opened.total is not None:
            if self._end is not None and opened.total != self._end:
                raise ObjectChangedError(
                    f"{self.url} changed while being read (size was {self._end}, now {opened.total})"
                )
            self._end = opened.total
        if opened.start > self._pos:
            raise ObjectChangedError(
                f"{self.url}: asked for bytes from {self._pos}, the server sent bytes from {opened.start}"
            )


# HTTP statuses worth retrying: request timeout, too early, too many requests, and any 5xx
_HTTP_TRANSIENT = frozenset({408, 425, 429})
_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)")
_UNSATISFIED_RANGE = re.compile(r"bytes\s+\*/(\d+)")


class _HTTPSource:
    """GET through urllib (redirects and ``http(s)_proxy``/``no_proxy`` as urllib does them), with the
    headers of ``auth`` (never shown; they follow a redirect to the same origin only)."""

    read_errors = (OSError, http.client.HTTPException)

    def __init__(self, url: str, timeout: float):
        self.url, self.timeout, self._headers = url, timeout, http_headers(url)
        self._opener = authorized_opener(watched_opener())

    def open(self, offset: int, version: str | None) -> _Opened:
        headers = {"User-Agent": "wds_reinforce", "Accept-Encoding": "identity"}
        if offset:
            headers["Range"] = f"bytes={offset}-"
        try:
            request = urllib.request.Request(self.url, headers=headers)
            response = authorized_open(self._opener, request, self._headers, self.timeout)  # values never shown
        except urllib.error.HTTPError as exc:
            exc.close()
            status, reason = exc.code, exc.reason
            if status in (404, 410):
                raise FileNotFoundError(f"{self.url}: HTTP {status} {reason}") from None
            if status == 416 and offset:  # asked from the very end of an object of unknown size: nothing left
                found = _UNSATISFIED_RANGE.fullmatch((exc.headers.get("Content-Range") or "").strip())
                if found and int(found.group(1)) == offset:
                    return _Opened(io.BytesIO(), offset, offset, version)
            if status >= 500 or status in _HTTP_TRANSIENT:
                raise _Transient(f"HTTP {status} {reason}") from None
            raise OSError(f"{self.url}: HTTP {status} {reason}") from None
        except urllib.error.URLError as exc:
            if isinstance(exc.reason, ssl.SSLCertVerificationError):
                raise OSError(f"{self.url}: {exc.reason}") from None
            reason = exc.reason
            raise _Transient(_describe(reason) if isinstance(reason, BaseException) else str(reason)) from exc
        except http.client.InvalidURL as exc:  # a URL no retry can send
            raise UsageError(f"expected a URL http.client can send, got {self.url!r}: {exc}") from None
        except (OSError, http.client.HTTPException) as exc:
            raise _Transient(_describe(exc)) from exc
        length = response.headers.get("Content-Length")
        length = int(length) if length and length.strip().isdigit() else None
        version = response.headers.get("ETag") or response.headers.get("Last-Modified")
        if response.status == 206:
            found = _CONTENT_RANGE.fullmatch((response.headers.get("Content-Range") or "").strip())
            if not found:
                response.close()
                raise OSError(f"{self.url}: a 206 response without a usable Content-Range")
            start, total = int(found.group(1)), found.group(3)
            return _Opened(response, start, int(total) if total != "*" else None, version)
        return _Opened(response, 0, length, version)  # 200: the whole object, whatever we asked


# S3 error codes worth retrying (besides any 5xx): throttling and timeouts
_S3_TRANSIENT = frozenset(
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "RequestLimitExceeded",
        "RequestTimeout",
        "RequestTimeoutException",
        "InternalError",
        "ServiceUnavailable",
        "TooManyRequestsException",
    }
)
_S3_MISSING = frozenset({"NoSuchKey", "NoSuchBucket", "404", "NotFound"})


class _S3Source:
    """GET (ranged from the current offset, ``IfMatch`` the first ETag) through ``s3_client(timeout)``."""

    def __init__(self, url: str, timeout: float):
        import botocore.exceptions as be
        import urllib3.exceptions

        self.url, self.timeout = url, timeout
        self.bucket, self.key = s3_location(url)
        self.read_errors = (
            OSError,
            http.client.HTTPException,
            be.HTTPClientError,
            be.ConnectionError,
            be.IncompleteReadError,
            urllib3.exceptions.HTTPError,
        )
        self._client_error = be.ClientError

    def open(self, offset: int, version: str | None) -> _Opened:
        args: dict[str, Any] = {"Bucket": self.bucket, "Key": self.key}
        if offset:
            args["Range"] = f"bytes={offset}-"
        if version:
            args["IfMatch"] = version
        try:
            response = s3_client(self.timeout).get_object(**args)
        except self._client_error as exc:
            error = exc.response.get("Error", {})
            code = str(error.get("Code", ""))
            status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
            message = error.get("Message") or ""
            cause = f"{code} (HTTP {status})" + (f": {message}" if message else "")
            if code in _S3_MISSING or status == 404:
                raise FileNotFoundError(f"{self.url}: {code}") from None
            if code == "PreconditionFailed" or status == 412:
                raise ObjectChangedError(
                    f"{self.url} changed while being read (no longer ETag {version} at byte {offset})"
                ) from None
            if status >= 500 or status == 429 or code in _S3_TRANSIENT:
                raise _Transient(cause) from exc
            raise OSError(f"{self.url}: {cause}") from None
        except self.read_errors as exc:
            raise _Transient(_describe(exc)) from exc
        start, total = 0, response.get("ContentLength")
        found = _CONTENT_RANGE.fullmatch(str(response.get("ContentRange") or "").strip())
        if found:
            start, total = int(found.group(1)), found.group(3)
            total = int(total) if total != "*" else None
        body = response["Body"]
        body = getattr(body, "_raw_stream", body)  # urllib3's response: read1(), one socket read at a time
        return _Opened(body, start, total, response.get("ETag"))


def open_http(url: str) -> ResumableReader:
    """A resumable stream over an ``http(s)://`` URL (the first request is made here)."""
    policy = RetryPolicy.from_env()
    return ResumableReader(_HTTPSource(url, policy.timeout), policy)


def open_s3(url: str) -> ResumableReader:
    """A resumable stream over an ``s3://bucket/key`` object (the first request is made here)."""
    policy = RetryPolicy.from_env()
    return ResumableReader(_S3Source(url, policy.timeout), policy)
