"""Sidecar sets: reinforce plain webdataset shards where they are, without copying their images.

The image shards (local, ``http(s)://`` or ``s3://``) are only read. For each image shard i the
producer writes one sidecar shard per round group g, ``rounds-AAAAA-BBBBB/{split}-{i:06d}.tar``,
holding ``{key}.dr.mp`` for the same keys in the same order, with rounds ``[g*G, (g+1)*G)``
(a sidecar's row r is round ``g*G + r``). The manifest lists the image shards (URLs as given,
local paths made absolute, with sizes, sha256 and counts) and every group's shards; it is the
one entry point, read by the same ``ReinforcedDataset``, which reads one group per epoch.

Rounds are seeded by (seed, key, round), so rerunning a job with a larger ``rounds`` makes only
the new groups: existing sidecar shards are verified and never rewritten, and the manifest is
replaced last. Work is partitioned by image shard (rank r takes shards ``i % world == r``); each
sidecar shard is written to a temporary name, fsynced, renamed and recorded with a done marker.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import braceexpand
import numpy as np
import torch

from wds_reinforce.core.augment import Recipe, replay, round_rng
from wds_reinforce.core.augment.mixing import mix_row, mixed_views
from wds_reinforce.core.decode import SourceImage
from wds_reinforce.core.errors import DataError, FormatError, UsageError
from wds_reinforce.core.format import (
    SIDECAR_EXT,
    Manifest,
    RoundGroup,
    ShardInfo,
    Sidecar,
    SkippedInput,
    TeacherSet,
    crc32c,
    decode_sidecar,
    encode_sidecar,
)
from wds_reinforce.core.targets import topk
from wds_reinforce.io.shards import HashingReader, image_bytes
from wds_reinforce.io.shards import samples as shard_samples
from wds_reinforce.io.storage import open_output, open_url
from wds_reinforce.layouts import SIDECAR_SETS, Part, group_dir, layout_of, parse_manifest, read_unit
from wds_reinforce.produce.make import checked_teacher, dist_env
from wds_reinforce.produce.self_contained import (
    OtherJobError,
    ProducerSummary,
    error_reason,
    library_versions,
    write_tar_file,
)
from wds_reinforce.produce.teacher import Teacher

__all__ = ["SidecarSetJob", "SIDECAR_JOB_FILE", "image_shard_urls"]

_DONE_DIR = ".done"
_MANIFEST = "manifest.json"
SIDECAR_JOB_FILE = f"{_DONE_DIR}/sidecar-job.json"  # the job's identity, written before any shard


def image_shard_urls(spec: str | Sequence[str]) -> list[str]:
    """Image shard URLs from a brace pattern or a list; local paths become absolute (the manifest
    must find them from anywhere), URLs stay as given.

    Raises:
        UsageError: no shards, or a local shard that does not exist.
    """
    items = [spec] if isinstance(spec, str) else list(spec)
    urls = [u for item in items for u in braceexpand.braceexpand(str(item))]
    if not urls:
        raise UsageError(f"expected image shard URLs, got none from {spec!r}")
    out = []
    for url in urls:
        if "://" in url:
            out.append(url)
            continue
        path = url[len("file:") :] if url.startswith("file:") else url
        if not os.path.isfile(path):
            raise UsageError(f"expected existing image shards, got {url!r} (not found)")
        out.append(os.path.abspath(path))
    return out


def _identity(item: Any) -> Any:
    return item


class _ShardReplay(torch.utils.data.IterableDataset):
    """Items (image shard i, url, rounds to make) -> per sample its pixels for those rounds, then an
    end-of-shard record with the image shard's identity. Workers take whole shards."""

    def __init__(self, items: Sequence[tuple[int, str, list[int]]], recipe: Recipe, seed: int):
        super().__init__()
        self.items, self.recipe, self.seed = list(items), recipe, seed

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        items = self.items if info is None else self.items[info.id :: info.num_workers]
        for i, url, rounds in items:
            yield from self._shard(i, url, rounds)

    def _shard(self, i: int, url: str, rounds: list[int]) -> Iterator[dict[str, Any]]:
        keys = []
        with open_url(url) as raw:
            stream = HashingReader(raw)
            for sample in shard_samples(stream, url):
                key = sample["__key__"]
                keys.append(key)
                yield self._replay(i, key, sample, rounds)
            stream.drain()
        first, last = (keys[0], keys[-1]) if keys else ("", "")
        image = ShardInfo(url, len(keys), stream.count, stream.hexdigest(), first, last)
        yield {"shard": i, "end": image}

    def _replay(self, i: int, key: str, sample: Mapping[str, Any], rounds: list[int]) -> dict[str, Any]:
        try:
            data = image_bytes(sample)
        except FormatError as exc:
            return {"shard": i, "key": key, "error": exc.message}
        try:
            src = SourceImage(data)
            params = [self.recipe.sample(round_rng(self.seed, key, r), src.size) for r in rounds]
            pixels = torch.stack([replay(src, p, self.recipe) for p in params])
        except DataError as exc:
            return {"shard": i, "key": key, "error": error_reason(exc)}
        return {"shard": i, "key": key, "error": None, "params": params, "images": pixels, "crc": crc32c(data)}


@dataclass
class SidecarSetJob:
    """A checked sidecar-set job (``prepare_sidecar_job``); ``run()`` makes this rank's sidecar shards."""

    image_urls: list[str]
    teacher: Teacher
    recipe: Recipe
    output: Any
    rounds: int
    group_rounds: int
    topk: int
    seed: int
    batch_size: int
    workers: int
    rank: int = 0
    world_size: int = 1
    progress: bool = True
    name: str = "reinforced"
    split: str = "train"
    wait_timeout: float = 7 * 24 * 3600.0
    _checked: dict[tuple[int, int], str] = field(default_factory=dict, init=False, repr=False)

    def finished_shards(self) -> int:
        """Sidecar shards of this job that are finished and intact (what an interrupted run keeps)."""
        n = len(self.image_urls)
        return sum(self._valid(g, i) is not None for g in range(self.groups) for i in range(n))

    @property
    def groups(self) -> int:
        return self.rounds // self.group_rounds

    def identity(self) -> dict[str, Any]:
        """What decides every group's bytes; not ``rounds``, so that rounds can be added later."""
        return {
            "layout": SIDECAR_SETS,
            "images": self.image_urls,
            "recipe": self.recipe.to_dict(),
            "teacher": self.teacher.describe(self.recipe),
            "group_rounds": self.group_rounds,
            "topk": self.topk,
            "seed": self.seed,
            "batch_size": self.batch_size,
        }

    @property
    def digest(self) -> str:
        canon = json.dumps(self.identity(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canon.encode()).hexdigest()[:16]

    def sidecar_name(self, g: int, i: int) -> str:
        return f"{group_dir(g * self.group_rounds, self.group_rounds)}/{self.split}-{i:06d}.tar"

    def _done_name(self, g: int, i: int) -> str:
        return f"{_DONE_DIR}/{self.sidecar_name(g, i)}.json"

    def _read_done(self, g: int, i: int) -> dict[str, Any] | None:
        text = self.output.read_text(self._done_name(g, i))
        try:
            done = json.loads(text) if text is not None else None
        except ValueError:
            return None
        return done if isinstance(done, dict) else None

    def check_existing(self) -> None:
        """Refuse to add to an output that holds another job's sidecar sets (before any work)."""
        text = self.output.read_text(SIDECAR_JOB_FILE)
        if text is None:
            return
        try:
            other = json.loads(text)
        except ValueError:
            other = {}
        if other.get("job") != self.digest:
            mine, theirs = self.identity(), other.get("identity", {})
            differ = sorted(
                k for k in mine if json.dumps(mine[k], sort_keys=True) != json.dumps(theirs.get(k), sort_keys=True)
            )
            raise OtherJobError(
                f"expected the output {self.output.url!r} to be empty or hold this job's sidecar sets, got another "
                f"job's (differing: {', '.join(differ) or 'unknown'}); use a new output folder"
            )

    def _valid(self, g: int, i: int) -> dict[str, Any] | None:
        done = self._read_done(g, i)
        if done is None or done.get("job") != self.digest:
            return None
        info = done.get("shard", {})
        if self._checked.get((g, i)) == info.get("sha256") or self.output.verify(self.sidecar_name(g, i), info):
            self._checked[(g, i)] = info.get("sha256")
            return done
        return None

    def run(self) -> ProducerSummary:
        """Make this rank's missing (group, shard) sidecar shards; rank 0 then writes the manifest."""
        start = time.perf_counter()
        self.output.staging()
        if self.rank == 0 and self.output.read_text(SIDECAR_JOB_FILE) is None:
            self.output.write_text(
                SIDECAR_JOB_FILE, json.dumps({"job": self.digest, "identity": self.identity()}, sort_keys=True)
            )
        todo = []
        for i in range(self.rank, len(self.image_urls), self.world_size):
            groups = [g for g in range(self.groups) if self._valid(g, i) is None]
            if groups:
                todo.append((i, groups))
        images = self._make(todo)
        seconds = time.perf_counter() - start
        manifest = self._write_manifest() if self.rank == 0 else None
        made = sum(len(g) for _, g in todo)
        samples = layout_of(manifest).num_samples(manifest) if manifest else 0
        summary = ProducerSummary(
            out=self.output.url,
            samples=samples,
            skipped=len(manifest.skipped) if manifest else 0,
            rounds=self.rounds,
            shards=len(self.image_urls) * self.groups,
            made=made,
            reused=len(range(self.rank, len(self.image_urls), self.world_size)) * self.groups - made,
            bytes=sum(s.bytes for g in manifest.round_groups for s in g.shards) if manifest else 0,
            sidecar_bytes_per_round=0.0,
            images_per_s=images / seconds if seconds > 0 else 0.0,
            seconds=seconds,
            manifest_written=manifest is not None,
        )
        if manifest is not None and samples:
            summary.sidecar_bytes_per_round = summary.bytes / (samples * self.rounds)
        self.output.close()
        return summary

    def _make(self, todo: list[tuple[int, list[int]]]) -> int:
        if not todo:
            return 0
        G = self.group_rounds
        items = [(i, self.image_urls[i], [r for g in groups for r in range(g * G, (g + 1) * G)]) for i, groups in todo]
        groups_of = dict(todo)
        items_rounds = {i: rounds for i, _, rounds in items}
        loader = torch.utils.data.DataLoader(
            _ShardReplay(items, self.recipe, self.seed),
            batch_size=None,
            num_workers=min(self.workers, len(items)),
            collate_fn=_identity,
        )
        state: dict[int, dict[str, Any]] = {}
        images = 0
        width = self.recipe.mix.window if self.recipe.mix is not None else 1

        def enqueue(st: dict[str, Any], rounds: list[int]) -> None:
            nonlocal images
            window, st["window"] = st["window"], []
            if self.recipe.mix is not None and window:
                self._mix(window, rounds)
            for item in window:
                n = len(item["params"])
                item["idx"] = np.zeros((n, self.topk), np.uint32)
                item["prob"] = np.zeros((n, self.topk), np.float16)
                st["queue"].extend((item, r) for r in range(n))
                images += n

        for item in loader:
            i = item["shard"]
            st = state.setdefault(i, {"samples": [], "queue": deque(), "end": None, "window": []})
            if "end" in item:
                st["end"] = item["end"]
                enqueue(st, items_rounds[i])
            elif item["error"] is None:
                st["samples"].append(item)
                st["window"].append(item)  # pairing windows: W consecutive samples with sidecars
                if len(st["window"]) == width:
                    enqueue(st, items_rounds[i])
            else:
                st["samples"].append(item)
            while len(st["queue"]) >= self.batch_size or (st["end"] is not None and st["queue"]):
                self._run_teacher(st["queue"], min(self.batch_size, len(st["queue"])))
            if st["end"] is not None:
                self._write_shard(i, groups_of[i], st["samples"], st["end"])
                del state[i]
                if self.progress and self.rank == 0:
                    print(
                        f"sidecars for image shard {i}: {st['end'].samples} samples, groups {groups_of[i]}", flush=True
                    )
        return images

    def _mix(self, window: list[dict[str, Any]], rounds: list[int]) -> None:
        """Mix one pairing window in place: the views the teacher sees, mixing columns, window checksum."""
        keys = [item["key"] for item in window]
        mixed, columns, crc = self.recipe.mix.mix_window(self.seed, keys, [item["images"] for item in window], rounds)
        for item, views, cols in zip(window, mixed, columns):
            item["images"], item["window"] = views, crc
            for t, params in enumerate(item["params"]):
                params.update(mix_row(cols, t))

    def _run_teacher(self, queue: deque, count: int) -> None:
        batch = [queue.popleft() for _ in range(count)]
        probs = self.teacher.predict(torch.stack([s["images"][r] for s, r in batch]))
        idx, prob = topk(probs, self.topk)
        for row, (s, r) in enumerate(batch):
            s["idx"][r], s["prob"][r] = idx[row], prob[row]
            if r == len(s["params"]) - 1:
                s["images"] = None  # the teacher has seen every round: free the pixels

    def _write_shard(self, i: int, groups: list[int], samples: list[dict[str, Any]], image: ShardInfo) -> None:
        G = self.group_rounds
        skipped = [SkippedInput(s["key"], s["error"]) for s in samples if s["error"] is not None]
        done_ok = [s for s in samples if s["error"] is None]
        for n, g in enumerate(groups):
            rows = slice(n * G, (n + 1) * G)
            members = []
            for s in done_ok:
                cols = {c: np.stack([p[c] for p in s["params"][rows]]) for c in s["params"][0]}
                sidecar = Sidecar(
                    self.recipe.fingerprint, s["idx"][rows], s["prob"][rows], cols, s["crc"], s.get("window")
                )
                members.append((f"{s['key']}.{SIDECAR_EXT}", encode_sidecar(sidecar)))
            info = write_tar_file(self.output, self.sidecar_name(g, i), iter(members), [s["key"] for s in done_ok])
            sha = info.sha256
            done = {
                "job": self.digest,
                "shard": dataclasses.asdict(info),
                "image": dataclasses.asdict(image),
                "skipped": [dataclasses.asdict(s) for s in skipped],
            }
            self.output.write_text(self._done_name(g, i), json.dumps(done, sort_keys=True) + "\n")
            self._checked[(g, i)] = sha

    def _write_manifest(self) -> Manifest:
        deadline = time.monotonic() + self.wait_timeout
        while True:
            dones = {(g, i): self._valid(g, i) for g in range(self.groups) for i in range(len(self.image_urls))}
            missing = [self.sidecar_name(g, i) for (g, i), d in dones.items() if d is None]
            if not missing:
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"expected every sidecar shard finished, got {len(missing)} not: {missing[:5]}")
            time.sleep(1.0)
        images = [ShardInfo(**dones[(0, i)]["image"]) for i in range(len(self.image_urls))]
        for (g, i), done in dones.items():
            if done["image"]["sha256"] != images[i].sha256:
                raise DataError(
                    f"image shard {self.image_urls[i]} changed since round group {g} was made (sha256 differs): "
                    "its sidecars no longer describe it; use a new output folder",
                    url=self.image_urls[i],
                )
        groups = [
            RoundGroup(
                g * self.group_rounds,
                self.group_rounds,
                [ShardInfo(**dones[(g, i)]["shard"]) for i in range(len(self.image_urls))],
            )
            for g in range(self.groups)
        ]
        manifest = Manifest(
            recipe=self.recipe.to_dict(),
            fingerprint=self.recipe.fingerprint.hex(),
            teacher=self.teacher.describe(self.recipe),
            num_classes=self.teacher.num_classes,
            rounds=self.rounds,
            topk=self.topk,
            seed=self.seed,
            class_names=[str(c) for c in range(self.teacher.num_classes)],
            skipped=[SkippedInput(**s) for i in range(len(self.image_urls)) for s in dones[(0, i)]["skipped"]],
            versions=library_versions(),
            split=self.split,
            name=self.name,
            layout=SIDECAR_SETS,
            image_shards=images,
            round_groups=groups,
        )
        self.output.write_text(_MANIFEST, manifest.to_json())  # last, replacing any earlier one atomically
        return manifest


def prepare_sidecar_job(
    source: str | Sequence[str],
    teacher: str | Sequence[str] | Teacher,
    out: str = "shards/out",
    *,
    round_group: int | None = None,
    recipe: str | Mapping[str, Any] | Recipe = "rrc",
    image_size: int | Sequence[int] | None = None,
    decode: str | None = None,
    rounds: int = 8,
    topk: int | None = None,
    batch_size: int = 256,
    workers: int | None = None,
    seed: int = 0,
    device: str = "auto",
    teacher_checkpoint: str | Sequence[str | None] | None = None,
    teacher_num_classes: int | None = None,
    pretrained: bool = False,
    progress: bool = True,
    name: str = "reinforced",
    split: str = "train",
    **unused: Any,
) -> SidecarSetJob:
    """Check every argument and build a sidecar-set job; nothing is written.

    ``source`` is plain webdataset image shards (a brace pattern or a list; local, http(s), s3);
    ``round_group`` G rounds go into each group (default: all ``rounds`` in one group), and
    ``rounds`` must be a multiple of G.

    Raises:
        UsageError: bad arguments (also a producer option that has no meaning here), before any work.
    """
    from wds_reinforce.core.threads import default_workers

    meaningless = sorted(k for k, v in unused.items() if v not in (None, False) and k not in ("shuffle", "threads"))
    if meaningless:
        raise UsageError(f"expected no {', '.join(meaningless)} with sidecar sets (the image shards stay as they are)")
    for label, value, low in (("rounds", rounds, 1), ("batch_size", batch_size, 1), ("seed", seed, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise UsageError(f"expected {label} an integer >= {low}, got {value!r}")
    group = rounds if round_group is None else round_group
    if isinstance(group, bool) or not isinstance(group, int) or group < 1 or rounds % group:
        raise UsageError(f"expected round_group a positive divisor of rounds={rounds}, got {group!r}")
    if not isinstance(split, str) or not split or "." in split or "/" in split:
        raise UsageError(f"expected split a name without dots or slashes, got {split!r}")
    workers = default_workers() if workers is None else workers
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        raise UsageError(f"expected workers an integer >= 0, got {workers!r}")
    rank, world = dist_env()
    urls = image_shard_urls(source)
    try:
        rcp = Recipe.from_spec(recipe, size=image_size, decode=decode)
    except ValueError as exc:
        raise UsageError(f"bad recipe: {exc}") from None
    output = open_output(out)
    tch = checked_teacher(teacher, teacher_checkpoint, teacher_num_classes, pretrained, device)
    k = min(10, tch.num_classes) if topk is None else topk
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= tch.num_classes:
        raise UsageError(f"expected topk in [1, {tch.num_classes}] (the teacher's classes), got {k!r}")
    output.check_writable()
    job = SidecarSetJob(
        image_urls=urls,
        teacher=tch,
        recipe=rcp,
        output=output,
        rounds=rounds,
        group_rounds=group,
        topk=k,
        seed=seed,
        batch_size=batch_size,
        workers=workers,
        rank=rank,
        world_size=world,
        progress=progress,
        name=name,
        split=split,
    )
    job.check_existing()
    return job


def add_teacher_set(
    location: str,
    teacher: str | Sequence[str] | Teacher,
    name: str,
    *,
    batch_size: int = 256,
    device: str = "auto",
    teacher_checkpoint: str | Sequence[str | None] | None = None,
    teacher_num_classes: int | None = None,
    pretrained: bool = False,
    progress: bool = True,
) -> Manifest:
    """Add another teacher's targets to a sidecar set, for the rounds it already stores.

    The stored parameters of every round are replayed on the image shards and the teacher's
    top-k (the set's k) written as targets-only sidecars (no op columns) under
    ``teachers/{name}/``, aligned with the params shards; the manifest gains a ``TeacherSet`` and
    is replaced last. Resumable and torchrun-partitioned by image shard, like the set itself;
    replay runs in this process (the teacher is the cost). The loader then takes
    ``teacher=k`` or ``teacher="mean"``.

    Raises:
        UsageError: not a sidecar set, a name in use by another teacher, a teacher whose classes
            differ from the set's, bad numbers; before any work.
    """
    if not isinstance(name, str) or not name or "/" in name or name.startswith("."):
        raise UsageError(f"expected a teacher set name without slashes, got {name!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise UsageError(f"expected batch_size an integer >= 1, got {batch_size!r}")
    output = open_output(location)
    text = output.read_text(_MANIFEST)
    if text is None:
        raise UsageError(f"expected a sidecar set at {location!r}, found no {_MANIFEST}")
    manifest = parse_manifest(text, f"{location}/{_MANIFEST}")
    if manifest.layout != SIDECAR_SETS:
        raise UsageError(f"expected a sidecar set at {location!r}, got a {manifest.layout} data set")
    tch = checked_teacher(teacher, teacher_checkpoint, teacher_num_classes, pretrained, device)
    if tch.num_classes != manifest.num_classes:
        raise UsageError(f"expected a teacher with the set's {manifest.num_classes} classes, got {tch.num_classes}")
    recipe = Recipe.from_dict(manifest.recipe)
    desc = tch.describe(recipe)
    existing = next((t for t in manifest.teacher_sets if t.name == name), None)
    if existing is not None and existing.teacher != desc:
        raise UsageError(f"expected a new teacher set name, got {name!r}, which another teacher's targets use")
    rank, world = dist_env()
    digest = hashlib.sha256(json.dumps([name, desc, manifest.fingerprint], sort_keys=True).encode()).hexdigest()[:16]
    base = output.url
    skipped = frozenset(s.key for s in manifest.skipped)

    def target_name(g: int, i: int) -> str:
        return f"teachers/{name}/{manifest.round_groups[g].shards[i].name}"

    def done_of(g: int, i: int) -> dict[str, Any] | None:
        text = output.read_text(f"{_DONE_DIR}/{target_name(g, i)}.json")
        try:
            done = json.loads(text) if text is not None else None
        except ValueError:
            return None
        if not isinstance(done, dict) or done.get("job") != digest:
            return None
        return done if output.verify(target_name(g, i), done["shard"]) else None

    output.staging()
    for i in range(rank, len(manifest.image_shards), world):
        for g, group in enumerate(manifest.round_groups):
            if done_of(g, i) is not None:
                continue
            params_url = f"{base.rstrip('/')}/{group.shards[i].name}"
            samples = []
            for sample in read_unit(Part(manifest.image_shards[i].name), [Part(params_url)], skipped):
                raw = sample[SIDECAR_EXT]
                sidecar = decode_sidecar_for(raw, manifest, group.rounds, sample["__key__"])
                data = image_bytes(sample)
                if sidecar.image_crc is not None and crc32c(data) != sidecar.image_crc:
                    raise DataError("image bytes do not match the sidecar's checksum", sample["__key__"])
                src = SourceImage(data)
                pixels = torch.stack([replay(src, sidecar.round_params(r), recipe) for r in range(group.rounds)])
                samples.append((sample["__key__"], sidecar, pixels))
            if recipe.mix is not None:  # the teacher sees each round as mixed within its pairing window
                W = recipe.mix.window
                for w in range(0, len(samples), W):
                    window = samples[w : w + W]
                    views = mixed_views([px for _, _, px in window], [sc.ops for _, sc, _ in window])
                    samples[w : w + W] = [(key, sc, px) for (key, sc, _), px in zip(window, views)]
            members = []
            flat = [(n, r) for n in range(len(samples)) for r in range(group.rounds)]
            idx = np.zeros((len(samples), group.rounds, manifest.topk), np.uint32)
            prob = np.zeros((len(samples), group.rounds, manifest.topk), np.float16)
            for b in range(0, len(flat), batch_size):
                batch = flat[b : b + batch_size]
                out_idx, out_prob = topk(tch.predict(torch.stack([samples[n][2][r] for n, r in batch])), manifest.topk)
                for row, (n, r) in enumerate(batch):
                    idx[n, r], prob[n, r] = out_idx[row], out_prob[row]
            for n, (key, sidecar, _) in enumerate(samples):
                targets = Sidecar(sidecar.fingerprint, idx[n], prob[n], {}, sidecar.image_crc)
                members.append((f"{key}.{SIDECAR_EXT}", encode_sidecar(targets)))
            shard_name = target_name(g, i)
            keys = [key for key, _, _ in samples]
            info = write_tar_file(output, shard_name, iter(members), keys)
            done = {"job": digest, "shard": dataclasses.asdict(info)}
            output.write_text(f"{_DONE_DIR}/{shard_name}.json", json.dumps(done, sort_keys=True) + "\n")
            if progress:
                print(f"teacher set {name}: round group {g}, image shard {i}: {len(keys)} samples", flush=True)
    if rank != 0:
        return manifest
    deadline = time.monotonic() + 7 * 24 * 3600.0
    while True:
        dones = [[done_of(g, i) for i in range(len(manifest.image_shards))] for g in range(len(manifest.round_groups))]
        if all(d is not None for row in dones for d in row):
            break
        if time.monotonic() > deadline:
            raise TimeoutError("expected every targets shard of the teacher set finished")
        time.sleep(1.0)
    groups = [[ShardInfo(**d["shard"]) for d in row] for row in dones]
    manifest.teacher_sets = [t for t in manifest.teacher_sets if t.name != name] + [TeacherSet(name, desc, groups)]
    output.write_text(_MANIFEST, manifest.to_json())
    output.close()
    return manifest


def decode_sidecar_for(raw: bytes | None, manifest: Manifest, rounds: int, key: str) -> Sidecar:
    """A params sidecar of a sidecar set, checked against its manifest (fingerprint, rounds, top-k)."""
    if raw is None:
        raise DataError(f"no {SIDECAR_EXT} member", key)
    sidecar = decode_sidecar(raw, key)
    if sidecar.fingerprint.hex() != manifest.fingerprint or (sidecar.rounds, sidecar.topk) != (rounds, manifest.topk):
        raise DataError("sidecar does not match the manifest (fingerprint, rounds or top-k)", key)
    return sidecar
