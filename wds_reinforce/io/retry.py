"""How remote reads retry, and when they give up: ``RetryPolicy``, ``Pace``, ``Watch``, ``NetworkReadError``.

The policy (read from the environment each time a stream is opened; ``storage.check_settings``
checks it):

- ``WDS_REINFORCE_RETRIES`` (default 5): retries allowed in a row without getting a byte further;
  any progress starts the count again, so a long shard survives any number of spaced-out faults.
- ``WDS_REINFORCE_BACKOFF`` (0.5 s): the first wait, doubled at each retry in a row ...
- ``WDS_REINFORCE_BACKOFF_MAX`` (8 s): ... up to this (each wait is jittered to 50-100 %).
- ``WDS_REINFORCE_TIMEOUT`` (30 s): socket timeout (connect, and each read), HTTP and S3; a
  silence that long is a fault.
- ``WDS_REINFORCE_SPEED_LIMIT`` (1000 bytes/s) and ``WDS_REINFORCE_SPEED_TIME`` (30 s): a
  response that brings fewer than SPEED_LIMIT bytes/s averaged over SPEED_TIME seconds is a
  fault (retried, resumed), as curl's ``--speed-limit``/``--speed-time``; 0 bytes/s: no limit.
- ``WDS_REINFORCE_STALL_LIMIT`` (90 s): the bound per object read. Good progress is the read
  averaging SPEED_LIMIT bytes/s or more since the last good progress, over SPEED_TIME seconds at
  least, whatever the reconnects. A read that goes STALL_LIMIT without it, across retries and
  backoff, gives up, even with retries left; a socket call blocked at that moment (a header or a
  chunk-size line trickled a byte at a time, endless ``100 Continue`` lines, a body read, a
  connect: no address gets longer than what is left) is ended by the watchdog. So a dead,
  trickling or too slow server is given up on within about STALL_LIMIT (90 s by default; only a
  name lookup is not bounded). Only time inside the reader counts, never a consumer's pause.

``Pace`` is one read's clock: it abandons a response that is too slow and says when the read has
gone too long without good progress. ``Watch`` ends the read's blocked socket calls from outside
the socket (one watchdog thread per process) through the connections of ``watched_opener``
(HTTP) and ``watch_s3_client`` (S3). A read that gives up raises ``NetworkReadError``.
"""

from __future__ import annotations

import functools
import http.client
import math
import os
import random
import socket
import sys
import threading
import time
import urllib.request
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
    "Watch",
    "watch_socket",
    "connect",
    "watched_opener",
    "watch_s3_client",
]

RETRIES = 5
BACKOFF = 0.5
BACKOFF_MAX = 8.0
TIMEOUT = 30.0
SPEED_LIMIT = 1000.0
SPEED_TIME = 30.0
STALL_LIMIT = 90.0  # a dead, trickling or too slow server costs about this (the watchdog ends a blocked call)

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
        stall_limit: seconds a read may go without good progress (averaging ``speed_limit`` over
            ``speed_time`` at least, see ``Pace``), across retries and backoff, before it gives up.
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
    backoff), never the time a consumer takes between two reads. Good progress is the read (all
    its responses together) having averaged ``speed_limit`` bytes/s or more since the last good
    progress (or the read's start), over ``speed_time`` seconds at least: ``speed_limit *
    max(elapsed, speed_time)`` bytes. ``overdue`` says when ``stall_limit`` seconds went by
    without it, so a read that stays under the limit ends, however often it reconnects. A
    response (from ``attempt``) that gets fewer than ``speed_limit`` bytes/s averaged over
    ``speed_time`` seconds or more is too slow (``arrived`` says why).
    """

    def __init__(self, policy: RetryPolicy, clock: Callable[[], float] = time.monotonic):
        self.policy = policy
        self._clock = clock
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
        limit = self.policy.speed_limit
        self._banked += n
        if n and self._banked >= limit * max(now - self._good_at, self.policy.speed_time):
            self._good_at, self._banked = now, 0
        self._window_bytes += n
        elapsed = now - self._window_at
        if elapsed < self.policy.speed_time:
            return None
        if self._window_bytes < limit * elapsed:
            got = f"{self._window_bytes} bytes in {elapsed:.1f} s"
            return f"slower than {limit:g} bytes/s ({got}; WDS_REINFORCE_SPEED_LIMIT)"
        self._window_at, self._window_bytes = now, 0
        return None

    def stalled(self) -> float:
        """Seconds since the last good progress."""
        return self.now() - self._good_at

    def left(self) -> float:
        """Seconds (of the reader's time) until ``overdue``, unless good progress comes first."""
        return self.policy.stall_limit - self.stalled()

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


# ----------------------------------------------------------------------------------------
# The watchdog: a socket call blocked past the read's bound is ended from outside the socket


_local = threading.local()  # .watch: the Watch of the read under way on this thread, if any


class Watch:
    """Ends a read's blocked socket calls once the read is overdue, whatever the socket is waiting for.

    A socket timeout only bounds one silence: a server that sends a header byte, a ``100 Continue``
    or a chunk-size byte every few seconds keeps a call (``urlopen``, ``get_object``, ``read1``)
    blocked for ever. While armed (``with watch:``, on the reader's thread), the sockets that the
    read's connections open are attached (a duplicate of each, ``attach``); the process's watchdog
    thread shuts them down when ``left()`` reaches 0 (``fired``: and so does ``attach`` from then
    on), which turns the blocked call into an error or an early end of data (``cut``).
    """

    def __init__(self, left: Callable[[], float]):
        self.left = left  # seconds until the read is overdue; called from the watchdog thread too
        self.fired = self._cut = False
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._outer: Watch | None = None

    def __enter__(self) -> Watch:
        self._outer, _local.watch = getattr(_local, "watch", None), self
        _watchdog().arm(self)
        return self

    def __exit__(self, *exc: object) -> None:
        _watchdog().disarm(self)
        _local.watch, self._outer = self._outer, None

    def attach(self, sock: socket.socket) -> None:
        """Watch ``sock`` (its connection, through a duplicate of its descriptor: valid when TLS wraps
        ``sock``, and a TLS socket itself cannot be ``dup``-ed)."""
        with self._lock:
            self._sockets.append(socket.fromfd(sock.fileno(), sock.family, sock.type))
            if self.fired:
                self._cut = _shut(self._sockets[-1]) or self._cut

    @property
    def cut(self) -> bool:
        """Whether a socket was shut down (read once the call it ended has returned: ``fire`` is over by then)."""
        with self._lock:
            return self._cut

    def release(self) -> None:
        """Stop watching the sockets attached so far (their responses are done with)."""
        with self._lock:
            sockets, self._sockets = self._sockets, []
        for sock in sockets:
            sock.close()

    def fire(self) -> None:
        with self._lock:
            self.fired = True  # first: a reader that sees the end of data its shutdown causes sees this too
            for sock in self._sockets:
                self._cut = _shut(sock) or self._cut


def _shut(sock: socket.socket) -> bool:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:  # not connected (any more): nothing is blocked on it
        return False
    return True


_SLACK = 0.05  # seconds a watch may fire late, rather than wake the watchdog at every arm


class _Watchdog:
    """One daemon thread per process that fires the armed watches that are due."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._armed: dict[Watch, float] = {}  # watch -> when it is due (time.monotonic())
        self._wake = math.inf
        self._thread: threading.Thread | None = None

    def arm(self, watch: Watch) -> None:
        due = time.monotonic() + watch.left()
        with self._cond:
            self._armed[watch] = due
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="wds_reinforce-watchdog", daemon=True)
                self._thread.start()
            elif due < self._wake - _SLACK:  # (not for the clock's jitter between two arms of one read)
                self._cond.notify()

    def disarm(self, watch: Watch) -> None:
        with self._cond:
            self._armed.pop(watch, None)

    def _run(self) -> None:
        with self._cond:
            while True:
                now = time.monotonic()
                for watch, due in list(self._armed.items()):
                    if due <= now:  # as planned; good progress since may have moved it on
                        due = self._armed[watch] = now + watch.left()
                    if due <= now:
                        del self._armed[watch]
                        watch.fire()
                self._wake = min(self._armed.values(), default=math.inf)
                self._cond.wait(None if self._wake == math.inf else self._wake - now)


_WATCHDOG: _Watchdog | None = None
_WATCHDOG_LOCK = threading.Lock()


def _watchdog() -> _Watchdog:
    global _WATCHDOG
    if _WATCHDOG is None:
        with _WATCHDOG_LOCK:
            if _WATCHDOG is None:
                _WATCHDOG = _Watchdog()
    return _WATCHDOG


def _after_fork() -> None:  # a forked child (a DataLoader worker) has no watchdog thread, and maybe a held lock
    global _WATCHDOG, _WATCHDOG_LOCK
    _WATCHDOG, _WATCHDOG_LOCK = None, threading.Lock()


os.register_at_fork(after_in_child=_after_fork)


def watch_socket(sock: socket.socket) -> None:
    """Attach ``sock`` to the watch of the read under way on this thread, if any."""
    watch = getattr(_local, "watch", None)
    if watch is not None:
        watch.attach(sock)


def connect(address: tuple[str, int], timeout: Any = None, source_address: Any = None, options: Any = ()) -> Any:
    """``socket.create_connection``, but no address's connect waits past the watched read's bound
    (a host with N addresses would otherwise cost N timeouts); the connected socket is watched."""
    host, port = address
    timeout = timeout if isinstance(timeout, (int, float)) else socket.getdefaulttimeout()
    watch: Watch | None = getattr(_local, "watch", None)
    error: OSError = OSError(f"getaddrinfo returned no address for {host}")
    for family, kind, proto, _, sockaddr in socket.getaddrinfo(host.strip("[]"), port, 0, socket.SOCK_STREAM):
        wait = timeout
        if watch is not None:
            left = watch.left()
            if left <= 0:
                raise TimeoutError(f"connecting to {host}:{port} timed out: the read is at its bound") from error
            wait = left if wait is None else min(wait, left)
        sock = socket.socket(family, kind, proto)
        try:
            for option in options or ():
                sock.setsockopt(*option)
            sock.settimeout(wait)
            if source_address:
                sock.bind(source_address)
            sock.connect(sockaddr)
            sock.settimeout(timeout)
            watch_socket(sock)
        except OSError as exc:
            sock.close()
            error = exc
            continue
        return sock
    raise error


# ----------------------------------------------------------------------------------------
# Watched connections: urllib's for HTTP, botocore's (urllib3) for S3


class _Connects:
    """http.client's connection, connecting through ``connect``."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._create_connection = connect


class _HTTPConnection(_Connects, http.client.HTTPConnection):
    pass


class _HTTPSConnection(_Connects, http.client.HTTPSConnection):
    pass


class _HTTPHandler(urllib.request.HTTPHandler):
    def http_open(self, req: Any) -> Any:
        return self.do_open(_HTTPConnection, req)


class _HTTPSHandler(urllib.request.HTTPSHandler):
    def https_open(self, req: Any) -> Any:
        return self.do_open(_HTTPSConnection, req, context=self._context)


def watched_opener() -> urllib.request.OpenerDirector:
    """urllib's default opener (proxies from the environment, redirects), its connections watched."""
    return urllib.request.build_opener(_HTTPHandler, _HTTPSHandler)


def watch_s3_client(client: Any) -> bool:
    """Make the connections ``client`` opens from now on watched, as ``watched_opener``'s are.

    False where botocore no longer has the private table this sets (its connection pool classes):
    then a blocked header read is bounded by the socket timeout only.
    """
    session = getattr(getattr(client, "_endpoint", None), "http_session", None)
    pools = getattr(session, "_pool_classes_by_scheme", None)
    if not isinstance(pools, dict):
        return False
    pools.update(_s3_pools())  # the proxy managers share this table
    return True


@functools.cache
def _s3_pools() -> dict[str, type]:
    import urllib3.exceptions as ue
    from botocore.awsrequest import AWSHTTPConnection, AWSHTTPConnectionPool, AWSHTTPSConnection, AWSHTTPSConnectionPool

    class Watched:  # a urllib3 connection: _new_conn as urllib3's, through connect()
        def _new_conn(self: Any) -> socket.socket:
            sys.audit("http.client.connect", self, self.host, self.port)
            try:
                return connect((self._dns_host, self.port), self.timeout, self.source_address, self.socket_options)
            except socket.gaierror as exc:
                raise ue.NameResolutionError(self.host, self, exc) from exc
            except TimeoutError as exc:
                raise ue.ConnectTimeoutError(self, f"Connection to {self.host} timed out: {exc}") from exc
            except OSError as exc:
                raise ue.NewConnectionError(self, f"Failed to establish a new connection: {exc}") from exc

        def request(self: Any, *args: Any, **kwargs: Any) -> Any:
            if self.sock is not None:  # a kept-alive connection (a new one is attached as it connects)
                watch_socket(self.sock)
            return super().request(*args, **kwargs)  # type: ignore[misc]

    class HTTPConnection(Watched, AWSHTTPConnection):
        pass

    class HTTPSConnection(Watched, AWSHTTPSConnection):
        pass

    class HTTPPool(AWSHTTPConnectionPool):
        ConnectionCls = HTTPConnection

    class HTTPSPool(AWSHTTPSConnectionPool):
        ConnectionCls = HTTPSConnection

    return {"http": HTTPPool, "https": HTTPSPool}
