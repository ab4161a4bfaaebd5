"""Sidecar sets: reinforce plain webdataset shards where they are, without copying their images.

The image shards (local, ``http(s)://`` or ``s3://``) are only read. For each image shard i the
producer writes one sidecar shard per round group g, ``rounds-AAAAA-BBBBB/{split}-{i:06d}.tar``,
holding ``{key}.dr.mp`` for the same keys in the same order, with rounds ``[g*G, (g+1)*G)``
(a sidecar's row r is round ``g*G + r``). The manifest lists the image shards (URLs as given,
local paths made absolute, with sizes, sha256 and counts) and every group's shards; it is the
one entry point, read by the same ``ReinforcedDataset``, which reads one group per epoch.

Rounds are seeded by (seed, key, round), so rerunning a job with a larger ``rounds`` makes only
the new groups: existing sidecar shards are verified and never rewritten, and the manifest is
replaced last. Work is partitioned by image shard (rank r takes shards ``i % world == r``), with
the shared job's lifecycle (``jobs``); another teacher's targets for the stored rounds are added
by ``teacher_sets``.

Class names (the manifest's ``class_names``, what ``inspect_shards.py --grid`` prints) come from,
in order: the caller (``--class-names FILE``), the image shards' own ``manifest.json`` or
``_info.json`` (``found_class_names``), each sample's ``json`` member (``{"label": 3, "class_name":
"dog"}``, gathered while the shards are read), else ``"0" .. "N-1"`` with a note in the summary.

Adding to a set (rounds, a teacher) first reads every image shard that files were made from and
refuses, before anything is written, if one's sha256 changed since (``check_image_shards``). Every
rank checks every such shard, not only its own: otherwise one rank could write new groups while
another refuses. Reading the images once costs far less than running the teacher on them.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, ClassVar

import braceexpand
import torch

from wds_reinforce.core.augment import Recipe
from wds_reinforce.core.errors import DataError, FormatError, UsageError, error_text
from wds_reinforce.core.format import (
    SIDECAR_EXT,
    Manifest,
    ShardInfo,
    Sidecar,
    SkippedInput,
    crc32c,
    encode_sidecar,
)
from wds_reinforce.core.progress import SidecarBytes
from wds_reinforce.core.schedule import WindowCutter
from wds_reinforce.io.outputs import local_path
from wds_reinforce.io.shards import HashingReader, image_bytes, sample_label, samples
from wds_reinforce.io.storage import dirname_url, join_url, open_url, read_url
from wds_reinforce.layouts import (
    INFO_NAME,
    MANIFEST_NAME,
    SIDECAR_SETS,
    group_rows,
    group_shard_name,
    sidecar_set_fields,
)
from wds_reinforce.produce.jobs import (
    DONE_DIR,
    library_versions,
    run,
)
from wds_reinforce.produce.teacher import TeacherBatcher
from wds_reinforce.produce.teacher_job import ProducerSummary, TeacherJob
from wds_reinforce.produce.workers import mix_items, replay_rounds, worker_loader

__all__ = [
    "SidecarSetJob",
    "SIDECAR_JOB_FILE",
    "MadeFrom",
    "check_image_shards",
    "image_shard_urls",
    "found_class_names",
    "read_class_names",
]

SIDECAR_JOB_FILE = f"{DONE_DIR}/sidecar-job.json"  # the job's identity, written before any shard


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
        path = local_path(url)
        if not os.path.isfile(path):
            raise UsageError(f"expected existing image shards, got {url!r} (not found)")
        out.append(os.path.abspath(path))
    return out


def read_class_names(path: str | os.PathLike) -> list[str]:
    """Class names from a UTF-8 text file, one per line: line i names class i (blank lines at the end ignored).

    Raises:
        UsageError: the file cannot be read, or a name is blank.
    """
    try:
        with open(path, encoding="utf-8") as f:
            names = [line.strip() for line in f.read().rstrip().splitlines()]
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(
            f"expected class_names a UTF-8 text file, one name per line, got {str(path)!r} ({exc})"
        ) from None
    blank = [i for i, name in enumerate(names) if not name]
    if not names or blank:
        where = f"line {blank[0] + 1} is blank" if blank else "it is empty"
        raise UsageError(f"expected class_names a UTF-8 text file, one name per line, got {str(path)!r} ({where})")
    return names


def found_class_names(urls: Sequence[str]) -> tuple[list[str], str] | None:
    """The class names the image shards' folder lists (``class_names`` of its ``manifest.json`` or
    ``_info.json``, beside the first shard; a data set this producer made has both), and that file."""
    folder = dirname_url(urls[0]) if urls else ""
    for name in (MANIFEST_NAME, INFO_NAME):
        url = join_url(folder, name)
        if "://" not in url and not os.path.isfile(url):
            continue
        try:
            meta = json.loads(read_url(url))
        except (OSError, ValueError):  # none there, or not JSON: not a list of names
            continue
        names = meta.get("class_names") if isinstance(meta, dict) else None
        if isinstance(names, list) and names and all(isinstance(n, str) for n in names):
            return list(names), url
    return None


def _json_class_name(sample: Mapping[str, Any]) -> tuple[int, str] | None:
    """(label, name) from a sample's ``json`` member ``{"class_name": ...}``; None without one."""
    try:
        meta = json.loads(sample.get("json") or b"null")
        name = meta.get("class_name") if isinstance(meta, dict) else None
        return (sample_label(sample), name) if isinstance(name, str) and name else None
    except ValueError:  # not JSON, or no label: no name to learn
        return None


@dataclass(frozen=True)
class MadeFrom:
    """An image shard as the files made from it recorded it."""

    url: str  # as the manifest lists it
    sha256: str
    samples: int
    folder: str  # the first folder (round group) made from these bytes


def _changed(made: MadeFrom, now: str) -> DataError:
    return DataError(
        f"image shard changed since {made.folder} was made from it (sha256 {made.sha256[:12]}..., now "
        f"{now[:12]}...): its sidecars no longer describe it; remake the sidecar set in a new output folder",
        url=made.url,
        samples=made.samples,
    )


def _image_sha256(url: str) -> str:
    try:
        with open_url(url) as raw:
            stream = HashingReader(raw)
            stream.drain()
    except OSError as exc:
        raise DataError(
            f"cannot read the image shard the set was made from ({type(exc).__name__}: {exc})", url=url
        ) from exc
    return stream.hexdigest()


def check_image_shards(made: Sequence[MadeFrom], threads: int = 1) -> None:
    """Read (streaming, ``threads`` at a time) and hash each image shard in ``made`` once; refuse one
    whose sha256 is not what the files made from it recorded.

    Raises:
        DataError: the first such shard in ``made``'s order (or one that cannot be read), naming
            its URL and the folder made from it; ``samples`` is its count.
    """
    urls = list(dict.fromkeys(m.url for m in made))
    pool = ThreadPoolExecutor(max(1, min(threads, len(urls))), thread_name_prefix="image-check")
    try:
        now = dict(zip(urls, pool.map(_image_sha256, urls)))
    finally:
        pool.shutdown(cancel_futures=True)  # a refusal need not wait for the other shards
    for m in made:
        if now[m.url] != m.sha256:
            raise _changed(m, now[m.url])


class _ShardReplay(torch.utils.data.IterableDataset):
    """Items (image shard i, url, rounds to make) -> per sample its views of those rounds, then an
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
            for sample in samples(stream, url):
                keys.append(sample["__key__"])
                yield self._replay(i, sample, rounds)
            stream.drain()
        first, last = (keys[0], keys[-1]) if keys else ("", "")
        yield {"shard": i, "end": ShardInfo(url, len(keys), stream.count, stream.hexdigest(), first, last)}

    def _replay(self, i: int, sample: Mapping[str, Any], rounds: list[int]) -> dict[str, Any]:
        key = sample["__key__"]
        try:
            data = image_bytes(sample)
        except FormatError as exc:  # no image member: listed as skipped
            return {"shard": i, "key": key, "error": exc.message}
        try:
            params, pixels = replay_rounds(data, key, rounds, self.recipe, self.seed)
        except DataError as exc:
            return {"shard": i, "key": key, "error": error_text(exc, whole=True)}
        crcs = {"crc": crc32c(data), "label_crc": crc32c(sample.get("cls") or b"")}
        named = _json_class_name(sample)
        return {"shard": i, "key": key, "error": None, "params": params, "images": pixels, "named": named, **crcs}


@dataclass
class SidecarSetJob(TeacherJob):
    """A checked sidecar-set job (``make.prepare_sidecar_job``); ``run()`` makes this rank's sidecar shards."""

    job_file: ClassVar[str] = SIDECAR_JOB_FILE
    job_file_decides: ClassVar[bool] = True  # written once: names the sets' job
    what: ClassVar[str] = "sidecar shards"
    image_urls: list[str]
    group_rounds: int
    class_names: list[str] | None = None  # given or found before the run (checked against the teacher)
    names_from: str = ""  # where they came from, for the summary
    # image shard i -> what its finished groups were made from (``check_images``)
    _made_from: dict[int, list[MadeFrom]] = field(default_factory=dict, init=False, repr=False)

    @property
    def groups(self) -> int:
        return self.rounds // self.group_rounds

    @property
    def units(self) -> int:
        return len(self.image_urls)

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

    def sidecar_name(self, g: int, i: int) -> str:
        return group_shard_name(g, self.group_rounds, self.split, i)

    def run(self) -> ProducerSummary:
        """Make this rank's missing (group, shard) sidecar shards; rank 0 then writes the manifest.

        Raises:
            DataError: an image shard changed since groups were made from it; nothing written.
        """
        self.check_images()
        self.job.output.staging()
        identity = json.dumps({"job": self.digest, "identity": self.identity()}, sort_keys=True)
        self.job.keep_identity(self.job_file, identity, self.job_file_decides)
        result = run(self.job, self, len(self.image_urls))
        summary = ProducerSummary.of(self.job, result, self.rounds, self._sidecar_bytes(result.markers.values()))
        if result.manifest is not None:
            summary.notes.append(self._names_note(result.manifest))
        return summary

    def _sidecar_bytes(self, markers: Iterable[Mapping[str, Any]]) -> SidecarBytes:
        """What these parts' sidecars take (the payload unknown if one was made by an older version)."""
        markers = list(markers)
        payloads = [m.get("sidecar_bytes") for m in markers]
        payload = None if None in payloads else sum(payloads)
        members = sum(m["shard"]["samples"] for m in markers)
        disk = sum(m["shard"]["bytes"] for m in markers)
        return SidecarBytes(payload, disk, members, self.group_rounds, self.rounds, alone=True)

    def _names_note(self, manifest: Manifest) -> str:
        if self.names_from:
            return f"class names: {len(manifest.class_names)}, from {self.names_from}"
        if any(n != str(c) for c, n in enumerate(manifest.class_names)):
            return f"class names: {len(manifest.class_names)}, from the image shards' json members (class_name)"
        return (
            f'class names: not found (no class_names beside the image shards, no json class_name), listed as "0" .. '
            f'"{len(manifest.class_names) - 1}"; --class-names FILE (one name per line) names them'
        )

    def check_images(self) -> None:
        """Refuse, before anything is written, to add groups beside groups made from other image bytes.

        Every image shard with finished groups (any rank's) is read once when any group is to be
        made; nothing to make, nothing read.
        """
        self._made_from, missing = {}, False
        for i, url in enumerate(self.image_urls):
            for g in range(self.groups):
                name = self.sidecar_name(g, i)
                marker = self.job.finished(name)
                if marker is None:
                    missing = True
                    continue
                known = self._made_from.setdefault(i, [])
                image = marker["image"]
                if all(m.sha256 != image["sha256"] for m in known):
                    known.append(MadeFrom(url, image["sha256"], image["samples"], os.path.dirname(name)))
        if missing:
            check_image_shards([m for i in sorted(self._made_from) for m in self._made_from[i]], self.workers)

    # -- the Maker

    def parts(self, i: int) -> list[str]:
        return [self.sidecar_name(g, i) for g in range(self.groups)]

    def make(self, todo: list[tuple[int, list[str]]]) -> int:
        G = self.group_rounds
        groups = {i: [g for g in range(self.groups) if self.sidecar_name(g, i) in missing] for i, missing in todo}
        items = [(i, self.image_urls[i], [r for g in groups[i] for r in range(g * G, (g + 1) * G)]) for i, _ in todo]
        rounds_of = {i: rounds for i, _, rounds in items}
        loader = worker_loader(_ShardReplay(items, self.recipe, self.seed), min(self.workers, len(items)))
        bar = self.progress_bar(len(items), len(items), "sidecars", "image shards")
        width = self.recipe.pairing_window
        state: dict[int, dict[str, Any]] = {}  # workers take whole shards, but their items interleave
        views = 0
        try:
            for item in loader:
                i = item["shard"]
                st = state.setdefault(i, {"samples": [], "cutter": WindowCutter(width), "batcher": self._batcher()})
                if bar is not None and "end" not in item:
                    bar.update(0)  # in a log, a line within a long shard
                if "end" in item:  # the shard's last, shorter window
                    windows = [w for w in [st["cutter"].close()] if w]
                else:
                    st["samples"].append(item)  # pairing windows: W consecutive samples with sidecars
                    windows = st["cutter"].add(item) if item["error"] is None else []
                for window in windows:
                    self._enqueue(st["batcher"], window, rounds_of[i])
                if "end" in item:
                    st["batcher"].flush()
                    views += st["batcher"].views
                    self._write_shard(i, groups[i], state.pop(i)["samples"], item["end"], st["batcher"].views)
                    if bar is not None:
                        bar.update(1)
                        bar.shard_done(os.path.basename(item["end"].name))
        finally:
            if bar is not None:
                bar.close()
        return views

    def _batcher(self) -> TeacherBatcher:
        return TeacherBatcher(self.teacher, self.topk, self.batch_size)

    def _enqueue(self, batcher: TeacherBatcher, window: list[dict[str, Any]], rounds: list[int]) -> None:
        if self.recipe.mix is not None and window:
            mix_items(window, self.recipe, self.seed, rounds)
        for item in window:
            item["views"] = batcher.add(item.pop("images"))  # the batcher holds the pixels until seen

    def _write_shard(  # long: the sidecars of every group, then each group's tar and marker
        self, i: int, groups: list[int], made: list[dict[str, Any]], image: ShardInfo, views: int
    ) -> None:
        for known in self._made_from.get(i, []):  # changed while this run read it
            if known.sha256 != image.sha256:
                raise _changed(known, image.sha256)
        G = self.group_rounds
        skipped = [dataclasses.asdict(SkippedInput(s["key"], s["error"])) for s in made if s["error"] is not None]
        done = [s for s in made if s["error"] is None]
        names: dict[str, str] = {}  # label -> the first class_name its samples' json members give
        for s in done:
            if s.get("named") is not None:
                names.setdefault(str(s["named"][0]), s["named"][1])
        fp = self.recipe.fingerprint
        sidecars = [
            Sidecar(
                fp,
                s["views"].idx,
                s["views"].prob,
                s["params"],
                s["crc"],
                s.get("window"),
                place=(i, n, 0),  # each group's first round is set below
                label_crc=s["label_crc"],
            )  # fmt: skip
            for n, s in enumerate(done)
        ]
        for n, g in enumerate(groups):  # this run's rounds hold groups ``groups``, in order
            rows = group_rows(n, G)
            members = [
                (
                    f"{s['key']}.{SIDECAR_EXT}",
                    encode_sidecar(dataclasses.replace(sc.select(rows), place=(i, pos, g * G))),
                )
                for pos, (s, sc) in enumerate(zip(done, sidecars))
            ]
            name = self.sidecar_name(g, i)
            info = self.job.write_tar(name, iter(members), [s["key"] for s in done])
            payload = {"shard": dataclasses.asdict(info), "image": dataclasses.asdict(image), "skipped": skipped}
            payload["places"] = True  # its sidecars record them (groups made before do not)
            payload["sidecar_bytes"] = sum(len(data) for _, data in members)
            payload["class_names"] = names
            payload["made"] = self.job.work(len(done), views // len(groups))
            self.job.done(name, payload)

    def manifest(self, markers: Mapping[str, Mapping[str, Any]]) -> Manifest:
        n = len(self.image_urls)
        images = [ShardInfo(**markers[self.sidecar_name(0, i)]["image"]) for i in range(n)]
        for g in range(self.groups):
            for i in range(n):
                sha = markers[self.sidecar_name(g, i)]["image"]["sha256"]
                if sha != images[i].sha256:  # another rank's groups, made from bytes read at another time
                    first = os.path.dirname(self.sidecar_name(0, i))
                    raise _changed(MadeFrom(self.image_urls[i], images[i].sha256, images[i].samples, first), sha)
        by_group = [
            [ShardInfo(**markers[self.sidecar_name(g, i)]["shard"]) for i in range(n)] for g in range(self.groups)
        ]
        return Manifest(
            recipe=self.recipe.to_dict(),
            fingerprint=self.recipe.fingerprint.hex(),
            teacher=self.teacher.describe(self.recipe),
            num_classes=self.teacher.num_classes,
            rounds=self.rounds,
            topk=self.topk,
            seed=self.seed,
            class_names=self._class_names(
                [markers[self.sidecar_name(g, i)] for g in range(self.groups) for i in range(n)]
            ),
            skipped=[SkippedInput(**s) for i in range(n) for s in markers[self.sidecar_name(0, i)]["skipped"]],
            versions=library_versions(),
            split=self.split,
            name=self.name,
            places=all(
                markers[self.sidecar_name(g, i)].get("places", False) for g in range(self.groups) for i in range(n)
            ),
            **sidecar_set_fields(images, self.group_rounds, by_group),
        )

    def _class_names(self, markers: Sequence[Mapping[str, Any]]) -> list[str]:
        """The given or found names; else those the samples' json members gave (the first per label,
        in shard order), numbers where none did."""
        if self.class_names is not None:
            return list(self.class_names)
        names = [str(c) for c in range(self.teacher.num_classes)]
        seen: set[int] = set()
        for marker in markers:
            for label, name in (marker.get("class_names") or {}).items():
                c = int(label)
                if c < len(names) and c not in seen:
                    names[c] = name
                    seen.add(c)
        return names
