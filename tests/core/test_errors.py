"""The two kinds of error, and the handlers that tell them apart."""

from __future__ import annotations

import pytest

from wds_reinforce.core.errors import (
    DataError,
    DecodeError,
    FormatError,
    MismatchError,
    SampleError,
    UsageError,
    VersionError,
)
from wds_reinforce.read.loader import SkipCounter


def test_hierarchy():
    for cls in (FormatError, VersionError, DecodeError, SampleError, MismatchError):
        assert issubclass(cls, DataError)
    assert not issubclass(UsageError, DataError)
    # Both stay ValueErrors, so ``except ValueError`` in user code keeps working.
    assert issubclass(DataError, ValueError) and issubclass(UsageError, ValueError)


def test_messages_name_the_place_once():
    assert str(FormatError("bad", "k1")) == "k1: bad"
    assert str(SampleError("bad", "k1", "s/0.tar")) == "s/0.tar: sample 'k1': bad"
    located = FormatError("bad").located("k1", "s/0.tar")
    assert isinstance(located, FormatError) and str(located) == "s/0.tar: sample 'k1': bad"
    assert (located.key, located.url) == ("k1", "s/0.tar")
    again = located.located("k2", "other.tar")  # a located error keeps its place
    assert str(again) == "s/0.tar: sample 'k1': bad"
    version = VersionError("unknown version 9", version=9).located("k", "u")
    assert (
        isinstance(version, VersionError)
        and version.version == 9
        and str(version) == "u: sample 'k': unknown version 9"
    )


def test_wrapping_keeps_data_errors_and_wraps_the_rest():
    err = SampleError.of(DecodeError("cannot decode"), "k", "u")
    assert type(err) is DecodeError and str(err) == "u: sample 'k': cannot decode"
    wrapped = SampleError.of(OSError("disk on fire"), "k", "u")
    assert type(wrapped) is SampleError and "OSError: disk on fire" in str(wrapped)
    assert isinstance(wrapped.__cause__, OSError)


@pytest.mark.parametrize(
    "bug", [UsageError("expected p in [0, 1]"), TypeError("bad type"), RuntimeError("kernel"), KeyError("round")]
)
def test_skip_counter_lets_bugs_and_usage_errors_propagate(bug):
    counter = SkipCounter()
    with pytest.raises(type(bug)):
        counter(bug)
    assert counter.count == 0 and counter.samples == 0


def test_skip_counter_skips_and_counts_data_errors():
    counter = SkipCounter()
    assert counter(DecodeError("x", "k", "u")) is True
    assert counter(SampleError("short shard", url="u", samples=3)) is True
    assert counter.count == 2 and counter.samples == 4
    assert "short shard" in counter.last
