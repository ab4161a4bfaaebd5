"""How a reinforced data set lies in its files: one entry per manifest ``layout``.

``LAYOUTS`` maps each layout name a manifest may carry to a ``Layout``, which says how to list
the set's shards (as ``Unit``s: a shard of images and, per round group, the sidecar shards
aligned with it), how a reader pairs a sample's parts (``read_unit``), how many samples and
rounds per sidecar it holds, and in what order verify checks its files. Readers and jobs ask the
table; nothing else branches on the layout. The layouts today:

- ``self-contained``: shards holding each sample's image, label and sidecar (all rounds);
- ``sidecar-sets``: plain image shards left where they are, and beside them one sidecar shard
  per image shard and round group (same keys, same order), plus targets-only shards of other
  teachers (``teacher_sets``).

The manifest (``manifest.json``) is the set's one entry point: ``read_manifest`` reads it from
any URL and checks it against its layout.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

from wds_reinforce.core.errors import FormatError, UsageError
from wds_reinforce.core.format import SIDECAR_EXT, Manifest, RoundGroup, ShardInfo, TeacherSet
from wds_reinforce.core.registry import Registry
from wds_reinforce.core.schedule import group_for
from wds_reinforce.io.shards import samples
from wds_reinforce.io.storage import dirname_url, join_url, open_url, read_url

__all__ = [
    "MANIFEST_NAME",
    "INFO_NAME",
    "SELF_CONTAINED",
    "SIDECAR_SETS",
    "LAYOUTS",
    "Layout",
    "Part",
    "Unit",
    "ShardChecks",
    "layout_of",
    "num_samples",
    "timm_info",
    "manifest_url",
    "parse_manifest",
    "read_manifest",
    "load_manifest",
    "no_manifest",
    "shard_urls",
    "read_unit",
    "group_dir",
    "group_rows",
    "group_shard_name",
    "sidecar_set_fields",
]

MANIFEST_NAME = "manifest.json"
INFO_NAME = "_info.json"  # timm's webdataset reader's file (self-contained sets)
SELF_CONTAINED, SIDECAR_SETS = "self-contained", "sidecar-sets"


# ----------------------------------------------------------------------------------------
# The manifest: where it is, and reading it


def manifest_url(location: str) -> str:
    """``manifest.json`` of a shard directory or URL prefix, or ``location`` itself if it names a .json."""
    return location if location.endswith(".json") else join_url(location, MANIFEST_NAME)


def parse_manifest(text: str | bytes, source: str = "manifest") -> Manifest:
    """A manifest from its JSON, checked against its layout (``FormatError`` naming ``source``)."""
    manifest = Manifest.from_json(text, source)
    layout_of(manifest, source).check(manifest, source)
    return manifest


def read_manifest(url: str) -> Manifest:
    """Read and check ``manifest.json`` from a local path, ``file:``, ``http(s)://`` or ``s3://`` URL."""
    data = read_url(url)
    if not data:
        raise FileNotFoundError(f"cannot read {url}: empty response")
    return parse_manifest(data, url)


def load_manifest(location: str) -> tuple[str, Manifest]:
    """(its URL, the manifest) of the set at ``location``: a folder, URL prefix or manifest .json.

    Raises:
        FileNotFoundError: no manifest there; the message names ``location`` as given and what is expected.
    """
    url = manifest_url(location)
    try:
        return url, read_manifest(url)
    except FileNotFoundError as exc:
        raise FileNotFoundError(no_manifest(location, None, exc)) from None


def no_manifest(given: str | Sequence[str], urls: Sequence[str] | None, exc: OSError, expected: str = "") -> str:
    """What was given and what is expected (``expected``, or a folder/URL/.json), for a set without a manifest."""
    given = given if isinstance(given, str) else (list(urls or []) or [""])[0]
    expected = expected or "expected a folder or URL prefix holding manifest.json, or a manifest .json"
    local = "://" not in given and not given.startswith("file:")
    if local and not any(os.path.exists(u) for u in (urls or [given])):
        return f"{expected}, got {given!r}, which does not exist"
    return f"{expected}, got {given!r}: {exc}"


def shard_urls(manifest_location: str, manifest: Manifest) -> list[str]:
    """The URLs of the shards of a self-contained set, which lie beside its manifest."""
    return [join_url(dirname_url(manifest_location), s.name) for s in manifest.shards]


def group_dir(first_round: int, rounds: int) -> str:
    """The folder of a sidecar set's round group holding rounds ``[first_round, first_round + rounds)``."""
    return f"rounds-{first_round:05d}-{first_round + rounds - 1:05d}"


def group_rows(g: int, group_rounds: int) -> slice:
    """The rounds (sidecar rows) of a sidecar set's round group ``g`` of ``group_rounds`` rounds each."""
    return slice(g * group_rounds, (g + 1) * group_rounds)


def group_shard_name(g: int, group_rounds: int, split: str, i: int) -> str:
    """Round group ``g``'s sidecar shard for image shard ``i``, in the set's folder."""
    return f"{group_dir(g * group_rounds, group_rounds)}/{split}-{i:06d}.tar"


def sidecar_set_fields(
    image_shards: Sequence[ShardInfo], group_rounds: int, group_shards: Sequence[Sequence[ShardInfo]]
) -> dict[str, Any]:
    """A sidecar set's own manifest fields: its image shards and round groups (``group_shards[g][i]``)."""
    groups = [RoundGroup(g * group_rounds, group_rounds, list(shards)) for g, shards in enumerate(group_shards)]
    return {"layout": SIDECAR_SETS, "image_shards": list(image_shards), "round_groups": groups}


# ----------------------------------------------------------------------------------------
# Units of work, and reading one


@dataclass(frozen=True)
class Part:
    """One shard of a set: where to read it, and its record in the manifest (None: not listed)."""

    url: str
    info: ShardInfo | None = None


@dataclass(frozen=True)
class Unit:
    """What a reader takes as one piece of work: a shard of images and, per round group, the
    sidecar shards aligned with it (the params set's, then those of the teacher sets asked for).

    Attributes:
        images: the shard holding the images (self-contained: also labels and sidecars).
        groups: per round group, its aligned sidecar shards; empty for self-contained shards.
        samples: the samples with sidecars the manifest promises (None: not listed, not counted).
        index: the shard's index in the manifest's list (``shards``, or ``image_shards`` for sidecar
            sets), which its sidecars record as their place (None: not listed).
        placed: whether every sidecar records its place (the manifest's ``places``).
    """

    images: Part
    groups: tuple[tuple[Part, ...], ...] = ()
    samples: int | None = None
    index: int | None = None
    placed: bool = False  # every sidecar records its place (the manifest's ``places``)

    def sidecars(self, group: int) -> tuple[Part, ...]:
        """The sidecar shards to read in lockstep with the images in an epoch of round group ``group``."""
        return self.groups[group] if self.groups else ()


def read_unit(images: Part, sidecars: Sequence[Part] = (), skipped: frozenset[str] = frozenset()) -> Iterator[dict]:
    """The samples of shard ``images``, each with the sidecar of its key from each aligned shard of
    ``sidecars`` in lockstep, as members ``dr.mp``, ``dr.mp.1``, ... in that order (none: the
    shard's own members only). Samples in ``skipped`` (no sidecar was made) are passed over.

    Raises:
        FormatError: a key that differs between the image shard and a sidecar shard, or a sidecar
            shard longer than its image shard (naming both URLs).
    """
    url = images.url
    with contextlib.ExitStack() as stack:
        stream = stack.enter_context(open_url(url))
        sides = [samples(stack.enter_context(open_url(p.url)), p.url) for p in sidecars]
        for sample in samples(stream, url):
            if sample["__key__"] in skipped:
                continue
            for n, (side, part) in enumerate(zip(sides, sidecars)):
                other = next(side, None)
                if other is None or other["__key__"] != sample["__key__"]:
                    got = "its end" if other is None else f"key {other['__key__']!r}"
                    raise FormatError(
                        f"image shard has key {sample['__key__']!r} where sidecar shard {part.url} has {got}: "
                        "the shards are not aligned"
                    )
                sample[SIDECAR_EXT if n == 0 else f"{SIDECAR_EXT}.{n}"] = other.get(SIDECAR_EXT)
            yield sample
        for side, part in zip(sides, sidecars):
            extra = next(side, None)
            if extra is not None:
                raise FormatError(f"sidecar shard {part.url} has key {extra['__key__']!r} after the image shard ends")


def _listed(url: str, name: str) -> bool:
    """Whether ``url`` names the shard listed as ``name`` (equal, or one ends with the other's path)."""
    return url == name or url.endswith("/" + name.lstrip("/")) or name.endswith("/" + url.lstrip("/"))


class ShardChecks(Protocol):
    """What verify offers a layout (``read.verify``): the checks of one shard of each kind."""

    def full_shard(self, part: Part) -> None:
        """A self-contained shard: images, labels and sidecars of every round."""

    def image_shard(self, part: Part, skipped: frozenset[str]) -> Any:
        """A plain image shard: images (and their checksums, for the sidecars after it)."""

    def sidecar_shard(self, part: Part, group: int, images: Any) -> None:
        """Round group ``group``'s sidecar shard, aligned with the image shard checked as ``images``."""


# ----------------------------------------------------------------------------------------
# The table


class Layout:
    """One way a set lies in its files; see the module docstring. Stateless: one instance per layout."""

    name: ClassVar[str]
    teacher_sets: ClassVar[bool] = False  # whether other teachers' targets can lie beside it (add_teacher_set)

    def check(self, manifest: Manifest, source: str) -> None:
        """Raise ``FormatError`` (naming ``source``) unless the manifest's lists fit this layout."""

    def num_samples(self, manifest: Manifest) -> int:
        """Samples in the set (the skipped ones of a sidecar set included: they are in its image shards)."""
        raise NotImplementedError

    def group_rounds(self, manifest: Manifest) -> int:
        """Rounds per sidecar: all of them, or one round group's."""
        raise NotImplementedError

    def made_files(self, manifest: Manifest) -> list[ShardInfo]:
        """The shards the set's own job wrote (not the image shards it only reads, nor teacher sets)."""
        raise NotImplementedError

    def units(self, manifest: Manifest, base: str, teacher: int | str = 0) -> list[Unit]:
        """The set's units in manifest order, files resolved against ``base`` (the manifest's folder).

        ``teacher``: 0 for the manifest's teacher; k (teacher set k) or ``"mean"`` (all) to read
        other teachers' targets beside it, where the layout has them.
        """
        raise NotImplementedError

    def select(self, units: Sequence[Unit], urls: Sequence[str]) -> list[Unit]:
        """The units of shard URLs a user named (a subset, or the shards elsewhere)."""
        raise NotImplementedError

    def skipped(self, manifest: Manifest) -> frozenset[str]:
        """Keys that are in the image shards but have no sidecar (the producer skipped them)."""
        return frozenset()

    def group(self, manifest: Manifest, seed: int, epoch: int) -> int:
        """The round group every sample reads in ``epoch`` (``schedule.group_for``)."""
        return 0

    def verify(self, manifest: Manifest, unit: Unit, checks: ShardChecks) -> None:
        """Check one unit's files, in the order this layout needs."""
        raise NotImplementedError


LAYOUTS: Registry[Layout] = Registry("layout")


def layout_of(manifest: Manifest, source: str = "manifest") -> Layout:
    """The ``Layout`` of a manifest's ``layout``.

    Raises:
        FormatError: a layout this reader does not know (a newer wds_reinforce's?).
    """
    if manifest.layout not in LAYOUTS:
        raise FormatError(f"unknown layout {manifest.layout!r}; this reader knows {LAYOUTS.names()}", source)
    return LAYOUTS.get(manifest.layout)


def num_samples(manifest: Manifest) -> int:
    """Samples in the set a manifest describes (by its layout)."""
    return layout_of(manifest).num_samples(manifest)


def timm_info(manifest: Manifest) -> dict[str, Any]:
    """The ``_info.json`` that timm's webdataset reader (``create_dataset("wds/...")``) reads."""
    split = {
        "name": manifest.split,
        "num_samples": num_samples(manifest),
        "filenames": [s.name for s in manifest.shards],
        "shard_lengths": [s.samples for s in manifest.shards],
    }
    return {"name": manifest.name, "num_classes": manifest.num_classes, "splits": {manifest.split: split}}


class _SelfContained(Layout):
    name = SELF_CONTAINED

    def num_samples(self, manifest: Manifest) -> int:
        return sum(s.samples for s in manifest.shards)

    def group_rounds(self, manifest: Manifest) -> int:
        return manifest.rounds

    def made_files(self, manifest: Manifest) -> list[ShardInfo]:
        return list(manifest.shards)

    def units(self, manifest: Manifest, base: str, teacher: int | str = 0) -> list[Unit]:
        if teacher != 0:
            raise UsageError(f"expected teacher=0 for a self-contained data set (one teacher), got {teacher!r}")
        placed = manifest.places
        return [Unit(Part(join_url(base, s.name), s), (), s.samples, j, placed) for j, s in enumerate(manifest.shards)]

    def select(self, units: Sequence[Unit], urls: Sequence[str]) -> list[Unit]:
        # Shards are read where the user says (a mirror, say); those the manifest lists (matched by
        # their trailing path) are counted against it, others are read uncounted.
        out = []
        for url in urls:
            unit = next((u for u in units if _listed(url, u.images.info.name)), None)
            if unit is None:
                out.append(Unit(Part(url)))
            else:
                out.append(dataclasses.replace(unit, images=Part(url, unit.images.info)))
        return out

    def verify(self, manifest: Manifest, unit: Unit, checks: ShardChecks) -> None:
        checks.full_shard(unit.images)


class _SidecarSets(Layout):
    name = SIDECAR_SETS
    teacher_sets = True

    def check(self, manifest: Manifest, source: str) -> None:
        """Round groups must tile rounds 0..R-1 in order, all of one size, one shard per image shard."""
        groups, first = manifest.round_groups, 0
        if not groups or not manifest.image_shards:
            raise FormatError("a sidecar-set manifest must list image_shards and round_groups", source)
        for g in groups:
            if g.first_round != first or g.rounds != groups[0].rounds or g.rounds < 1:
                raise FormatError(
                    f"round groups must tile the rounds in equal steps, got one at {g.first_round}", source
                )
            if len(g.shards) != len(manifest.image_shards):
                raise FormatError(
                    f"round group {g.first_round} lists {len(g.shards)} shards "
                    f"for {len(manifest.image_shards)} image shards",
                    source,
                )
            first += g.rounds
        if first != manifest.rounds:
            raise FormatError(f"round groups hold {first} rounds, the manifest says {manifest.rounds}", source)
        for t in manifest.teacher_sets:
            if len(t.groups) > len(groups) or any(len(shards) != len(manifest.image_shards) for shards in t.groups):
                raise FormatError(f"teacher set {t.name!r} does not match the round groups and image shards", source)

    def num_samples(self, manifest: Manifest) -> int:
        return sum(s.samples for s in manifest.image_shards)

    def group_rounds(self, manifest: Manifest) -> int:
        return manifest.round_groups[0].rounds

    def made_files(self, manifest: Manifest) -> list[ShardInfo]:
        return [s for g in manifest.round_groups for s in g.shards]

    def units(self, manifest: Manifest, base: str, teacher: int | str = 0) -> list[Unit]:
        sets = _teacher_sets(manifest, teacher)
        return [
            Unit(
                Part(image.name, image),  # image shards are listed by their own URL (or absolute path)
                tuple(
                    (Part(join_url(base, g.shards[i].name), g.shards[i]),)
                    + tuple(Part(join_url(base, t.groups[n][i].name), t.groups[n][i]) for t in sets)
                    for n, g in enumerate(manifest.round_groups)
                ),
                manifest.round_groups[0].shards[i].samples,  # the image shard's samples with sidecars
                i,
                manifest.places,
            )
            for i, image in enumerate(manifest.image_shards)
        ]

    def select(self, units: Sequence[Unit], urls: Sequence[str]) -> list[Unit]:
        out = []
        for url in urls:
            unit = next((u for u in units if _listed(url, u.images.url)), None)
            if unit is None:
                raise UsageError(f"expected image shards the manifest lists, got {url!r}")
            out.append(unit)
        return out

    def skipped(self, manifest: Manifest) -> frozenset[str]:
        return frozenset(s.key for s in manifest.skipped)

    def group(self, manifest: Manifest, seed: int, epoch: int) -> int:
        return group_for(seed, epoch, manifest.rounds, self.group_rounds(manifest))

    def verify(self, manifest: Manifest, unit: Unit, checks: ShardChecks) -> None:
        images = checks.image_shard(unit.images, self.skipped(manifest))
        for g, parts in enumerate(unit.groups):
            checks.sidecar_shard(parts[0], g, images)


def _teacher_sets(manifest: Manifest, teacher: int | str) -> list[TeacherSet]:
    """The extra teacher sets to read besides the params set (the manifest's teacher, set 0)."""
    if teacher == "mean":
        sets = manifest.teacher_sets
    elif teacher == 0:
        return []
    elif isinstance(teacher, int) and 1 <= teacher <= len(manifest.teacher_sets):
        sets = [manifest.teacher_sets[teacher - 1]]
    else:
        names = ["0 (the manifest's teacher)"] + [f"{n + 1} ({t.name})" for n, t in enumerate(manifest.teacher_sets)]
        raise UsageError(f"expected teacher 'mean' or one of {', '.join(names)}, got {teacher!r}")
    short = [t.name for t in sets if len(t.groups) < len(manifest.round_groups)]
    if short:
        raise UsageError(
            f"teacher set(s) {short} cover fewer round groups than the data set: add them for the new rounds"
        )
    return sets


for _layout in (_SelfContained(), _SidecarSets()):
    LAYOUTS.register(_layout.name, _layout)
del _layout
