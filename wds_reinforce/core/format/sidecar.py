"""The per-sample sidecar (tar member ``{key}.dr.mp``): ``Sidecar``, its encoder and its checked decoder.

A sidecar is one msgpack map, columnar across the R rounds stored for one sample, so decoding
costs about the same for R=8 or R=400. Each op column is laid out by its ``Column`` in the
format's one table (``columns.COLUMNS``) and written by a codec (``codecs.CODECS``).
docs/FORMAT.md is the normative spec. No I/O: bytes in, bytes out.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np
from crc32c import crc32c as _crc32c

from wds_reinforce.core.errors import FormatError, VersionError
from wds_reinforce.core.format.codecs import UINT_DTYPES, uint_width
from wds_reinforce.core.format.columns import COLUMNS

__all__ = [
    "FORMAT_VERSION",
    "SIDECAR_EXT",
    "MAX_SIDECAR_BYTES",
    "FINGERPRINT_BYTES",
    "Sidecar",
    "check_topk",
    "crc32c",
    "encode_sidecar",
    "decode_sidecar",
    "sidecar_place",
]

FORMAT_VERSION = 1
SIDECAR_EXT = "dr.mp"
# A sidecar of 4096 rounds at top-100 with every op is ~1.7 MB; anything far larger is not ours.
MAX_SIDECAR_BYTES = 16 * 1024 * 1024
FINGERPRINT_BYTES = 8
_MAX_ROUNDS = 65535
_MAX_TOPK = 65535
_ID_DTYPES = {2: np.dtype("<u2"), 4: np.dtype("<u4")}


@dataclass(frozen=True, eq=False)
class Sidecar:
    """Everything stored for one sample: R rounds of augmentation parameters and top-k outputs.

    Attributes:
        fingerprint: the recipe fingerprint, 8 bytes (hex in the manifest).
        idx: (R, k) class ids, uint16 or uint32; row r holds round r's top-k, by falling probability.
        prob: (R, k) float16 probabilities matching ``idx``.
        ops: column name -> (R, width) array, one per op that records parameters (see ``COLUMNS``).
        image_crc: CRC-32C of the sample's image member, which the loader checks before decoding;
            None in sidecars written before integrity checks (they still read).
        window_crc: for mixing recipes, CRC-32C of the keys of the sample's pairing window
            (``mixing.window_crc``), which the loader checks before mixing; None otherwise.
        place: (shard, position, first round) the sample was made for: its shard's index in the
            manifest's list (``image_shards`` for sidecar sets), its position among that shard's
            samples with a sidecar, and the data set's round of row 0 (a round group's first; 0
            for all the rounds). The loader refuses a sample read anywhere else, and counts by
            it what a shard lost. None in sidecars written before (they read, positions counted).
        label_crc: CRC-32C of the sample's ``cls`` member (of no bytes when it has none), which
            the loader checks; None in sidecars written before.
    """

    fingerprint: bytes
    idx: np.ndarray
    prob: np.ndarray
    ops: Mapping[str, np.ndarray] = field(default_factory=dict)
    image_crc: int | None = None
    window_crc: int | None = None
    place: tuple[int, int, int] | None = None
    label_crc: int | None = None

    @property
    def rounds(self) -> int:
        return int(self.idx.shape[0])

    @property
    def topk(self) -> int:
        return int(self.idx.shape[1])

    def round_params(self, r: int) -> dict[str, np.ndarray]:
        """Op parameters of round ``r``: column name -> 1-D row."""
        return {name: col[r] for name, col in self.ops.items()}

    def select(self, rows: slice) -> Sidecar:
        """The sidecar of rounds ``rows`` alone (a sidecar set's round group, ``rows.start`` its first
        round): the same image, window, label and place, the place's first round moved to the group's."""
        ops = {name: col[rows] for name, col in self.ops.items()}
        place = self.place
        if place is not None:  # rows are a group's: ``schedule.group_rows``, a non-negative slice
            place = (place[0], place[1], place[2] + (rows.start or 0))
        return dataclasses.replace(self, idx=self.idx[rows], prob=self.prob[rows], ops=ops, place=place)

    def validate(self, num_classes: int | None = None, key: str | None = None) -> None:
        """Deep checks that ``decode_sidecar`` leaves out of the hot path (see ``check_topk``)."""
        check_topk(self.idx, self.prob, num_classes, key)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Sidecar):
            return NotImplemented
        return (
            self.fingerprint == other.fingerprint
            and np.array_equal(self.idx, other.idx)
            and np.array_equal(self.prob.view(np.uint16), other.prob.view(np.uint16))
            and self.ops.keys() == other.ops.keys()
            and all(np.array_equal(v, other.ops[k]) for k, v in self.ops.items())
            and self.image_crc == other.image_crc
            and self.window_crc == other.window_crc
            and self.place == other.place
            and self.label_crc == other.label_crc
        )


def crc32c(data: bytes | bytearray | memoryview) -> int:
    """CRC-32C (Castagnoli) of ``data``, as an unsigned 32-bit int (hardware-accelerated where available)."""
    return _crc32c(data)


def check_topk(idx: np.ndarray, prob: np.ndarray, num_classes: int | None = None, key: str | None = None) -> None:
    """Check top-k rows, (k,) or (R, k): what a reader needs before trusting them as targets.

    Raises:
        FormatError: probabilities not finite, outside [0, 1] or not falling along a row;
            a class id repeated within a row or not below ``num_classes``.
    """
    p = prob.astype(np.float32)
    if not (np.isfinite(p).all() and p.min(initial=0) >= 0 and p.max(initial=0) <= 1):
        raise FormatError("probabilities must be finite and within [0, 1]", key)
    if np.any(np.diff(p, axis=-1) > 0):
        raise FormatError("probabilities must fall along each row", key)
    if idx.shape[-1] > 1:
        srt = np.sort(idx, axis=-1)
        if np.any(srt[..., 1:] == srt[..., :-1]):
            raise FormatError("a class id repeats within a round", key)
    if num_classes is not None and idx.size and int(idx.max()) >= num_classes:
        raise FormatError(f"class id {int(idx.max())} is not below num_classes={num_classes}", key)


def encode_sidecar(sidecar: Sidecar) -> bytes:
    """Encode one sample's sidecar (see docs/FORMAT.md).

    Class ids are dictionary-coded when that is smaller: ``cls`` holds the sorted distinct ids
    of all rounds and ``idx`` holds, per (round, rank), the position of the id in ``cls``
    (1 byte while a sample has at most 256 distinct ids). Teachers put the same few classes on
    top in most rounds, so this about halves the id bytes. Otherwise ``cls`` is empty and
    ``idx`` holds the ids themselves.

    Raises:
        ValueError: arrays of the wrong shape or range, an unknown op column.
    """
    idx = np.asarray(sidecar.idx)
    prob = np.asarray(sidecar.prob)
    if idx.ndim != 2 or prob.shape != idx.shape:
        raise ValueError(f"expected idx and prob of one shape (R, k), got {idx.shape} and {prob.shape}")
    rounds, topk = idx.shape  # 0 rounds: a sample without any (its original image and label every epoch)
    if not (0 <= rounds <= _MAX_ROUNDS and 1 <= topk <= _MAX_TOPK):
        raise ValueError(f"expected 0 to {_MAX_ROUNDS} rounds and top-k of 1 to {_MAX_TOPK}, got {rounds}, {topk}")
    if len(sidecar.fingerprint) != FINGERPRINT_BYTES:
        raise ValueError(f"expected a {FINGERPRINT_BYTES}-byte fingerprint, got {len(sidecar.fingerprint)}")
    if idx.size and (idx.min() < 0 or idx.max() > 0xFFFFFFFF):
        raise ValueError("expected class ids within [0, 2**32)")
    cls, codes = np.unique(idx, return_inverse=True)
    id_width = 2 if not cls.size or cls[-1] <= 0xFFFF else 4
    code_width = uint_width(np.asarray([cls.size - 1]))
    if cls.size * id_width + idx.size * code_width >= idx.size * id_width:
        cls, codes, code_width = cls[:0], idx, id_width
    ops = {}
    for name, values in sidecar.ops.items():
        if name not in COLUMNS:
            raise ValueError(f"unknown op column {name!r}; known: {COLUMNS.names()}")
        ops[name] = COLUMNS.get(name).encode(values, rounds)
    body = {
        "v": FORMAT_VERSION,
        "fp": bytes(sidecar.fingerprint),
        "n": rounds,
        "k": topk,
        "cw": id_width,
        "cls": cls.astype(_ID_DTYPES[id_width]).tobytes(),
        "idx": codes.reshape(-1).astype(UINT_DTYPES[code_width]).tobytes(),
        "prob": prob.astype("<f2").tobytes(),
        "ops": ops,
    }
    for name, value in (("ic", sidecar.image_crc), ("mw", sidecar.window_crc), ("lc", sidecar.label_crc)):
        if value is not None:
            body[name] = _u32_bytes(name, value)
    if sidecar.place is not None:
        body["at"] = b"".join(
            _u32_bytes(f"place {n}", v) for n, v in zip(("shard", "position", "round"), sidecar.place)
        )
    body["ck"] = b"\0\0\0\0"  # the last entry: a fixed 9-byte tail whose value covers all bytes before it
    data = bytearray(msgpack.packb(body, use_bin_type=True))
    data[-4:] = _crc32c(memoryview(data)[:-_CK_TAIL]).to_bytes(4, "little")
    return bytes(data)


def _u32_bytes(name: str, value: int) -> bytes:
    if not 0 <= value <= 0xFFFFFFFF:
        raise ValueError(f"expected {name} an unsigned 32-bit int, got {value!r}")
    return int(value).to_bytes(4, "little")


# The fields of every v1 sidecar; a sidecar with any other field is one written with the
# integrity checksum, which must then end it (see docs/FORMAT.md, "Integrity").
_REQUIRED = ("v", "fp", "n", "k", "cw", "cls", "idx", "prob", "ops")
_CK_TAG = b"\xa2ck\xc4\x04"  # msgpack: the str "ck", then a bin of 4 bytes
_CK_TAIL = len(_CK_TAG) + 4
# The optional fixed-size fields: image, window and label checksums, and the sample's place.
_SIZED = {"ic": 4, "mw": 4, "lc": 4, "at": 12}


def _check_integrity(data: bytes, body: Mapping[str, Any], key: str | None) -> None:
    if len(body) == len(_REQUIRED) and "ck" not in body:
        return  # a sidecar from before integrity checks: nothing to verify
    if "ck" not in body or data[-_CK_TAIL:-4] != _CK_TAG:
        raise FormatError("sidecar checksum 'ck' is missing or not last: the sidecar bytes are damaged", key)
    if _crc32c(memoryview(data)[:-_CK_TAIL]) != int.from_bytes(data[-4:], "little"):
        raise FormatError("sidecar checksum mismatch: the sidecar bytes are damaged", key)


def decode_sidecar(data: bytes, key: str | None = None) -> Sidecar:
    """Decode and structurally check one sidecar. Arrays are read-only views of ``data``.

    Raises:
        FormatError: not msgpack, too large, an unknown format version, a missing or
            mistyped field, or array lengths that disagree with the rounds and top-k.
    """
    body = _body(data, key)
    rounds, topk = body["n"], body["k"]
    image_crc, window, label, place = body.get("ic"), body.get("mw"), body.get("lc"), body.get("at")
    return Sidecar(
        fingerprint=body["fp"],
        idx=_class_ids(body, rounds, topk, key),
        prob=np.frombuffer(body["prob"], "<f2").reshape(rounds, topk),
        ops=_op_columns(body["ops"], rounds, key),
        image_crc=None if image_crc is None else int.from_bytes(image_crc, "little"),
        window_crc=None if window is None else int.from_bytes(window, "little"),
        place=None if place is None else _place(place),
        label_crc=None if label is None else int.from_bytes(label, "little"),
    )


def _place(raw: bytes) -> tuple[int, int, int]:
    shard, position, first = np.frombuffer(raw, "<u4").tolist()
    return shard, position, first


def sidecar_place(data: bytes, key: str | None = None) -> tuple[int, int, int] | None:
    """The (shard, position, first round) a sidecar was made for, its integrity checked; None if it records none.

    Cheaper than ``decode_sidecar`` (no arrays): the loader reads it in shard order, before any
    shuffle, to bind each sample to its place.

    Raises:
        FormatError: what ``decode_sidecar`` would refuse about the map, its version or checksum.
    """
    place = _body(data, key).get("at")
    return None if place is None else _place(place)


def _body(data: bytes, key: str | None) -> dict[str, Any]:
    """The sidecar's msgpack map, its version, integrity, fields and their types and sizes checked."""
    if len(data) > MAX_SIDECAR_BYTES:
        raise FormatError(f"sidecar of {len(data)} bytes exceeds the {MAX_SIDECAR_BYTES}-byte limit", key)
    try:
        body = msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            max_bin_len=MAX_SIDECAR_BYTES,
            max_str_len=1024,
            max_array_len=1024,
            max_map_len=64,
            max_ext_len=0,
        )
    except Exception as exc:  # msgpack raises several unrelated types for bad input
        raise FormatError(f"sidecar is not valid msgpack ({type(exc).__name__}: {exc})", key) from None
    if not isinstance(body, dict):
        raise FormatError(f"sidecar must be a msgpack map, got {type(body).__name__}", key)
    version = body.get("v")
    if version != FORMAT_VERSION:
        message = f"unknown sidecar format version {version!r}; this reader knows {FORMAT_VERSION}"
        raise VersionError(message, key, version)
    _check_integrity(data, body, key)
    missing = [name for name in _REQUIRED if name not in body]
    if missing:
        raise FormatError(f"sidecar lacks field(s) {missing}", key)
    for name, size in _SIZED.items():
        value = body.get(name)
        if value is not None and not (isinstance(value, bytes) and len(value) == size):
            raise FormatError(f"field {name!r} must be {size} bytes", key)
    rounds, topk = body["n"], body["k"]
    if not (isinstance(rounds, int) and 0 <= rounds <= _MAX_ROUNDS):
        raise FormatError(f"rounds 'n' must be an integer in [0, {_MAX_ROUNDS}], got {rounds!r}", key)
    if not (isinstance(topk, int) and 1 <= topk <= _MAX_TOPK):
        raise FormatError(f"top-k 'k' must be an integer in [1, {_MAX_TOPK}], got {topk!r}", key)
    if body["cw"] not in _ID_DTYPES:
        raise FormatError(f"class id width 'cw' must be 2 or 4, got {body['cw']!r}", key)
    for name in ("fp", "cls", "idx", "prob"):
        if not isinstance(body[name], bytes):
            raise FormatError(f"field {name!r} must be bytes, got {type(body[name]).__name__}", key)
    if len(body["fp"]) != FINGERPRINT_BYTES:
        raise FormatError(f"fingerprint must be {FINGERPRINT_BYTES} bytes, got {len(body['fp'])}", key)
    if len(body["prob"]) != 2 * rounds * topk:
        expected = 2 * rounds * topk
        raise FormatError(f"'prob' has {len(body['prob'])} bytes, expected {expected} for {rounds}x{topk}", key)
    return body


def _class_ids(body: Mapping[str, Any], rounds: int, topk: int, key: str | None) -> np.ndarray:
    """The (rounds, topk) class ids: dictionary codes into ``cls``, or the ids themselves."""
    id_width, count = body["cw"], rounds * topk
    if len(body["cls"]) % id_width:
        raise FormatError(f"'cls' length {len(body['cls'])} is not a multiple of {id_width}", key)
    cls = np.frombuffer(body["cls"], _ID_DTYPES[id_width])
    if count == 0:  # no rounds: no ids
        if cls.size or body["idx"]:
            raise FormatError("a sidecar without rounds has class ids in 'cls' or 'idx'", key)
        return cls.reshape(0, topk)
    code_width = len(body["idx"]) // count
    if code_width not in UINT_DTYPES or code_width * count != len(body["idx"]):
        raise FormatError(f"'idx' has {len(body['idx'])} bytes, expected {count} codes of 1, 2 or 4 bytes", key)
    codes = np.frombuffer(body["idx"], UINT_DTYPES[code_width])
    if cls.size == 0:  # ids stored directly
        if code_width != id_width:
            raise FormatError(f"'idx' holds ids directly but has {code_width}-byte values, not {id_width}", key)
        return codes.reshape(rounds, topk)
    if int(codes.max()) >= cls.size:
        raise FormatError(f"'idx' refers past the {cls.size} distinct class ids in 'cls'", key)
    return cls[codes].reshape(rounds, topk)


def _op_columns(ops_raw: Any, rounds: int, key: str | None) -> dict[str, np.ndarray]:
    """The op columns, each decoded by its layout in the format's column table."""
    if not isinstance(ops_raw, dict):
        raise FormatError(f"'ops' must be a map, got {type(ops_raw).__name__}", key)
    ops = {}
    for name, raw in ops_raw.items():
        try:
            column = COLUMNS.get(name)
        except ValueError:
            raise FormatError(f"unknown op column {name!r}; this reader knows {COLUMNS.names()}", key) from None
        ops[name] = column.decode(raw, rounds, key)
    return ops
