"""Every sample bound to its place: a shard's samples checked, in shard order, against the place
their sidecars were made for, and what the shard lost counted from it.

A sidecar records ``place`` = (shard, position, first round): the shard's index in the
manifest's list, the sample's position among that shard's samples with a sidecar, and the data
set's round of its row 0 (a round group's first). A ``ShardTally`` follows one shard as it is
read: a sample of another shard or round group, a position seen before or out of order, or one
past the shard's count is refused as *foreign* (read, but not the sample its place should hold);
a position skipped is a sample lost. So a shard swapped for another, an object overwritten
mid-epoch or a resume that splices in other bytes yields nothing that is not the shard's own,
and the losses are counted exactly. A sample whose sidecar cannot be read here is held until
the next admitted sample shows whether a position was free for it: then it goes on (the
reinforce stage refuses it and counts it as lost), else it is foreign.

Sidecars written before places existed are counted by arrival, checked as far as the manifest
allows: a key seen before in the shard, one past the shard's count, and (self-contained shards)
a first key other than the manifest's ``first_key`` are refused. A manifest with ``places``
says every sidecar records one. The position also cuts the pairing windows of mixing recipes,
so a lost sample costs only its own window.
"""

from __future__ import annotations

from wds_reinforce.core.errors import DataError, SampleError
from wds_reinforce.core.format import SIDECAR_EXT, sidecar_place
from wds_reinforce.layouts import Unit

__all__ = ["ShardTally"]

_GAPS_SHOWN = 3  # runs of missing positions named in a shard's message

Verdict = tuple[dict, "DataError | None"]  # a sample, and None (it goes on) or the error refusing it


class ShardTally:
    """One shard's samples as they arrive: which go on (``admit``, then ``finish``) and what was lost.

    Attributes:
        good: samples admitted, each at its own place.
        unread: samples passed on whose sidecar could not be read here (the reinforce stage
            refuses and counts each); they are not counted again as lost.
        foreign: samples refused as not the shard's at their place.
    """

    def __init__(self, unit: Unit, url: str, first_round: int = 0):
        self.index, self.want, self.url, self.first_round = unit.index, unit.samples, url, first_round
        info = unit.images.info
        self._first_key = info.first_key if info is not None and not unit.groups and unit.samples else None
        self.good = self.unread = self.foreign = 0
        self._next = 0  # the lowest position still expected
        self._placed: bool | None = True if unit.placed else None  # else the first readable sidecar says
        self._pending: list[dict] = []  # unreadable sidecars, held until a position is known free for them
        self._keys: set[str] = set()  # of a shard without places: the keys arrived
        self._alien: str | None = None  # its first key, when it is not the manifest's
        self._gaps: list[tuple[int, int]] = []

    def admit(self, sample: dict) -> list[Verdict]:
        """The samples that can be decided now, ``sample`` among them or held; in shard order."""
        raw = sample.get(SIDECAR_EXT)
        try:
            place = sidecar_place(raw) if raw is not None else None
        except DataError:
            raw = None
        if raw is None:  # missing or damaged
            self._keys.add(sample.get("__key__"))  # it arrived: the first-key check is past
            if self._placed is False:
                return [self._pass_unread(sample)]
            self._pending.append(_stub(sample))  # held light: the reinforce stage refuses it unread
            return []
        out: list[Verdict] = []
        if self._placed is None:
            self._placed = place is not None
            if not self._placed:
                out = [self._pass_unread(s) for s in self._pending]
                self._pending = []
        refused = self._refusal(sample, place)
        if refused is not None:
            return [*out, (sample, self._foreign(sample, refused))]
        position = self.good + self.unread if place is None else place[1]  # without places: by arrival
        out += self._release(position - self._next)
        if position > self._next and place is not None:
            self._gaps.append((self._next, position - 1))
        sample["__position__"], self._next = position, position + 1
        self.good += 1
        return [*out, (sample, None)]

    def finish(self) -> list[Verdict]:
        """At the shard's end: the held samples, passed on where positions are left, else foreign."""
        if not self._placed:
            out = [self._pass_unread(s) for s in self._pending]
            self._pending = []
            return out
        free = len(self._pending) if self.want is None else self.want - self._next
        return self._release(free)

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

    def _refusal(self, sample: dict, place: tuple[int, int, int] | None) -> str | None:
        """Why a sample with a readable sidecar is not this shard's at its place, or None."""
        if (place is not None) != self._placed:
            return f"its sidecar {'records no place' if place is None else 'records a place'}, unlike the shard's"
        if place is None:
            return self._unplaced(sample.get("__key__"))
        shard, position, first = place
        if self.index is not None and shard != self.index:
            return f"it was made for shard {shard}, not this one (shard {self.index})"
        if first != self.first_round:
            return f"it holds rounds from {first}, where this epoch's round group begins at {self.first_round}"
        if position < self._next:
            return f"position {position} comes again or out of order (next is {self._next})"
        if self.want is not None and position >= self.want:
            return f"position {position} is past the {self.want} samples the manifest lists"
        return None

    def _unplaced(self, key: str) -> str | None:
        """Why a sample of a shard without places does not belong, or None."""
        if self._alien is None and self._first_key is not None and not self._keys and key != self._first_key:
            self._alien = key
        if self._alien is not None:
            return f"the shard begins with {self._alien!r}, not the manifest's first key {self._first_key!r}"
        if key in self._keys:
            return "its key comes again"
        arrived = self.good + self.unread
        if self.want is not None and arrived >= self.want:
            return f"position {arrived} is past the {self.want} samples the manifest lists"
        self._keys.add(key)
        return None

    def _release(self, free: int) -> list[Verdict]:
        """The held samples: the first ``free`` go on at the free positions, the others are foreign."""
        out = []
        for n, sample in enumerate(self._pending):
            if n < free:
                sample["__position__"] = self._next + n
                out.append(self._pass_unread(sample))
            else:
                out.append((sample, self._foreign(sample, "its sidecar cannot be read, and no position is free")))
        taken = min(free, len(self._pending))
        self._next, self._pending = self._next + taken, []
        return out

    def _pass_unread(self, sample: dict) -> Verdict:
        if not self._placed and self.want is not None and self.good + self.unread >= self.want:
            return sample, self._foreign(sample, f"its sidecar cannot be read, past the {self.want} samples listed")
        sample.setdefault("__position__", self.good + self.unread)  # without places: by arrival
        self.unread += 1
        return sample, None

    def _foreign(self, sample: dict, why: str) -> DataError:
        self.foreign += 1
        message = f"not this shard's sample at this place: {why}"
        return SampleError(message, sample.get("__key__"), self.url, samples=0, foreign=1)


def _stub(sample: dict) -> dict:
    """A held sample without its members' bytes (names kept for messages), its sidecar bytes kept:
    what the reinforce stage reads before it refuses a sidecar it cannot decode."""
    return {k: v if k.startswith("__") or k == SIDECAR_EXT else b"" for k, v in sample.items()}
