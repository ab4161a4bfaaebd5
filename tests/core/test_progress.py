"""Progress: a bar on a terminal, one line per finished shard in a log (and between, when slow); steps."""

from __future__ import annotations

import io

from wds_reinforce.core.progress import ShardProgress, StepProgress, eta, format_duration


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


def test_eta_is_the_rest_at_the_rate_so_far():
    assert eta(0, 100, 50.0) == "?"  # no rate yet
    assert eta(25, 100, 50.0) == "2m30s"  # 75 more at 0.5/s
    assert eta(5, 12, 41 * 60) == "57m24s"  # the demo's teacher at epoch 5/12 after 41 minutes
    assert eta(100, 100, 50.0) == "0s"


def test_a_long_shard_gets_a_line_every_between_seconds_in_a_log():
    now = [0.0]
    lines: list[str] = []
    progress = ShardProgress(2400, 4, say=lines.append, clock=lambda: now[0], between=30.0)
    now[0] = 20.0
    progress.update(100)
    assert lines == []  # not yet 30 s without a line
    now[0] = 30.0
    progress.update(50)
    now[0] = 31.0
    progress.update(50)  # 1 s after that line: no second one
    assert lines == ["reinforce: shard 1/4 in progress; 150/2400 samples (6 %), 5.0 samples/s, elapsed 30s, ETA 7m30s"]
    now[0] = 45.0
    progress.update(400)
    progress.shard_done("train-000000.tar")
    now[0] = 74.0
    progress.update(10)  # 29 s after the shard's line
    assert len(lines) == 2 and lines[1].startswith("reinforce: shard 1/4 done (train-000000.tar)")


def test_steps_within_an_epoch_get_a_line_every_few_seconds():
    now = [1000.0]
    lines: list[str] = []
    progress = StepProgress(epochs=3, steps=100, say=lines.append, every=30.0, clock=lambda: now[0])
    progress.start(1)  # the second epoch
    for _ in range(40):
        now[0] += 1.0
        progress.step()
    assert lines == [
        "  epoch 2/3: step 30/100 (30 %), 1.00 steps/s, elapsed 30s, "
        "ETA 1m10s for the epoch, 2m50s for the run's training steps"
    ]
    progress.start(2)  # a new epoch counts afresh
    now[0] += 29.0
    progress.step()
    assert len(lines) == 1
    unknown = StepProgress(epochs=1, steps=None, say=lines.append, every=0.0, clock=lambda: now[0])
    unknown.start(0)
    now[0] += 4.0
    unknown.step(2)
    assert lines[-1] == "  epoch 1/1: step 2, 0.50 steps/s, elapsed 4s"
