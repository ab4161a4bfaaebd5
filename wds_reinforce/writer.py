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

import dataclasses
import hashlib
import io
import json
import os
import platform
import re
import shutil
import tarfile
import tempfile
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch
from PIL import Image

from .augment import DecodeError, Recipe, SourceImage, replay
from .format import SIDECAR_EXT, Manifest, ShardInfo, Sidecar, SkippedInput, encode_sidecar
from .sources import SourceSampleError, Source, SourceSample, WebDatasetSource, open_source
from .teacher import Teacher, load_teacher, parse_teacher_spec, topk

__all__ = [
    "UsageError",
    "ProducerSummary",
    "ReinforceJob",
    "prepare_job",
    "make_shards",
    "write_tar",
    "TAR_MTIME",
]

# Fixed tar header fields: reruns give byte-identical shards.
TAR_MTIME = 0
_TAR_MODE = 0o444
_DONE_DIR = ".done"
_MANIFEST = "manifest.json"
_INFO = "_info.json"


class UsageError(ValueError):
    """A bad argument, found before any work starts (the CLI prints it on one line, exit 2)."""


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


# ----------------------------------------------------------------------------------------
# Output locations: a local folder or s3://bucket/prefix


class _LocalOutput:
    def __init__(self, root: str):
        self.root = Path(root)
        self.url = str(root)

    def check_writable(self) -> None:
        p = self.root.absolute()
        if p.exists():
            if not p.is_dir():
                raise UsageError(f"expected --out to be a directory, got {self.url!r} (a file)")
            if not os.access(p, os.W_OK | os.X_OK):
                raise UsageError(f"expected a writable --out, got {self.url!r} (permission denied)")
            return
        parent = p.parent
        while not parent.exists():
            parent = parent.parent
        if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
            raise UsageError(f"expected a writable --out, got {self.url!r} ({parent} is not writable)")

    def staging(self) -> Path:
        (self.root / _DONE_DIR).mkdir(parents=True, exist_ok=True)
        return self.root

    def finish_file(self, local: Path, name: str, sha256: str) -> None:
        _fsync_rename(local, self.root / name)

    def verify(self, name: str, info: Mapping[str, Any]) -> bool:
        path = self.root / name
        if not path.is_file() or path.stat().st_size != info["bytes"]:
            return False
        return _sha256_file(path) == info["sha256"]

    def read_text(self, name: str) -> str | None:
        path = self.root / name
        return path.read_text() if path.is_file() else None

    def write_text(self, name: str, text: str) -> None:
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        _fsync_rename(tmp, path)

    def close(self) -> None:
        pass


class _S3Output:
    """``s3://bucket/prefix`` via boto3 (which honours AWS_ENDPOINT_URL); shards are staged locally."""

    def __init__(self, url: str):
        import boto3

        rest = url[len("s3://"):]
        self.bucket, _, prefix = rest.partition("/")
        if not self.bucket:
            raise UsageError(f"expected --out like s3://bucket/prefix, got {url!r}")
        self.prefix = prefix.strip("/")
        self.url = url
        self.client = boto3.client("s3")
        self._tmp: str | None = None

    def _key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    def check_writable(self) -> None:
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except Exception as exc:  # botocore raises ClientError, EndpointConnectionError, NoCredentialsError...
            raise UsageError(f"expected a writable --out, got {self.url!r} ({type(exc).__name__}: {exc})") from None

    def staging(self) -> Path:
        if self._tmp is None:
            self._tmp = tempfile.mkdtemp(prefix="wds_reinforce_")
        return Path(self._tmp)

    def finish_file(self, local: Path, name: str, sha256: str) -> None:
        self.client.upload_file(str(local), self.bucket, self._key(name), ExtraArgs={"Metadata": {"sha256": sha256}})
        local.unlink()

    def verify(self, name: str, info: Mapping[str, Any]) -> bool:
        # Downloading every shard to hash it would double the traffic; the uploaded object's
        # size and the sha256 recorded in its metadata at upload time stand in for it.
        try:
            head = self.client.head_object(Bucket=self.bucket, Key=self._key(name))
        except Exception:
            return False
        return head.get("ContentLength") == info["bytes"] and head.get("Metadata", {}).get("sha256") == info["sha256"]

    def read_text(self, name: str) -> str | None:
        try:
            return self.client.get_object(Bucket=self.bucket, Key=self._key(name))["Body"].read().decode()
        except self.client.exceptions.NoSuchKey:
            return None

    def write_text(self, name: str, text: str) -> None:
        self.client.put_object(Bucket=self.bucket, Key=self._key(name), Body=text.encode())

    def close(self) -> None:
        if self._tmp:
            shutil.rmtree(self._tmp, ignore_errors=True)


def _open_output(out: str) -> _LocalOutput | _S3Output:
    if not isinstance(out, (str, os.PathLike)) or not str(out):
        raise UsageError(f"expected --out a folder or s3://bucket/prefix, got {out!r}")
    out = str(out)
    return _S3Output(out) if out.startswith("s3://") else _LocalOutput(out)


def _fsync_rename(src: Path, dst: Path) -> None:
    with open(src, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(src, dst)
    try:
        fd = os.open(dst.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)  # the rename itself must survive a crash
    finally:
        os.close(fd)


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


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
        desc = self.teacher.describe()
        if self.class_map is not None:
            desc["class_map"] = list(self.class_map)
        return desc

    @property
    def digest(self) -> str:
        """Identity of everything that decides the shards' bytes; done markers carry it."""
        if not self._digest:
            ident = {
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
            canon = json.dumps(ident, sort_keys=True, separators=(",", ":"))
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
                raise UsageError(
                    f"expected --out {self.output.url!r} to be empty or hold this job's shards, "
                    f"got shards of another job (source, teacher, recipe or settings differ); use a new --out"
                )
            return

    def run(self) -> ProducerSummary:
        """Make this rank's unfinished shards; rank 0 then waits for all and writes the manifest."""
        start = time.perf_counter()
        self.output.staging()
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
        dataset = _ReplayDataset(self.source, indices, self.recipe, self.seed, self.rounds)
        loader = torch.utils.data.DataLoader(
            dataset,
            batch_size=None,
            shuffle=False,
            num_workers=self.workers,
            collate_fn=_identity,
            worker_init_fn=_worker_init if self.workers else None,
            prefetch_factor=max(2, -(-self.batch_size // max(self.rounds, 1)) // max(self.workers, 1) + 1)
            if self.workers
            else None,
            persistent_workers=False,
        )
        bar = None
        if self.progress and self.rank == 0:
            from tqdm import tqdm

            bar = tqdm(total=len(indices), unit="img", desc="reinforce", dynamic_ncols=True)
        items = iter(loader)
        images = 0
        for j in todo:
            images += self._make_shard(j, items, bar)
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
                sidecar = Sidecar(self.recipe.fingerprint, s["idx"], s["prob"], s["params"])
                data = encode_sidecar(sidecar)
                samples.append({"key": sample.key, "sidecar_bytes": len(data)})
                yield f"{sample.key}.{sample.ext}", sample.data
                yield f"{sample.key}.cls", str(sample.label).encode()
                yield f"{sample.key}.{SIDECAR_EXT}", data

        def members() -> Iterator[tuple[str, bytes]]:
            nonlocal images
            for _ in self._indices(j):
                item = next(items)
                if bar is not None:
                    bar.update(1)
                if item["error"] is not None:
                    skipped.append(SkippedInput(item["sample"].key, item["error"]))
                    continue
                item["idx"] = np.zeros((self.rounds, self.topk), np.uint32)
                item["prob"] = np.zeros((self.rounds, self.topk), np.float16)
                item["left"] = self.rounds
                pending.append(item)
                queue.extend((item, r) for r in range(self.rounds))
                images += self.rounds
                while len(queue) >= self.batch_size:
                    run_teacher(self.batch_size)
                    yield from emit_ready()
            if queue:
                run_teacher(len(queue))
            yield from emit_ready()

        with open(tmp, "wb") as f:
            write_tar(f, members())
        sha = _sha256_file(tmp)
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
            versions=_versions(),
            split=self.split,
            name=self.name,
        )
        # The manifest goes last: its presence means every shard it lists is complete.
        self.output.write_text(_INFO, json.dumps(manifest.timm_info(), indent=1, sort_keys=True) + "\n")
        self.output.write_text(_MANIFEST, manifest.to_json())
        return manifest, sum(d.get("sidecar_bytes", 0) for d in dones)

    def _summary(
        self, manifest: Manifest | None, side: int, made: int, reused: int, images: int, seconds: float
    ) -> ProducerSummary:
        samples = manifest.num_samples if manifest else 0
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


def _versions() -> dict[str, str]:
    import simplejpeg
    import timm
    import torchvision

    from . import __version__

    return {
        "wds_reinforce": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "timm": timm.__version__,
        "numpy": np.__version__,
        "pillow": Image.__version__,
        "simplejpeg": simplejpeg.__version__,
    }


def _reason(exc: BaseException) -> str:
    """A skipped input's reason: the error's type and message, the same on every run."""
    # Object addresses in messages would make the manifest differ between runs.
    return re.sub(r" at 0x[0-9a-fA-F]+", "", f"{type(exc).__name__}: {exc}")


def _identity(item: Any) -> Any:
    return item


def _worker_init(_: int) -> None:
    # Workers replay on the CPU next to the teacher: one thread each avoids oversubscription.
    torch.set_num_threads(1)


class _ReplayDataset(torch.utils.data.Dataset):
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
            return {"sample": SourceSample(key, b"", -1, ""), "error": _reason(exc)}
        try:
            src = SourceImage(sample.data)
            params = self.recipe.sample_rounds(self.seed, sample.key, self.rounds, src.size)
            pixels = torch.stack(
                [replay(src, {c: v[r] for c, v in params.items()}, self.recipe) for r in range(self.rounds)]
            )
        except (DecodeError, OSError, Image.DecompressionBombError) as exc:
            return {"sample": sample, "error": _reason(exc)}
        return {"sample": sample, "error": None, "params": params, "images": pixels}


# ----------------------------------------------------------------------------------------
# Entry points


def _dist_env() -> tuple[int, int]:
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


def _positive(name: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise UsageError(f"expected {name} an integer >= {minimum}, got {value!r}")
    return value


def _load_class_map(class_map: str | Mapping[str, int], source: Source, teacher_classes: int) -> list[int]:
    if isinstance(class_map, (str, os.PathLike)):
        path = Path(class_map)
        if not path.is_file():
            raise UsageError(f"expected --class-map to be a JSON file, got {str(class_map)!r} (not found)")
        try:
            class_map = json.loads(path.read_text())
        except ValueError as exc:
            raise UsageError(f"expected --class-map to be valid JSON, got {exc}") from None
    if not isinstance(class_map, Mapping):
        raise UsageError(f"expected --class-map to map source class names to teacher class ids, got {type(class_map).__name__}")
    missing = [c for c in source.class_names if c not in class_map]
    if missing:
        raise UsageError(f"expected --class-map to cover every source class, got none for {missing[:5]}")
    ids = [class_map[c] for c in source.class_names]
    bad = [i for i in ids if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < teacher_classes]
    if bad:
        raise UsageError(f"expected --class-map teacher ids in [0, {teacher_classes}), got {bad[:5]}")
    if len(set(ids)) != len(ids):
        raise UsageError("expected --class-map to map source classes to distinct teacher ids")
    return ids


def prepare_job(
    source: str | Source,
    teacher: str | Sequence[str] | Teacher,
    out: str = "shards/out",
    recipe: str | Mapping[str, Any] | Recipe = "rrc",
    image_size: int | Sequence[int] | None = None,
    decode: str | None = None,
    rounds: int = 8,
    topk: int = 10,
    shard_size: int = 1000,
    batch_size: int = 256,
    workers: int = 4,
    seed: int = 0,
    device: str = "auto",
    teacher_checkpoint: str | Sequence[str | None] | None = None,
    teacher_num_classes: int | None = None,
    pretrained: bool = False,
    class_map: str | Mapping[str, int] | None = None,
    progress: bool = True,
    name: str = "reinforced",
    split: str = "train",
    shuffle: bool = True,
) -> ReinforceJob:
    """Check every argument and build the job; nothing is written.

    Raises:
        UsageError: a missing or empty source, an unknown recipe or teacher, a bad number,
            top-k above the class count, teacher classes that differ from the source's (without
            ``class_map``), an unwritable or foreign ``out``.
    """
    rounds = _positive("rounds", rounds)
    k = _positive("topk", topk)
    shard_size = _positive("shard_size", shard_size)
    batch_size = _positive("batch_size", batch_size)
    workers = _positive("workers", workers, 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise UsageError(f"expected seed a non-negative integer, got {seed!r}")
    if not isinstance(split, str) or not split or "." in split or "/" in split:
        raise UsageError(f"expected split a name without dots or slashes, got {split!r}")
    rank, world = _dist_env()
    try:
        src = open_source(source)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    try:
        rcp = Recipe.from_spec(recipe, size=image_size, decode=decode)
    except ValueError as exc:
        raise UsageError(f"bad recipe: {exc}") from None
    output = _open_output(out)
    if isinstance(teacher, Teacher):
        tch = teacher
    else:
        try:
            import timm

            members = parse_teacher_spec(teacher)
            for kind, model in members:
                if kind == "timm" and not timm.is_model(model):
                    raise ValueError(f"unknown teacher 'timm:{model}'; expected a timm model name (see timm.list_models())")
            tch = load_teacher(teacher, teacher_checkpoint, num_classes=teacher_num_classes, pretrained=pretrained, device=device)
        except (ValueError, RuntimeError) as exc:  # RuntimeError: a checkpoint torch cannot read
            raise UsageError(str(exc).splitlines()[0]) from None
    cmap = None
    if class_map is not None:
        cmap = _load_class_map(class_map, src, tch.num_classes)
        class_names = list(src.class_names)
    elif isinstance(src, WebDatasetSource) and src.class_names == [str(i) for i in range(len(src.class_names))]:
        # Class names inferred from labels only: the teacher must cover every label seen.
        if tch.num_classes < len(src.class_names):
            raise UsageError(
                f"expected a teacher with at least {len(src.class_names)} classes for the source's labels, "
                f"got {tch.num_classes} (pass --class-map to map them)"
            )
        class_names = [str(i) for i in range(tch.num_classes)]
    else:
        if tch.num_classes != src.num_classes:
            raise UsageError(
                f"expected a teacher with the source's {src.num_classes} classes, got {tch.num_classes} "
                f"(pass --class-map to map source classes to teacher classes)"
            )
        class_names = list(src.class_names)
    if k > len(class_names):
        raise UsageError(f"expected topk <= the {len(class_names)} classes, got {k}")
    output.check_writable()
    job = ReinforceJob(
        source=src,
        teacher=tch,
        recipe=rcp,
        output=output,
        rounds=rounds,
        topk=k,
        seed=seed,
        shard_size=shard_size,
        batch_size=batch_size,
        workers=workers,
        class_names=class_names,
        class_map=cmap,
        rank=rank,
        world_size=world,
        progress=progress,
        name=name,
        split=split,
        shuffle=bool(shuffle),
    )
    job.check_existing()
    return job


def make_shards(source: str | Source, teacher: str | Sequence[str] | Teacher, out: str = "shards/out", **kwargs: Any) -> ProducerSummary:
    """Reinforce ``source`` with ``teacher`` into webdataset shards under ``out``.

    Args:
        source: a source spec (see ``wds_reinforce.sources.open_source``) or a ``Source``.
        teacher: ``"timm:NAME"``, comma-separated or a list for an ensemble, or a ``Teacher``.
        out: a folder or ``s3://bucket/prefix``.
        **kwargs: the other arguments of ``prepare_job`` (recipe, image_size, decode, rounds,
            topk, shard_size, batch_size (images, i.e. samples x rounds, per teacher call),
            workers, seed, device, teacher_checkpoint, teacher_num_classes, pretrained,
            class_map, progress, name, split, shuffle).

    Returns:
        A ``ProducerSummary``. Under torchrun (RANK / WORLD_SIZE set) each rank makes shards
        ``j % WORLD_SIZE == RANK``; rank 0 waits for all and writes the manifest.

    Raises:
        UsageError: bad arguments, before any work starts.
    """
    return prepare_job(source, teacher, out, **kwargs).run()
