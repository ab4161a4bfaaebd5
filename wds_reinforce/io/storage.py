"""Every byte that crosses a URL boundary, by scheme: one table for reading and writing.

``SCHEMES`` holds one ``Scheme`` per URL scheme: its reader, installed in webdataset's ``gopen``
table (so plain ``wds.WebDataset`` pipelines read through it too), and, where the scheme can be
written, the ``Output`` a job writes to (``outputs``). A new scheme is one entry. Today:

- local paths and ``file:`` (webdataset's own reader; ``LocalOutput``);
- ``http(s)://``: ``remote.ResumableReader`` (retries with backoff and ranged resume, so a
  transient fault never changes the bytes read; see ``retry`` for the ``WDS_REINFORCE_*``
  settings), with the headers of ``auth`` (``WDS_REINFORCE_HTTP_HEADERS``, the Hugging Face
  token); writes stay with webdataset's curl handler (no job output);
- ``s3://``: the same reader over the one S3 client (``remote.s3_client``); ``S3Output``, and a
  PUT-on-close stream for webdataset writers such as ``wds.ShardWriter``;
- ``*``: any other scheme fsspec knows (``gs://``, ``az://``, ``hf://``, ``memory://``, a
  user's own; ``fsspec_store``): the same reader over ``fs.open``, and ``FsspecOutput``. It
  takes webdataset's default and its subprocess handlers for ``gs`` (gsutil) and ``hf`` (curl).

Other schemes of webdataset's table (``pipe:``, ``ais``, a user's own mapping) read through it as
they are. Readers of data sets open every URL here (``open_url``, ``read_url``).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from webdataset.gopen import gopen as _gopen
from webdataset.gopen import gopen_curl as _gopen_curl
from webdataset.gopen import gopen_error as _gopen_error
from webdataset.gopen import gopen_gsutil as _gopen_gsutil
from webdataset.gopen import gopen_hf as _gopen_hf
from webdataset.gopen import gopen_schemes as _gopen_schemes

from wds_reinforce.core.errors import UsageError
from wds_reinforce.core.registry import Registry
from wds_reinforce.io.auth import check_http_headers
from wds_reinforce.io.fsspec_store import FsspecOutput, fsspec_knows, gopen_fsspec
from wds_reinforce.io.outputs import LocalOutput, Output, S3Output, S3Writer
from wds_reinforce.io.remote import NetworkReadError, ObjectChangedError, RetryPolicy, open_http, open_s3, s3_location

__all__ = [
    "Scheme",
    "SCHEMES",
    "ANY",
    "scheme_entry",
    "scheme_of",
    "register_url_schemes",
    "check_settings",
    "gopen_http",
    "gopen_s3",
    "open_url",
    "read_url",
    "count_reads",
    "ReadCount",
    "join_url",
    "dirname_url",
    "open_output",
]


# ----------------------------------------------------------------------------------------
# Readers (webdataset gopen handlers)


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


def gopen_s3(url: str, mode: str = "rb", bufsize: int = 8192, **kw: Any) -> Any:
    """webdataset ``gopen`` handler for ``s3://bucket/key``: a ``ResumableReader``, or PUT on close.

    Raises:
        FileNotFoundError: no such bucket or key (at once, no retries).
        NetworkReadError: still failing (throttled, 5xx, connection errors) after the allowed retries.
        UsageError: a malformed URL or mode.
    """
    s3_location(url)
    if mode.startswith("w"):
        return S3Writer(url)
    if not mode.startswith("r"):
        raise UsageError(f"expected mode 'rb' or 'wb', got {mode!r}")
    return open_s3(url)


# ----------------------------------------------------------------------------------------
# The table


@dataclass(frozen=True)
class Scheme:
    """One URL scheme.

    Attributes:
        name: the scheme (``file`` stands for local paths too; ``*`` for any scheme fsspec knows).
        gopen: its handler for webdataset's gopen table, ``(url, mode, bufsize) -> stream``; None
            to keep webdataset's own.
        output: the ``Output`` a job writes to under a URL of this scheme; None if it cannot be written.
        replaces: webdataset's own handlers of the scheme that ``gopen`` replaces (others, a
            user's mapping, are kept unless forced); for ``*``, the handlers it takes over,
            whatever scheme webdataset maps to them.
    """

    name: str
    gopen: Callable[..., Any] | None = None
    output: Callable[[str], Output] | None = None
    replaces: tuple[Callable[..., Any], ...] = ()


ANY = "*"  # the entry of every scheme fsspec knows that has none of its own

SCHEMES: Registry[Scheme] = Registry("URL scheme")
for _scheme in (
    Scheme("file", None, LocalOutput),
    Scheme("http", gopen_http, None, (_gopen_curl,)),
    Scheme("https", gopen_http, None, (_gopen_curl,)),
    Scheme("s3", gopen_s3, S3Output),
    Scheme(ANY, gopen_fsspec, FsspecOutput, (_gopen_error, _gopen_gsutil, _gopen_hf)),
):
    SCHEMES.register(_scheme.name, _scheme)
del _scheme


def scheme_entry(scheme: str) -> Scheme | None:
    """The table's entry for ``scheme``: its own, the fsspec entry (``ANY``) if fsspec knows it, or None."""
    if scheme in SCHEMES:
        return SCHEMES.get(scheme)
    return SCHEMES.get(ANY) if fsspec_knows(scheme) else None


def scheme_of(url: str) -> str:
    """The scheme of ``url``: ``file`` for a local path or ``file:`` URL.

    A prefix is a scheme when it is known (ours or webdataset's), followed by ``//``, or an fsspec
    protocol chained with ``::`` (``simplecache::gs://b/k``); anything else is a path, such as
    ``out:v2`` or a Windows drive letter.
    """
    scheme, sep, rest = url.partition(":")
    scheme = scheme.lower()
    if not sep or len(scheme) < 2 or not scheme.replace("+", "").replace("-", "").replace(".", "").isalnum():
        return "file"
    known = scheme in SCHEMES or scheme in _gopen_schemes or (rest.startswith(":") and fsspec_knows(scheme))
    return scheme if known or rest.startswith("//") else "file"


def register_url_schemes(force: bool = False) -> None:
    """Put the table's readers in webdataset's gopen table.

    A scheme the user mapped elsewhere (e.g. s3 to AIS through ``USE_AIS_FOR``) is kept unless
    ``force``; webdataset's own handler (curl for http(s)) is replaced. The fsspec entry takes
    webdataset's default (``__default__``: any scheme not in its table) and the handlers it replaces.
    """
    for scheme in SCHEMES.names():
        entry = SCHEMES.get(scheme)
        if entry.gopen is None:
            continue
        names = [scheme]
        if scheme == ANY:
            names = ["__default__"] + [n for n, h in _gopen_schemes.items() if h in entry.replaces or h is entry.gopen]
        for name in dict.fromkeys(names):
            current = _gopen_schemes.get(name)
            if force or current is None or current is entry.gopen or current in entry.replaces:
                _gopen_schemes[name] = entry.gopen


register_url_schemes()


def check_settings() -> None:
    """Raise ``UsageError`` for a bad ``WDS_REINFORCE_*`` setting now, not later in a loader worker."""
    RetryPolicy.from_env()
    check_http_headers()


# ----------------------------------------------------------------------------------------
# Reading


def open_url(url: str) -> Any:
    """A readable stream over any supported URL (webdataset's gopen table; see the module docstring).

    Raises:
        UsageError: a URL scheme no handler knows, or a malformed URL.
        OSError: the URL cannot be opened (FileNotFoundError for a missing one).
    """
    if scheme_of(url) == "file" and urlsplit(url).scheme not in ("", "file"):
        url = "./" + url  # a relative path such as out:v2/x, whose prefix webdataset would take for a scheme
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
    """All bytes of a local path, ``file:``, ``http(s)://``, ``s3://`` or fsspec URL (via webdataset's gopen).

    Network reads go through the same ``ResumableReader`` as shards: retried and resumed.

    Raises:
        FileNotFoundError: the URL cannot be read (missing, refused for good, an HTTP error).
        NetworkReadError: a transient fault that outlasted the retries, or a read that went too long
            without good progress (an ``OSError``; see ``retry`` for the bound).
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


def join_url(base: str, name: str) -> str:
    return name if not base else base.rstrip("/") + "/" + name


def dirname_url(url: str) -> str:
    return url.rsplit("/", 1)[0] if "/" in url else ""


def open_output(out: str | os.PathLike) -> Output:
    """A job's output: a local folder, or a prefix under a scheme that can be written
    (``s3://bucket/prefix``, or any fsspec store: ``gs://bucket/prefix``, ``az://``, ``hf://``, ...).

    Raises:
        UsageError: an empty location, a scheme that cannot be written, or an fsspec scheme whose
            backend is not installed.
    """
    if not isinstance(out, (str, os.PathLike)) or not str(out):
        raise UsageError(f"expected an output folder or s3://bucket/prefix, got {out!r}")
    out = str(out)
    scheme = scheme_of(out)
    entry = scheme_entry(scheme)
    if entry is None or entry.output is None:
        writable = [name for name in SCHEMES.names() if SCHEMES.get(name).output is not None]
        named = ", ".join(f"{n}://" for n in writable if n not in ("file", ANY))
        raise UsageError(
            f"expected an output folder or a URL of {named} or another fsspec store, got {out!r} "
            f"({scheme}:// cannot be written)"
        )
    return entry.output(out)
