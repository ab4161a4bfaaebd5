from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
from pathlib import Path

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wds_reinforce.core.format import (
    CODECS,
    COLUMNS,
    FORMAT_VERSION,
    MAX_SIDECAR_BYTES,
    Column,
    FormatError,
    Manifest,
    ShardInfo,
    Sidecar,
    SkippedInput,
    crc32c,
    decode_sidecar,
    encode_sidecar,
)
from wds_reinforce.layouts import num_samples, timm_info

FP = bytes(range(8))
FORMAT_MD = Path(__file__).resolve().parents[2] / "docs" / "FORMAT.md"


def _column_values(draw, name: str, rounds: int) -> np.ndarray:
    col = COLUMNS.get(name)
    fields = col.width if col.width is not None else len(col.fields) * draw(st.integers(0, 4))
    shape = (rounds, fields)
    if col.codec == "bits":
        vals = draw(st.lists(st.integers(0, 1), min_size=rounds * fields, max_size=rounds * fields))
        return np.array(vals, np.int64).reshape(shape)
    if col.codec in ("uint", "sparse"):
        top = draw(st.sampled_from([0xFF, 0xFFFF, 0xFFFFFFFF]))
        vals = draw(st.lists(st.integers(0, top), min_size=rounds * fields, max_size=rounds * fields))
        vals = np.array(vals, np.int64).reshape(shape)
        if col.codec == "sparse":  # most rows absent (all zero)
            vals[np.array(draw(st.lists(st.booleans(), min_size=rounds, max_size=rounds)))] = 0
        return vals
    if col.codec == "f16":
        vals = draw(st.lists(st.floats(-1, 1, width=16), min_size=rounds * fields, max_size=rounds * fields))
        return np.array(vals, np.float16).reshape(shape)
    lo, hi = (-128, 127) if col.codec == "i8" else (-32768, 32767)
    vals = draw(st.lists(st.integers(lo, hi), min_size=rounds * fields, max_size=rounds * fields))
    return np.array(vals, np.int64).reshape(shape)


@st.composite
def sidecars(draw) -> Sidecar:
    rounds = draw(st.integers(1, 12))
    num_classes = draw(st.sampled_from([2, 10, 1000, 65536, 70000, 2**32 - 1]))
    topk = draw(st.integers(1, min(num_classes, 12)))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    idx = np.stack([rng.choice(num_classes, topk, replace=False) for _ in range(rounds)])
    prob = -np.sort(-rng.random((rounds, topk)), axis=1).astype(np.float16)
    names = draw(st.lists(st.sampled_from(sorted(COLUMNS)), unique=True))
    ops = {name: _column_values(draw, name, rounds) for name in names}
    return Sidecar(fingerprint=draw(st.binary(min_size=8, max_size=8)), idx=idx.astype(np.int64), prob=prob, ops=ops)


@settings(max_examples=200, deadline=None)
@given(sidecars())
def test_sidecar_round_trip(sc: Sidecar):
    data = encode_sidecar(sc)
    out = decode_sidecar(data)
    assert out == sc
    assert out.rounds == sc.idx.shape[0] and out.topk == sc.idx.shape[1]
    assert out.idx.dtype == (np.uint16 if sc.idx.max() <= 0xFFFF else np.uint32)
    assert out.prob.dtype == np.float16
    for name, values in sc.ops.items():
        assert np.array_equal(out.ops[name], values.astype(out.ops[name].dtype))
    # encoding is deterministic
    assert encode_sidecar(out) == data


@settings(max_examples=50, deadline=None)
@given(sidecars(), st.data())
def test_a_round_group_is_the_sidecar_of_its_rows(sc: Sidecar, data):
    sc = dataclasses.replace(sc, image_crc=7, window_crc=9)
    start = data.draw(st.integers(0, sc.rounds - 1))
    stop = data.draw(st.integers(start + 1, sc.rounds))
    part = decode_sidecar(encode_sidecar(sc.select(slice(start, stop))))
    assert part.rounds == stop - start and (part.image_crc, part.window_crc) == (7, 9)
    for r in range(start, stop):  # each row keeps its parameters and targets
        assert np.array_equal(part.idx[r - start], sc.idx[r])
        assert part.prob[r - start].tobytes() == sc.prob[r].tobytes()
        assert all(np.array_equal(part.round_params(r - start)[c], v) for c, v in sc.round_params(r).items())


def _half(bits: int) -> float:
    """The half float with these bits; 0 for NaN (any other half float round-trips)."""
    value = float(np.uint16(bits).view(np.float16))
    return 0.0 if value != value else value


# Valid values of each codec: codec name -> strategy for one value (uint: of a random width).
_CODEC_VALUES = {
    "uint": st.sampled_from([0xFF, 0xFFFF, 2**32 - 1]).flatmap(lambda top: st.integers(0, top)),
    "bits": st.integers(0, 1),
    "sparse": st.integers(0, 2**32 - 1) | st.just(0),
    "i8": st.integers(-128, 127),
    "i16": st.integers(-32768, 32767),
    "f16": st.integers(0, 0xFFFF).map(_half),  # every bit pattern: subnormals, infinities, -0
}


def test_every_codec_has_a_round_trip_test():
    assert set(CODECS.names()) == set(_CODEC_VALUES)


@pytest.mark.parametrize("name", sorted(_CODEC_VALUES))
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_each_codec_round_trips(name, data):
    codec = CODECS.get(name)()
    rounds, fields = data.draw(st.integers(1, 12)), data.draw(st.integers(0, 5))
    dtype = np.float16 if name == "f16" else np.int64
    n = rounds * fields
    values = np.array(data.draw(st.lists(_CODEC_VALUES[name], min_size=n, max_size=n)), dtype).reshape(rounds, fields)
    if name == "sparse":  # some rows absent (all zero)
        values[np.array(data.draw(st.lists(st.booleans(), min_size=rounds, max_size=rounds)))] = 0
    raw = codec.encode(values, rounds)
    for width in [fields, None] if codec.variable else [fields]:
        out = codec.decode(raw, rounds, width)
        assert out.shape == (rounds, fields)
        assert np.array_equal(out, values.astype(out.dtype)) and np.array_equal(out.astype(values.dtype), values)
    assert codec.encode(out, rounds) == raw  # deterministic, and stable under re-encoding


def test_registries_refuse_a_duplicate_name():
    with pytest.raises(ValueError, match="column codec 'uint' is already registered"):
        CODECS.register("uint", CODECS.get("bits"))
    with pytest.raises(ValueError, match="op column 'mixp' is already registered"):
        COLUMNS.register("mixp", Column("mixp", "i8", ("x",)))
    assert COLUMNS.get("mixp").codec == "sparse"


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: Column("x", "zip", ("a",)), "unknown column codec 'zip'; expected one of: bits, f16, i16, i8, sparse"),
        (lambda: Column("x", "uint", ("a",), repeat=None), "expected a fixed repeat for column 'x': codec 'uint'"),
        (lambda: Column("x", "i8", ()), "expected column fields to be a non-empty tuple of names"),
        (lambda: Column("x", "i8", ("a",), repeat=-1), "expected repeat a non-negative integer or None"),
    ],
)
def test_bad_columns_fail_early(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def _spec_table() -> dict[str, tuple[str, str]]:
    """docs/FORMAT.md's op column table: name -> (codec, fields)."""
    text = FORMAT_MD.read_text()
    section = text[text.index("### Op columns") : text.index("### Limits")]
    rows = re.findall(r"^\| `(\w+)` \| (\w+) \| ([^|]+?) \|", section, re.M)
    return {name: (codec, fields) for name, codec, fields in rows}


def test_columns_are_the_spec_s():
    """Every column a reader knows has the codec and row width that docs/FORMAT.md gives it."""
    spec = _spec_table()
    assert sorted(spec) == COLUMNS.names() == ["flip", "mixb", "mixl", "mixp", "ra", "random_crop", "re", "rrc"]
    for name, (codec, fields) in spec.items():
        col = COLUMNS.get(name)
        assert col.codec == codec, name
        if fields.isdigit():
            assert col.width == int(fields), name
        else:  # "2·num_ops": a variable width, whole groups of 2
            assert fields == "2·num_ops" and col.width is None and len(col.fields) == 2, name


def test_a_fresh_reader_knows_every_column():
    """format.COLUMNS declares every column: importing the format alone brings them all, no op needed."""
    code = "from wds_reinforce.core.format import COLUMNS; print(' '.join(COLUMNS.names()))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["flip", "mixb", "mixl", "mixp", "ra", "random_crop", "re", "rrc"]


def test_the_worked_example_of_the_spec():
    """The bytes that docs/FORMAT.md shows are the bytes the writer makes, and they decode back."""
    text = FORMAT_MD.read_text()
    dump = text[text.index("encodes to these 182 bytes") :].split("```")[1]
    expected = bytes.fromhex("".join(line[6:] for line in dump.strip().splitlines()))
    assert len(expected) == 182
    sc = Sidecar(
        bytes.fromhex("551ddeee2dfb6629"),
        np.array([[3, 1], [3, 1], [1, 3]]),
        np.array([[0.75, 0.125], [0.5, 0.25], [0.5, 0.375]], np.float16),
        {
            "rrc": np.array([[10, 20, 300, 400], [0, 0, 375, 500], [5, 6, 100, 120]]),
            "flip": np.array([[1], [0], [1]]),
            "ra": np.array([[5, -9, 11, 9], [0, 9, 13, 9], [1, 9, 2, -9]]),
            "re": np.array([[0, 0, 0, 0], [12, 30, 40, 50], [0, 0, 0, 0]]),
        },
        image_crc=crc32c(b"123456789"),
        place=(2, 5, 0),
        label_crc=crc32c(b"7"),
    )
    assert crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value the spec quotes
    assert crc32c(expected[:-9]) == int.from_bytes(expected[-4:], "little")
    assert encode_sidecar(sc) == expected
    assert decode_sidecar(expected) == sc


def _sample(rounds=4, topk=3, ops=None) -> Sidecar:
    rng = np.random.default_rng(0)
    idx = np.stack([rng.choice(5, topk, replace=False) for _ in range(rounds)]) * 20  # few distinct ids
    prob = -np.sort(-rng.random((rounds, topk)), axis=1)
    if ops is None:
        ops = {"rrc": rng.integers(0, 500, (rounds, 4)), "flip": rng.integers(0, 2, (rounds, 1))}
    return Sidecar(FP, idx, prob.astype(np.float16), ops)


def test_uint_columns_take_the_smallest_width():
    small = _sample(ops={"rrc": np.full((4, 4), 200)})
    big = _sample(ops={"rrc": np.full((4, 4), 300)})
    assert len(encode_sidecar(big)) - len(encode_sidecar(small)) == 16
    assert decode_sidecar(encode_sidecar(big)).ops["rrc"].dtype == np.uint16


def test_flip_bits_are_packed():
    sc = _sample(rounds=16, ops={"flip": np.arange(16)[:, None] % 2})
    body = msgpack.unpackb(encode_sidecar(sc))
    assert len(body["ops"]["flip"]) == 2
    assert decode_sidecar(encode_sidecar(sc)).ops["flip"][:, 0].tolist() == [0, 1] * 8


def test_sparse_columns_store_present_rows_only():
    boxes = np.zeros((16, 4), np.int64)
    boxes[[3, 9]] = [[1, 2, 30, 40], [5, 6, 70, 80]]
    body = msgpack.unpackb(encode_sidecar(_sample(rounds=16, ops={"re": boxes})))
    assert len(body["ops"]["re"]) == 2 + 2 * 4
    assert np.array_equal(decode_sidecar(encode_sidecar(_sample(rounds=16, ops={"re": boxes}))).ops["re"], boxes)


def test_ids_are_stored_directly_when_a_dictionary_does_not_pay():
    rounds, topk = 4, 3
    few = Sidecar(FP, np.tile([7, 3, 5], (rounds, 1)), np.full((rounds, topk), 0.1, np.float16))
    many = Sidecar(FP, np.arange(rounds * topk).reshape(rounds, topk) * 1000, few.prob)
    assert msgpack.unpackb(encode_sidecar(few))["cls"] != b""
    assert msgpack.unpackb(encode_sidecar(many))["cls"] == b""
    for sc in (few, many):
        assert decode_sidecar(encode_sidecar(sc)) == sc


def test_a_sidecar_without_rounds_round_trips():
    """n = 0: a sample imported without rounds keeps its top-k width, checksums and (empty) columns."""
    ops = {name: np.zeros((0, COLUMNS.get(name).width or 4), np.int64) for name in sorted(COLUMNS)}
    sc = Sidecar(FP, np.zeros((0, 5), np.uint32), np.zeros((0, 5), np.float16), ops, image_crc=7, window_crc=9)
    data = encode_sidecar(sc)
    body = msgpack.unpackb(data)
    assert (body["n"], body["k"], body["cls"], body["idx"], body["prob"]) == (0, 5, b"", b"", b"")
    assert body["ops"] == {name: b"" for name in COLUMNS}
    out = decode_sidecar(data, key="k")
    assert (out.rounds, out.topk, out.image_crc, out.window_crc, out.fingerprint) == (0, 5, 7, 9, FP)
    assert out.idx.shape == out.prob.shape == (0, 5)
    for name in COLUMNS:  # a width the bytes cannot give (RandAugment's pairs) is 0
        assert out.ops[name].shape == (0, COLUMNS.get(name).width or 0), name
    assert encode_sidecar(out) == data  # and stable under re-encoding
    assert out.select(slice(0, 3)) == out  # a round group of it has none either
    out.validate(num_classes=10)
    for name in sorted(CODECS.names()):  # every codec: zero rows are zero bytes, and back
        codec = CODECS.get(name)()
        assert codec.encode(np.zeros((0, 3), np.int64), 0) == b""
        assert codec.decode(b"", 0, 3).shape == (0, 3)


def _mutate(sc: Sidecar, **changes) -> bytes:
    """``sc`` with fields changed or removed, re-sealed with a valid checksum (so that the
    structural check under test is what refuses it, as a writer's bug would be refused)."""
    body = msgpack.unpackb(encode_sidecar(sc))
    del body["ck"]
    for k, v in changes.items():
        if v is None:
            del body[k]
        else:
            body[k] = v
    body["ck"] = b"\0\0\0\0"
    data = bytearray(msgpack.packb(body, use_bin_type=True))
    data[-4:] = crc32c(bytes(data[:-9])).to_bytes(4, "little")
    return bytes(data)


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"v": 2}, "unknown sidecar format version 2"),
        ({"v": None}, "unknown sidecar format version None"),
        ({"prob": None}, r"lacks field\(s\) \['prob'\]"),
        ({"n": -1}, "rounds 'n' must be an integer"),
        ({"n": 65536}, "rounds 'n' must be an integer in \\[0, 65535\\], got 65536"),
        ({"n": 0}, "'prob' has 24 bytes, expected 0 for 0x3"),
        ({"n": 0, "prob": b""}, "a sidecar without rounds has class ids in 'cls' or 'idx'"),
        ({"n": 0, "prob": b"", "cls": b"", "idx": b"", "ops": {"ra": b"\0\0"}}, "'ra' has 2 bytes, but there are no"),
        ({"k": "3"}, "top-k 'k' must be an integer"),
        ({"cw": 3}, "class id width 'cw' must be 2 or 4"),
        ({"fp": b"123"}, "fingerprint must be 8 bytes"),
        ({"prob": b"\0" * 10}, "'prob' has 10 bytes, expected 24"),
        ({"idx": b"\0" * 5}, "'idx' has 5 bytes"),
        ({"idx": b"\xff" * 12}, "'idx' refers past the"),
        ({"cls": b"\0" * 3}, "'cls' length 3 is not a multiple of 2"),
        ({"cls": "text"}, "field 'cls' must be bytes"),
        ({"ops": [1]}, "'ops' must be a map"),
        ({"ops": {"warp": b""}}, "unknown op column 'warp'"),
        ({"ops": {"rrc": b"\0" * 12}}, "op column 'rrc' has 12 bytes"),
        ({"ops": {"flip": b"\0\0"}}, "op column 'flip' has 2 bytes, expected 1"),
        ({"ops": {"ra": b"\0" * 6}}, "op column 'ra' has 6 bytes, which is not 4 whole rows"),
        ({"ops": {"re": b""}}, "fewer than its 1-byte bitmap"),
        ({"ops": {"re": b"\x03" + b"\0" * 5}}, "op column 're' has 5 bytes, expected 2x4"),
        ({"ops": {"re": b"\x00\x01"}}, "has values but no row is present"),
        ({"cls": b"", "idx": b"\0" * 12}, "holds ids directly but has 1-byte values, not 2"),
    ],
)
def test_bad_sidecars_are_rejected_with_reason(changes, match):
    with pytest.raises(FormatError, match=match):
        decode_sidecar(_mutate(_sample(), **changes), key="shard-000/abc")


def test_unknown_version_is_a_version_error():
    from wds_reinforce.core.format import VersionError

    with pytest.raises(VersionError, match="unknown sidecar format version 3") as info:
        decode_sidecar(_mutate(_sample(), v=3))
    assert info.value.version == 3


def test_error_names_the_key():
    with pytest.raises(FormatError, match=r"^s1/key7: unknown sidecar format version 9"):
        decode_sidecar(_mutate(_sample(), v=9), key="s1/key7")


@pytest.mark.parametrize("cut", [1, 2, 10, -1])
def test_truncated_sidecar_is_rejected(cut):
    data = encode_sidecar(_sample())
    with pytest.raises(FormatError, match="not valid msgpack|lacks field|has .* bytes"):
        decode_sidecar(data[:cut] if cut > 0 else data[:cut])


def test_garbage_and_non_map_are_rejected():
    with pytest.raises(FormatError, match="not valid msgpack"):
        decode_sidecar(b"\xc1\x00\x01")
    with pytest.raises(FormatError, match="must be a msgpack map, got list"):
        decode_sidecar(msgpack.packb([1, 2, 3]))


def test_oversized_sidecar_is_rejected_before_parsing():
    with pytest.raises(FormatError, match="exceeds the"):
        decode_sidecar(b"\0" * (MAX_SIDECAR_BYTES + 1))


def test_pickle_like_ext_types_are_refused():
    body = msgpack.unpackb(encode_sidecar(_sample()))
    body["ops"] = msgpack.ExtType(1, b"payload")
    with pytest.raises(FormatError, match="not valid msgpack"):
        decode_sidecar(msgpack.packb(body, use_bin_type=True))


def test_encode_checks_its_arguments():
    sc = _sample()
    with pytest.raises(ValueError, match="expected idx and prob of one shape"):
        encode_sidecar(Sidecar(FP, sc.idx, sc.prob[:, :2]))
    with pytest.raises(ValueError, match="expected a 8-byte fingerprint"):
        encode_sidecar(Sidecar(b"x", sc.idx, sc.prob))
    with pytest.raises(ValueError, match="unknown op column 'warp'"):
        encode_sidecar(Sidecar(FP, sc.idx, sc.prob, {"warp": np.zeros((4, 1))}))
    with pytest.raises(ValueError, match="expected op column 'rrc' rows of 4 values, got 3"):
        encode_sidecar(Sidecar(FP, sc.idx, sc.prob, {"rrc": np.zeros((4, 3))}))
    with pytest.raises(ValueError, match="expected op column 'ra' values within int8"):
        encode_sidecar(Sidecar(FP, sc.idx, sc.prob, {"ra": np.full((4, 2), 300)}))
    with pytest.raises(ValueError, match="with 4 rows"):
        encode_sidecar(Sidecar(FP, sc.idx, sc.prob, {"flip": np.zeros((3, 1))}))


def test_validate_catches_what_decode_leaves_out():
    sc = _sample()
    sc.validate(num_classes=100)
    with pytest.raises(FormatError, match="not below num_classes=10"):
        sc.validate(num_classes=10)
    rising = Sidecar(FP, sc.idx, sc.prob[:, ::-1].copy(), sc.ops)
    with pytest.raises(FormatError, match="k1: probabilities must fall"):
        rising.validate(key="k1")
    dup = sc.idx.copy()
    dup[0, 1] = dup[0, 0]
    with pytest.raises(FormatError, match="a class id repeats"):
        Sidecar(FP, dup, sc.prob, sc.ops).validate()
    with pytest.raises(FormatError, match="finite and within"):
        Sidecar(FP, sc.idx, np.full(sc.prob.shape, np.nan, np.float16), sc.ops).validate()


def _manifest() -> Manifest:
    return Manifest(
        recipe={"name": "rrc", "ops": []},
        fingerprint=FP.hex(),
        teacher={"members": ["timm:resnet18"]},
        num_classes=10,
        rounds=4,
        topk=3,
        seed=0,
        class_names=[f"c{i}" for i in range(10)],
        shards=[ShardInfo("s-000000.tar", 5, 10240, "ab" * 32, "a", "e")],
        skipped=[SkippedInput("bad", "cannot decode image")],
        versions={"torch": "2.x"},
    )


def test_manifest_round_trip():
    m = _manifest()
    text = m.to_json()
    assert Manifest.from_json(text) == m
    assert num_samples(Manifest.from_json(text)) == 5
    assert json.loads(text)["format_version"] == FORMAT_VERSION


def test_timm_info_lists_the_split():
    info = timm_info(_manifest())
    assert info["splits"]["train"] == {
        "name": "train",
        "num_samples": 5,
        "filenames": ["s-000000.tar"],
        "shard_lengths": [5],
    }
    assert info["num_classes"] == 10


def test_manifest_ignores_unknown_fields_and_defaults_new_ones():
    raw = json.loads(_manifest().to_json())
    raw["added_in_a_later_minor"] = 1
    del raw["skipped"]
    assert Manifest.from_json(json.dumps(raw)).skipped == []


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda r: r.update(format_version=7), "unknown manifest format_version 7"),
        (lambda r: r.pop("rounds"), "do not match the schema"),
        (lambda r: r.update(topk="3"), "topk must be an integer"),
        (lambda r: r["shards"][0].pop("sha256"), "do not match the schema"),
    ],
)
def test_bad_manifests_are_rejected(edit, match):
    raw = json.loads(_manifest().to_json())
    edit(raw)
    with pytest.raises(FormatError, match=match):
        Manifest.from_json(json.dumps(raw), source="x/manifest.json")


def test_manifest_not_json():
    with pytest.raises(FormatError, match="^m.json: not valid JSON"):
        Manifest.from_json("{", source="m.json")


def _v1_sidecar_without_integrity(sc: Sidecar) -> bytes:
    """A sidecar as writers before the integrity fields wrote it: the nine v1 keys only."""
    body = msgpack.unpackb(encode_sidecar(sc))
    return msgpack.packb({k: v for k, v in body.items() if k not in ("ic", "ck")}, use_bin_type=True)


def test_every_single_byte_change_is_refused():
    sc = dataclasses.replace(_sample(rounds=6, topk=4), image_crc=0x12345678)
    data = encode_sidecar(sc)
    assert decode_sidecar(data) == sc
    for i in range(len(data)):
        for flip in (0x01, 0x80, 0xFF):
            bad = bytearray(data)
            bad[i] ^= flip
            with pytest.raises(FormatError):
                decode_sidecar(bytes(bad), "k")


def test_multi_byte_damage_is_refused():
    rng = np.random.default_rng(7)
    data = encode_sidecar(_sample(rounds=16, topk=5))
    for _ in range(200):
        bad = bytearray(data)
        for i in rng.choice(len(data), size=int(rng.integers(2, 6)), replace=False):
            bad[i] ^= int(rng.integers(1, 256))
        with pytest.raises(FormatError):
            decode_sidecar(bytes(bad), "k")


def test_checksum_errors_name_the_key_and_say_what_is_damaged():
    data = bytearray(encode_sidecar(_sample()))
    data[30] ^= 0x04
    with pytest.raises(FormatError, match=r"^k7: sidecar checksum mismatch: the sidecar bytes are damaged"):
        decode_sidecar(bytes(data), "k7")
    body = msgpack.unpackb(encode_sidecar(_sample()))
    body["zz"] = b"a later field"  # a field beyond v1 but no valid checksum last
    with pytest.raises(FormatError, match="checksum 'ck' is missing or not last"):
        decode_sidecar(msgpack.packb(body, use_bin_type=True), "k7")


def test_sidecars_without_integrity_fields_still_read():
    sc = _sample()
    old = _v1_sidecar_without_integrity(dataclasses.replace(sc, image_crc=99))
    assert decode_sidecar(old) == sc  # unchecked, image_crc None
    assert decode_sidecar(old).image_crc is None
    assert len(encode_sidecar(sc)) == len(old) + 9  # the checksum costs 9 bytes per sample
