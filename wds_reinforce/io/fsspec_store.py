"""Any store fsspec knows (``gs://``, ``az://``, ``hf://``, ``memory://``, ...), read and written.

``storage.SCHEMES`` sends every URL scheme that has no entry of its own here. Reads go through
the same ``remote.ResumableReader`` as ``http(s)://`` and ``s3://``: a backend error that may pass
(a timeout, a reset connection, a 5xx or 429) is retried with the same ``WDS_REINFORCE_*`` policy
and resumed at the byte it stopped at, over a fresh ``fs.open`` and ``seek``. The object is
pinned at the first open by what ``fs.info`` says of it (a generation, version id, ETag or git
blob id where the store has one, else its modification time): a resumed read of another
version, or a read whose object changed by the time its last byte arrives, raises
``ObjectChangedError`` instead of returning spliced bytes. Every backend call runs on a helper
thread and is abandoned when it is still blocked after ``WDS_REINFORCE_STALL_LIMIT`` seconds (the
read then gives up), as the watchdog ends a blocked socket call over HTTP and S3, which it cannot
do inside a backend: a dead store costs about the bound, whatever the backend's own timeouts.

``FsspecOutput`` is a job's output in such a store: files are staged locally and uploaded whole
(``put_file``), straight to their name where the store's upload is atomic (object stores),
else to a temporary name and moved into place.

fsspec and the backend are imported when a URL needs them; a missing one is a one-line
``UsageError`` naming what to install (``pip install 'wds_reinforce[gcs]'``, ``[azure]``, ``[hf]``).
"""

from __future__ import annotations

import hashlib
import io
import queue
import shutil
import tempfile
import threading
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from wds_reinforce.core.errors import UsageError
from wds_reinforce.io.remote import ObjectChangedError, ResumableReader, _Opened, _Transient
from wds_reinforce.io.retry import RetryPolicy

__all__ = ["EXTRAS", "fsspec_knows", "filesystem", "object_version", "open_fsspec", "gopen_fsspec", "FsspecOutput"]

# The package extra that brings a scheme's backend
EXTRAS = {"gs": "gcs", "gcs": "gcs", "az": "azure", "abfs": "azure", "abfss": "azure", "adl": "azure", "hf": "hf"}

# Stores whose upload of a whole file is atomic (a reader sees the old object or the new, never a part)
_ATOMIC_PUT = frozenset({"gs", "gcs", "s3", "s3a", "az", "abfs", "abfss", "adl", "hf", "memory", "oci", "oss"})

_BLOCK = 1 << 20  # bytes per backend read: one helper-thread hop per block, whatever size the consumer asks


def _fsspec() -> Any:
    try:
        import fsspec
    except ImportError:
        raise UsageError("expected fsspec for this URL scheme: pip install fsspec") from None
    return fsspec


def fsspec_knows(scheme: str) -> bool:
    """Whether fsspec (if installed) has a backend registered or known for ``scheme``."""
    try:
        from fsspec.registry import known_implementations, registry
    except ImportError:
        return False
    return scheme in registry or scheme in known_implementations


def filesystem(url: str) -> tuple[Any, str]:
    """(fsspec filesystem, path within it) for ``url``.

    Raises:
        UsageError: fsspec or the scheme's backend is not installed, or fsspec does not know the scheme.
    """
    fsspec = _fsspec()
    scheme = url.split("://", 1)[0].split("::")[-1].lower() if "://" in url else url.split(":", 1)[0]
    try:
        return fsspec.core.url_to_fs(url)
    except ImportError as exc:
        extra = EXTRAS.get(scheme)
        how = f"pip install 'wds_reinforce[{extra}]'" if extra else "install its fsspec backend"
        raise UsageError(f"expected the backend of {scheme}:// to be installed: {how} ({exc})") from None
    except ValueError as exc:
        if "protocol" in str(exc).lower():
            raise UsageError(f"expected a URL scheme that webdataset or fsspec knows, got {url!r}") from None
        raise UsageError(f"cannot use {url!r}: {exc}") from None


# Fields of ``fs.info`` that name one version of an object, most specific first: identities, then times
_IDENTITY = ("generation", "version_id", "VersionId", "etag", "ETag", "e_tag", "blob_id")
_TIMES = ("mtime", "LastModified", "last_modified", "updated", "ino")


def object_version(info: Mapping[str, Any]) -> str | None:
    """What tells this version of an object from another, from its ``fs.info``; None if nothing does."""
    for fields in (_IDENTITY, _TIMES, ("created",)):
        found = [f"{k}={info[k]}" for k in fields if info.get(k) not in (None, "")]
        if found:
            return " ".join(found)
    return None


# ----------------------------------------------------------------------------------------
# Reading


def _status(exc: BaseException) -> int | None:
    """The HTTP status a backend's error carries, if any (requests, httpx, aiohttp, gcsfs styles)."""
    for value in (getattr(getattr(exc, "response", None), "status_code", None), getattr(exc, "code", None)):
        if isinstance(value, int) and 100 <= value < 600:
            return value
    return getattr(exc, "status", None) if isinstance(getattr(exc, "status", None), int) else None


# Errors that say the call itself was wrong (a bug, a bad path, a missing object): never retried
_FINAL = (
    FileNotFoundError,
    PermissionError,
    IsADirectoryError,
    NotADirectoryError,
    ValueError,
    TypeError,
    AttributeError,
    KeyError,
    IndexError,
    NotImplementedError,
    ImportError,
    AssertionError,
)


def _transient(exc: BaseException) -> bool:
    status = _status(exc)
    if status is not None:
        return status >= 500 or status in (408, 425, 429)
    return isinstance(exc, Exception) and not isinstance(exc, _FINAL)


class _Caller:
    """Runs a backend's calls on a helper thread, and abandons one still blocked after ``bound`` seconds.

    Neither a socket timeout nor the reader's watchdog reaches every backend's connections; a call
    abandoned here is a fault (the read is past its bound by then, so it gives up), and its thread
    ends when the call returns. The thread ends with the body (``close``), or with the source, which
    the reader closes when it closes or its open fails; a later call starts another.
    """

    def __init__(self, bound: float):
        self.bound = bound
        self._jobs: queue.SimpleQueue | None = None

    def __call__(self, fn: Callable[..., Any], *args: Any) -> Any:
        if self._jobs is None:
            self._jobs = queue.SimpleQueue()
            threading.Thread(target=_serve, args=(self._jobs,), name="wds_reinforce-fsspec", daemon=True).start()
        done, box = threading.Event(), {}
        self._jobs.put((fn, args, box, done))
        if not done.wait(self.bound):
            self._jobs.put(None)  # the thread ends after the call it is stuck in
            self._jobs = None
            raise _Transient(f"no answer from the store in {self.bound:g} s (WDS_REINFORCE_STALL_LIMIT)")
        if "error" in box:
            raise box["error"]
        return box["value"]

    def close(self) -> None:
        if self._jobs is not None:
            self._jobs.put(None)
            self._jobs = None


def _serve(jobs: queue.SimpleQueue) -> None:
    while (job := jobs.get()) is not None:
        fn, args, box, done = job
        try:
            box["value"] = fn(*args)
        except BaseException as exc:  # handed to the caller, which decides
            box["error"] = exc
        done.set()


class _Source:
    """``fs.info`` (size, version), then ``fs.open`` and ``seek`` at the offset, on a helper thread."""

    read_errors = ()  # a body's read raises ``_Transient`` for a fault worth retrying, anything else is final

    def __init__(self, url: str, policy: RetryPolicy):
        self.url = url
        self.fs, self.path = filesystem(url)
        self.call = _Caller(policy.stall_limit)

    def info(self) -> tuple[int | None, str | None]:
        """(size, version) of the object now."""
        try:
            info = self.call(self.fs.info, self.path)
        except _Transient:
            raise
        except Exception as exc:
            error = self.error(exc)
            raise error from (None if error is exc else exc)
        if info.get("type") == "directory":
            raise IsADirectoryError(f"{self.url}: a folder, not a file")
        size = info.get("size")
        return (int(size) if isinstance(size, int) else None), object_version(info)

    def open(self, offset: int, version: str | None) -> _Opened:
        size, now = self.info()
        if version is not None and now != version:  # (the reader's check says it in its words)
            return _Opened(io.BytesIO(), offset, size, now)
        try:
            f = self.call(self.fs.open, self.path, "rb")
            if offset:
                self.call(f.seek, offset)
        except _Transient:
            raise
        except Exception as exc:
            error = self.error(exc)
            raise error from (None if error is exc else exc)
        return _Opened(_Body(self, f, offset, size, now), offset, size, now)

    def error(self, exc: Exception) -> BaseException:
        """What the reader should see of a backend's error: final, or ``_Transient`` (retried)."""
        cause = f"{type(exc).__name__}: {exc}"
        if isinstance(exc, FileNotFoundError):
            error: BaseException = FileNotFoundError(f"{self.url}: not found")
        elif _transient(exc):
            error = _Transient(cause)
        elif isinstance(exc, (OSError, ValueError)) or _status(exc) is not None:
            error = OSError(f"{self.url}: {cause}")
        else:
            return exc  # a bug: as it is
        return error

    def close(self) -> None:
        self.call.close()


class _Body:
    """A backend file as the reader's body: ``read1`` serves one block at a time; when the object's
    last byte arrives its version is asked again, so that a change during the read is not data."""

    def __init__(self, source: _Source, f: Any, offset: int, size: int | None, version: str | None):
        self.source, self.f, self.pos, self.size, self.version = source, f, offset, size, version
        self._buf, self._at, self._checked = b"", 0, False

    def read1(self, n: int = -1) -> bytes:
        if self._at >= len(self._buf):
            self._buf, self._at = self._block(), 0
        n = len(self._buf) - self._at if n is None or n < 0 else n
        data = self._buf[self._at : self._at + n]
        self._at += len(data)
        return data

    def _block(self) -> bytes:
        want = _BLOCK if self.size is None else min(_BLOCK, self.size - self.pos)
        if want <= 0:
            return b""
        try:
            data = self.source.call(self.f.read, want)
        except _Transient:  # the helper gave up on the call
            raise
        except Exception as exc:
            error = self.source.error(exc)
            raise error from (None if error is exc else exc)
        self.pos += len(data)
        end = self.pos >= self.size if self.size is not None else not data
        if end and not self._checked:
            self._checked = True
            self._check_end()
        return data

    def _check_end(self) -> None:
        _, now = self.source.info()
        if now != self.version:
            raise ObjectChangedError(
                f"{self.source.url} changed while being read (was {self.version}, now {now} at byte {self.pos})"
            )

    def close(self) -> None:
        f, self.f = self.f, None
        self.source.call.close()  # its thread ends (a resumed read starts another)
        if f is not None:
            try:
                f.close()
            except Exception:  # a broken connection may fail to close; it is being dropped anyway
                pass


def open_fsspec(url: str) -> ResumableReader:
    """A resumable stream over an object in any fsspec store (the object is opened here).

    Raises:
        FileNotFoundError: no such object. UsageError: no backend for the scheme.
        NetworkReadError, ObjectChangedError: as for ``http(s)://`` and ``s3://``.
    """
    policy = RetryPolicy.from_env()
    return ResumableReader(_Source(url, policy), policy)


def gopen_fsspec(url: str, mode: str = "rb", bufsize: int = 8192, **kw: Any) -> Any:
    """webdataset ``gopen`` handler for any scheme fsspec knows: a ``ResumableReader``, or the
    backend's own writer for ``wb`` (the object appears when it is closed)."""
    if mode.startswith("w"):
        fs, path = filesystem(url)
        return fs.open(path, "wb")
    if not mode.startswith("r"):
        raise UsageError(f"expected mode 'rb' or 'wb', got {mode!r}")
    return open_fsspec(url)


# ----------------------------------------------------------------------------------------
# Writing


class FsspecOutput:
    """A job's output under a URL of any fsspec store; files are staged locally and uploaded whole."""

    def __init__(self, url: str):
        self.url = url
        self.fs, root = filesystem(url)
        self.root = root.rstrip("/")
        protocols = self.fs.protocol if isinstance(self.fs.protocol, (tuple, list)) else (self.fs.protocol,)
        self._atomic = any(p in _ATOMIC_PUT for p in protocols)
        self._tmp: str | None = None

    def _path(self, name: str) -> str:
        return f"{self.root}/{name}" if self.root else name

    def check_writable(self) -> None:
        probe = self._path(f".wdsr-probe-{uuid.uuid4().hex}")
        try:
            self.fs.makedirs(self.root, exist_ok=True)
            self.fs.pipe_file(probe, b"")
            self.fs.rm_file(probe)
        except Exception as exc:  # each backend has its own errors: credentials, permissions, no bucket
            raise UsageError(f"expected a writable output, got {self.url!r} ({type(exc).__name__}: {exc})") from None

    def staging(self) -> Path:
        if self._tmp is None:
            self._tmp = tempfile.mkdtemp(prefix="wds_reinforce_")
        return Path(self._tmp)

    def _put(self, put: Callable[[str], None], name: str) -> None:
        """Upload with ``put(path)`` into place: straight to ``name``, or through a temporary name."""
        target = self._path(name)
        self.fs.makedirs(target.rsplit("/", 1)[0] if "/" in target else self.root, exist_ok=True)
        if self._atomic:
            put(target)
            return
        tmp = f"{target}.tmp-{uuid.uuid4().hex[:8]}"
        put(tmp)
        self.fs.mv(tmp, target)

    def finish_file(self, local: Path, name: str, sha256: str) -> None:
        self._put(lambda path: self.fs.put_file(str(local), path), name)
        local.unlink()

    def verify(self, name: str, info: Mapping[str, Any]) -> bool:
        # The store keeps no sha256 we could ask for: the file is read back and hashed (on resume only).
        try:
            if self.fs.info(self._path(name)).get("size") != info["bytes"]:
                return False
            h = hashlib.sha256()
            with open_fsspec(f"{self.url.rstrip('/')}/{name}") as f:
                for block in iter(lambda: f.read(_BLOCK), b""):
                    h.update(block)
        except (OSError, UsageError):
            return False
        return h.hexdigest() == info["sha256"]

    def read_text(self, name: str) -> str | None:
        try:
            return self.fs.cat_file(self._path(name)).decode()
        except FileNotFoundError:
            return None

    def write_text(self, name: str, text: str) -> None:
        self._put(lambda path: self.fs.pipe_file(path, text.encode()), name)

    def close(self) -> None:
        if self._tmp:
            shutil.rmtree(self._tmp, ignore_errors=True)
