"""Check reinforced shards against their manifest, and optionally against the teacher.

``verify_shards`` streams every shard once: byte count and sha256 against the manifest, sample
count and first/last key, unique keys, every sidecar decoded and validated (all rounds, top-k,
fingerprint, class ids, image and label checksums), every label parsed and image decoded. With a
teacher it replays random (sample, round) pairs and compares its outputs with the stored ones
(``teacher_view``: mixed where the recipe mixes).
"""

from __future__ import annotations

import tarfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from wds_reinforce.core.augment import Recipe, replay
from wds_reinforce.core.augment.mixing import check_window, mix_row, window_crc
from wds_reinforce.core.decode import SourceImage
from wds_reinforce.core.errors import DataError, DecodeError, FormatError
from wds_reinforce.core.format import SIDECAR_EXT, Manifest, Sidecar, crc32c, decode_sidecar
from wds_reinforce.core.progress import ShardProgress
from wds_reinforce.core.schedule import WindowCutter, pairing_windows
from wds_reinforce.io.shards import IMAGE_EXTS, HashingReader, ShardCut, image_member, samples
from wds_reinforce.io.storage import dirname_url, open_url
from wds_reinforce.layouts import Part, layout_of, load_manifest

__all__ = ["Problem", "VerifyReport", "verify_shards", "teacher_view", "partner_view"]


@dataclass
class Problem:
    """One thing wrong: where (shard, key) and what."""

    shard: str
    key: str | None
    message: str

    def __str__(self) -> str:
        return f"{self.shard}" + (f" key {self.key}" if self.key else "") + f": {self.message}"


@dataclass
class VerifyReport:
    shards: int = 0
    samples: int = 0
    bytes: int = 0
    problems: list[Problem] = field(default_factory=list)
    teacher_checks: int = 0
    max_prob_diff: float | None = None
    top1_agreement: float | None = None

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        lines = [f"{self.shards} shards, {self.samples} samples, {self.bytes / 1e6:.1f} MB checked"]
        if self.teacher_checks:
            lines.append(
                f"teacher: {self.teacher_checks} (sample, round) pairs replayed, largest probability difference "
                f"{self.max_prob_diff:.4g}, top-1 agreement {self.top1_agreement:.1%}"
            )
        lines.append("OK" if self.ok else f"{len(self.problems)} problem(s)")
        return "\n".join(lines)


def _check_image(key: str, members: dict[str, bytes], decode_images: bool) -> tuple[bytes | None, list[str]]:
    errors = []
    found = image_member(members)
    image = found[1] if found is not None else None
    if image is None:
        errors.append(f"no image member ({'/'.join(IMAGE_EXTS)})")
    elif decode_images:
        try:
            SourceImage(image).decode(1)
        except DecodeError as exc:
            errors.append(str(exc))
    return image, errors


def _check_sidecar(
    raw: bytes | None, manifest: Manifest, recipe: Recipe, rounds: int, image_crc: int | None
) -> tuple[Sidecar | None, list[str]]:
    """Decode and check one sidecar of ``rounds`` rounds; ``image_crc`` is its image's CRC-32C if known."""
    if raw is None:
        return None, [f"no {SIDECAR_EXT} member"]
    errors = []
    try:
        sidecar = decode_sidecar(raw)
        sidecar.validate(manifest.num_classes)
        if sidecar.fingerprint != bytes.fromhex(manifest.fingerprint):
            errors.append(
                f"recipe fingerprint {sidecar.fingerprint.hex()} differs from the manifest's {manifest.fingerprint}"
            )
        if sidecar.rounds not in (rounds, 0 if recipe.mix is None else rounds) or sidecar.topk != manifest.topk:
            errors.append(
                f"sidecar has {sidecar.rounds} rounds of top-{sidecar.topk}, "
                f"the manifest says {rounds} of top-{manifest.topk}"
            )
        if sidecar.rounds:  # none: the sample's original image every epoch, nothing to replay
            recipe.check_columns(sidecar.ops)
        if image_crc is not None and sidecar.image_crc is not None and image_crc != sidecar.image_crc:
            errors.append("image bytes do not match the sidecar's checksum: the image member is damaged")
    except ValueError as exc:  # FormatError, or columns that do not fit the recipe
        return None, [f"bad sidecar: {exc}"]
    return sidecar, errors


def _check_sample(
    key: str, members: dict[str, bytes], manifest: Manifest, recipe: Recipe, decode_images: bool
) -> tuple[Sidecar | None, bytes | None, list[str]]:
    image, errors = _check_image(key, members, decode_images)
    label = members.get("cls")
    try:
        value = int(label.decode()) if label is not None else None
        if value is None:
            errors.append("no cls member")
        elif not 0 <= value < manifest.num_classes:
            errors.append(f"label {value} is not in [0, {manifest.num_classes})")
    except (UnicodeDecodeError, ValueError):
        errors.append(f"label {label[:20]!r} is not an integer")
    crc = crc32c(image) if image is not None else None
    sidecar, side_errors = _check_sidecar(members.get(SIDECAR_EXT), manifest, recipe, manifest.rounds, crc)
    if sidecar is not None and sidecar.label_crc not in (None, crc32c(label or b"")):
        errors.append("the label member 'cls' does not match the sidecar's checksum")
    return sidecar, image, errors + side_errors


def _read_stream(report: VerifyReport, name: str, url: str, reader: Any, keys: list[str], on_sample: Any) -> None:
    """Each sample to ``on_sample`` (keys into ``keys``), the rest drained; a cut or bad stream is a problem."""
    try:
        for sample in samples(reader, url):
            keys.append(sample["__key__"])
            on_sample(sample["__key__"], sample)
    except ShardCut as exc:
        if exc.member is not None:
            message = (
                f"shard cut inside member {exc.member!r} of this sample, after {exc.complete} complete samples "
                f"({exc.message})"
            )
        else:  # between members: the sample may lack members, and says so when checked
            keys.append(exc.key)
            on_sample(exc.key, exc.pending)
            message = (
                f"shard ends after member {exc.after!r} without the end-of-archive marker (cut?): this sample "
                f"may be incomplete; {exc.complete} complete samples before it"
            )
        report.problems.append(Problem(name, exc.key, message))
    except DataError as exc:  # a sample that repeats a member: the shard is not one the producer wrote
        report.problems.append(Problem(name, exc.key, exc.message))
    except (tarfile.TarError, OSError, EOFError) as exc:  # before the first member
        report.problems.append(Problem(name, None, f"unreadable tar: {exc}"))
    try:
        reader.drain()  # hash the rest, cut or not, so the byte count says how much there is
    except OSError as exc:
        report.problems.append(Problem(name, None, f"read failed: {exc}"))


def _read_shard(report: VerifyReport, name: str, url: str, info: Any, on_sample: Any) -> list[str]:
    """Stream one shard: ``on_sample(key, members)`` per sample; check its bytes, sha256, count and
    first/last keys against ``info`` (a ``ShardInfo``); return its keys."""
    report.shards += 1
    keys: list[str] = []
    try:
        stream = open_url(url)
    except Exception as exc:  # gopen raises several kinds for a missing file or URL
        report.problems.append(Problem(name, None, f"cannot open: {exc}"))
        return keys
    reader = HashingReader(stream)
    try:
        _read_stream(report, name, url, reader, keys, on_sample)
    finally:
        stream.close()
    report.bytes += reader.count
    if reader.count != info.bytes:
        report.problems.append(Problem(name, None, f"{reader.count} bytes, the manifest says {info.bytes}"))
    elif reader.sha256.hexdigest() != info.sha256:
        report.problems.append(Problem(name, None, "sha256 differs from the manifest's"))
    if len(keys) != info.samples:
        report.problems.append(Problem(name, None, f"{len(keys)} samples, the manifest says {info.samples}"))
    elif keys and (keys[0], keys[-1]) != (info.first_key, info.last_key):
        said = f"{info.first_key}/{info.last_key}"
        report.problems.append(Problem(name, None, f"first/last key {keys[0]}/{keys[-1]}, the manifest says {said}"))
    return keys


def verify_shards(
    location: str,
    teacher: Any = None,
    checks: int = 32,
    tolerance: float = 0.02,
    seed: int = 0,
    decode_images: bool = True,
    progress: bool = False,
) -> VerifyReport:
    """Check every shard of a reinforced dataset.

    Args:
        location: a shard directory or URL prefix holding ``manifest.json``, or the manifest's URL.
        teacher: a ``produce.teacher.Teacher`` to rerun on ``checks`` random (sample, round)
            pairs; a stored probability further than ``tolerance`` from the teacher's is a problem.
        checks: how many (sample, round) pairs to replay through the teacher.
        tolerance: largest allowed |stored - teacher| probability (fp16 storage and AMP differ a little).
        seed: picks the pairs.
        decode_images: decode every image (the slow part) to find undecodable ones.
        progress: report progress on stderr: a bar on a terminal, a line per shard elsewhere.
    """
    url, manifest = load_manifest(location)
    recipe = Recipe.from_dict(manifest.recipe)
    fingerprint = bytes.fromhex(manifest.fingerprint)
    report = VerifyReport()
    if recipe.fingerprint != fingerprint:
        report.problems.append(
            Problem(
                url,
                None,
                f"the manifest's recipe has fingerprint {recipe.fingerprint.hex()}, "
                f"not the {manifest.fingerprint} it states",
            )
        )
    layout = layout_of(manifest, url)
    rng = np.random.default_rng(seed)
    total = layout.num_samples(manifest)
    picked: set[int] = set()
    if teacher is not None and total:
        picked = set(rng.choice(total, min(checks, total), replace=False).tolist())
    units = layout.units(manifest, dirname_url(url))
    bar = ShardProgress(total, len(units), desc="verify") if progress else None
    checker = _Checker(report, manifest, recipe, picked, rng, decode_images, bar)
    for unit in units:
        layout.verify(manifest, unit, checker)
        if bar is not None:
            bar.shard_done(unit.images.url.rsplit("/", 1)[-1])
    if bar is not None:
        bar.close()
    if teacher is not None and checker.chosen:
        _check_teacher(report, checker.chosen, recipe, teacher, tolerance, rng, checker.windows.kept)
    return report


WindowId = tuple[str, int]  # (shard, the window's number in it)


class _Windows:
    """A mixing recipe's pairing windows as shards are read, sample by sample in shard order.

    A closed window is checked (each sidecar's ``mw`` against the window's keys, its mixing rows)
    and, when one of its samples is chosen for the teacher check, kept as (image, sidecar) pairs
    in ``kept`` for the partners. Without mixing it does nothing.
    """

    def __init__(self, report: VerifyReport, recipe: Recipe):
        self.report, self.recipe = report, recipe
        self.mixing, self.width = recipe.mix is not None, recipe.pairing_window
        self.kept: dict[WindowId, list[tuple[bytes | None, Sidecar | None]]] = {}
        self._cutter: WindowCutter[tuple[str, bytes | None, Sidecar | None, bool]] = WindowCutter(self.width)
        self._shard: str | None = None
        self._number = 0

    def add(self, shard: str, key: str, image: bytes | None, sidecar: Sidecar | None, wanted: bool) -> WindowId | None:
        """The next sample of ``shard`` (None: an unreadable sidecar); its window's id."""
        if not self.mixing:
            return None
        if shard != self._shard:
            self.close()
            self._shard, self._number = shard, 0
        window = (shard, self._number)
        for done in self._cutter.add((key, image, sidecar, wanted)):
            self._check(done)
        return window

    def close(self) -> None:
        """End the shard: check its last, shorter window."""
        done = self._cutter.close()
        if done:
            self._check(done)

    def _check(self, window: list[tuple[str, bytes | None, Sidecar | None, bool]]) -> None:
        crc = window_crc([key for key, _, _, _ in window])
        for pos, (key, _, sidecar, _) in enumerate(window):
            if sidecar is None:
                continue  # already reported
            try:
                check_window(sidecar.window_crc, crc)
                self.recipe.mix.check_columns(sidecar.ops, pos, len(window), self.recipe.size)
            except FormatError as exc:
                self.report.problems.append(Problem(self._shard, key, exc.message))
        if any(wanted for _, _, _, wanted in window):
            self.kept[self._shard, self._number] = [(image, sidecar) for _, image, sidecar, _ in window]
        self._number += 1


def partner_view(
    sidecar: Sidecar, r: int, recipe: Recipe, window: Sequence[tuple[bytes | None, Sidecar | None]] | None
) -> torch.Tensor | None:
    """The unmixed view of row ``r``'s mixing partner, from ``window`` (its pairing window's
    (image, sidecar) pairs); None for a recipe or round that does not mix.

    Raises:
        FormatError: the round mixes but its partner is not in ``window`` or unreadable.
    """
    partner = int(sidecar.ops["mixp"][r][0]) - 1 if recipe.mix is not None else -1
    if partner < 0:
        return None
    if window is None or partner >= len(window) or None in window[partner]:
        raise FormatError(f"round {r}: its mixing partner (position {partner} of the window) is unreadable")
    image, other = window[partner]
    return replay(image, other.round_params(r), recipe)


def teacher_view(
    image: bytes | SourceImage,
    sidecar: Sidecar,
    r: int,
    recipe: Recipe,
    window: Sequence[tuple[bytes | None, Sidecar | None]] | None = None,
) -> torch.Tensor:
    """What the teacher saw in row ``r`` of ``sidecar``: the replayed view, mixed with its
    partner's (``partner_view``) where the round mixes.

    Raises:
        FormatError: the round mixes but its partner is not in ``window`` or unreadable.
    """
    view = replay(image, sidecar.round_params(r), recipe)
    other = partner_view(sidecar, r, recipe, window)
    return view if other is None else recipe.mix.apply(view, other, mix_row(sidecar.ops, r))


def _check_teacher(
    report: VerifyReport,
    chosen: Sequence[Chosen],
    recipe: Recipe,
    teacher: Any,
    tolerance: float,
    rng: np.random.Generator,
    windows: Mapping[WindowId, Sequence[tuple[bytes | None, Sidecar | None]]],
) -> None:
    chosen = [c for c in chosen if c[3].rounds]  # a sample without rounds has no teacher view to check
    rounds = [int(rng.integers(c[3].rounds)) for c in chosen]
    views, kept = [], []
    for (shard, key, image, sc, window), r in zip(chosen, rounds):
        try:
            views.append(teacher_view(image, sc, r, recipe, windows.get(window)))
            kept.append(((shard, key, image, sc, window), r))
        except FormatError as exc:
            report.problems.append(Problem(shard, key, str(exc)))
    if not views:
        return
    probs = teacher.predict(torch.stack(views)).numpy()
    worst, agree = 0.0, 0
    for ((shard, key, _, sc, _), r), p in zip(kept, probs):
        stored_idx, stored = sc.idx[r].astype(np.int64), sc.prob[r].astype(np.float32)
        diff = float(np.abs(p[stored_idx] - stored).max())
        worst = max(worst, diff)
        agree += int(int(np.argmax(p)) == int(stored_idx[0]))
        if diff > tolerance:
            report.problems.append(
                Problem(
                    shard, key, f"round {r}: stored outputs differ from the teacher's by {diff:.4f} (> {tolerance})"
                )
            )
    report.teacher_checks = len(kept)
    report.max_prob_diff = worst
    report.top1_agreement = agree / len(kept)


# A sample whose outputs the teacher rechecks: (shard, key, image, sidecar, its pairing window's
# id in the windows map, or None without mixing).
Chosen = tuple[str, str, bytes, Sidecar, "WindowId | None"]


@dataclass
class _Images:
    """What checking an image shard leaves for its sidecar shards."""

    part: Part
    expected: list[str]  # its keys with sidecars, in order
    crcs: dict[str, int]  # key -> CRC-32C of its image
    kept: dict[str, bytes]  # the images of samples picked for the teacher check
    teacher_group: dict[str, int]  # the round group each of those is rechecked in
    images: dict[str, bytes]  # the images of their pairing windows (mixing recipes)


class _Checker:
    """verify's checks of one data set's shards (the layouts' ``ShardChecks``), filling ``report``.

    Samples are numbered in the order read (``picked`` are the teacher check's); ``chosen``
    collects what the teacher rechecks, ``windows`` the pairing windows of a mixing recipe.
    """

    def __init__(
        self,
        report: VerifyReport,
        manifest: Manifest,
        recipe: Recipe,
        picked: set[int],
        rng: np.random.Generator,
        decode_images: bool,
        bar: Any,
    ):
        self.report, self.manifest, self.recipe, self.picked, self.rng = report, manifest, recipe, picked, rng
        self.decode_images, self.bar = decode_images, bar
        self.chosen: list[Chosen] = []
        self.windows = _Windows(report, recipe)
        self.index = 0
        self.seen: dict[str, str] = {}

    def _next(self) -> bool:
        """Count a sample; whether it is one picked for the teacher check."""
        picked = self.index in self.picked
        self.index += 1
        if self.bar is not None:
            self.bar.update(1)
        return picked

    def full_shard(self, part: Part) -> None:
        """A self-contained shard: every sample's image, label and sidecar (all rounds), keys unique."""
        name, report = part.info.name, self.report

        def check(key: str, members: dict[str, bytes]) -> None:
            if key in self.seen:
                report.problems.append(Problem(name, key, f"key repeats (first in {self.seen[key]})"))
            self.seen.setdefault(key, name)
            sidecar, image, errors = _check_sample(key, members, self.manifest, self.recipe, self.decode_images)
            report.problems.extend(Problem(name, key, e) for e in errors)
            ok = sidecar is not None and image is not None and not errors
            wanted = self._next() and ok
            window = self.windows.add(name, key, image, sidecar if not errors else None, wanted)
            if wanted:
                self.chosen.append((name, key, image, sidecar, window))

        report.samples += len(_read_shard(report, name, part.url, part.info, check))
        self.windows.close()  # the shard's last, shorter window

    def image_shard(self, part: Part, skipped: frozenset[str]) -> _Images:
        """A plain image shard, unchanged since its sidecars were made (sha256): its images, and
        their checksums for the sidecars. For mixing recipes the images of the windows with a
        chosen sample are kept while the shard's sidecars are read."""
        name, mixing, width = part.info.name, self.windows.mixing, self.windows.width
        crcs: dict[str, int] = {}
        kept: dict[str, bytes] = {}
        images: dict[str, bytes] = {}

        def check(key: str, members: dict[str, bytes]) -> None:
            image, errors = _check_image(key, members, self.decode_images)
            if key in skipped:
                errors = []  # listed by the producer: no sidecar expected
            self.report.problems.extend(Problem(name, key, e) for e in errors)
            wanted = self._next()
            if image is not None:
                crcs[key] = crc32c(image)
                if wanted and not errors:
                    kept[key] = image
                if mixing:
                    images[key] = image

        keys = _read_shard(self.report, name, part.url, part.info, check)
        self.report.samples += len(keys)
        expected = [k for k in keys if k not in skipped]
        groups = len(self.manifest.round_groups)
        teacher_group = {key: int(self.rng.integers(groups)) for key in kept}
        if mixing:  # keep only the images of windows with a chosen sample
            windows = pairing_windows(expected, width)
            images = {k: images[k] for w in windows if any(k in kept for k in w) for k in w if k in images}
        return _Images(part, expected, crcs, kept, teacher_group, images)

    def sidecar_shard(self, part: Part, group: int, images: _Images) -> None:
        """Round group ``group``'s sidecar shard: aligned with its image shard (same keys, same order,
        but the skipped), decodable, of the group's rounds, and matching its images' CRC-32C."""
        name, rounds = part.info.name, self.manifest.round_groups[group].rounds

        def check(key: str, members: dict[str, bytes]) -> None:
            raw = members.get(SIDECAR_EXT)
            sidecar, errors = _check_sidecar(raw, self.manifest, self.recipe, rounds, images.crcs.get(key))
            self.report.problems.extend(Problem(name, key, e) for e in errors)
            ok = sidecar is not None and not errors
            wanted = ok and key in images.kept and images.teacher_group[key] == group
            window = self.windows.add(name, key, images.images.get(key), sidecar if ok else None, wanted)
            if wanted:
                self.chosen.append((name, key, images.kept[key], sidecar, window))

        side_keys = _read_shard(self.report, name, part.url, part.info, check)
        self.windows.close()  # the shard's last, shorter window
        if side_keys != images.expected:
            where = next(
                (n for n, (a, b) in enumerate(zip(side_keys, images.expected)) if a != b),
                min(len(side_keys), len(images.expected)),
            )
            self.report.problems.append(
                Problem(
                    name,
                    None,
                    f"not aligned with image shard {images.part.info.name}: keys differ from position {where}",
                )
            )
