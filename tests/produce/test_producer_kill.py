"""A killed producer takes its DataLoader workers with it.

A real ``tools/make_shards.py`` process with two workers is SIGKILLed while it works; each worker
must be gone within seconds. Without the parent-death signal the workers noticed only at their
next queue poll (up to 5 s), and often hung for minutes on a queue no one reads, holding memory
and, under torchrun, the launcher's stdout.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.producer_data import cli_args, make_image_folder

ROOT = Path(__file__).resolve().parents[2]
WORKERS_DEADLINE_S = 60.0  # to start: python, torch and timm imports, the teacher
GONE_DEADLINE_S = 2.0  # after the kill; the kernel signals at once, a poll loop took up to 5 s

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="the parent-death signal and /proc are Linux's"
)


def _stat(pid: int) -> tuple[str, int, int] | None:
    """(state, ppid, start time) of a process, or None when it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = text[text.rindex(")") + 2 :].split()  # after "pid (comm) "; comm may hold spaces
    return fields[0], int(fields[1]), int(fields[19])


def _children(pid: int) -> dict[int, int]:
    """Live child pids of ``pid`` -> their start times (to tell a reused pid apart)."""
    out = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            stat = _stat(int(entry))
            if stat is not None and stat[1] == pid and stat[0] != "Z":
                out[int(entry)] = stat[2]
    return out


def _workers(pid: int) -> dict[int, int]:
    """The DataLoader workers under ``pid``: its children, or a forkserver's (Python >= 3.14's
    default), but not multiprocessing's helper processes themselves."""
    out = {}
    for child, start in _children(pid).items():
        try:
            cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
        except (FileNotFoundError, ProcessLookupError):
            continue
        if b"multiprocessing.forkserver" in cmdline:
            out.update(_children(child))
        elif b"multiprocessing.resource_tracker" not in cmdline:
            out[child] = start
    return out


def _alive(pid: int, start: int) -> bool:
    stat = _stat(pid)
    return stat is not None and stat[2] == start and stat[0] not in ("Z", "X")


def test_killed_producer_leaves_no_worker(tmp_path):
    source = make_image_folder(tmp_path / "src", per_class=20, corrupt=False)
    # Slow enough to be killed mid-run: many rounds of a larger image through the teacher.
    argv = cli_args(source, str(tmp_path / "out"), **{"--workers": 2, "--rounds": 64, "--image-size": 64})
    log = open(tmp_path / "producer.log", "wb")  # a file, not a pipe: a full pipe would stall it
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "tools" / "make_shards.py"), *argv],
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    workers: dict[int, int] = {}
    try:
        deadline = time.monotonic() + WORKERS_DEADLINE_S
        while len(workers) < 2:
            if proc.poll() is not None:
                output = (tmp_path / "producer.log").read_text(errors="replace")[-2000:]
                pytest.fail(f"the producer ended (rc {proc.returncode}) before its workers were seen:\n{output}")
            if time.monotonic() > deadline:
                pytest.fail(f"no 2 workers after {WORKERS_DEADLINE_S:.0f} s (children: {_children(proc.pid)})")
            workers = _workers(proc.pid)
            time.sleep(0.05)
        assert len(workers) == 2, workers

        proc.send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        proc.wait(timeout=10)
        assert proc.returncode == -signal.SIGKILL  # killed, not finished
        while any(_alive(pid, start) for pid, start in workers.items()):
            if time.monotonic() - killed_at > GONE_DEADLINE_S:
                left = [pid for pid, start in workers.items() if _alive(pid, start)]
                pytest.fail(f"workers {left} still alive {GONE_DEADLINE_S} s after the producer was killed")
            time.sleep(0.02)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pid, start in workers.items():  # only the workers this test's producer started
            if _alive(pid, start):
                os.kill(pid, signal.SIGKILL)
        log.close()


def test_a_worker_says_nothing_when_the_producer_hangs_up_mid_transfer():
    """Ctrl-C while the producer takes a batch: the worker's resource-sharer thread reports the
    broken connection through sys.excepthook; a producer worker drops exactly that report."""
    code = r"""
import multiprocessing.resource_sharer as rs, sys
from wds_reinforce.produce.workers import _quiet_hang_ups

_quiet_hang_ups()
# A function in resource_sharer.py's file that catches and reports as its serve loop does.
src = (
    "import sys\ndef serve(exc):\n    try:\n        raise exc\n"
    "    except BaseException:\n        sys.excepthook(*sys.exc_info())\n"
)
there, here = {}, {}
exec(compile(src, rs.__file__, "exec"), there)
exec(compile(src, "elsewhere.py", "exec"), here)
there["serve"](EOFError("peer went away"))
there["serve"](BrokenPipeError("peer went away"))
there["serve"](ValueError("a real bug in the serve loop"))
here["serve"](EOFError("an EOFError anywhere else"))
"""
    err = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stderr
    assert "peer went away" not in err
    assert "ValueError: a real bug in the serve loop" in err and "EOFError: an EOFError anywhere else" in err
