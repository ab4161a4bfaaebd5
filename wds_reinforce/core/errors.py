"""The two kinds of error: bad data (skippable) and bad usage (never skipped).

``DataError`` and its subclasses mean the bytes are wrong: a sidecar that does not decode, an
image that cannot be decoded, a shard that is short or missing. A ``handler=`` such as
``read.options.SkipCounter`` may skip the samples they cost and go on. ``UsageError`` means the
caller is wrong (a bad argument, a recipe this version cannot replay): skipping would hide it,
so no handler ever does. Anything else (``TypeError``, ``RuntimeError`` from a kernel, ...) is
a bug and propagates as it is.

Both derive from ``ValueError``, as before this module existed, so ``except ValueError`` in
user code keeps working; handlers tell them apart by class.

This module is the bottom of the import graph: it imports nothing from the package.
"""

from __future__ import annotations

import re
from typing import Any

__all__ = [
    "DataError",
    "FormatError",
    "VersionError",
    "DecodeError",
    "SampleError",
    "MismatchError",
    "MetadataError",
    "UsageError",
    "check_int",
    "check_split",
    "error_text",
]


class DataError(ValueError):
    """Bad or missing data. Carries where it was found, when known.

    Attributes:
        key: the sample key, or None (a shard- or file-level problem).
        url: the shard URL (or file), or None.
        samples: how many of the data set's samples the problem cost (a truncated shard can lose several).
        foreign: how many samples it refused that were not the data set's at that place (another
            shard's, a repeat, one past the shard's end): read, but none of the samples it should hold.
    """

    def __init__(
        self, message: str, key: str | None = None, url: str | None = None, samples: int = 1, foreign: int = 0
    ):
        self.key, self.url, self.samples, self.foreign = key, url, samples, foreign
        self.message = message
        super().__init__(_where(key, url) + message)

    def located(self, key: str | None, url: str | None) -> DataError:
        """This error with ``key`` and ``url`` filled in where it had none (same class, same cause)."""
        if (self.key is not None or key is None) and (self.url is not None or url is None):
            return self
        err = type(self).__new__(type(self))
        err.__dict__.update(self.__dict__)
        key = self.key if self.key is not None else key
        DataError.__init__(err, self.message, key, self.url or url, self.samples, self.foreign)
        # The same story as the original: where it was raised, and what it was raised from.
        err.__traceback__ = self.__traceback__
        err.__context__ = self.__context__
        if self.__cause__ is not None or self.__suppress_context__:
            err.__cause__ = self.__cause__
        return err


def _where(key: str | None, url: str | None) -> str:
    where = f"{url}: " if url else ""
    if key is not None:
        where += f"sample {key!r}: " if url else f"{key}: "
    return where


class FormatError(DataError):
    """Bytes that are not a valid sidecar or manifest of a version this reader knows."""


class VersionError(FormatError):
    """A sidecar or manifest of a format version this reader does not know (``.version``)."""

    def __init__(self, message: str, key: str | None = None, version: Any = None, url: str | None = None):
        self.version = version
        super().__init__(message, key, url)


class DecodeError(DataError):
    """Encoded image bytes that cannot be decoded (or would decode to too many pixels)."""


class SampleError(DataError):
    """Bad data in one sample or shard, found by a loader stage (key and shard URL attached)."""

    @classmethod
    def of(cls, exc: BaseException, key: str | None, url: str | None) -> DataError:
        """``exc`` as a located ``DataError``: data errors keep their class, others are wrapped."""
        if isinstance(exc, DataError):
            return exc.located(key, url)
        err = cls(f"{type(exc).__name__}: {exc}", key, url)
        err.__cause__ = exc
        return err


class MismatchError(SampleError):
    """Shards made with a format version or recipe other than this reader's or the manifest's.

    Raised at the first sample a stage sees, whatever the ``handler``: it means the whole data
    set is not what the manifest describes, not that one sample is damaged.
    """


class UsageError(ValueError):
    """A bad argument or setting, found before any work starts; never skipped by a handler."""


def check_int(name: str, value: Any, minimum: int = 1) -> int:
    """``value``, an integer (not a bool) of at least ``minimum``; else a ``UsageError`` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise UsageError(f"expected {name} an integer >= {minimum}, got {value!r}")
    return value


def check_split(split: Any) -> str:
    """``split``, a name that can begin shard names (``SPLIT-000000.tar``): no dots or slashes."""
    if not isinstance(split, str) or not split or "." in split or "/" in split:
        raise UsageError(f"expected split a name without dots or slashes, got {split!r}")
    return split


def error_text(exc: BaseException, whole: bool = False) -> str:
    """An error as reports and manifests show it, ``Type: message``: the message's first line
    unless ``whole``, and no object addresses (which would differ between runs)."""
    if whole:
        text = str(exc)
    else:
        text = str(exc.args[0]) if exc.args and isinstance(exc.args[0], str) else str(exc)
        text = text.splitlines()[0] if text else type(exc).__name__
    return f"{type(exc).__name__}: {re.sub(r' at 0x[0-9a-fA-F]+', '', text)}"


class MetadataError(DataError):
    """A record or file that cannot be read, or holds something other than its format's plain values."""
