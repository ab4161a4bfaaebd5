from __future__ import annotations

import json

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wds_reinforce.format import (
    COLUMNS,
    FORMAT_VERSION,
    MAX_SIDECAR_BYTES,
    FormatError,
    Manifest,
    ShardInfo,
    Sidecar,
    SkippedInput,
    decode_sidecar,
    encode_sidecar,
)

FP = bytes(range(8))


def _column_values(draw, name: str, rounds: int) -> np.ndarray:
    col = COLUMNS[name]
    fields = col.fields or col.group * draw(st.integers(0, 4))
    shape = (rounds, fields)
    if col.kind == "bits":
        vals = draw(st.lists(st.integers(0, 1), min_size=rounds * fields, max_size=rounds * fields))
        return np.array(vals, np.int64).reshape(shape)
    if col.kind in ("uint", "sparse"):
        top = draw(st.sampled_from([0xFF, 0xFFFF, 0xFFFFFFFF]))
        vals = draw(st.lists(st.integers(0, top), min_size=rounds * fields, max_size=rounds * fields))
        vals = np.array(vals, np.int64).reshape(shape)
        if col.kind == "sparse":  # most rows absent (all zero)
            vals[np.array(draw(st.lists(st.booleans(), min_size=rounds, max_size=rounds)))] = 0
        return vals
    if col.kind == "f16":
        vals = draw(st.lists(st.floats(-1, 1, width=16), min_size=rounds * fields, max_size=rounds * fields))
        return np.array(vals, np.float16).reshape(shape)
    lo, hi = (-128, 127) if col.kind == "i8" else (-32768, 32767)
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


def _mutate(sc: Sidecar, **changes) -> bytes:
    body = msgpack.unpackb(encode_sidecar(sc))
    for k, v in changes.items():
        if v is None:
            del body[k]
        else:
            body[k] = v
    return msgpack.packb(body, use_bin_type=True)


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"v": 2}, "unknown sidecar format version 2"),
        ({"v": None}, "unknown sidecar format version None"),
        ({"prob": None}, r"lacks field\(s\) \['prob'\]"),
        ({"n": -1}, "rounds 'n' must be an integer"),
        ({"n": 0}, "rounds 'n' must be an integer in \\[1, 65535\\], got 0"),
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
    from wds_reinforce.format import VersionError

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
    assert Manifest.from_json(text).num_samples == 5
    assert json.loads(text)["format_version"] == FORMAT_VERSION


def test_timm_info_lists_the_split():
    info = _manifest().timm_info()
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
