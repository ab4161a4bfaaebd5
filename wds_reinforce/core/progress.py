"""Progress reports that read well both on a terminal and in a log file.

On a terminal: a tqdm bar. Elsewhere (a log file, a pipe, a batch job): no carriage-return
updates, but one line per finished shard with the count, the rate and the time left, and one
between shards when a shard takes long (so a slow run and a stalled one look different). Every
job that writes shards (the producer's, the importers') reports through ``ShardProgress``; a
caller that wants the lines itself (a library user, a test) passes ``say``. ``StepProgress`` does
the same for a training loop's steps. ``SidecarBytes`` says what a data set's sidecars take, the
same way for the producer and the importers.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TextIO

__all__ = ["ShardProgress", "StepProgress", "SidecarBytes", "TAR_MEMBER_OVERHEAD", "eta", "format_duration"]

TAR_MEMBER_OVERHEAD = 512  # a tar member's header; its data is padded to a multiple of 512 too


def format_duration(seconds: float) -> str:
    """``42s``, ``11m50s``, ``2h03m``."""
    s = max(0, int(round(seconds)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def eta(done: float, total: float, elapsed: float) -> str:
    """The time ``total - done`` more take at the rate so far (``done`` in ``elapsed`` s); ``?`` before any."""
    if done <= 0 or elapsed <= 0:
        return "?"
    return format_duration(max(total - done, 0) * elapsed / done)


def _is_tty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


class ShardProgress:
    """Counts items (samples) over a run of shards; a bar on a terminal, a line per shard elsewhere.

    Args:
        items: samples this run will process.
        shards: shards this run will make.
        desc: what the run is called in the report.
        unit: what an item is called.
        stream: where to write (default ``sys.stderr``).
        tty: force the terminal (True) or log (False) form; default: ask ``stream``.
        clock: seconds, for tests.
        say: where lines go instead of ``stream`` (then never a bar).
        every: ``note`` writes at most one line per this many seconds (unless forced).
        between: in a log, a line within a shard once this many seconds passed without one.
    """

    def __init__(
        self,
        items: int,
        shards: int,
        desc: str = "reinforce",
        unit: str = "samples",
        stream: TextIO | None = None,
        tty: bool | None = None,
        clock: Callable[[], float] = time.monotonic,
        say: Callable[[str], None] | None = None,
        every: float = 10.0,
        between: float = 30.0,
    ):
        self.items, self.shards, self.desc, self.unit = items, shards, desc, unit
        self.stream = sys.stderr if stream is None else stream
        self.clock = clock
        self.start = self._noted = self._lined = clock()
        self.every, self.between = every, between
        self.done_items = 0
        self.done_shards = 0
        self.bar = None
        self._say = say
        if say is None and (_is_tty(self.stream) if tty is None else tty):
            from tqdm import tqdm

            self.bar = tqdm(total=items, unit=unit, desc=desc, dynamic_ncols=True, file=self.stream)

    def started(self) -> None:
        """In a log, a first line now (the first finished shard may be minutes away)."""
        if self.bar is None:
            self._write(f"{self.desc}: started, {self.shards} shards ({self.items} {self.unit}) to make")

    def restart(self, items: int, shards: int) -> None:
        """Count afresh from now: ``items`` and ``shards`` are what is left to make (after reuse)."""
        self.items, self.shards, self.done_items, self.done_shards = items, shards, 0, 0
        self.start = self._lined = self.clock()
        if self.bar is not None:
            self.bar.reset(total=items)

    def update(self, n: int = 1) -> None:
        self.done_items += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.clock() - self._lined >= self.between:
            self._write(self._status(f"shard {self.done_shards + 1}/{self.shards} in progress"))

    def shard_done(self, name: str) -> None:
        """Report a finished shard (a line when not on a terminal)."""
        self.done_shards += 1
        if self.bar is None:
            self._write(self.line(name))

    def due(self) -> bool:
        """Whether a ``note`` would be written now (so that a caller can skip building it)."""
        return self.clock() - self._noted >= self.every

    def note(self, text: str, force: bool = False) -> None:
        """A line of its own (at most one per ``every`` seconds unless ``force``): above the bar, or in the log."""
        if force or self.due():
            self._noted = self.clock()
            if self.bar is not None:
                self.bar.write(text, file=self.stream)
            else:
                self._write(text)

    def _write(self, line: str) -> None:
        self._lined = self.clock()
        if self._say is not None:
            self._say(line)
        else:
            print(line, file=self.stream, flush=True)

    def line(self, name: str) -> str:
        return self._status(f"shard {self.done_shards}/{self.shards} done ({name})")

    def _status(self, head: str) -> str:
        elapsed = max(self.clock() - self.start, 1e-9)
        rate = self.done_items / elapsed
        pct = 100.0 * self.done_items / self.items if self.items else 100.0
        return (
            f"{self.desc}: {head}; {self.done_items}/{self.items} {self.unit} ({pct:.0f} %), "
            f"{rate:.1f} {self.unit}/s, elapsed {format_duration(elapsed)}, "
            f"ETA {eta(self.done_items, self.items, elapsed)}"
        )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class StepProgress:
    """A line within a training epoch every ``every`` seconds: steps done / total, steps/s, the time left.

    Args:
        epochs: epochs of the run.
        steps: steps per epoch (``None``: not known; then no total and no ETA).
        say: where lines go (default: ``sys.stderr``, flushed).
        every: seconds between lines; each is a line of its own (no carriage return), for log files.
        clock: seconds, for tests.
    """

    def __init__(
        self,
        epochs: int,
        steps: int | None,
        say: Callable[[str], None] | None = None,
        every: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.epochs, self.steps, self.every, self.clock = epochs, steps, every, clock
        self._say = say if say is not None else (lambda line: print(line, file=sys.stderr, flush=True))
        self.epoch, self.done = 0, 0
        self.began = self._said = clock()

    def start(self, epoch: int) -> None:
        """A new epoch (0-based) begins now."""
        self.epoch, self.done = epoch, 0
        self.began = self._said = self.clock()

    def step(self, n: int = 1) -> None:
        self.done += n
        now = self.clock()
        if now - self._said >= self.every:
            self._said = now
            self._say(self.line(now))

    def line(self, now: float) -> str:
        elapsed = max(now - self.began, 1e-9)
        head = f"  epoch {self.epoch + 1}/{self.epochs}: step {self.done}"
        rate = f"{self.done / elapsed:.2f} steps/s, elapsed {format_duration(elapsed)}"
        if not self.steps:
            return f"{head}, {rate}"
        left_in_run = (self.epochs - self.epoch) * self.steps
        return (
            f"{head}/{self.steps} ({100.0 * self.done / self.steps:.0f} %), {rate}, "
            f"ETA {eta(self.done, self.steps, elapsed)} for the epoch, "
            f"{eta(self.done, left_in_run, elapsed)} for the run's training steps"
        )


@dataclass(frozen=True)
class SidecarBytes:
    """What a data set's sidecars take, for a summary: the encoded sidecars (payload) and the bytes
    they take in the tars (on disk: each member's 512-byte header and padding to 512 bytes, and for
    shards of sidecars alone the tar's end blocks).

    A self-contained sample has one sidecar member holding every round (``group_rounds`` =
    ``rounds``); a sidecar set has one per round group, of which an epoch reads one.
    """

    payload: int | None  # None: not recorded (shards made by an older version)
    on_disk: int
    members: int  # sidecar members counted (samples x round groups)
    group_rounds: int  # rounds per member
    rounds: int  # rounds per sample
    estimated: bool = False  # on_disk from the average padding (256 bytes a member), not counted
    alone: bool = False  # in tars of sidecars alone (a sidecar set): on_disk counts the tars' end too

    @property
    def payload_per_round(self) -> float:
        return (self.payload or 0) / max(self.members * self.group_rounds, 1)

    def lines(self) -> list[str]:
        """``sidecar: 24.4 B/round payload + 255.9 B/round tar overhead = 280.3 B/round on disk; ...``,
        and a line on what the overhead is."""
        rounds = max(self.members * self.group_rounds, 1)
        about = "~" if self.estimated else ""
        grouped = self.group_rounds < self.rounds
        plural = "s" if self.group_rounds > 1 else ""
        read = f"one group of {self.group_rounds} round{plural}" if grouped else f"all {self.rounds} rounds"
        epoch = f"an epoch reads {read}: {about}{self.on_disk / max(self.members, 1):.0f} B of sidecar per sample"
        if self.payload is None:
            return [f"sidecar: {about}{self.on_disk / rounds:.1f} B/round on disk with the tar overhead; {epoch}"]
        overhead = self.on_disk - self.payload
        each = "sample and round group" if grouped else "sample"
        end = ", and a share of the tar's end" if self.alone else ""
        why = "; larger groups pay it fewer times" if grouped else ""
        return [
            f"sidecar: {self.payload_per_round:.1f} B/round payload + {about}{overhead / rounds:.1f} B/round tar "
            f"overhead = {about}{self.on_disk / rounds:.1f} B/round on disk; {epoch}",
            f"  (tar overhead: {about}{overhead / max(self.members, 1):.0f} B per {each}: a sidecar member's "
            f"{TAR_MEMBER_OVERHEAD}-byte header and padding to {TAR_MEMBER_OVERHEAD} bytes{end}{why})",
        ]
