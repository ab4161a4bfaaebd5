#!/usr/bin/env python
"""Fault-injection table: attack real reinforced shards, read them back, count what came out.

Makes data with the real producer (teacher timm:test_resnet with random weights, 3 classes, 32 px,
4 rounds, photo-like JPEGs in an ImageFolder; nothing is downloaded): self-contained shards of 6
samples ("bound"), the same images with rrc+mix (pairing window 4, shards of 8; "mix"), a sidecar
set in two round groups beside plain image shards ("sets"), and "bound" with every sidecar
re-encoded as written before places ("old": place and label_crc None, nothing else updated).
Each attack runs --trials seeded random trials on a fresh copy, read with ReinforcedDataset(
keys=("__key__", "round", "image", "target"), handler=SkipCounter()):

  1 swap           a shard replaced by another shard with the same sample count
  2 http-replaced  over HTTP (127.0.0.1), a shard replaced after the dataset was opened
  3 splice@member  a resumed HTTP read without ETag or Last-Modified: the body cut at a random
                   member header, the ranged retry served another shard's bytes from its member
                   of the same index on (zero-padded to the same length)
  3 splice@byte    the same, cut at a random byte, the retry served the other shard's bytes at the
                   same offsets (the shards here all have the same length)
  4 longer         1-3 samples appended (copies of the shard's own or of another shard's)
  4 longer-1       the same, and one real sample removed
  5 label          one sample's label replaced by another valid class, read with p=0
  6 mix-1          one sample removed from a "mix" shard
  7 sidecar-cut    a sidecar shard of "sets" cut at a random byte (in both round groups)
  8 ... (old)      attacks 1 and 4 on "old": what data written before places still gets

Columns, summed over trials, against a clean read of the untouched data at the same seed and
epoch: yielded; lost (the clean read's samples whose key, round, pixels and target did not come
out); injected (samples the attack put where the reader reads that are not the place's own);
c.samples and c.foreign (SkipCounter's samples and foreign); damaged (trials that yielded a key
not in the data, a key twice, or pixels or target unlike the clean read's); exact (trials where
c.samples == lost).

Usage: python tools/fault_table.py [--trials N] [--json] [--out DIR] [--seed S] [--shards N]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import hashlib
import http.server
import io
import json
import logging
import os
import shutil
import sys
import tarfile
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from wds_reinforce.cli.demo import photo_like  # noqa: E402
from wds_reinforce.core.augment import Recipe  # noqa: E402
from wds_reinforce.core.errors import UsageError, check_int  # noqa: E402
from wds_reinforce.core.format import SIDECAR_EXT, Manifest, decode_sidecar, encode_sidecar  # noqa: E402
from wds_reinforce.produce.make import make_shards  # noqa: E402
from wds_reinforce.read.dataset import ReinforcedDataset  # noqa: E402
from wds_reinforce.read.options import SkipCounter  # noqa: E402

__all__ = ["FIELDS", "run_table", "format_table", "build_parser", "main"]

KEYS = ("__key__", "round", "image", "target")
PER_SHARD, MIX_SHARD, WINDOW, ROUNDS = 6, 8, 4, 4
JOB = dict(teacher_num_classes=3, image_size=32, rounds=ROUNDS, topk=2, batch_size=32, workers=0, seed=7, device="cpu")
TEACHER = "timm:test_resnet"
FIELDS = (
    "attack", "data", "bound", "trials", "yielded", "lost", "injected",
    "counter_samples", "counter_foreign", "damaged_or_foreign_yielded", "loss_counted_exactly", "seconds",
)  # fmt: skip


def _say(message: str) -> None:
    print(f"fault_table: {message}", file=sys.stderr, flush=True)


# ---- The data
@dataclasses.dataclass(frozen=True)
class Data:
    """One made data set: its folder, its manifest, and its shards' names and sample counts."""

    root: Path
    manifest: Manifest
    shards: list[str]
    counts: list[int]


def _load(root: Path) -> Data:
    manifest = Manifest.from_json((root / "manifest.json").read_text())
    return Data(root, manifest, [s.name for s in manifest.shards], [s.samples for s in manifest.shards])


def _image_folder(root: Path, per_class: int) -> list[Path]:
    files = []
    for c in range(JOB["teacher_num_classes"]):
        (root / f"c{c}").mkdir(parents=True)
        for i in range(per_class):
            files.append(root / f"c{c}" / f"i{i:03d}.jpg")
            Image.fromarray(photo_like(40 + 4 * (i % 3), 48, seed=100 * c + i)).save(files[-1], quality=85)
    return files


def _image_shards(files: list[Path], root: Path) -> str:
    """Plain webdataset shards (jpg, cls) of the ImageFolder's files; their brace pattern."""
    root.mkdir(parents=True)
    chunks = [files[i : i + PER_SHARD] for i in range(0, len(files), PER_SHARD)]
    for s, chunk in enumerate(chunks):
        keys = [(f"{f.parent.name}_{f.stem}", f) for f in chunk]
        _write(
            root / f"images-{s:06d}.tar",
            [[(f"{k}.jpg", f.read_bytes()), (f"{k}.cls", f.parent.name[1:].encode())] for k, f in keys],
        )
    return str(root / f"images-{{000000..{len(chunks) - 1:06d}}}.tar")


def _unbind(data: Data, dest: Path) -> Data:
    """A copy whose sidecars are re-encoded, and manifest rewritten, as before places; nothing else changes."""
    shutil.copytree(data.root, dest, copy_function=shutil.copyfile)
    manifest = Manifest.from_json((dest / "manifest.json").read_text())
    (dest / "manifest.json").write_text(dataclasses.replace(manifest, places=False).to_json())
    for name in data.shards:
        samples = _samples(dest / name)
        for members in samples:
            for j, (member, raw) in enumerate(members):
                if member.endswith("." + SIDECAR_EXT):
                    old = dataclasses.replace(decode_sidecar(raw), place=None, label_crc=None)
                    members[j] = (member, encode_sidecar(old))
        _write(dest / name, samples)
    return _load(dest)


def build_data(root: Path, shards: int) -> dict[str, Data]:
    """The four data sets under ``root``: self-contained, mix, sidecar set, and old sidecars."""
    files = _image_folder(root / "folder", shards * PER_SHARD // JOB["teacher_num_classes"])
    job = dict(JOB, progress=False)
    make_shards(str(root / "folder"), TEACHER, out=str(root / "bound"), shard_size=PER_SHARD, **job)
    mix = Recipe.from_spec("rrc+mix", size=JOB["image_size"]).to_dict()
    mix["mix"]["window"] = WINDOW
    make_shards(str(root / "folder"), TEACHER, out=str(root / "mix"), shard_size=MIX_SHARD, recipe=mix, **job)
    pattern = _image_shards(files, root / "images")
    make_shards(pattern, TEACHER, out=str(root / "sets"), sidecars_only=True, round_group=ROUNDS // 2, **job)
    made = {name: _load(root / name) for name in ("bound", "mix", "sets")}
    made["old"] = _unbind(made["bound"], root / "old")
    return made


# ---- Tar members
def _samples(path: Path) -> list[list[tuple[str, bytes]]]:
    """A shard's members grouped by key, in order."""
    out: list[list[tuple[str, bytes]]] = []
    with tarfile.open(path) as tar:
        for m in tar:
            if not out or out[-1][0][0].split(".")[0] != m.name.split(".")[0]:
                out.append([])
            out[-1].append((m.name, tar.extractfile(m).read()))
    return out


def _write(path: Path, samples: list[list[tuple[str, bytes]]]) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for members in samples:
            for name, data in members:
                info = tarfile.TarInfo(name)
                info.size, info.mtime = len(data), 0
                tar.addfile(info, io.BytesIO(data))
    path.write_bytes(buf.getvalue())


def _spans(data: bytes) -> list[tuple[str, int, int]]:
    """(key, header offset, data end) of each member of a tar's bytes."""
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return [(m.name.split(".")[0], m.offset, m.offset_data + m.size) for m in tar]


def _cut_at(t: Trial, data: bytes) -> int:
    """A random byte in [1, end of the end-of-archive marker): past it lies only the record's zero fill."""
    end = -(-_spans(data)[-1][2] // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE + 2 * tarfile.BLOCKSIZE
    return 1 + t.pick(min(end, len(data)) - 1)


# ---- Servers on 127.0.0.1
class _Splicing(http.server.BaseHTTPRequestHandler):
    """Serves ``server.root`` without ETag or Last-Modified; the first GET of ``server.victim``
    breaks after ``server.cut`` bytes, and a ranged retry gets ``server.tail``: another object's bytes."""

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        name, server = self.path.lstrip("/"), self.server
        try:
            data = (server.root / name).read_bytes()
        except OSError:
            return self.send_error(404)
        if name != server.victim:
            return self._send(200, data, len(data))
        if self.headers.get("Range") is None:
            return self._send(200, data[: server.cut], len(data))  # fewer bytes than it says: the read breaks
        start = int(self.headers["Range"].split("=")[1].split("-")[0])
        return self._send(206, server.tail[start - server.cut :], len(data), start)

    def _send(self, status: int, body: bytes, total: int, start: int = 0) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(total - start))
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{total - 1}/{total}")
        self.end_headers()
        self.wfile.write(body)
        self.close_connection = True


@contextlib.contextmanager
def _serve(handler: Callable, **attrs) -> Iterator[str]:
    """A threaded HTTP server on 127.0.0.1 for the block; its base URL."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    for name, value in attrs.items():
        setattr(server, name, value)
    thread = threading.Thread(target=server.serve_forever, args=(0.01,), daemon=True)  # a quick shutdown
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@contextlib.contextmanager
def _loopback_env() -> Iterator[None]:
    """No proxy for 127.0.0.1, quick retries, one process: set for the run, restored after."""
    saved = dict(os.environ)
    for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "RANK", "WORLD_SIZE"):
        os.environ.pop(name, None)
    os.environ.update(NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost")
    os.environ.update(WDS_REINFORCE_BACKOFF="0.01", WDS_REINFORCE_TIMEOUT="20")
    quiet = logging.getLogger("wds_reinforce.io.remote")
    level, quiet.level = quiet.level, logging.ERROR  # the retries are the attack, not news
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)
        quiet.level = level


# ---- One trial
class Trial:
    """A fresh copy of one data set, a seeded RNG, and the attacked read's result."""

    def __init__(self, data: Data, root: Path, rng: np.random.Generator):
        shutil.copytree(data.root, root, copy_function=shutil.copyfile)  # the producer's files are read-only
        self.data, self.root, self.rng = data, root, rng
        self.seed, self.epoch = int(rng.integers(1 << 16)), int(rng.integers(2 * ROUNDS))
        self.p, self.rows, self.counter = 1.0, [], SkipCounter()

    def read(self, source: str | None = None, p: float = 1.0, after_open: Callable | None = None) -> None:
        self.p = p
        ds = _dataset(source or str(self.root) + "/", self.seed, self.epoch, p, self.counter)
        if after_open is not None:
            after_open()
        self.rows = _rows(ds)

    def pick(self, n: int) -> int:
        return int(self.rng.integers(n))

    def shard(self, i: int) -> Path:
        return self.root / self.data.shards[i]

    def pair(self) -> tuple[int, int]:
        """Two shards (victim, other) with the same sample count."""
        counts = self.data.counts
        pairs = [(a, b) for a in range(len(counts)) for b in range(len(counts)) if a != b and counts[a] == counts[b]]
        if not pairs:
            raise UsageError(f"expected two shards with the same sample count, got counts {counts}")
        return pairs[self.pick(len(pairs))]


def _dataset(source: str, seed: int, epoch: int, p: float, counter: SkipCounter) -> ReinforcedDataset:
    return ReinforcedDataset(source, seed=seed, epoch=epoch, p=p, keys=KEYS, handler=counter)


def _rows(ds: ReinforcedDataset) -> list[tuple[str, int, str]]:
    """(key, round, digest of pixels and target) of each yielded sample."""
    out = []
    for key, rnd, image, target in ds:
        digest = hashlib.blake2b(image.numpy().tobytes() + target.numpy().tobytes(), digest_size=16)
        out.append((key, int(rnd), digest.hexdigest()))
    return out


# ---- The attacks: each changes its trial's copy, reads it, and returns the samples it injected
def _swap(t: Trial) -> int:
    a, b = t.pair()
    shutil.copyfile(t.shard(b), t.shard(a))
    t.read()
    return t.data.counts[b]


def _http_replaced(t: Trial) -> int:
    a, b = t.pair()
    with _serve(_Splicing, root=t.root, victim=None) as base:
        t.read(base + "manifest.json", after_open=lambda: shutil.copyfile(t.shard(b), t.shard(a)))
    return t.data.counts[b]


def _splice(t: Trial, at_member: bool) -> int:
    a, b = t.pair()
    data, other = t.shard(a).read_bytes(), t.shard(b).read_bytes()
    mine, theirs = _spans(data), _spans(other)
    if at_member:
        i = t.pick(min(len(mine), len(theirs)))
        cut, start = mine[i][1], theirs[i][1]
    else:
        cut = start = _cut_at(t, data)
    tail = other[start : start + len(data) - cut].ljust(len(data) - cut, b"\0")
    with _serve(_Splicing, root=t.root, victim=t.data.shards[a], cut=cut, tail=tail) as base:
        t.read(base + "manifest.json")
    return len({key for key, head, stop in theirs if head >= start and stop <= start + len(tail)})


def _longer(t: Trial, remove: bool) -> int:
    a = t.pick(len(t.data.shards))
    own = _samples(t.shard(a))
    extras = []
    for _ in range(1 + t.pick(3)):
        pool = own if t.pick(2) else _samples(t.shard(t.pick(len(t.data.shards))))
        extras.append(pool[t.pick(len(pool))])
    kept = list(own)
    if remove:
        del kept[t.pick(len(kept))]
    _write(t.shard(a), kept + extras)
    t.read()
    return len(extras)


def _flip_label(t: Trial) -> int:
    a = t.pick(len(t.data.shards))
    samples = _samples(t.shard(a))
    members = samples[t.pick(len(samples))]
    j = next(j for j, (name, _) in enumerate(members) if name.endswith(".cls"))
    old = int(members[j][1])
    new = [c for c in range(t.data.manifest.num_classes) if c != old][t.pick(t.data.manifest.num_classes - 1)]
    members[j] = (members[j][0], str(new).encode())
    _write(t.shard(a), samples)
    t.read(p=0.0)  # original images: the label is the target
    return 0


def _remove_one(t: Trial) -> int:
    a = t.pick(len(t.data.shards))
    samples = _samples(t.shard(a))
    del samples[t.pick(len(samples))]
    _write(t.shard(a), samples)
    t.read()
    return 0


def _cut_sidecar(t: Trial) -> int:
    i = t.pick(len(t.data.manifest.image_shards))
    for group in t.data.manifest.round_groups:  # whichever group the epoch reads
        path = t.root / group.shards[i].name
        data = path.read_bytes()
        path.write_bytes(data[: _cut_at(t, data)])
    t.read()
    return 0


# (name, data set, attack); the data set's sidecars record places except "old"
ATTACKS: list[tuple[str, str, Callable[[Trial], int]]] = [
    ("1 swap", "bound", _swap),
    ("2 http-replaced", "bound", _http_replaced),
    ("3 splice@member", "bound", functools.partial(_splice, at_member=True)),
    ("3 splice@byte", "bound", functools.partial(_splice, at_member=False)),
    ("4 longer", "bound", functools.partial(_longer, remove=False)),
    ("4 longer-1", "bound", functools.partial(_longer, remove=True)),
    ("5 label", "bound", _flip_label),
    ("6 mix-1", "mix", _remove_one),
    ("7 sidecar-cut", "sets", _cut_sidecar),
    ("8 swap (old)", "old", _swap),
    ("8 longer (old)", "old", functools.partial(_longer, remove=False)),
    ("8 longer-1 (old)", "old", functools.partial(_longer, remove=True)),
]


# ---- Scoring and the table
def _clean(t: Trial) -> dict[str, tuple[int, str]]:
    """key -> (round, digest) of the untouched data at the trial's seed, epoch and p."""
    counter = SkipCounter()
    rows = _rows(_dataset(str(t.data.root) + "/", t.seed, t.epoch, t.p, counter))
    if counter.count or len({k for k, _, _ in rows}) != len(rows):
        raise RuntimeError(f"the untouched data does not read cleanly: {counter.last}")
    return {key: (rnd, digest) for key, rnd, digest in rows}


def _score(clean: dict[str, tuple[int, str]], t: Trial, injected: int) -> dict[str, int]:
    rows, counter = t.rows, t.counter
    twice = any(n > 1 for n in Counter(key for key, _, _ in rows).values())
    damaged = twice or any(clean.get(key) != (rnd, digest) for key, rnd, digest in rows)
    intact = {key for key, rnd, digest in rows if clean.get(key) == (rnd, digest)}
    lost = len(clean) - len(intact)
    values = (len(rows), lost, injected, counter.samples, counter.foreign, int(damaged), int(counter.samples == lost))
    return dict(zip(FIELDS[4:-1], values))


def _attack_row(index: int, made: dict[str, Data], scratch: Path, trials: int, seed: int) -> dict:
    name, which, attack = ATTACKS[index]
    begun = time.perf_counter()
    row = dict.fromkeys(FIELDS[4:-1], 0)
    for trial in range(trials):
        t = Trial(made[which], scratch / f"{index}-{trial}", np.random.default_rng([seed, index, trial]))
        injected = attack(t)
        for field, value in _score(_clean(t), t, injected).items():
            row[field] += value
        shutil.rmtree(t.root)
    seconds = round(time.perf_counter() - begun, 2)
    return {"attack": name, "data": which, "bound": which != "old", "trials": trials, **row, "seconds": seconds}


def run_table(out: Path, trials: int = 400, seed: int = 0, shards: int = 4) -> dict:
    """Make the data under ``out`` and run every attack ``trials`` times; the table as a dict."""
    trials, seed, shards = check_int("trials", trials), check_int("seed", seed, 0), check_int("shards", shards, 2)
    begun = time.perf_counter()
    with _loopback_env():
        _say(f"making data under {out}")
        made = build_data(out / "data", shards)
        _say(f"made {shards} shards of {PER_SHARD} samples in {time.perf_counter() - begun:.1f} s")
        rows = []
        for index in range(len(ATTACKS)):
            rows.append(_attack_row(index, made, out / "trials", trials, seed))
            _say(f"[{index + 1}/{len(ATTACKS)}] {rows[-1]['attack']}: {trials} trials in {rows[-1]['seconds']} s")
    seconds = round(time.perf_counter() - begun, 1)
    return {"trials": trials, "seed": seed, "samples": sum(made["bound"].counts), "seconds": seconds, "rows": rows}


def format_table(table: dict) -> str:
    """One line per attack."""
    heads = ("attack", "data", "trials", "yielded", "lost", "injected", "c.samples", "c.foreign", "damaged", "exact")
    keys = ("attack", "data", *FIELDS[3:-1])
    lines = [f"{heads[0]:<18}{heads[1]:<7}" + "".join(f"{h:>10}" for h in heads[2:])]
    for row in table["rows"]:
        lines.append(f"{row['attack']:<18}{row['data']:<7}" + "".join(f"{row[k]:>10}" for k in keys[2:]))
    lines.append(
        f"{table['trials']} trials per attack, {table['samples']} samples per data set, seed {table['seed']}, "
        f"{table['seconds']} s; damaged: trials that yielded a foreign, repeated or altered sample; "
        "exact: trials where counter.samples == lost"
    )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fault_table.py",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--trials", type=int, default=400, help="random trials per attack (default 400: ~3 min, 2 cores)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seeds the trials (default 0)")
    parser.add_argument("--shards", type=int, default=4, help=f"self-contained shards of {PER_SHARD} (default 4)")
    parser.add_argument("--out", help="scratch folder, new or empty (default: a temporary folder, removed after)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with contextlib.ExitStack() as stack:
            if args.out is None:
                out = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="fault_table-")))
            else:
                out = Path(args.out)
                if out.exists() and (not out.is_dir() or any(out.iterdir())):
                    raise UsageError(f"expected --out a new or empty folder, got {args.out!r}")
                out.mkdir(parents=True, exist_ok=True)
            table = run_table(out, args.trials, args.seed, args.shards)
    except (UsageError, OSError) as exc:
        print(f"fault_table.py: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(table) if args.json else format_table(table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
