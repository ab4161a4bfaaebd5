"""Tar shards as samples: the one grouper of tar members into samples, the hashing reader, which
member is a sample's image and what its label is, and local shard patterns.

Every reader of shards (the loader, verify, the rounds picture, sidecar sets, the producer's
sources and the ml-dr import's inputs) groups members here, with webdataset's rule: consecutive
members sharing a key form a sample, the key ending at the basename's first dot
(``webdataset.tariterators.base_plus_ext``), extensions lower-cased, webdataset's
``__key__``-style metadata members skipped. Members come from the lean reader ``tario``.
"""

from __future__ import annotations

import glob
import hashlib
import io
import json
import re
import tarfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from webdataset.tariterators import base_plus_ext

from wds_reinforce.core.errors import DataError, FormatError, error_text
from wds_reinforce.io.tario import iter_members

__all__ = [
    "IMAGE_EXTS",
    "LABEL_EXTS",
    "Span",
    "ShardCut",
    "HashingReader",
    "samples",
    "image_member",
    "image_bytes",
    "members_of",
    "image_ext",
    "sample_label",
    "local_shards",
    "sanitize_key",
    "unique_keys",
]

# A sample's image is its first member with one of these extensions, in this order.
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
# A plain webdataset sample's label members (``sample_label``): read while listing, images later
LABEL_EXTS = frozenset({"cls", "json"})

_INTEGER = re.compile(r"-?[0-9]+")
# webdataset's metadata members, which it skips
_META = re.compile(r"__[^/]*__($|/)")
# What a broken or vanished stream raises under the grouper (tario's cuts and damage, the URL readers)
_STREAM_ERRORS = (tarfile.TarError, OSError, EOFError)


@dataclass(frozen=True)
class Span:
    """Where an unread member's data lies in an uncompressed shard file (``read`` it from the file)."""

    offset: int
    size: int

    def read(self, path: str) -> bytes:
        with open(path, "rb") as f:
            f.seek(self.offset)
            return f.read(self.size)


class ShardCut(DataError):
    """A shard stream that broke (cut, damaged, or failed to read) after its first member.

    The message is the cause as ``Type: first line``. Attributes:
        key: the key of the sample being assembled, which is never yielded.
        pending: that sample's members read so far (``{ext: bytes}``, with ``__key__``).
        complete: the whole samples yielded before it.
        member: the member whose data was cut, or None when the stream broke between members
            (at a header, or with no end-of-archive marker: the pending sample may be whole).
        after: the last member read whole.
    """

    def __init__(self, message: str, key: str, pending: dict, complete: int, member: str | None, after: str, url=None):
        self.pending, self.complete, self.member, self.after = pending, complete, member, after
        super().__init__(message, key, url)


def samples(stream: Any, url: str | None = None, read: Callable[[str], bool] | None = None) -> Iterator[dict]:
    """The complete samples of one tar stream: ``{"__key__", "__url__", ext: bytes, ...}``.

    A sample is yielded only once the next key (or the end-of-archive marker) shows it complete,
    so a shard cut inside a sample, or between members, never yields the part before the cut.

    Args:
        stream: a readable file object (read forward only; never closed here).
        url: the shard's URL, set as ``__url__`` and in errors.
        read: which extensions to read; the others become a ``Span`` (uncompressed shards
            only). Default: read every member.

    Raises:
        FormatError: a sample that repeats an extension.
        ShardCut: the stream breaks after its first member (see ``ShardCut``).
        tarfile.ReadError, OSError: the stream is not a tar file, or breaks before any member;
            or it is compressed and ``read`` leaves members to be read in place later.
    """
    sample: dict | None = None
    complete, reading, after = 0, None, ""
    members = iter_members(stream)
    while True:
        try:
            member = next(members, None)
            if member is None:
                break
            key, ext = base_plus_ext(member.name)
            if key is None or _META.match(member.name):
                continue
            if sample is None or key != sample["__key__"]:
                if sample is not None:
                    yield sample  # complete: a member of the next sample has begun
                    complete += 1
                sample = {"__key__": key, "__url__": url}
            ext = ext.lower()
            if ext in sample:
                raise FormatError(f"member {member.name!r} repeats extension {ext!r}", key, url)
            if read is None or read(ext):
                reading = member.name
                sample[ext] = member.read()
                reading = None
            elif member.offset is None:  # a compressed stream: nothing to read in place later
                break
            else:
                sample[ext] = Span(member.offset, member.size)
            after = member.name
        except _STREAM_ERRORS as exc:
            if sample is None:
                raise
            raise ShardCut(error_text(exc), sample["__key__"], sample, complete, reading, after, url) from exc
    if member is not None:
        raise tarfile.ReadError("a compressed shard, whose members cannot be read in place; expected a plain .tar")
    if sample is not None:
        yield sample  # iter_members ended at the end-of-archive marker: the shard is whole


def members_of(sample: Mapping[str, Any]) -> list[str]:
    """A sample's member extensions (for messages)."""
    return sorted(k for k in sample if not k.startswith("__"))


def image_member(sample: Mapping[str, Any]) -> tuple[str, Any] | None:
    """(extension, value) of a sample's image: its first member of ``IMAGE_EXTS``; None without one."""
    for ext in IMAGE_EXTS:
        value = sample.get(ext)
        if value is not None:
            return ext, value
    return None


def image_bytes(sample: Mapping[str, Any]) -> bytes:
    """A sample's image bytes.

    Raises:
        FormatError: the sample has no image member (its members are listed).
    """
    found = image_member(sample)
    if found is None:
        raise FormatError(f"no image member ({'/'.join(IMAGE_EXTS)}); members: {members_of(sample)}")
    return found[1]


class HashingReader(io.RawIOBase):
    """A read-only stream that hashes (sha256) and counts every byte read through it."""

    def __init__(self, stream: Any):
        super().__init__()
        self.stream = stream
        self.sha256 = hashlib.sha256()
        self.count = 0
        self._readinto = getattr(stream, "readinto", None)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if self._readinto is not None:
            n = self._readinto(buffer) or 0
            data = memoryview(buffer)[:n]
        else:
            data = self.stream.read(len(buffer))
            n = len(data)
            memoryview(buffer).cast("B")[:n] = data
        self.sha256.update(data)
        self.count += n
        return n

    def hexdigest(self) -> str:
        return self.sha256.hexdigest()

    def drain(self) -> None:
        """Read (and hash) the rest of the stream."""
        while self.read(1 << 20):
            pass


def image_ext(name: str) -> str:
    """An image file's or member's extension as shards store it: lower case, ``jpeg`` as ``jpg``."""
    ext = name.rsplit(".", 1)[-1].lower()
    return "jpg" if ext == "jpeg" else ext


def sample_label(sample: Mapping[str, Any]) -> int:
    """A plain webdataset sample's class: its ``cls`` member (an integer as text), else ``json["label"]``.

    Raises:
        ValueError: what is wrong with the label, for the caller to say where.
    """
    if "cls" in sample:
        text = sample["cls"].decode("ascii", "replace").strip()
        if not _INTEGER.fullmatch(text):  # what int() takes besides: "+3", "1_0", other scripts' digits
            raise ValueError(f"cls {text[:20]!r} is not an integer")
        label = int(text)
    elif "json" in sample:
        try:
            meta = json.loads(sample["json"] or b"null")
        except ValueError as exc:
            raise ValueError(f"its json member is not JSON ({exc})") from None
        label = meta.get("label") if isinstance(meta, dict) else None
        if type(label) is not int:
            raise ValueError("its json member has no integer 'label'")
    else:
        raise ValueError("it has no 'cls' member or json 'label'")
    if label < 0:
        raise ValueError(f"label {label} is negative")
    return label


def local_shards(pattern: str) -> list[str]:
    """The local paths a shard pattern names: braces expanded, then each glob matched (sorted)."""
    import braceexpand

    paths: list[str] = []
    for part in braceexpand.braceexpand(pattern):
        paths.extend(sorted(glob.glob(part)) if any(c in part for c in "*?[") else [part])
    return paths


# ----------------------------------------------------------------------------------------
# Keys

_MAX_KEY = 80


def sanitize_key(text: str) -> str:
    """A webdataset key from arbitrary text: only ``[A-Za-z0-9_-]``, no dots, at most 80 chars."""
    key = re.sub(r"[^A-Za-z0-9_-]+", "_", text).strip("_") or "x"
    if len(key) > _MAX_KEY:
        digest = hashlib.blake2b(text.encode(), digest_size=4).hexdigest()
        key = f"{key[: _MAX_KEY - 9]}_{digest}"
    return key


def unique_keys(raw: Sequence[str]) -> list[str]:
    """Sanitised keys, made unique deterministically (in order) with a numeric suffix."""
    seen: set[str] = set()
    out = []
    for text in raw:
        key = base = sanitize_key(text)
        n = 1
        while key in seen:
            n += 1
            key = f"{base}_{n}"
        seen.add(key)
        out.append(key)
    return out
