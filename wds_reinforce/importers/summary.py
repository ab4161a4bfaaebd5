"""What an import run did, as ``tools/import_mldr.py`` prints it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from wds_reinforce.core.progress import SidecarBytes
from wds_reinforce.layouts import SIDECAR_SETS, layout_of

__all__ = ["ImportSummary", "summarize"]


@dataclass
class ImportSummary:
    """What an import run did (``made``/``images_per_s`` are this rank's)."""

    out: str
    variant: str
    samples: int
    rounds: int
    total_rounds: int
    topk: int
    shards: int
    made: int
    reused: int
    bytes: int
    sidecar_bytes_per_round: float
    metadata_bytes_per_round: float
    images_per_s: float
    seconds: float
    manifest_written: bool
    kept: str = ""
    layout: str = "self-contained"
    groups: int = 1
    image_shards: int = 0
    note: str = ""  # where the output lies (a sidecar set beside the input shards)
    without_rounds: int = 0  # images that kept no round, imported without any
    notes: list[str] = field(default_factory=list)  # the importer's (e.g. transforms their code ignored)
    sidecar: SidecarBytes | None = None

    def format(self) -> str:
        lines = [
            f"imported {self.variant} into {self.out}: {self.samples} images x {self.rounds} rounds (of "
            f"{self.total_rounds}), top-{self.topk}, {self.shards} shards ({self.made} made, {self.reused} reused), "
            f"{self.bytes / 1e6:.1f} MB",
            *(
                self.sidecar.lines()
                if self.sidecar is not None
                else [f"sidecar: {self.sidecar_bytes_per_round:.1f} B/round payload"]
            ),
            f"their metadata: {self.metadata_bytes_per_round:.1f} bytes per round (the archive, per image and round)",
            f"speed: {self.images_per_s:.0f} images/s over {self.seconds:.1f} s",
        ]
        if self.note:
            lines.append(self.note)
        if self.kept:
            lines.append(self.kept)
        lines.extend(self.notes)
        if self.without_rounds:
            lines.append(
                f"{self.without_rounds} image(s) kept no round: imported without rounds (the loader gives them their "
                "original image and label every epoch)"
            )
        if not self.manifest_written:
            lines.append("manifest: written by rank 0 once every shard is done")
        return "\n".join(lines)


def summarize(maker: Any, result: Any) -> ImportSummary:
    """The summary of an import job's run (``maker``: the job's ``_ImportJob``; ``result``: its ``JobRun``)."""
    importer, job = maker.importer, maker.job
    mine = [job.markers[p] for j in job.mine(len(maker.shards)) for p in maker.parts(j) if p in job.markers]
    rounds = mine[0]["rounds"] if mine else (maker.rounds or importer.total_rounds)
    manifest = result.manifest
    samples = layout_of(manifest).num_samples(manifest) if manifest else sum(m["shard"]["samples"] for m in mine)
    if manifest is not None:
        written = sum(s.bytes for s in layout_of(manifest).made_files(manifest))
    else:  # a rank other than 0: its own files
        written = sum(f["bytes"] for m in mine for f in m.get("files", [m["shard"]]))
    every = list(job.markers.values()) if manifest is not None else mine  # rank 0: every rank's shards
    sidecar = _sidecar_bytes(every, maker.writer.layout, rounds)
    stats = [m["kept"] for m in mine if m["kept"]["images"]]
    low, high = min((s["min"] for s in stats), default=0), max((s["max"] for s in stats), default=0)
    groups = len(mine[0]["files"]) if mine and "files" in mine[0] else 1
    if manifest is not None:  # every shard's count; otherwise this rank's
        without = int(manifest.teacher.get("imported", {}).get("images_without_rounds", 0))
    else:
        without = sum(m["kept"].get("none", 0) for m in mine)
    return ImportSummary(
        out=job.output.url,
        variant=importer.label,
        samples=samples,
        rounds=rounds,
        total_rounds=importer.total_rounds,
        topk=importer.topk,
        shards=len(maker.shards),
        made=result.made,
        reused=result.reused,
        bytes=written,
        sidecar_bytes_per_round=sidecar.payload_per_round,
        metadata_bytes_per_round=importer.bytes / max(len(maker.images) * importer.total_rounds, 1),
        images_per_s=result.rate,
        seconds=result.seconds,
        manifest_written=manifest is not None,
        kept=importer.kept_note(rounds, low, high),
        layout=maker.writer.layout,
        groups=groups,
        image_shards=len(maker.shards),
        note=maker.writer.note(groups, rounds, len(maker.shards)),
        without_rounds=without,
        notes=list(importer.notes),
        sidecar=sidecar,
    )


def _sidecar_bytes(markers: list[Any], layout: str, rounds: int) -> SidecarBytes:
    """What the sidecars of these shards take, said as the producer says it (``SidecarBytes``); in
    self-contained shards their tar overhead is estimated (256 bytes of padding a member)."""
    payload = sum(m["sidecar_bytes"] for m in markers)
    samples = sum(m["shard"]["samples"] for m in markers)
    if layout == SIDECAR_SETS:  # shards of sidecars alone: their bytes are the sidecars'
        groups = len(markers[0]["files"]) if markers and "files" in markers[0] else 1
        on_disk = sum(f["bytes"] for m in markers for f in m.get("files", [m["shard"]]))
        return SidecarBytes(payload, on_disk, samples * groups, rounds // max(groups, 1), rounds, alone=True)
    return SidecarBytes(payload, payload + samples * (512 + 256), samples, rounds, rounds, estimated=True)
