"""What a job's DataLoader workers run: replaying rounds, and the worker lifecycle.

Workers decode each source image once, sample the parameters of the rounds to make (seeded by
(seed, key, round)) and replay them; the main process runs the teacher. ``worker_loader`` builds
the DataLoader every job uses: one torch thread per worker (they replay next to the teacher),
and workers that die with the job's process (a parent-death signal) and stay quiet when it is
interrupted while taking a batch.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import signal
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from wds_reinforce.core.augment import Recipe, replay
from wds_reinforce.core.decode import SourceImage

__all__ = ["replay_rounds", "mix_items", "worker_loader", "worker_init_fn"]


def replay_rounds(
    data: bytes, key: str, rounds: Sequence[int], recipe: Recipe, seed: int
) -> tuple[dict[str, np.ndarray], torch.Tensor]:
    """One sample's parameters of ``rounds`` (columns, (len(rounds), width)) and its views (len(rounds), 3, H, W).

    Raises:
        DataError: the image cannot be decoded (or would decode to too many pixels).
    """
    src = SourceImage(data)
    params = recipe.sample_rounds(seed, key, rounds, src.size)
    pixels = torch.stack([replay(src, {c: v[t] for c, v in params.items()}, recipe) for t in range(len(rounds))])
    return params, pixels


def mix_items(window: Sequence[dict[str, Any]], recipe: Recipe, seed: int, rounds: Sequence[int]) -> None:
    """Mix one pairing window of job items (``key``, ``params`` columns, ``images``) in place:
    ``images`` become what the teacher sees, ``params`` gain the mixing columns, ``window`` is the
    sidecars' ``mw``."""
    keys = [item["key"] for item in window]
    mixed, columns, crc = recipe.mix.mix_window(seed, keys, [item["images"] for item in window], rounds)
    for item, views, cols in zip(window, mixed, columns):
        item["images"], item["params"], item["window"] = views, {**item["params"], **cols}, crc


def _identity(item: Any) -> Any:
    return item


def worker_loader(dataset: Any, workers: int, prefetch: int | None = None) -> torch.utils.data.DataLoader:
    """A DataLoader of single items (no batching) over ``dataset`` with the job's worker lifecycle."""
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=None,
        shuffle=False,
        num_workers=workers,
        collate_fn=_identity,
        worker_init_fn=worker_init_fn() if workers else None,
        prefetch_factor=prefetch if workers else None,
        persistent_workers=False,
    )


_PR_SET_PDEATHSIG = 1  # linux/prctl.h
_log = logging.getLogger(__name__)


def worker_init_fn() -> functools.partial[None]:
    """The DataLoader's ``worker_init_fn``: picklable (for spawn), carrying the parent's pid."""
    if not sys.platform.startswith("linux"):
        _note_no_death_signal()
    # A worker's parent is this process under fork and spawn. Under forkserver it is the server,
    # which exits when this process dies and so passes the signal on: no pid to compare (0).
    method = torch.multiprocessing.get_start_method(allow_none=True)  # never fix the global method here
    method = method or torch.multiprocessing.get_all_start_methods()[0]
    parent = 0 if method == "forkserver" else os.getpid()
    return functools.partial(_worker_init, parent)


@functools.cache
def _note_no_death_signal() -> None:
    _log.debug(
        "no parent-death signal on %s: DataLoader workers of a killed producer exit at their next "
        "queue poll instead of at once",
        sys.platform,
    )


def _worker_init(parent: int, _: int) -> None:
    _die_with_parent(parent)
    _quiet_hang_ups()
    # Workers replay on the CPU next to the teacher: one thread each avoids oversubscription.
    torch.set_num_threads(1)


def _quiet_hang_ups() -> None:
    """Keep a worker silent when the producer hangs up in the middle of taking a batch (Ctrl-C).

    A worker hands its tensors over through multiprocessing's resource sharer: a thread that
    serves each storage's file descriptor when the producer asks for it. Interrupted while asking,
    the producer closes the connection, and that thread reports the broken connection through
    ``sys.excepthook``: a traceback under the producer's one-line "interrupted" message. Only that
    report is dropped (an ``EOFError`` or ``OSError`` raised in ``resource_sharer``'s serve loop).
    """
    report = sys.excepthook

    def hook(kind: type[BaseException], value: BaseException, tb: Any) -> None:
        if issubclass(kind, (EOFError, OSError)) and tb is not None:
            if tb.tb_frame.f_code.co_filename.endswith(os.path.join("multiprocessing", "resource_sharer.py")):
                return
        report(kind, value, tb)

    sys.excepthook = hook


def _die_with_parent(parent: int) -> None:
    """Have the kernel SIGKILL this worker when the producer dies (Linux; a no-op elsewhere).

    Without it a worker of a SIGKILLed producer lives on until its next queue poll, or hangs on a
    queue nobody reads, holding its memory and, under torchrun, the launcher's stdout. The kernel
    sends it when the thread that started the worker ends; the producer starts and drains its
    DataLoader in one thread, which outlives the workers unless it is killed.
    """
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        _log.debug("prctl(PR_SET_PDEATHSIG) failed: %s", os.strerror(ctypes.get_errno()))
        return
    if parent and os.getppid() != parent:  # the parent died before prctl: no one will signal us
        os._exit(1)
