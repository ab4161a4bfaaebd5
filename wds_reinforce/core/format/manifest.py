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

__all__ = ["ShardInfo", "SkippedInput", "RoundGroup", "TeacherSet", "Manifest"]


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
    # How the set lies in its files (``layouts.LAYOUTS``); sidecar sets (docs/FORMAT.md) keep the
    # images in plain shards elsewhere.
    layout: str = "self-contained"
    image_shards: list[ShardInfo] = field(default_factory=list)
    round_groups: list[RoundGroup] = field(default_factory=list)
    teacher_sets: list[TeacherSet] = field(default_factory=list)
    # Every sidecar records its place (docs/FORMAT.md, "Integrity"): one without is refused.
    places: bool = False

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str | bytes, source: str = "manifest") -> Manifest:
        """Parse a manifest, raising FormatError (naming ``source``) for anything unexpected.

        The lists a layout needs are checked by the layout (``layouts.parse_manifest``).
        """
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
        if not isinstance(manifest.layout, str):
            raise FormatError(f"layout must be a string, got {manifest.layout!r}", source)
        for name, typ in (("num_classes", int), ("rounds", int), ("topk", int), ("seed", int)):
            if not isinstance(getattr(manifest, name), typ):
                raise FormatError(f"{name} must be an integer, got {getattr(manifest, name)!r}", source)
        return manifest
