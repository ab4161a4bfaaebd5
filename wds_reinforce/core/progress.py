"""Progress reports that read well both on a terminal and in a log file.

On a terminal: a tqdm bar. Elsewhere (a log file, a pipe, a batch job): no carriage-return
updates, but one line per finished shard with the count, the rate and the time left.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

__all__ = ["ShardProgress", "format_duration"]


def format_duration(seconds: float) -> str:
    """``42s``, ``11m50s``, ``2h03m``."""
    s = max(0, int(round(seconds)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


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
    ):
        self.items, self.shards, self.desc, self.unit = items, shards, desc, unit
        self.stream = sys.stderr if stream is None else stream
        self.clock = clock
        self.start = clock()
        self.done_items = 0
        self.done_shards = 0
        self.bar = None
        if _is_tty(self.stream) if tty is None else tty:
            from tqdm import tqdm

            self.bar = tqdm(total=items, unit="img", desc=desc, dynamic_ncols=True, file=self.stream)

    def update(self, n: int = 1) -> None:
        self.done_items += n
        if self.bar is not None:
            self.bar.update(n)

    def shard_done(self, name: str) -> None:
        """Report a finished shard (a line when not on a terminal)."""
        self.done_shards += 1
        if self.bar is None:
            print(self.line(name), file=self.stream, flush=True)

    def line(self, name: str) -> str:
        elapsed = max(self.clock() - self.start, 1e-9)
        rate = self.done_items / elapsed
        left = self.items - self.done_items
        eta = format_duration(left / rate) if rate > 0 else "?"
        pct = 100.0 * self.done_items / self.items if self.items else 100.0
        return (
            f"{self.desc}: shard {self.done_shards}/{self.shards} done ({name}); "
            f"{self.done_items}/{self.items} {self.unit} ({pct:.0f} %), {rate:.1f} {self.unit}/s, "
            f"elapsed {format_duration(elapsed)}, ETA {eta}"
        )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
