"""Every byte that crosses a URL boundary: local paths, ``file:``, ``http(s)://`` and ``s3://``.

Reading goes through webdataset's ``gopen`` table, in which importing this module registers
``http``, ``https`` and ``s3`` handlers that return a ``remote.ResumableReader`` (retries with
backoff and ranged resume: a transient fault never changes the bytes read; see ``remote`` for
the ``WDS_REINFORCE_*`` retry settings). ``s3://`` also writes (PUT on close, for writers such
as ``wds.ShardWriter``); ``http(s)://`` writes stay with webdataset's curl handler. Writing a
producer's output (a local folder or ``s3://bucket/prefix``) goes through ``open_output``. All
S3 traffic uses the one client of ``remote.s3_client``.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from webdataset.gopen import gopen as _gopen
from webdataset.gopen import gopen_curl as _gopen_curl
from webdataset.gopen import gopen_schemes as _gopen_schemes

from wds_reinforce.core.errors import UsageError
from wds_reinforce.core.format import Manifest
from wds_reinforce.io.remote import (
    NetworkReadError,
    ObjectChangedError,
    ResumableReader,
    open_http,
    open_s3,
    s3_client,
    s3_location,
)

__all__ = [
    "NetworkReadError",
    "ObjectChangedError",
    "ResumableReader",
    "s3_client",
    "gopen_http",
    "gopen_s3",
    "register_url_schemes",
    "register_s3_scheme",
    "open_url",
    "count_reads",
    "ReadCount",
    "read_url",
    "read_manifest",
    "join_url",
    "dirname_url",
    "manifest_url",
    "shard_urls",
    "sha256_file",
    "fsync_rename",
    "LocalOutput",
    "S3Output",
    "open_output",
]

MANIFEST_NAME = "manifest.json"

_log = logging.getLogger(__name__)

# ----------------------------------------------------------------------------------------
# Handlers in webdataset's gopen table


class _S3Writer:
    """A writable stream that uploads to S3 on close (spooled to disk past 64 MiB)."""

    def __init__(self, url: str):
        self.url = url
        self._bucket, self._key = s3_location(url)
        self._buf = tempfile.SpooledTemporaryFile(max_size=64 << 20)

    def write(self, data: bytes) -> int:
        return self._buf.write(data)

    def writable(self) -> bool:
        return True

    def flush(self) -> None:
        self._buf.flush()

    def close(self) -> None:
        if self._buf.closed:
            return
        self._buf.seek(0)
        try:
            s3_client().upload_fileobj(self._buf, self._bucket, self._key)
        finally:
            self._buf.close()

    def __enter__(self) -> _S3Writer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def gopen_http(url: str, mode: str = "rb", bufsize: int = 8192, **kw: Any) -> Any:
    """webdataset ``gopen`` handler for ``http(s)://``: a ``ResumableReader``, or curl PUT for ``wb``.

    Raises:
        FileNotFoundError: HTTP 404 or 410 (at once, no retries).
        NetworkReadError: still failing after the allowed retries.
        OSError: another HTTP error (401, 403, ...), not retried.
    """
    if mode.startswith("w"):
        return _gopen_curl(url, mode, bufsize)
    if not mode.startswith("r"):
        raise UsageError(f"expected mode 'rb' or 'wb', got {mode!r}")
    return open_http(url)


def gopen_s3(url: str, mode: str = "rb", bufsize: int = 8192, **kw: Any) -> ResumableReader | _S3Writer:
    """webdataset ``gopen`` handler for ``s3://bucket/key``: a ``ResumableReader``, or PUT on close.

    Raises:
        FileNotFoundError: no such bucket or key (at once, no retries).
        NetworkReadError: still failing (throttled, 5xx, connection errors) after the allowed retries.
        UsageError: a malformed URL or mode.
    """
    s3_location(url)
    if mode.startswith("w"):
        return _S3Writer(url)
    if not mode.startswith("r"):
        raise UsageError(f"expected mode 'rb' or 'wb', got {mode!r}")
    return open_s3(url)


# webdataset's own handlers, which ours replace; any other mapping is the user's and is kept
_REPLACEABLE = {"http": (_gopen_curl,), "https": (_gopen_curl,), "s3": ()}


def _register(scheme: str, handler: Any, force: bool) -> None:
    current = _gopen_schemes.get(scheme)
    if force or current is None or current is handler or current in _REPLACEABLE[scheme]:
        _gopen_schemes[scheme] = handler


def register_url_schemes(force: bool = False) -> None:
    """Put ``gopen_http`` (http, https) and ``gopen_s3`` (s3) in webdataset's scheme table.

    A scheme the user mapped elsewhere (e.g. s3 to AIS through ``USE_AIS_FOR``) is kept unless
    ``force``; webdataset's default curl handler for http(s) is replaced.
    """
    _register("http", gopen_http, force)
    _register("https", gopen_http, force)
    _register("s3", gopen_s3, force)


def register_s3_scheme(force: bool = False) -> None:
    """Put ``gopen_s3`` in webdataset's scheme table (kept if the user mapped s3 elsewhere, e.g. AIS)."""
    _register("s3", gopen_s3, force)


register_url_schemes()


# ----------------------------------------------------------------------------------------
# Reading small files; URL arithmetic


def open_url(url: str) -> Any:
    """A readable stream over any supported URL (webdataset's gopen table; see the module docstring).

    Raises:
        UsageError: a URL scheme no handler knows, or a malformed URL.
        OSError: the URL cannot be opened (FileNotFoundError for a missing one).
    """
    try:
        stream = _gopen(url, "rb")
    except ValueError as exc:
        if isinstance(exc, UsageError):
            raise
        raise UsageError(f"cannot open {url!r}: {exc}") from None
    return _Counted(stream, _COUNTERS[-1]) if _COUNTERS else stream


class ReadCount:
    """Bytes read through ``open_url`` while a ``count_reads()`` block is open (this process only)."""

    def __init__(self) -> None:
        self.bytes = 0
        self.opened: list[str] = []


_COUNTERS: list[ReadCount] = []


@contextlib.contextmanager
def count_reads() -> Iterator[ReadCount]:
    """Count the bytes this process reads through ``open_url`` (shards, sidecars) in the block.

    For measurements (e.g. bytes read per epoch); DataLoader workers count in their own process.
    """
    counter = ReadCount()
    _COUNTERS.append(counter)
    try:
        yield counter
    finally:
        _COUNTERS.remove(counter)


class _Counted:
    def __init__(self, stream: Any, counter: ReadCount):
        self.stream, self.counter = stream, counter

    def read(self, size: int = -1) -> bytes:
        data = self.stream.read(size)
        self.counter.bytes += len(data)
        return data

    def close(self) -> None:
        self.stream.close()

    def __enter__(self) -> _Counted:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def read_url(url: str) -> bytes:
    """All bytes of a local path, ``file:``, ``http(s)://`` or ``s3://`` URL (via webdataset's gopen).

    Network reads go through the same ``ResumableReader`` as shards: retried and resumed.

    Raises:
        FileNotFoundError: the URL cannot be read (missing, refused for good, an HTTP error).
        NetworkReadError: a transient fault that outlasted the retries (an ``OSError``).
        ObjectChangedError: the object changed while being read (an ``OSError``).
    """
    try:
        with open_url(url) as stream:
            data = stream.read()
    except (NetworkReadError, ObjectChangedError, UsageError):
        raise
    except Exception as exc:  # gopen backends raise OSError, ValueError or pipe errors
        raise FileNotFoundError(f"cannot read {url}: {type(exc).__name__}: {exc}") from None
    return data


def read_manifest(url: str) -> Manifest:
    """Read and parse ``manifest.json`` from any URL kind ``read_url`` supports."""
    data = read_url(url)
    if not data:
        raise FileNotFoundError(f"cannot read {url}: empty response")
    return Manifest.from_json(data, url)


def join_url(base: str, name: str) -> str:
    return name if not base else base.rstrip("/") + "/" + name


def dirname_url(url: str) -> str:
    return url.rsplit("/", 1)[0] if "/" in url else ""


def manifest_url(location: str) -> str:
    """``manifest.json`` of a shard directory or URL prefix, or ``location`` itself if it names a .json."""
    return location if location.endswith(".json") else join_url(location, MANIFEST_NAME)


def shard_urls(manifest_location: str, manifest: Manifest) -> list[str]:
    """The URLs of a manifest's shards, which lie beside it."""
    return [join_url(dirname_url(manifest_location), s.name) for s in manifest.shards]


# ----------------------------------------------------------------------------------------
# Writing: a local folder or s3://bucket/prefix


def fsync_rename(src: Path, dst: Path) -> None:
    """Flush ``src`` to disk and rename it to ``dst``, so that ``dst`` is whole or absent after a crash."""
    with open(src, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(src, dst)
    try:
        fd = os.open(dst.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)  # the rename itself must survive a crash
    finally:
        os.close(fd)


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class LocalOutput:
    """A local output folder: files are staged in it and renamed into place."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.url = str(root)

    def check_writable(self) -> None:
        p = self.root.absolute()
        if p.exists():
            if not p.is_dir():
                raise UsageError(f"expected the output {self.url!r} to be a directory, got a file")
            if not os.access(p, os.W_OK | os.X_OK):
                raise UsageError(f"expected a writable output folder, got {self.url!r} (permission denied)")
            self._probe(p, f"{p} is not writable")
            return
        parent = p.parent
        while not parent.exists():
            parent = parent.parent
        if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
            raise UsageError(f"expected a writable output folder, got {self.url!r} ({parent} is not writable)")
        self._probe(parent, f"cannot create folders in {parent}")

    def _probe(self, folder: Path, why: str) -> None:
        # access() says yes to root everywhere, and to anyone on /proc or a read-only mount:
        # only making (and removing) an empty folder tells.
        try:
            os.rmdir(tempfile.mkdtemp(prefix=".wdsr-probe-", dir=folder))
        except OSError as exc:
            raise UsageError(
                f"expected a writable output folder, got {self.url!r} ({why}: {exc.strerror or exc})"
            ) from None

    def staging(self) -> Path:
        """A local folder to write files in before ``finish_file`` puts them in place."""
        self.root.mkdir(parents=True, exist_ok=True)
        return self.root

    def finish_file(self, local: Path, name: str, sha256: str) -> None:
        (self.root / name).parent.mkdir(parents=True, exist_ok=True)
        fsync_rename(local, self.root / name)

    def verify(self, name: str, info: Mapping[str, Any]) -> bool:
        path = self.root / name
        if not path.is_file() or path.stat().st_size != info["bytes"]:
            return False
        return sha256_file(path) == info["sha256"]

    def read_text(self, name: str) -> str | None:
        path = self.root / name
        return path.read_text() if path.is_file() else None

    def write_text(self, name: str, text: str) -> None:
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        fsync_rename(tmp, path)

    def close(self) -> None:
        pass


class S3Output:
    """``s3://bucket/prefix``; files are staged in a local temporary folder and uploaded whole."""

    def __init__(self, url: str):
        rest = url[len("s3://") :]
        self.bucket, _, prefix = rest.partition("/")
        if not self.bucket:
            raise UsageError(f"expected an output like s3://bucket/prefix, got {url!r}")
        self.prefix = prefix.strip("/")
        self.url = url
        self.client = s3_client()
        self._tmp: str | None = None

    def _key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    def check_writable(self) -> None:
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except Exception as exc:  # botocore raises ClientError, EndpointConnectionError, NoCredentialsError...
            raise UsageError(f"expected a writable output, got {self.url!r} ({type(exc).__name__}: {exc})") from None

    def staging(self) -> Path:
        if self._tmp is None:
            self._tmp = tempfile.mkdtemp(prefix="wds_reinforce_")
        return Path(self._tmp)

    def finish_file(self, local: Path, name: str, sha256: str) -> None:
        self.client.upload_file(str(local), self.bucket, self._key(name), ExtraArgs={"Metadata": {"sha256": sha256}})
        local.unlink()

    def verify(self, name: str, info: Mapping[str, Any]) -> bool:
        # Downloading every shard to hash it would double the traffic; the uploaded object's
        # size and the sha256 recorded in its metadata at upload time stand in for it.
        try:
            head = self.client.head_object(Bucket=self.bucket, Key=self._key(name))
        except Exception:
            return False
        return head.get("ContentLength") == info["bytes"] and head.get("Metadata", {}).get("sha256") == info["sha256"]

    def read_text(self, name: str) -> str | None:
        try:
            return self.client.get_object(Bucket=self.bucket, Key=self._key(name))["Body"].read().decode()
        except self.client.exceptions.NoSuchKey:
            return None

    def write_text(self, name: str, text: str) -> None:
        self.client.put_object(Bucket=self.bucket, Key=self._key(name), Body=text.encode())

    def close(self) -> None:
        if self._tmp:
            shutil.rmtree(self._tmp, ignore_errors=True)


def open_output(out: str | os.PathLike) -> LocalOutput | S3Output:
    """The producer's output: ``s3://bucket/prefix`` or a local folder."""
    if not isinstance(out, (str, os.PathLike)) or not str(out):
        raise UsageError(f"expected an output folder or s3://bucket/prefix, got {out!r}")
    out = str(out)
    return S3Output(out) if out.startswith("s3://") else LocalOutput(out)
