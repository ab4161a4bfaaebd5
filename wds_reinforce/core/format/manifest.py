"""``manifest.json``: the one entry point of a reinforced data set, and the records it lists.

New fields get defaults; existing fields never change type; a reader rejects a
``format_version`` it does not know (docs/FORMAT.md, "Manifest").
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from wds_reinforce.core.errors import FormatError, VersionError
from wds_reinforce.core.format.sidecar import FORMAT_VERSION

__all__ = [
    "ShardInfo",
    "SkippedInput",
    "RoundGroup",
    "TeacherSet",
    "Manifest",
    "LAYOUTS",
    "SELF_CONTAINED",
    "SIDECAR_SETS",
]

SELF_CONTAINED, SIDECAR_SETS = "self-contained", "sidecar-sets"
LAYOUTS = (SELF_CONTAINED, SIDECAR_SETS)


@dataclass
class ShardInfo:
    """One finished shard: its file name (relative to the manifest), samples, size and hash."""

    name: str
    samples: int
    bytes: int
    sha256: str
    first_key: str
    last_key: str


@dataclass
class RoundGroup:
    """One round group of a sidecar set: rounds ``[first_round, first_round + rounds)``.

    ``shards`` are its sidecar shards, one per image shard in the manifest's ``image_shards``
    order, holding ``{key}.dr.mp`` members with only these rounds (a sidecar's round r is round
    ``first_round + r`` of the data set).
    """

    first_round: int
    rounds: int
    shards: list[ShardInfo] = field(default_factory=list)


@dataclass
class TeacherSet:
    """Another teacher's targets for a sidecar set's stored rounds (the parameters are not repeated).

    ``groups[g][i]`` is the targets shard of round group g and image shard i: ``{key}.dr.mp``
    sidecars with the group's rounds of top-k and no op columns (``ops`` is empty).
    """

    name: str
    teacher: dict[str, Any]
    groups: list[list[ShardInfo]] = field(default_factory=list)


@dataclass
class SkippedInput:
    """A source input that was not written, and why."""

    key: str
    reason: str


@dataclass
class Manifest:
    """``manifest.json``, written next to the shards after all of them are finished.

    New fields get defaults; existing fields never change type; a reader rejects a
    ``format_version`` it does not know.
    """

    recipe: dict[str, Any]
    fingerprint: str
    teacher: dict[str, Any]
    num_classes: int
    rounds: int
    topk: int
    seed: int
    class_names: list[str] = field(default_factory=list)
    shards: list[ShardInfo] = field(default_factory=list)
    skipped: list[SkippedInput] = field(default_factory=list)
    versions: dict[str, str] = field(default_factory=dict)
    split: str = "train"
    name: str = "reinforced"
    format_version: int = FORMAT_VERSION
    # Sidecar sets (docs/FORMAT.md): the images stay in plain shards elsewhere.
    layout: str = "self-contained"
    image_shards: list[ShardInfo] = field(default_factory=list)
    round_groups: list[RoundGroup] = field(default_factory=list)
    teacher_sets: list[TeacherSet] = field(default_factory=list)

    @property
    def sidecar_sets(self) -> bool:
        """True for the sidecar-set layout (images in ``image_shards``, rounds in ``round_groups``)."""
        return self.layout == SIDECAR_SETS

    @property
    def num_samples(self) -> int:
        return sum(s.samples for s in (self.image_shards if self.sidecar_sets else self.shards))

    @property
    def group_rounds(self) -> int:
        """Rounds per sidecar: all of them (self-contained), or one group's."""
        return self.round_groups[0].rounds if self.sidecar_sets and self.round_groups else self.rounds

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1, sort_keys=True) + "\n"

    def timm_info(self) -> dict[str, Any]:
        """The ``_info.json`` that timm's webdataset reader (``create_dataset("wds/...")``) reads."""
        split = {
            "name": self.split,
            "num_samples": self.num_samples,
            "filenames": [s.name for s in self.shards],
            "shard_lengths": [s.samples for s in self.shards],
        }
        return {"name": self.name, "num_classes": self.num_classes, "splits": {self.split: split}}

    @classmethod
    def from_json(cls, text: str | bytes, source: str = "manifest") -> Manifest:
        """Parse a manifest, raising FormatError (naming ``source``) for anything unexpected."""
        try:
            raw = json.loads(text)
        except (ValueError, UnicodeDecodeError) as exc:
            raise FormatError(f"not valid JSON ({exc})", source) from None
        if not isinstance(raw, dict):
            raise FormatError("manifest must be a JSON object", source)
        if raw.get("format_version") != FORMAT_VERSION:
            raise VersionError(
                f"unknown manifest format_version {raw.get('format_version')!r}; this reader knows {FORMAT_VERSION}",
                source,
                raw.get("format_version"),
            )
        known = {f.name for f in dataclasses.fields(cls)}
        fields = {k: v for k, v in raw.items() if k in known}
        try:
            fields["shards"] = [ShardInfo(**s) for s in fields.get("shards", [])]
            fields["skipped"] = [SkippedInput(**s) for s in fields.get("skipped", [])]
            fields["image_shards"] = [ShardInfo(**s) for s in fields.get("image_shards", [])]
            fields["round_groups"] = [
                RoundGroup(g["first_round"], g["rounds"], [ShardInfo(**s) for s in g.get("shards", [])])
                for g in fields.get("round_groups", [])
            ]
            fields["teacher_sets"] = [
                TeacherSet(t["name"], t["teacher"], [[ShardInfo(**s) for s in group] for group in t.get("groups", [])])
                for t in fields.get("teacher_sets", [])
            ]
            manifest = cls(**fields)
        except (TypeError, KeyError) as exc:
            raise FormatError(f"manifest fields do not match the schema ({exc})", source) from None
        if manifest.layout not in LAYOUTS:
            raise FormatError(f"unknown layout {manifest.layout!r}; this reader knows {list(LAYOUTS)}", source)
        if manifest.sidecar_sets:
            _check_groups(manifest, source)
        for name, typ in (("num_classes", int), ("rounds", int), ("topk", int), ("seed", int)):
            if not isinstance(getattr(manifest, name), typ):
                raise FormatError(f"{name} must be an integer, got {getattr(manifest, name)!r}", source)
        return manifest


def _check_groups(manifest: Manifest, source: str) -> None:
    """Round groups must tile rounds 0..R-1 in order, all of one size, one shard per image shard."""
    groups, first = manifest.round_groups, 0
    if not groups or not manifest.image_shards:
        raise FormatError("a sidecar-set manifest must list image_shards and round_groups", source)
    for g in groups:
        if g.first_round != first or g.rounds != groups[0].rounds or g.rounds < 1:
            raise FormatError(f"round groups must tile the rounds in equal steps, got one at {g.first_round}", source)
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
