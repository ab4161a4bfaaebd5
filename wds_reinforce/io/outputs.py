"""Where jobs write: the ``Output`` protocol and its local-folder and ``s3://`` implementations.

A job stages each file locally, hashes it, then puts it in place (``finish_file``): renamed into
a local folder after an fsync, or uploaded whole to S3 with its sha256 in the object's metadata.
Small files (markers, manifests) go through ``read_text``/``write_text``. ``storage.open_output``
picks the implementation from its URL scheme (``storage.SCHEMES``).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

from wds_reinforce.core.errors import UsageError
from wds_reinforce.io.remote import s3_client, s3_location

__all__ = ["Output", "LocalOutput", "S3Output", "S3Writer", "local_path", "fsync_rename", "sha256_file"]


class Output(Protocol):
    """A job's output location (a folder, or a prefix of an object store)."""

    url: str

    def check_writable(self) -> None:
        """Raise ``UsageError`` unless files can be written here (before any work starts)."""

    def staging(self) -> Path:
        """A local folder to write files in before ``finish_file`` puts them in place."""

    def finish_file(self, local: Path, name: str, sha256: str) -> None:
        """Put the staged file ``local`` in place as ``name``, whole or not at all."""

    def verify(self, name: str, info: Mapping[str, Any]) -> bool:
        """Whether ``name`` is in place with the size and sha256 of ``info`` (a ``ShardInfo`` as a dict)."""

    def read_text(self, name: str) -> str | None:
        """A small file's text, or None if there is none."""

    def write_text(self, name: str, text: str) -> None:
        """Write a small file atomically (replacing one of that name)."""

    def close(self) -> None:
        """Remove what staging left behind."""


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


def local_path(url: str) -> str:
    """The file system path of a local location: a path, or a ``file:`` URL (``file:///abs``,
    ``file:/abs``, ``file:rel``); the rest of the URL is the path as written (a ``#`` included)."""
    if not url.startswith("file:"):
        return url
    rest = url[len("file:") :]
    return "/" + rest.lstrip("/") if rest.startswith("/") else rest


class LocalOutput:
    """A local output folder: files are staged in it and renamed into place."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(local_path(str(root)))
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


class S3Writer:
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

    def __enter__(self) -> S3Writer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
