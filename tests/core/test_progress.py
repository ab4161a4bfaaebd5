"""Progress: a bar on a terminal, one line per finished shard in a log."""

from __future__ import annotations

import io

from wds_reinforce.core.progress import ShardProgress, format_duration


def test_a_log_gets_one_line_per_shard_with_count_rate_and_eta():
    now = [100.0]
    log = io.StringIO()
    progress = ShardProgress(3000, 3, stream=log, clock=lambda: now[0])
    progress.update(1000)
    now[0] += 20.0
    progress.shard_done("train-000000.tar")
    progress.update(1000)
    now[0] += 20.0
    progress.shard_done("train-000001.tar")
    progress.close()
    lines = log.getvalue().splitlines()
    assert lines == [
        "reinforce: shard 1/3 done (train-000000.tar); 1000/3000 samples (33 %), 50.0 samples/s, elapsed 20s, ETA 40s",
        "reinforce: shard 2/3 done (train-000001.tar); 2000/3000 samples (67 %), 50.0 samples/s, elapsed 40s, ETA 20s",
    ]
    assert "\r" not in log.getvalue()


def test_a_restart_counts_only_what_is_left():
    now = [0.0]
    log = io.StringIO()
    progress = ShardProgress(3000, 3, stream=log, clock=lambda: now[0])
    now[0] += 50.0  # finding the finished shards
    progress.restart(1000, 1)  # two of the three were kept
    progress.update(1000)
    now[0] += 10.0
    progress.shard_done("train-000002.tar")
    assert log.getvalue().splitlines() == [
        "reinforce: shard 1/1 done (train-000002.tar); 1000/1000 samples (100 %), 100.0 samples/s, elapsed 10s, ETA 0s"
    ]


def test_a_terminal_gets_a_bar_and_no_lines():
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    term = Terminal()
    progress = ShardProgress(10, 1, stream=term)
    progress.update(10)
    progress.shard_done("train-000000.tar")
    progress.close()
    assert "reinforce" in term.getvalue() and "shard 1/1 done" not in term.getvalue()


def test_durations():
    assert [format_duration(s) for s in (0, 42.4, 61, 3599, 3600 * 2 + 180)] == [
        "0s",
        "42s",
        "1m01s",
        "59m59s",
        "2h03m",
    ]
