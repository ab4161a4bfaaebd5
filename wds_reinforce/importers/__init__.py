"""Importing another project's released reinforcements: the seam an importer plugs into.

Such a release holds, per training image, its rounds (augmentation parameters and the teacher's
top-k), keyed by the image's position in some order of the train split. An importer is a
module or package (``mldr`` for apple/ml-dr's ImageNet+ and friends: ``mldr.importer``, with its
reading and conversion helpers beside it) that supplies an ``Importer``: its
records as a stream, which image each one is (its index), and how one record becomes this
package's ``Rounds``. The shared import job (``job.run_import``) does the rest: it indexes the
images (``images``), checks that records and images agree, converts this rank's records into a
spool, writes self-contained shards or a sidecar set beside the input shards (``writers``),
resumably and torchrun-partitioned (``produce.jobs``), and writes the manifest last.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from wds_reinforce.core.augment import Recipe
from wds_reinforce.core.errors import MetadataError, UsageError

__all__ = ["MetadataError", "IndexMismatchError", "Rounds", "Importer"]


class IndexMismatchError(UsageError):
    """The records and the images disagree: a count, an index outside the split, a record missing."""


@dataclass
class Rounds:
    """One image's kept rounds in this package's layout.

    Attributes:
        idx: (R, k) class ids, uint32, each row by falling probability.
        prob: (R, k) float16.
        ops: sidecar column name -> (R, fields) int64.
        total: rounds in the record.
    """

    idx: np.ndarray
    prob: np.ndarray
    ops: dict[str, np.ndarray]
    total: int

    @property
    def kept(self) -> int:
        return int(self.idx.shape[0])


class Importer(Protocol):
    """What an importer supplies to the import job (``job.run_import``).

    Attributes:
        label: what is imported, for the summary (e.g. ``RRC+RA/RE``).
        notes: lines for the summary about the records (e.g. what their config named but their code ignored).
        recipe: their augmentation, as this package's recipe.
        topk, num_classes: the teacher's top-k and classes.
        total_rounds: rounds per image in the records.
        variable: whether images keep different numbers of rounds (then the job keeps the most
            every image has, unless told how many).
        bytes: the records' size, for the summary's bytes per round.
        sha256: the records' digest once streamed (None where there is none).
    """

    label: str
    notes: list[str]
    recipe: Recipe
    topk: int
    num_classes: int
    total_rounds: int
    variable: bool
    bytes: int
    sha256: str | None

    def identity(self) -> dict[str, Any]:
        """What decides the output's bytes on the importer's side (the records, their settings)."""

    def listing(self) -> list[str] | None:
        """The record names, where they can be had without reading the records (a folder), else None."""

    def index_of(self, name: str) -> int | None:
        """The image index a record name gives (None: a record that is no image's, such as a config).

        Raises:
            MetadataError: a name that is neither.
        """

    def record_name(self, index: int) -> str:
        """Where image ``index``'s record should be, for messages."""

    def stream(self) -> Iterator[tuple[str, Callable[[], bytes]]]:
        """Every record once, in storage order: (name, read); ``read()`` is valid until the next one."""

    def convert(self, read: Callable[[], bytes], index: int, name: str, size: tuple[int, int]) -> Rounds:
        """Record ``name`` of image ``index`` (of ``size``) as ``Rounds``, refusing anything unexpected."""

    def too_few(self, where: str, index: int, kept: int, keep: int) -> str:
        """Why image ``index`` (at ``where``), keeping ``kept`` rounds, cannot give ``keep`` (0: any)."""

    def teacher(self, rounds_kept: int, kept: Mapping[str, float], imported: Mapping[str, Any]) -> dict[str, Any]:
        """The manifest's ``teacher``: the importer's description, with ``imported`` (what the job
        knows of the images) and ``kept`` (min, max, mean rounds kept per image) folded in."""

    def kept_note(self, rounds: int, low: int, high: int) -> str:
        """A summary line on the rounds kept of images that had ``low``..``high`` (or "" for none)."""
