"""Every sample bound to its place: a shard's samples checked, in shard order, against the place
their sidecars were made for, and what the shard lost counted from it.

A sidecar records ``place`` = (shard, position): the shard's index in the manifest's list and
the sample's position among that shard's samples with a sidecar (``core.format.sidecar``). A
``ShardTally`` follows one shard as it is read: a sample of another shard, a position seen
before or out of order, or one past the shard's count is refused as *foreign* (read, but not
the sample its place should hold); a position skipped is a sample lost. So a shard swapped for
another, an object overwritten mid-epoch or a resume that splices in other bytes yields nothing
that is not the shard's own, and the losses are counted exactly. Sidecars written before places
existed are counted by arrival, checked as far as the manifest allows: a key seen before in the
shard, one past the shard's count, and (self-contained shards) a first key other than the
manifest's ``first_key`` are refused.
The position also cuts the pairing windows of mixing recipes, so a lost sample costs only its
own window.
"""

from __future__ import annotations

from wds_reinforce.core.errors import DataError, SampleError
from wds_reinforce.core.format import SIDECAR_EXT, sidecar_place
from wds_reinforce.layouts import Unit

__all__ = ["ShardTally"]

_GAPS_SHOWN = 3  # runs of missing positions named in a shard's message


class ShardTally:
    """One shard's samples as they arrive: which belong (``admit``) and what was lost (``lost``).

    Attributes:
        good: samples admitted, each at its own place.
        unread: samples passed on whose sidecar could not be read here (a later stage refuses
            and counts each); they are not counted again as lost.
    """

    def __init__(self, unit: Unit, url: str):
        self.index, self.want, self.url = unit.index, unit.samples, url
        info = unit.images.info
        self._first_key = info.first_key if info is not None and not unit.groups and unit.samples else None
        self._keys: set[str] = set()  # of a shard without places: the keys admitted
        self._alien: str | None = None  # its first key, when it is not the manifest's
        self.good = self.unread = 0
        self._next = 0  # the lowest position still expected
        self._placed: bool | None = None  # whether the shard's sidecars record places (its first readable one says)
        self._gaps: list[tuple[int, int]] = []

    def admit(self, sample: dict) -> DataError | None:
        """None if ``sample`` belongs here (``__position__`` set to its place), else the error refusing it."""
        raw = sample.get(SIDECAR_EXT)
        try:
            place = sidecar_place(raw) if raw is not None else None
        except DataError:
            raw = None
        if raw is None:  # missing or damaged: the reinforce stage refuses it and counts it
            self.unread += 1
            self._keys.add(sample.get("__key__"))  # it arrived: a later first-key check would misjudge
            sample["__position__"] = self._next
            return None
        if self._placed is None:
            self._placed = place is not None
        if (place is not None) != self._placed:
            which = "records no place" if place is None else "records a place"
            return self._foreign(sample, f"its sidecar {which}, unlike the shard's first sample's")
        if place is None:
            refused = self._unplaced(sample.get("__key__"))
            if refused:
                return self._foreign(sample, refused)
            position = self._next
        else:
            shard, position = place
            if self.index is not None and shard != self.index:
                return self._foreign(sample, f"it was made for shard {shard}, not this one (shard {self.index})")
            if position < self._next:
                return self._foreign(sample, f"position {position} comes again or out of order (next is {self._next})")
        if self.want is not None and position >= self.want:
            return self._foreign(sample, f"position {position} is past the {self.want} samples the manifest lists")
        if position > self._next:
            self._gaps.append((self._next, position - 1))
        sample["__position__"], self._next = position, position + 1
        self.good += 1
        return None

    def _unplaced(self, key: str) -> str | None:
        """Why a sample of a shard without places does not belong, or None."""
        if self._alien is None and self._first_key is not None and not self._keys and key != self._first_key:
            self._alien = key
        if self._alien is not None:
            return f"the shard begins with {self._alien!r}, not the manifest's first key {self._first_key!r}"
        if key in self._keys:
            return "its key comes again"
        self._keys.add(key)
        return None

    def lost(self) -> int:
        """Samples of the manifest's count not admitted, less those refused downstream (``unread``)."""
        return 0 if self.want is None else max(self.want - self.good - self.unread, 0)

    def missing(self) -> str:
        """The positions never admitted, for a message (known only where sidecars record places)."""
        gaps = list(self._gaps)
        if self._placed and self.want is not None and self._next < self.want:
            gaps.append((self._next, self.want - 1))
        if not self._placed or not gaps:
            return ""
        runs = [f"{a}" if a == b else f"{a}-{b}" for a, b in gaps[:_GAPS_SHOWN]]
        more = f" and {len(gaps) - _GAPS_SHOWN} more runs" if len(gaps) > _GAPS_SHOWN else ""
        return f"positions {', '.join(runs)}{more} missing"

    def _foreign(self, sample: dict, why: str) -> DataError:
        message = f"not this shard's sample at this place: {why}"
        return SampleError(message, sample.get("__key__"), self.url, samples=0, foreign=1)
