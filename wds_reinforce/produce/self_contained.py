"""The producer: source + teacher + recipe -> reinforced webdataset shards and a manifest.

Work is partitioned by output shard: shard j holds positions ``j * shard_size .. (j + 1) *
shard_size - 1`` of the source order (minus inputs that cannot be read or decoded, listed as
skipped), so any process can make any shard and get the same bytes. The order is a permutation seeded by ``seed``
(``shuffle=True``, the default: an ImageFolder lists its samples class by class, and shards of
one or two classes train badly through a shuffle buffer) or the source's own. DataLoader workers decode, sample every
round's parameters and replay them (uint8); the main process runs the teacher in batches that
never cross a shard boundary (so a shard's bytes do not depend on what was made before it) and
writes each shard to a temporary name, fsyncs and renames it, then records a small done
marker with its sha256. A rerun verifies finished shards against their markers and redoes the
rest; the manifest is written last, by rank 0, once every shard is done.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import hashlib
import io
import json
import logging
import os
import platform
import re
import signal
import sys
import tarfile
import time
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

from wds_reinforce.core.augment import Recipe, replay
from wds_reinforce.core.decode import SourceImage
from wds_reinforce.core.errors import DataError, UsageError
from wds_reinforce.core.format import SIDECAR_EXT, Manifest, ShardInfo, Sidecar, SkippedInput, crc32c, encode_sidecar
from wds_reinforce.core.progress import ShardProgress
from wds_reinforce.core.targets import topk
from wds_reinforce.io.outputs import sha256_file
from wds_reinforce.layouts import layout_of, timm_info
from wds_reinforce.produce.sources import Source, SourceSample, SourceSampleError
from wds_reinforce.produce.teacher import Teacher

__all__ = [
    "OtherJobError",
    "error_reason",
    "library_versions",
    "describe_differences",
    "ProducerSummary",
    "ReplayDataset",
    "ReinforceJob",
    "write_tar",
    "write_tar_file",
    "TAR_MTIME",
]

# Fixed tar header fields: reruns give byte-identical shards.
TAR_MTIME = 0
_TAR_MODE = 0o444
_DONE_DIR = ".done"
_MANIFEST = "manifest.json"
_INFO = "_info.json"
_JOB_FILE = f"{_DONE_DIR}/job.identity"  # the job's identity (JSON); not a marker


@dataclass
class ProducerSummary:
    """What a ``make_shards`` run did (this rank's share for ``made``/``images_per_s``)."""

    out: str
    samples: int
    skipped: int
    rounds: int
    shards: int
    made: int
    reused: int
    bytes: int
    sidecar_bytes_per_round: float
    images_per_s: float
    seconds: float
    manifest_written: bool

    def format(self) -> str:
        lines = [
            f"wrote {self.out}: {self.samples} samples x {self.rounds} rounds in {self.shards} shards "
            f"({self.made} made, {self.reused} reused), {self.bytes / 1e6:.1f} MB",
            f"sidecar: {self.sidecar_bytes_per_round:.1f} bytes per round; skipped inputs: {self.skipped}",
            f"throughput: {self.images_per_s:.1f} images x rounds / s over {self.seconds:.1f} s"
            if self.made
            else "throughput: nothing to make, every shard was verified (sha256) and reused",
        ]
        return "\n".join(lines)


class OtherJobError(UsageError):
    """The output already holds shards of another job (another source, teacher, recipe or setting)."""


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


def write_tar(fileobj: io.BufferedIOBase, members: Iterator[tuple[str, bytes]]) -> None:
    """Write ``(name, data)`` members as a ustar archive with fixed header fields."""
    with tarfile.open(fileobj=fileobj, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            tar.addfile(_tarinfo(name, len(data)), io.BytesIO(data))


def write_tar_file(output: Any, name: str, members: Iterator[tuple[str, bytes]], keys: list[str]) -> ShardInfo:
    """Write ``members`` as the tar ``name`` of ``output`` (a ``storage`` output): staged under a
    temporary name, hashed, then put in place. ``keys`` (the samples' keys) may fill while the
    members are drawn; the returned ``ShardInfo`` counts them."""
    tmp = output.staging() / f"{name.replace('/', '__')}.tmp"
    with open(tmp, "wb") as f:
        write_tar(f, members)
    sha = sha256_file(tmp)
    info = ShardInfo(name, len(keys), tmp.stat().st_size, sha, keys[0] if keys else "", keys[-1] if keys else "")
    output.finish_file(tmp, name, sha)
    return info


# ----------------------------------------------------------------------------------------
# The job


@dataclass
class ReinforceJob:
    """A checked producer job (see ``prepare_job``); ``run()`` makes this rank's shards."""

    source: Source
    teacher: Teacher
    recipe: Recipe
    output: Any
    rounds: int
    topk: int
    seed: int
    shard_size: int
    batch_size: int
    workers: int
    class_names: list[str]
    class_map: list[int] | None
    rank: int = 0
    world_size: int = 1
    progress: bool = True
    name: str = "reinforced"
    split: str = "train"
    shuffle: bool = True
    wait_timeout: float = 7 * 24 * 3600.0
    _digest: str = field(default="", init=False)
    _order: np.ndarray | None = field(default=None, init=False, repr=False)
    # shard index -> sha256 of the shards this process wrote or verified during run()
    _checked: dict[int, str] = field(default_factory=dict, init=False, repr=False)

    @property
    def num_shards(self) -> int:
        return -(-len(self.source) // self.shard_size)

    def shard_name(self, j: int) -> str:
        return f"{self.split}-{j:06d}.tar"

    def describe_teacher(self) -> dict[str, Any]:
        desc = self.teacher.describe(self.recipe)  # the view the teacher saw, not timm's config
        if self.class_map is not None:
            desc["class_map"] = list(self.class_map)
        return desc

    def identity(self) -> dict[str, Any]:
        """Everything that decides the shards' bytes (``digest`` hashes it; the output keeps a copy)."""
        return {
            "samples": len(self.source),
            "source_index": self.source.index_digest(),
            "class_names": self.class_names,
            "recipe": self.recipe.to_dict(),
            "teacher": self.describe_teacher(),
            "rounds": self.rounds,
            "topk": self.topk,
            "seed": self.seed,
            "shard_size": self.shard_size,
            "batch_size": self.batch_size,
            "shuffle": self.shuffle,
        }

    @property
    def digest(self) -> str:
        """Identity of everything that decides the shards' bytes; done markers carry it."""
        if not self._digest:
            canon = json.dumps(self.identity(), sort_keys=True, separators=(",", ":"))
            self._digest = hashlib.sha256(canon.encode()).hexdigest()[:16]
        return self._digest

    def _done_name(self, j: int) -> str:
        return f"{_DONE_DIR}/{self.shard_name(j)}.json"

    def _read_done(self, j: int) -> dict[str, Any] | None:
        text = self.output.read_text(self._done_name(j))
        if text is None:
            return None
        try:
            done = json.loads(text)
        except ValueError:
            return None
        return done if isinstance(done, dict) and done.get("job") == self.digest else None

    def check_existing(self) -> None:
        """Refuse to mix shards of a different job into one output (caught before any work)."""
        for j in range(self.num_shards):
            text = self.output.read_text(self._done_name(j))
            if text is None:
                continue
            try:
                other = json.loads(text).get("job")
            except (ValueError, AttributeError):
                continue
            if other != self.digest:
                raise OtherJobError(
                    f"expected the output {self.output.url!r} to be empty or hold this job's shards, "
                    f"got shards of another job ({self._what_differs(other)}); use a new output folder, "
                    f"or the settings it was made with to resume it"
                )
            return

    def _what_differs(self, other: str) -> str:
        """The settings in which the output's job differs from this one, from its stored identity."""
        text = self.output.read_text(_JOB_FILE)
        try:
            stored = json.loads(text) if text is not None else None
        except ValueError:
            stored = None
        canon = json.dumps(stored, sort_keys=True, separators=(",", ":"))
        if not isinstance(stored, dict) or hashlib.sha256(canon.encode()).hexdigest()[:16] != other:
            return "source, teacher, recipe or settings differ"
        return describe_differences(stored, self.identity())

    def finished_shards(self) -> int:
        """Shards of this job finished in the output (a marker of this job; not re-hashed)."""
        return sum(self._read_done(j) is not None for j in range(self.num_shards))

    def run(self) -> ProducerSummary:
        """Make this rank's unfinished shards; rank 0 then waits for all and writes the manifest."""
        start = time.perf_counter()
        self.output.staging()
        if self.rank == 0:  # one writer: ranks share the temporary name
            # The identity beside the markers, so that a refused other job can be told what differs.
            self.output.write_text(_JOB_FILE, json.dumps(self.identity(), sort_keys=True) + "\n")
        mine = [j for j in range(self.num_shards) if j % self.world_size == self.rank]
        todo, reused = [], 0
        for j in mine:
            done = self._read_done(j)
            if done is not None and self.output.verify(self.shard_name(j), done["shard"]):
                self._checked[j] = done["shard"]["sha256"]
                reused += 1
            else:
                todo.append(j)
        images = self._make(todo)
        seconds = time.perf_counter() - start
        manifest, sidecar_bytes = self._write_manifest() if self.rank == 0 else (None, 0)
        summary = self._summary(manifest, sidecar_bytes, len(todo), reused, images, seconds)
        self.output.close()
        return summary

    def _indices(self, j: int) -> Sequence[int]:
        """Source indices of shard j: a slice of the (seeded) source order."""
        positions = range(j * self.shard_size, min((j + 1) * self.shard_size, len(self.source)))
        if not self.shuffle:
            return positions
        if self._order is None:
            # Its own stream (tagged), independent of the augmentation seeds of round_rng.
            self._order = np.random.default_rng([self.seed, 0x5348554646]).permutation(len(self.source))
        return self._order[positions.start : positions.stop].tolist()

    def _make(self, todo: list[int]) -> int:
        if not todo:
            return 0
        indices = [i for j in todo for i in self._indices(j)]
        dataset = ReplayDataset(self.source, indices, self.recipe, self.seed, self.rounds)
        loader = torch.utils.data.DataLoader(
            dataset,
            batch_size=None,
            shuffle=False,
            num_workers=self.workers,
            collate_fn=_identity,
            worker_init_fn=_worker_init_fn() if self.workers else None,
            prefetch_factor=max(2, -(-self.batch_size // max(self.rounds, 1)) // max(self.workers, 1) + 1)
            if self.workers
            else None,
            persistent_workers=False,
        )
        bar = None
        if self.progress and self.rank == 0:
            # A bar on a terminal; in a log file, one line per finished shard (count, rate, ETA).
            bar = ShardProgress(len(indices), len(todo), desc="reinforce")
        items = iter(loader)
        images = 0
        try:
            for j in todo:
                images += self._make_shard(j, items, bar)
                if bar is not None:
                    bar.shard_done(self.shard_name(j))
        finally:  # Ctrl-C included: end the bar's line before the caller says what was kept
            if bar is not None:
                bar.close()
        return images

    def _make_shard(self, j: int, items: Iterator[dict[str, Any]], bar: Any) -> int:
        name = self.shard_name(j)
        staging = self.output.staging()
        tmp = staging / f"{name}.tmp"
        samples: list[dict[str, Any]] = []
        skipped: list[SkippedInput] = []
        pending: deque[dict[str, Any]] = deque()
        queue: list[tuple[dict[str, Any], int]] = []  # (sample, round) per image awaiting the teacher
        images = 0

        def run_teacher(count: int) -> None:
            batch = queue[:count]
            del queue[:count]
            pixels = torch.stack([s["images"][r] for s, r in batch])
            probs = self._output_probs(self.teacher.predict(pixels))
            idx, prob = topk(probs, self.topk)
            for row, (s, r) in enumerate(batch):
                s["idx"][r] = idx[row]
                s["prob"][r] = prob[row]
                s["left"] -= 1

        def emit_ready() -> Iterator[tuple[str, bytes]]:
            while pending and pending[0]["left"] == 0:
                s = pending.popleft()
                sample: SourceSample = s["sample"]
                sidecar = Sidecar(
                    self.recipe.fingerprint, s["idx"], s["prob"], s["params"], crc32c(sample.data), s.get("window")
                )
                data = encode_sidecar(sidecar)
                samples.append({"key": sample.key, "sidecar_bytes": len(data)})
                yield f"{sample.key}.{sample.ext}", sample.data
                yield f"{sample.key}.cls", str(sample.label).encode()
                yield f"{sample.key}.{SIDECAR_EXT}", data

        def enqueue(window: list[dict[str, Any]]) -> Iterator[tuple[str, bytes]]:
            nonlocal images
            if self.recipe.mix is not None and window:
                _mix_items(window, self.recipe, self.seed, self.rounds)
            for item in window:
                item["idx"] = np.zeros((self.rounds, self.topk), np.uint32)
                item["prob"] = np.zeros((self.rounds, self.topk), np.float16)
                item["left"] = self.rounds
                pending.append(item)
                queue.extend((item, r) for r in range(self.rounds))
                images += self.rounds
                while len(queue) >= self.batch_size:
                    run_teacher(self.batch_size)
                    yield from emit_ready()

        def members() -> Iterator[tuple[str, bytes]]:
            # Mixing recipes pair the samples of each window of W written samples: the window is
            # complete before its views (mixed) go to the teacher. The teacher's batches are the
            # same either way: the queue's order does not change, only when it fills.
            width = self.recipe.mix.window if self.recipe.mix is not None else 1
            window: list[dict[str, Any]] = []
            for _ in self._indices(j):
                item = next(items)
                if bar is not None:
                    bar.update(1)
                if item["error"] is not None:
                    skipped.append(SkippedInput(item["sample"].key, item["error"]))
                    continue
                window.append(item)
                if len(window) == width:
                    yield from enqueue(window)
                    window = []
            yield from enqueue(window)
            if queue:
                run_teacher(len(queue))
            yield from emit_ready()

        with open(tmp, "wb") as f:
            write_tar(f, members())
        sha = sha256_file(tmp)
        size = tmp.stat().st_size
        info = ShardInfo(
            name=name,
            samples=len(samples),
            bytes=size,
            sha256=sha,
            first_key=samples[0]["key"] if samples else "",
            last_key=samples[-1]["key"] if samples else "",
        )
        self.output.finish_file(tmp, name, sha)
        done = {
            "job": self.digest,
            "shard": dataclasses.asdict(info),
            "skipped": [dataclasses.asdict(s) for s in skipped],
            "sidecar_bytes": sum(s["sidecar_bytes"] for s in samples),
        }
        self.output.write_text(self._done_name(j), json.dumps(done, sort_keys=True) + "\n")
        self._checked[j] = sha
        return images

    def _output_probs(self, probs: torch.Tensor) -> torch.Tensor:
        if self.class_map is None:
            return probs
        # A teacher over a larger label space: keep the source's classes and renormalise.
        sub = probs[:, self.class_map]
        return sub / sub.sum(dim=1, keepdim=True).clamp_min(1e-12)

    def _wait_all_done(self) -> list[dict[str, Any]]:
        deadline = time.monotonic() + self.wait_timeout
        dones: dict[int, dict[str, Any]] = {}
        while True:
            for j in range(self.num_shards):
                if j not in dones:
                    done = self._read_done(j)
                    # A marker counts only with its shard in place and matching: a stale marker
                    # (same job, shard since lost or rewritten) must not put a bad shard in the manifest.
                    if done is not None and self._shard_ok(j, done):
                        dones[j] = done
            if len(dones) == self.num_shards:
                return [dones[j] for j in range(self.num_shards)]
            if time.monotonic() > deadline:
                missing = [self.shard_name(j) for j in range(self.num_shards) if j not in dones]
                raise TimeoutError(
                    f"expected every shard finished and matching its done marker, got {len(missing)} not "
                    f"(after {self.wait_timeout:.0f} s): {missing[:5]}"
                )
            time.sleep(1.0)

    def _shard_ok(self, j: int, done: Mapping[str, Any]) -> bool:
        info = done.get("shard")
        if not isinstance(info, Mapping) or not isinstance(done.get("skipped"), list):
            return False
        if j in self._checked and self._checked[j] == info.get("sha256"):
            return True  # this process wrote or verified it moments ago: no second hash
        try:
            return bool(self.output.verify(self.shard_name(j), info))
        except (KeyError, OSError):  # a marker missing fields, or a shard vanishing mid-hash
            return False

    def _write_manifest(self) -> tuple[Manifest, int]:
        dones = self._wait_all_done()
        manifest = Manifest(
            recipe=self.recipe.to_dict(),
            fingerprint=self.recipe.fingerprint.hex(),
            teacher=self.describe_teacher(),
            num_classes=len(self.class_names),
            rounds=self.rounds,
            topk=self.topk,
            seed=self.seed,
            class_names=list(self.class_names),
            shards=[ShardInfo(**d["shard"]) for d in dones],
            skipped=[SkippedInput(**s) for d in dones for s in d["skipped"]],
            versions=library_versions(),
            split=self.split,
            name=self.name,
        )
        # The manifest goes last: its presence means every shard it lists is complete.
        self.output.write_text(_INFO, json.dumps(timm_info(manifest), indent=1, sort_keys=True) + "\n")
        self.output.write_text(_MANIFEST, manifest.to_json())
        return manifest, sum(d.get("sidecar_bytes", 0) for d in dones)

    def _summary(
        self, manifest: Manifest | None, side: int, made: int, reused: int, images: int, seconds: float
    ) -> ProducerSummary:
        samples = layout_of(manifest).num_samples(manifest) if manifest else 0
        return ProducerSummary(
            out=self.output.url,
            samples=samples,
            skipped=len(manifest.skipped) if manifest else 0,
            rounds=self.rounds,
            shards=self.num_shards,
            made=made,
            reused=reused,
            bytes=sum(s.bytes for s in manifest.shards) if manifest else 0,
            sidecar_bytes_per_round=side / max(samples * self.rounds, 1),
            images_per_s=images / seconds if seconds > 0 else 0.0,
            seconds=seconds,
            manifest_written=manifest is not None,
        )


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
    import cv2
    import simplejpeg
    import timm
    import torchvision

    from wds_reinforce import __version__

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


def error_reason(exc: BaseException) -> str:
    """A skipped input's reason: the error's type and message, the same on every run."""
    # Object addresses in messages would make the manifest differ between runs.
    return re.sub(r" at 0x[0-9a-fA-F]+", "", f"{type(exc).__name__}: {exc}")


def _identity(item: Any) -> Any:
    return item


_PR_SET_PDEATHSIG = 1  # linux/prctl.h
_log = logging.getLogger(__name__)


def _worker_init_fn() -> functools.partial[None]:
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


def _mix_items(window: list[dict[str, Any]], recipe: Recipe, seed: int, rounds: int) -> None:
    """Mix one pairing window of producer items in place: ``images`` become what the teacher sees,
    ``params`` gain the mixing columns, ``window`` is the sidecars' ``mw``."""
    keys = [item["sample"].key for item in window]
    mixed, columns, crc = recipe.mix.mix_window(seed, keys, [item["images"] for item in window], range(rounds))
    for item, views, cols in zip(window, mixed, columns):
        item["images"], item["params"], item["window"] = views, {**item["params"], **cols}, crc


class ReplayDataset(torch.utils.data.Dataset):
    """Sample i: read source input, sample R rounds of params, replay them all (uint8)."""

    def __init__(self, source: Source, indices: Sequence[int], recipe: Recipe, seed: int, rounds: int):
        self.source = source
        self.indices = list(indices)
        self.recipe = recipe
        self.seed = seed
        self.rounds = rounds

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict[str, Any]:
        index = self.indices[i]
        try:
            sample = self.source[index]
        except SourceSampleError as exc:  # listed, but no image to read (e.g. a wds sample without one)
            return {"sample": SourceSample(exc.key, b"", -1, ""), "error": exc.reason}
        except OSError as exc:  # listed, then unreadable or gone (deleted, permissions, I/O error)
            key = self.source.key(index)
            return {"sample": SourceSample(key, b"", -1, ""), "error": error_reason(exc)}
        try:
            src = SourceImage(sample.data)
            params = self.recipe.sample_rounds(self.seed, sample.key, self.rounds, src.size)
            pixels = torch.stack(
                [replay(src, {c: v[r] for c, v in params.items()}, self.recipe) for r in range(self.rounds)]
            )
        except (DataError, OSError) as exc:
            return {"sample": sample, "error": error_reason(exc)}
        return {"sample": sample, "error": None, "params": params, "images": pixels}
