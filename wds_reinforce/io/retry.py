"""How remote reads retry, and when they give up: ``RetryPolicy``, ``Pace``, ``NetworkReadError``.

``RetryPolicy`` is read from the ``WDS_REINFORCE_*`` settings (listed, with their defaults, in
``remote``'s docstring). ``Pace`` is one read's clock: it abandons a response that is too slow
(the low-speed limit, as curl's ``--speed-limit``/``--speed-time``) and says when the read has
gone too long without good progress, across retries and backoff, to go on. A read that gives
up raises ``NetworkReadError``.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from wds_reinforce.core.errors import UsageError

__all__ = [
    "RETRIES",
    "BACKOFF",
    "BACKOFF_MAX",
    "TIMEOUT",
    "SPEED_LIMIT",
    "SPEED_TIME",
    "STALL_LIMIT",
    "RetryPolicy",
    "Pace",
    "NetworkReadError",
]

RETRIES = 5
BACKOFF = 0.5
BACKOFF_MAX = 8.0
TIMEOUT = 30.0
SPEED_LIMIT = 1000.0
SPEED_TIME = 30.0
STALL_LIMIT = 90.0  # + at most one TIMEOUT for a socket wait under way: a dead server costs <= 2 minutes

_JITTER = random.Random()  # private: backoff jitter must not touch (or depend on) the global RNG


def _env_number(name: str, default: float, kind: type, minimum: float) -> Any:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = kind(raw)
    except ValueError:
        value = None
    if value is None or not value >= minimum:  # (NaN too)
        word = "an integer" if kind is int else "a number"
        raise UsageError(f"expected {name} to be {word} >= {minimum}, got {raw!r}")
    return value


@dataclass(frozen=True)
class RetryPolicy:
    """How a ``ResumableReader`` retries, and when it gives up.

    Attributes:
        retries: retries allowed in a row without a byte of progress (0: fail at the first fault).
        backoff: seconds before the first retry, doubled for each further retry in a row.
        backoff_max: cap on one wait, in seconds.
        timeout: socket timeout in seconds (connect, and each read), HTTP and S3.
        speed_limit: bytes/s; a response slower than this over ``speed_time`` is a fault (0: no limit).
        speed_time: seconds over which a response's speed is averaged.
        stall_limit: seconds a read may go without good progress (``speed_limit * speed_time``
            bytes), across retries and backoff, before it gives up.
    """

    retries: int = RETRIES
    backoff: float = BACKOFF
    backoff_max: float = BACKOFF_MAX
    timeout: float = TIMEOUT
    speed_limit: float = SPEED_LIMIT
    speed_time: float = SPEED_TIME
    stall_limit: float = STALL_LIMIT

    @classmethod
    def from_env(cls) -> RetryPolicy:
        """The module defaults, overridden by ``WDS_REINFORCE_{RETRIES,BACKOFF,BACKOFF_MAX,TIMEOUT,
        SPEED_LIMIT,SPEED_TIME,STALL_LIMIT}``.

        Raises:
            UsageError: a setting that is not a number in its range.
        """
        return cls(
            retries=_env_number("WDS_REINFORCE_RETRIES", RETRIES, int, 0),
            backoff=_env_number("WDS_REINFORCE_BACKOFF", BACKOFF, float, 0.0),
            backoff_max=_env_number("WDS_REINFORCE_BACKOFF_MAX", BACKOFF_MAX, float, 0.0),
            timeout=_env_number("WDS_REINFORCE_TIMEOUT", TIMEOUT, float, 0.001),
            speed_limit=_env_number("WDS_REINFORCE_SPEED_LIMIT", SPEED_LIMIT, float, 0.0),
            speed_time=_env_number("WDS_REINFORCE_SPEED_TIME", SPEED_TIME, float, 0.001),
            stall_limit=_env_number("WDS_REINFORCE_STALL_LIMIT", STALL_LIMIT, float, 0.001),
        )

    def delay(self, failure: int) -> float:
        """Seconds to wait before retry number ``failure`` (1-based) of a streak: jittered to 50-100 %."""
        base = min(self.backoff * 2.0 ** min(failure - 1, 62), self.backoff_max)
        return base * (0.5 + 0.5 * _JITTER.random())


class Pace:
    """One read's clock: the low-speed limit per response, and the bound on going without good progress.

    Only time spent inside the reader counts (between ``enter`` and ``leave``: reading, opening,
    backoff), never the time a consumer takes between two reads. Good progress is
    ``speed_limit * speed_time`` bytes received since the last good progress (or the read's
    start); ``overdue`` says when ``stall_limit`` seconds went by without it. A response (from
    ``attempt``) that gets fewer than ``speed_limit`` bytes/s averaged over ``speed_time``
    seconds or more is too slow (``arrived`` says why).
    """

    def __init__(self, policy: RetryPolicy, clock: Callable[[], float] = time.monotonic):
        self.policy = policy
        self._clock = clock
        self._quota = policy.speed_limit * policy.speed_time
        self._spent = 0.0  # seconds inside the reader before the current entry
        self._entered: float | None = None
        self._good_at = 0.0  # on the reader's own time
        self._banked = 0  # bytes received since then
        self._window_at, self._window_bytes = 0.0, 0

    def enter(self) -> None:
        self._entered = self._clock()

    def leave(self) -> None:
        if self._entered is not None:
            self._spent += self._clock() - self._entered
            self._entered = None

    def now(self) -> float:
        """Seconds spent inside the reader so far."""
        return self._spent + (self._clock() - self._entered if self._entered is not None else 0.0)

    def attempt(self) -> None:
        """A new request starts: its speed is measured from here."""
        self._window_at, self._window_bytes = self.now(), 0

    def arrived(self, n: int) -> str | None:
        """Count ``n`` bytes received; the reason to abandon the response as too slow, or None."""
        now = self.now()
        self._banked += n
        if n and self._banked >= self._quota:
            self._good_at, self._banked = now, 0
        self._window_bytes += n
        elapsed = now - self._window_at
        if elapsed < self.policy.speed_time:
            return None
        if self._window_bytes < self.policy.speed_limit * elapsed:
            return (
                f"slower than {self.policy.speed_limit:g} bytes/s ({self._window_bytes} bytes in {elapsed:.1f} s;"
                " WDS_REINFORCE_SPEED_LIMIT)"
            )
        self._window_at, self._window_bytes = now, 0
        return None

    def stalled(self) -> float:
        """Seconds since the last good progress."""
        return self.now() - self._good_at

    def overdue(self, wait: float = 0.0) -> bool:
        """Whether ``stall_limit`` has passed without good progress (or will have after ``wait`` more seconds)."""
        return self.stalled() + wait > self.policy.stall_limit


class NetworkReadError(OSError):
    """A network read that still failed after the allowed retries, or too long without good progress.

    Attributes:
        url: the URL; offset: the byte it stopped at; attempts: requests tried in the last streak;
        cause: the last fault, as text (the exception itself is ``__cause__``).
    """

    def __init__(self, message: str, url: str = "", offset: int = 0, attempts: int = 0, cause: str = ""):
        super().__init__(message)  # one argument: picklable, and what DataLoader's re-raise passes
        self.url, self.offset, self.attempts, self.cause = url, offset, attempts, cause
