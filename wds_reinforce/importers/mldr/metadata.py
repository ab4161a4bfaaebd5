"""apple/ml-dr's metadata as a stream: their ``.tar.gz`` read member by member, or its extracted folder.

The archive is never extracted and its sha256 is computed in passing; ``config()`` finds their
``config.pth.tar`` in it (or in the folder). A file's size is checked before it is read (an
archive member's from its tar header), and messages name a member with its archive
(``where``: ``ARCHIVE: reinforced_data/5.pth.tar``).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import os
import posixpath
import re
import tarfile
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

from wds_reinforce.core.errors import FormatError, UsageError
from wds_reinforce.importers import MetadataError
from wds_reinforce.importers.mldr.unpickle import MAX_PICKLE_BYTES
from wds_reinforce.io.shards import HashingReader
from wds_reinforce.io.tario import TarMember, iter_members

__all__ = ["CONFIG_NAME", "INDEX_NAME", "MAX_FILE_BYTES", "MetadataSource"]

CONFIG_NAME = "config.pth.tar"
# An image's file: {index}.pth.tar (torch.save, or joblib.dump under that name), {index}.jb, maybe gzipped.
INDEX_NAME = re.compile(r"(\d+)\.(?:pth\.tar|jb)(?:\.gz)?")
# The largest file read: a torch.save container around a data.pkl up to unpickle's limit (their
# files are a few MB). A larger one is refused from its size, before a byte of it is read.
MAX_FILE_BYTES = MAX_PICKLE_BYTES + (1 << 20)


class MetadataSource:
    """Their metadata: a ``.tar``/``.tar.gz`` archive (streamed, never extracted) or its extracted folder.

    ``members()`` yields ``(name, read)`` for every file; ``read()`` is valid until the next one.
    ``sha256`` is the archive's digest once a stream has been read to the end (None for a folder,
    which has ``listing_sha256`` over its file names and sizes instead).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.sha256: str | None = None
        self.listing_sha256: str | None = None
        if self.path.is_dir():
            root = self.path
            if not (root / CONFIG_NAME).is_file() and not any(INDEX_NAME.fullmatch(n) for n in os.listdir(root)[:1000]):
                subs = [p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")]
                if len(subs) == 1:
                    root = subs[0]  # the extracted archive's own folder (reinforced_data/)
            self.root: Path | None = root
            with os.scandir(root) as it:
                files = sorted((e.name, e.stat().st_size) for e in it if e.is_file() and not e.name.startswith("."))
            self._files = files
            h = hashlib.sha256()
            for name, size in files:
                h.update(f"{name}\t{size}\n".encode())
            self.listing_sha256 = h.hexdigest()
            self.bytes = sum(size for _, size in files)
        elif self.path.is_file():
            self.root = None
            self.bytes = self.path.stat().st_size
        else:
            raise UsageError(
                f"expected their metadata archive (.tar.gz) or its extracted folder, got {str(path)!r} (not found)"
            )

    @property
    def is_dir(self) -> bool:
        return self.root is not None

    def names(self) -> list[str]:
        """A folder's file names (without reading them)."""
        return [name for name, _ in self._files]

    def where(self, name: str) -> str:
        """A member or file as messages name it: ``ARCHIVE: MEMBER``, or the folder's file path."""
        return f"{self.path}: {name}" if self.root is None else os.path.join(self.root, name)

    def members(self) -> Iterator[tuple[str, Callable[[], bytes]]]:
        """``(name, read)`` of every member or file; ``read()`` refuses one over ``MAX_FILE_BYTES`` unread."""
        if self.root is not None:
            for name, _ in self._files:
                yield name, functools.partial(self._read_file, name)
            return
        with open(self.path, "rb", buffering=0) as raw:
            reader = HashingReader(raw)
            with self._reading():
                for member in iter_members(io.BufferedReader(reader, 1 << 20)):
                    yield member.name, functools.partial(self._read, member)
                reader.drain()  # the rest (end-of-archive blocks) counts in the digest
            self.sha256 = reader.hexdigest()

    def _read(self, member: TarMember) -> bytes:
        self._check_size(member.name, member.size)
        with self._reading(member.name):
            return member.read()

    def _read_file(self, name: str) -> bytes:
        with open(os.path.join(self.root, name), "rb") as f:
            self._check_size(name, os.fstat(f.fileno()).st_size)
            return f.read()

    def _check_size(self, name: str, size: int) -> None:
        if size > MAX_FILE_BYTES:
            raise MetadataError(
                f"refused unread: {size} bytes, over the {MAX_FILE_BYTES}-byte limit of a metadata file "
                "(theirs are a few MB)",
                url=self.where(name),
            )

    @contextlib.contextmanager
    def _reading(self, member: str = "") -> Iterator[None]:
        """Errors of a damaged archive (cut, bad gzip, bad headers) as ``MetadataError`` naming it."""
        try:
            yield
        except (tarfile.TarError, EOFError, zlib.error, OSError, FormatError) as exc:  # FormatError: tario's size check
            at = f" at {member}" if member else ""
            raise MetadataError(
                f"cannot read the archive{at} ({type(exc).__name__}: {exc})", url=str(self.path)
            ) from None

    def config(self, progress: Callable[[str], None] | None = None) -> tuple[bytes, str]:
        """``config.pth.tar``'s bytes and name: a folder's file, or the archive streamed until it turns up."""
        if self.root is not None:
            path = self.root / CONFIG_NAME
            if not path.is_file():
                raise UsageError(f"expected {CONFIG_NAME} in {self.root}, got none")
            return path.read_bytes(), str(path)
        start, count = time.monotonic(), 0
        for name, read in self.members():
            count += 1
            if posixpath.basename(name) == CONFIG_NAME:
                if progress and count > 1:
                    progress(f"found {name} after {count} members ({time.monotonic() - start:.0f} s)")
                return read(), self.where(name)
            if progress and count % 100_000 == 0:
                progress(f"looking for {CONFIG_NAME} in {self.path}: {count} members read (give --config to skip this)")
        raise UsageError(f"expected {CONFIG_NAME} in {self.path}, got none among {count} members")
