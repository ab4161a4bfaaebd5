"""One shard job: the lifecycle every job that writes a data set shares.

A job writes its files into an ``Output`` (a local folder or ``s3://bucket/prefix``) in units
(output shard j, or image shard i with its round groups). ``ShardJob`` keeps its bookkeeping
there, so that any process can make any unit and a killed run resumes:

- **partition**: under torchrun, or with ``RANK``/``WORLD_SIZE`` set by hand (one process per rank,
  the same output), rank r makes the units j % world == r;
- **identity**: a digest of everything that decides the bytes; a job file (for the tools that
  keep one) and every done marker carry it, and another job's files in the same output are
  refused, saying what differs;
- **staged writes**: each tar is written to a temporary name, hashed, and put in place whole;
- **done markers**: ``.done/{part}.json`` records a part's files with their sha256; a rerun
  verifies them and remakes only what is missing or damaged;
- **wait for all**: rank 0 waits for every part's marker, then writes the manifest last (its
  presence means every shard it lists is complete), with timm's ``_info.json`` where asked;
- **work records**: a made part's marker says which rank made it and what it took (``made``:
  images, images x rounds, seconds into that rank's run), so that rank 0 can total every rank's
  work (``JobRun.fresh``: the parts made while it ran).

``run`` drives it; a job supplies a ``Maker``: its parts per unit, how to make the missing ones,
and the manifest. The producer (``self_contained``, ``sidecar_sets``, ``teacher_sets``) and the
importers (``importers.mldr``) all run on it.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import platform
import tarfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from wds_reinforce.core.errors import UsageError
from wds_reinforce.core.format import Manifest, ShardInfo
from wds_reinforce.io.outputs import Output, sha256_file
from wds_reinforce.layouts import INFO_NAME, MANIFEST_NAME, timm_info

__all__ = [
    "DONE_DIR",
    "TAR_MTIME",
    "OtherJobError",
    "ShardJob",
    "Maker",
    "JobRun",
    "run",
    "dist_env",
    "job_digest",
    "describe_differences",
    "library_versions",
    "write_tar",
    "tar_member_bytes",
]

DONE_DIR = ".done"
TAR_MTIME = 0  # fixed tar header fields: reruns give byte-identical shards
_TAR_MODE = 0o444
WAIT_TIMEOUT = 7 * 24 * 3600.0  # how long rank 0 waits for the other ranks' shards
SAME_RUN_SLACK = 60.0  # without a run id: a rank that started this long before rank 0 belongs to its run
RUN_ID_VARS = ("WDS_REINFORCE_RUN_ID", "TORCHELASTIC_RUN_ID")  # the launch's id, shared by its ranks


def run_id() -> str | None:
    """This launch's id, the same on every rank: ``WDS_REINFORCE_RUN_ID``, else torchrun's
    ``TORCHELASTIC_RUN_ID`` (not its default ``none``); None without one."""
    for name in RUN_ID_VARS:
        value = os.environ.get(name, "").strip()
        if value and value != "none":
            return value
    return None


class OtherJobError(UsageError):
    """The output already holds files of another job (another source, teacher, recipe or setting)."""


def dist_env() -> tuple[int, int]:
    """(rank, world size) from torchrun's ``RANK`` and ``WORLD_SIZE`` (0, 1 without them)."""
    try:
        rank = int(os.environ.get("RANK", 0))
        world = int(os.environ.get("WORLD_SIZE", 1))
    except ValueError:
        raise UsageError(
            f"expected integer RANK and WORLD_SIZE, got {os.environ.get('RANK')!r}, {os.environ.get('WORLD_SIZE')!r}"
        ) from None
    if not (world >= 1 and 0 <= rank < world):
        raise UsageError(f"expected 0 <= RANK < WORLD_SIZE, got RANK={rank}, WORLD_SIZE={world}")
    return rank, world


def job_digest(identity: Any) -> str:
    """16 hex digits of sha256 over the canonical JSON of a job's identity."""
    canon = json.dumps(identity, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canon.encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------------------
# Deterministic tar


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = TAR_MTIME
    info.mode = _TAR_MODE
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def tar_member_bytes(size: int) -> int:
    """The bytes a member of ``size`` bytes takes in a tar: its 512-byte header and its data padded to 512."""
    return 512 + -(-size // 512) * 512


def write_tar(fileobj: io.BufferedIOBase, members: Iterable[tuple[str, bytes]]) -> None:
    """Write ``(name, data)`` members as a ustar archive with fixed header fields."""
    with tarfile.open(fileobj=fileobj, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            tar.addfile(_tarinfo(name, len(data)), io.BytesIO(data))


# ----------------------------------------------------------------------------------------
# The job's bookkeeping


def _files(marker: Mapping[str, Any]) -> list[Mapping[str, Any]] | None:
    """The files a done marker records (``files``, or its one ``shard``), or None if it records none."""
    files = marker.get("files", [marker.get("shard")])
    ok = isinstance(files, list) and all(
        isinstance(f, Mapping) and {"name", "bytes", "sha256"} <= f.keys() for f in files
    )
    return files if ok and files else None


@dataclass
class ShardJob:
    """A job's bookkeeping in its output (see the module docstring).

    Attributes:
        output: where the job writes.
        digest: the job's identity (``job_digest``); its markers carry it.
        rank, world: this process's share (``dist_env``).
        wait_timeout: how long rank 0 waits for the others' parts, in seconds.
    """

    output: Output
    digest: str
    rank: int = 0
    world: int = 1
    wait_timeout: float = WAIT_TIMEOUT
    # part -> sha256s of its files, made or verified by this process (no second hash)
    _checked: dict[str, tuple[str, ...]] = field(default_factory=dict, init=False, repr=False)
    # part -> its marker, for the parts this process made or found finished
    markers: dict[str, dict[str, Any]] = field(default_factory=dict, init=False, repr=False)
    started: float = field(default_factory=time.monotonic, init=False, repr=False)  # this run's start
    started_at: float = field(default_factory=time.time, init=False, repr=False)  # the same, wall clock
    run: str | None = field(default_factory=run_id, init=False, repr=False)  # the launch's id (``run_id``)

    def work(self, images: int, views: int) -> dict[str, Any]:
        """A made part's record (its marker's ``made``): this rank, the images and images x rounds it
        took, the seconds since this rank's run started when it was done, and when that was."""
        elapsed = round(time.monotonic() - self.started, 3)
        made = {"rank": self.rank, "world": self.world, "images": images, "views": views, "elapsed": elapsed}
        return {**made, "started": round(self.started_at, 3), **({"run": self.run} if self.run else {})}

    def made_in_this_run(self, marker: Mapping[str, Any] | None, before: Mapping[str, Any] | None) -> bool:
        """Whether a part's final ``marker`` was made in this launch: by a rank of the same run id
        (``run_id``) when both have one; else when it changed since ``before`` (its marker when this
        rank started) or a rank that started at most ``SAME_RUN_SLACK`` seconds before this one made it
        (ranks launched together start within seconds; approximate: a rerun within the slack counts
        its reused parts as made, a rank started earlier than the slack its made parts as reused)."""
        if marker is None:
            return False
        made = marker.get("made")
        if not isinstance(made, Mapping):
            return marker != before
        if self.run is not None and made.get("run") is not None:
            return made["run"] == self.run
        return marker != before or float(made.get("started", 0)) >= self.started_at - SAME_RUN_SLACK

    def mine(self, units: int) -> list[int]:
        """This rank's units of ``range(units)``."""
        return list(range(self.rank, units, self.world))

    # -- markers

    @staticmethod
    def marker_name(part: str) -> str:
        return f"{DONE_DIR}/{part}.json"

    def read_marker(self, part: str) -> dict[str, Any] | None:
        """Part ``part``'s done marker, whatever job wrote it (None: none, or not JSON)."""
        text = self.output.read_text(self.marker_name(part))
        try:
            marker = json.loads(text) if text is not None else None
        except ValueError:
            return None
        return marker if isinstance(marker, dict) else None

    def marked(self, part: str) -> bool:
        """Whether ``part`` has this job's done marker (its files not hashed: a quick count)."""
        marker = self.read_marker(part)
        return marker is not None and marker.get("job") == self.digest

    def finished(self, part: str) -> dict[str, Any] | None:
        """This job's marker of ``part`` when every file it records is in place and intact."""
        marker = self.read_marker(part)
        files = _files(marker) if marker is not None and marker.get("job") == self.digest else None
        if files is None:
            return None
        shas = tuple(f["sha256"] for f in files)
        if self._checked.get(part) != shas:
            try:
                if not all(self.output.verify(f["name"], f) for f in files):
                    return None
            except OSError:  # a file vanishing while it is hashed
                return None
            self._checked[part] = shas
        self.markers[part] = marker
        return marker

    def done(self, part: str, payload: Mapping[str, Any]) -> dict[str, Any]:
        """Record ``part`` as made: its marker, ``{"job": digest, **payload}`` (``shard`` or ``files``)."""
        marker = {"job": self.digest, **payload}
        self.output.write_text(self.marker_name(part), json.dumps(marker, sort_keys=True) + "\n")
        self._checked[part] = tuple(f["sha256"] for f in _files(marker) or [])
        self.markers[part] = marker
        return marker

    def write_tar(self, name: str, members: Iterable[tuple[str, bytes]], keys: list[str]) -> ShardInfo:
        """Write ``members`` as the tar ``name``: staged under a temporary name, hashed, then put in place.

        ``keys`` (the samples' keys) may fill while the members are drawn; the returned
        ``ShardInfo`` counts them.
        """
        tmp = self.output.staging() / f"{name.replace('/', '__')}.tmp"
        with open(tmp, "wb") as f:
            write_tar(f, members)
        sha = sha256_file(tmp)
        info = ShardInfo(name, len(keys), tmp.stat().st_size, sha, keys[0] if keys else "", keys[-1] if keys else "")
        self.output.finish_file(tmp, name, sha)
        return info

    # -- identity

    def keep_identity(self, name: str, text: str, decides: bool) -> None:
        """Rank 0 writes the job file ``name``: what the job is, for a refused other job to be told
        what differs. One that ``decides`` names the output's job: it is written once, before any
        part, and never replaced; otherwise each run rewrites it and the done markers decide."""
        if self.rank == 0 and (not decides or self.output.read_text(name) is None):
            self.output.write_text(name, text)

    def refuse_other_job(
        self,
        parts: Iterable[str],
        identity: Mapping[str, Any],
        job_file: str | None = None,
        what: str = "shards",
        file_decides: bool = True,
    ) -> None:
        """Raise ``OtherJobError`` if the output holds another job's files, before any work.

        A job file written once, before any part (``file_decides``), names the output's job;
        otherwise (or without one) the first done marker found among ``parts`` does. The message
        says what differs, from the job file when it describes that job.
        """
        stored = self._stored_identity(job_file)
        if stored is not None and file_decides:
            other = stored[0]
        else:
            other = next((m.get("job") for m in map(self.read_marker, parts) if m is not None), self.digest)
        if other == self.digest:
            return
        differs = "its inputs or settings differ"
        if stored is not None and stored[0] == other and isinstance(stored[1], Mapping):
            differs = describe_differences(stored[1], identity)
        raise OtherJobError(
            f"expected the output {self.output.url!r} to be empty or hold this job's {what}, got {what} of another "
            f"job ({differs}); use a new output folder, or the settings it was made with to resume it"
        )

    def _stored_identity(self, job_file: str | None) -> tuple[str, Any] | None:
        """(digest, identity) in a job file: ``{"job", "identity"}``, or the identity itself."""
        text = self.output.read_text(job_file) if job_file else None
        try:
            stored = json.loads(text) if text is not None else None
        except ValueError:
            return None
        if isinstance(stored, dict) and {"job", "identity"} <= stored.keys():
            return stored["job"], stored["identity"]
        return (job_digest(stored), stored) if stored is not None else None

    # -- the end

    def wait_all(self, parts: Sequence[str], say: Callable[[str], None] | None = None) -> dict[str, dict[str, Any]]:
        """Every part's marker, once all are finished (others may still be making theirs).

        A marker counts only with its files in place and matching: a stale one (same job, file
        since lost or rewritten) must not put a bad shard in the manifest.

        Raises:
            TimeoutError: parts still unfinished after ``wait_timeout``.
        """
        deadline = time.monotonic() + self.wait_timeout
        markers: dict[str, dict[str, Any]] = {}
        while True:
            for part in parts:
                if part not in markers:
                    marker = self.finished(part)
                    if marker is not None:
                        markers[part] = marker
            if len(markers) == len(parts):
                return {part: markers[part] for part in parts}
            missing = [p for p in parts if p not in markers]
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"expected every part finished and matching its done marker, got {len(missing)} not "
                    f"(after {self.wait_timeout:.0f} s): {missing[:5]}"
                )
            if say is not None:
                say(f"waiting for other ranks: {len(markers)}/{len(parts)} parts done")
            time.sleep(1.0)

    def write_manifest(self, manifest: Manifest, info: bool = False) -> None:
        """The manifest, last (and timm's ``_info.json`` before it, with ``info``)."""
        if info:
            self.output.write_text(INFO_NAME, json.dumps(timm_info(manifest), indent=1, sort_keys=True) + "\n")
        self.output.write_text(MANIFEST_NAME, manifest.to_json())


# ----------------------------------------------------------------------------------------
# Running a job


class Maker(Protocol):
    """What a job makes: the parts of each unit, how to make the missing ones, its manifest."""

    def parts(self, unit: int) -> list[str]:
        """The parts (files with a done marker each) of unit ``unit``."""

    def make(self, todo: list[tuple[int, list[str]]]) -> int:
        """Make the missing parts of this rank's units, recording each with ``ShardJob.done``;
        return the work done (images x rounds, or images) for the summary's rate."""

    def manifest(self, markers: Mapping[str, Mapping[str, Any]]) -> Manifest:
        """The manifest, from every part's marker (rank 0, once all are finished)."""


@dataclass
class JobRun:
    """What ``run`` did on this rank."""

    units: int
    parts: int  # of all units
    made: int  # parts this rank made
    reused: int  # parts of this rank's units found finished
    work: int  # what ``Maker.make`` returned
    seconds: float
    manifest: Manifest | None = None  # rank 0
    markers: dict[str, dict[str, Any]] = field(default_factory=dict)  # rank 0: every part's; others: their own
    fresh: list[str] = field(default_factory=list)  # parts made while this ran (rank 0: by any rank)
    wall: float = 0.0  # seconds until the manifest was written (rank 0), or as ``seconds``
    ended_at: float = 0.0  # when (wall clock)

    @property
    def rate(self) -> float:
        return self.work / self.seconds if self.seconds > 0 else 0.0


def run(
    job: ShardJob, maker: Maker, units: int, info: bool = False, say: Callable[[str], None] | None = None
) -> JobRun:
    """Make this rank's unfinished parts; rank 0 then waits for all and writes the manifest last.

    Rank 0 of several reads every part's marker first, to tell the parts made in this run (by
    whichever rank its ``made`` names; ``ShardJob.made_in_this_run``) from those reused.
    """
    start = time.perf_counter()
    job.started, job.started_at = time.monotonic(), time.time()
    job.output.staging()
    every = [part for u in range(units) for part in maker.parts(u)]
    before = {part: job.read_marker(part) for part in every} if job.rank == 0 and job.world > 1 else {}
    todo, reused = [], 0
    for unit in job.mine(units):
        parts = maker.parts(unit)
        missing = [part for part in parts if job.finished(part) is None]
        reused += len(parts) - len(missing)
        if missing:
            todo.append((unit, missing))
    work = maker.make(todo) if todo else 0
    seconds = time.perf_counter() - start
    result = JobRun(units, len(every), sum(len(p) for _, p in todo), reused, work, seconds, wall=seconds)
    result.fresh = [part for _, parts in todo for part in parts]
    result.markers = {part: job.markers[part] for part in result.fresh if part in job.markers}
    if job.rank == 0:
        result.markers = job.wait_all(every, say)
        if job.world > 1:
            result.fresh = [part for part in every if job.made_in_this_run(result.markers[part], before.get(part))]
        result.manifest = maker.manifest(result.markers)
        job.write_manifest(result.manifest, info)
        result.wall = time.perf_counter() - start
    result.ended_at = time.time()
    job.output.close()
    return result


# ----------------------------------------------------------------------------------------
# What goes into manifests, identities and reasons


_SETTING_NAMES = {
    "samples": "source sample count",
    "source_index": "source listing (files or labels)",
    "class_names": "class names",
}


def describe_differences(stored: Mapping[str, Any], current: Mapping[str, Any], limit: int = 4) -> str:
    """``"rounds 8 (the output has 16), recipe.size [64, 64] (the output has [32, 32])"``: what differs."""
    found: list[str] = []

    def walk(path: str, a: Any, b: Any) -> None:
        if a == b or len(found) >= 64:
            return
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            for k in sorted(set(a) | set(b), key=str):
                walk(f"{path}.{k}" if path else str(k), a.get(k), b.get(k))
        elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b) and len(a) <= 16:
            for i, (x, y) in enumerate(zip(a, b)):
                walk(f"{path}[{i}]", x, y)
        else:
            name = _SETTING_NAMES.get(path, path)
            if path in _SETTING_NAMES and path != "samples":
                found.append(name)
            else:
                here, there = json.dumps(b), json.dumps(a)
                if len(here) + len(there) > 80:
                    found.append(name)
                else:
                    found.append(f"{name} {here} (the output has {there})")

    walk("", stored, current)
    more = f" and {len(found) - limit} more" if len(found) > limit else ""
    return ", ".join(found[:limit]) + more if found else "the stored identity is the same"


def library_versions() -> dict[str, str]:
    """The versions of everything that decides a shard's bytes, for the manifest."""
    import cv2
    import numpy as np
    import simplejpeg
    import timm
    import torch
    import torchvision
    from PIL import Image

    from wds_reinforce.core.version import __version__

    return {
        "wds_reinforce": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "timm": timm.__version__,
        "numpy": np.__version__,
        "pillow": Image.__version__,
        "simplejpeg": simplejpeg.__version__,
        "opencv": cv2.__version__,
    }
