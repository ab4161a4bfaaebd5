"""MixUp/CutMix within pairing windows: sampling rates, pixels, producer = loader, windows."""

from __future__ import annotations

import hashlib
import io
import math
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds

from tests.producer_data import TEACHER, job_args, make_image_folder
from wds_reinforce import ReinforcedDataset, SkipCounter
from wds_reinforce.core.augment import Recipe, replay
from wds_reinforce.core.augment.mixing import (
    MIX_COLUMNS,
    Mixing,
    check_window,
    mix_kind,
    mix_pixels,
    mix_rng,
    window_crc,
)
from wds_reinforce.core.decode import SourceImage
from wds_reinforce.core.errors import FormatError, UsageError
from wds_reinforce.core.format import Manifest, decode_sidecar
from wds_reinforce.core.targets import topk
from wds_reinforce.layouts import num_samples
from wds_reinforce.produce.make import make_shards
from wds_reinforce.produce.teacher import Teacher, load_teacher
from wds_reinforce.read.loader import LoaderOptions, ReplayPlan, reinforce_sample, reinforce_stages

WINDOW = 4
ROUNDS = 4


def _within_3_sigma(count: int, n: int, p: float) -> bool:
    return abs(count - n * p) <= 3 * math.sqrt(n * p * (1 - p)) + 1e-9


def _kinds(mix: Mixing, n: int, members: int = 8) -> Counter:
    kinds: Counter = Counter()
    for r in range(n):
        position = r % members
        row = mix.sample(mix_rng(3, f"k{r // members}", r), position, members, (224, 224))
        kinds[mix_kind(row)] += 1
        partner = int(row["mixp"][0]) - 1
        assert (partner == -1) == (mix_kind(row) == "none")
        assert partner != position and partner < members
    return kinds


def test_the_papers_rates_none_mixup_cutmix_and_both_each_a_quarter():
    n = 4000
    kinds = _kinds(Mixing(), n)
    for kind in ("none", "mixup", "cutmix", "both"):
        assert _within_3_sigma(kinds[kind], n, 0.25), kinds


def test_mode_one_applies_at_most_one_at_its_rates():
    n = 4000
    kinds = _kinds(Mixing(mode="one", mixup_p=0.3, cutmix_p=0.5), n)
    assert kinds["both"] == 0
    for kind, p in (("none", 0.2), ("mixup", 0.3), ("cutmix", 0.5)):
        assert _within_3_sigma(kinds[kind], n, p), kinds


def test_mixup_weight_follows_the_lambda_range():
    mix = Mixing(mixup_p=1.0, cutmix_p=0.0)
    weights = np.array([mix.sample(mix_rng(0, "k", r), 0, 2, (32, 32))["mixl"][0] for r in range(2000)]) / 256
    assert weights.min() > 0 and weights.max() <= 0.5  # Beta(1, 1) / 2: the partner never dominates
    assert abs(weights.mean() - 0.25) < 0.02  # uniform on (0, 0.5)


def test_a_window_of_one_sample_is_never_mixed():
    mix = Mixing(mixup_p=1.0, cutmix_p=1.0)
    rows = [mix.sample(mix_rng(0, "alone", r), 0, 1, (32, 32)) for r in range(50)]
    assert all(mix_kind(row) == "none" and row["mixp"][0] == 0 for row in rows)


def test_mix_pixels_blends_then_pastes_the_partners_box():
    own = torch.zeros(3, 8, 8, dtype=torch.uint8)
    partner = torch.full((3, 8, 8), 255, dtype=torch.uint8)
    partner[:, 0, 0] = 7
    row = {"mixp": np.array([2]), "mixl": np.array([64]), "mixb": np.array([0, 0, 2, 3])}
    out = mix_pixels(own, partner, row)
    assert int(out[0, 5, 5]) == (255 * 64 + 128) >> 8 == 64  # a quarter of the partner, rounded in integers
    assert int(mix_pixels(partner, own, row)[0, 5, 5]) == (255 * 192 + 128) >> 8 == 191
    assert torch.equal(out[:, :2, :3], partner[:, :2, :3])  # the box comes from the unmixed partner
    assert torch.count_nonzero(own) == 0  # inputs untouched


@pytest.mark.parametrize(
    "row, why",
    [
        ({"mixp": [0], "mixl": [9], "mixb": [0, 0, 0, 0]}, "mixing rows without a partner"),
        ({"mixp": [5], "mixl": [9], "mixb": [0, 0, 0, 0]}, "a mixing partner outside its window of 4 samples"),
        ({"mixp": [2], "mixl": [9], "mixb": [0, 0, 0, 0]}, "the sample is its own mixing partner"),
        ({"mixp": [1], "mixl": [256], "mixb": [0, 0, 0, 0]}, "a MixUp weight not below 256"),
        ({"mixp": [1], "mixl": [0], "mixb": [30, 0, 4, 4]}, "a CutMix box outside the output"),
        ({"mixp": [1], "mixl": [0], "mixb": [0, 0, 0, 0]}, "a mixing partner with neither MixUp nor CutMix"),
    ],
)
def test_mixing_checks_raise_naming_the_broken_rule(row, why):
    mix, rows = Mixing(), {name: np.array(v) for name, v in row.items()}
    with pytest.raises(FormatError, match=f"^{why}"):
        mix.check(rows, 1, 4, (32, 32))  # the sample at position 1 of a window of 4
    columns = {name: np.stack([np.zeros_like(v), v]) for name, v in rows.items()}  # round 0 fine, round 1 not
    with pytest.raises(FormatError, match=f"^round 1: {why}"):
        mix.check_columns(columns, 1, 4, (32, 32))
    mix.check({name: np.zeros_like(v) for name, v in rows.items()}, 1, 4, (32, 32))  # not mixed: fine


def test_the_window_check_names_a_missing_or_other_window():
    check_window(window_crc(["a", "b"]), window_crc(["a", "b"]))
    with pytest.raises(FormatError, match="without a pairing-window checksum 'mw'"):
        check_window(None, window_crc(["a", "b"]))
    with pytest.raises(FormatError, match="pairing window differs from the one it was mixed in"):
        check_window(window_crc(["a", "b"]), window_crc(["a", "c"]))


@pytest.mark.parametrize("rounds", [16, 400])
def test_mixing_adds_at_most_8_bytes_per_round(rounds):
    """Whole sidecars, mixing recipe vs the same recipe without: columns, their names and ``mw``."""
    from wds_reinforce.core.format import Sidecar, encode_sidecar

    plain, mixed = Recipe.from_spec("rrc+ra/re"), Recipe.from_spec("rrc+ra/re+mix")
    rng = np.random.default_rng(0)
    added = []
    for s in range(32):
        keys = [f"w{s // 16}_{i}" for i in range(16)]
        ops = plain.sample_rounds(0, keys[s % 16], rounds, (375, 500))
        idx = np.stack([rng.choice(1000, 10, replace=False) for _ in range(rounds)])
        prob = -np.sort(-rng.dirichlet(np.ones(10), rounds).astype(np.float16), axis=1)
        mix = mixed.mix.sample_rounds(0, keys, s % 16, range(rounds), mixed.size)
        without = encode_sidecar(Sidecar(plain.fingerprint, idx, prob, ops, 1))
        with_mix = encode_sidecar(Sidecar(mixed.fingerprint, idx, prob, {**ops, **mix}, 1, window_crc(keys)))
        added.append((len(with_mix) - len(without)) / rounds)
    assert 0 < np.mean(added) <= 8.0, np.mean(added)


def test_recipe_mix_is_part_of_the_fingerprint_and_round_trips():
    plain, mixed = Recipe.from_spec("rrc+ra/re"), Recipe.from_spec("rrc+ra/re+mix")
    assert plain.fingerprint != mixed.fingerprint
    again = Recipe.from_dict(mixed.to_dict())
    assert again.fingerprint == mixed.fingerprint and again.mix == mixed.mix
    assert set(mixed.column_fields) - set(plain.column_fields) == set(MIX_COLUMNS)
    with pytest.raises(ValueError, match="mix window"):
        Recipe.from_spec(dict(mixed.to_dict(), mix={"window": 1}))
    with pytest.raises(ValueError, match="<= 1"):
        Recipe.from_spec(dict(mixed.to_dict(), mix={"mode": "one", "mixup": {"p": 0.8}, "cutmix": {"p": 0.5}}))
    for mix, match in (
        ({"windw": 4}, r"unknown mix field\(s\) \['windw'\]"),
        ({"mixup": {"alfa": 1}}, r"expected mix mixup a mapping of \['alpha', 'max', 'p'\]"),
        ({"cutmix": {"p": 1.5}}, r"expected mix cutmix p a probability in \[0, 1\], got 1.5"),
        ({"mixup": {"max": 0}}, "expected mix mixup max a positive number"),
        ({"mode": "switch"}, r"expected mix mode in \['both', 'one'\]"),
    ):
        with pytest.raises(ValueError, match=match):
            Recipe.from_spec(dict(mixed.to_dict(), mix=mix))


# ----------------------------------------------------------------------------------------
# Producer and loader


class RecordingTeacher(Teacher):
    """A real (random-weight timm) teacher that also keeps a digest of every image it is shown."""

    def __init__(self, inner: Teacher):
        self.__dict__.update(inner.__dict__)
        self.seen: set[str] = set()

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        for img in images:
            self.seen.add(_digest(img))
        return super().predict(images)


def _digest(img: torch.Tensor) -> str:
    return hashlib.sha256(img.contiguous().numpy().tobytes()).hexdigest()


def _mix_recipe() -> dict:
    desc = Recipe.from_spec("rrc+ra/re+mix", size=32).to_dict()
    desc["mix"]["window"] = WINDOW
    return desc


@pytest.fixture(scope="module")
def produced(tmp_path_factory):
    root = tmp_path_factory.mktemp("mix")
    source = make_image_folder(root / "src", per_class=6)
    teacher = RecordingTeacher(load_teacher(TEACHER, num_classes=3, device="cpu"))
    out = root / "out"
    make_shards(str(source), teacher, out=str(out), recipe=_mix_recipe(), **job_args(rounds=ROUNDS, shard_size=7))
    return source, out, teacher


def _shard_sidecars(out: Path) -> list[list[tuple[str, object]]]:
    shards = []
    for path in sorted(out.glob("train-*.tar")):
        with tarfile.open(path) as tar:
            sides = [(m.name.split(".")[0], tar.extractfile(m).read()) for m in tar if m.name.endswith(".dr.mp")]
        shards.append([(key, decode_sidecar(raw, key)) for key, raw in sides])
    return shards


def test_partner_always_in_the_samples_window(produced):
    _, out, _ = produced
    kinds: Counter = Counter()
    for shard in _shard_sidecars(out):
        for pos, (_key, sc) in enumerate(shard):
            start = pos - pos % WINDOW
            window = [k for k, _ in shard[start : start + WINDOW]]
            assert sc.window_crc == window_crc(window)
            for r in range(sc.rounds):
                partner = int(sc.ops["mixp"][r][0]) - 1
                kinds[mix_kind({n: sc.ops[n][r] for n in MIX_COLUMNS})] += 1
                if partner >= 0:
                    assert partner < len(window) and partner != pos - start
    assert kinds["none"] and kinds["mixup"] and kinds["cutmix"] and kinds["both"], kinds


def _loader_images(out: Path, epochs: int, **kwargs) -> dict[tuple[str, int], torch.Tensor]:
    ds = ReinforcedDataset(str(out) + "/", keys=("__key__", "round", "image", "target"), **kwargs)
    images = {}
    for epoch in range(epochs):
        ds.set_epoch(epoch)
        for key, r, img, _ in ds:
            images[key, r] = img
    return images


def test_loader_pixels_are_the_producers_mixed_pixels(produced):
    _, out, teacher = produced
    images = _loader_images(out, epochs=ROUNDS)
    assert {r for _, r in images} == set(range(ROUNDS))
    sidecars = {key: sc for shard in _shard_sidecars(out) for key, sc in shard}
    manifest = Manifest.from_json((out / "manifest.json").read_text())
    recipe = Recipe.from_dict(manifest.recipe)
    mixed = 0
    for (key, r), img in images.items():
        assert _digest(img) in teacher.seen, (key, r)  # bit for bit what the teacher saw
        idx, _ = topk(teacher.predict(img[None]), 2)
        assert idx[0].tolist() == sidecars[key].idx[r].tolist()
        if sidecars[key].ops["mixp"][r][0]:
            mixed += 1
    assert mixed >= len(images) // 2
    assert recipe.mix is not None


def test_a_window_plays_one_round_per_epoch(produced):
    _, out, _ = produced
    ds = ReinforcedDataset(str(out) + "/", keys=("__key__", "__url__", "round"), epoch=3)
    rounds: dict[tuple[str, int], set[int]] = {}
    position: Counter = Counter()
    for _, url, r in ds:
        rounds.setdefault((url, position[url] // WINDOW), set()).add(r)
        position[url] += 1
    assert all(len(rs) == 1 for rs in rounds.values())
    assert len({next(iter(rs)) for rs in rounds.values()}) > 1  # windows differ from each other


def test_shuffle_comes_after_mixing_and_keeps_the_pixels(produced):
    _, out, _ = produced
    plain = _loader_images(out, epochs=1)
    shuffled_ds = ReinforcedDataset(str(out) + "/", keys=("__key__", "round", "image"), shuffle=20, seed=0)
    order = []
    for key, r, img in shuffled_ds:
        order.append(key)
        assert torch.equal(img, plain[key, r])
    assert sorted(order) == sorted(k for k, _ in plain) and order != [k for k, _ in plain]


def test_original_image_rounds_are_not_mixed_and_partners_still_are(produced):
    _, out, teacher = produced
    ds = ReinforcedDataset(str(out) + "/", keys=("__key__", "round", "image"), p=0.5, seed=1)
    originals = reinforced = 0
    for _key, r, img in ds:
        if r < 0:
            originals += 1
            assert _digest(img) not in teacher.seen
        else:
            reinforced += 1
            assert _digest(img) in teacher.seen
    assert originals and reinforced


def test_byte_identical_across_workers_and_batches(produced, tmp_path):
    source, out, _ = produced
    again = tmp_path / "again"
    make_shards(
        str(source), TEACHER, out=str(again), recipe=_mix_recipe(),
        **job_args(rounds=ROUNDS, shard_size=7, workers=1, batch_size=5),
    )  # fmt: skip
    for path in sorted(out.glob("train-*.tar")):
        assert (again / path.name).read_bytes() == path.read_bytes()


@pytest.mark.parametrize("positions", [True, False])
def test_a_lost_sample_is_caught_by_the_window_check(produced, positions):
    _, out, _ = produced
    manifest = Manifest.from_json((out / "manifest.json").read_text())
    urls = [str(p) for p in sorted(out.glob("train-*.tar"))]
    n = manifest.shards[0].samples
    assert n > WINDOW + 1

    def drop_second(src):
        for i, sample in enumerate(src):
            if positions:
                sample["__position__"] = i  # as ReinforcedDataset's reader numbers them
            if i != 1:
                yield sample

    counter = SkipCounter()
    ds = (
        wds.WebDataset(urls[:1], shardshuffle=False, empty_check=False)
        .compose(drop_second)
        .compose(*reinforce_stages(manifest, handler=counter))
    )
    got = [s["__key__"] for s in ds]
    assert "pairing window" in counter.last
    # With positions only the broken window's other members are lost; without, every later
    # window of the shard is shifted and lost too.
    assert counter.count == (WINDOW - 1 if positions else n - 1)
    assert len(got) + counter.count == n - 1


def test_a_sample_missing_from_a_shard_costs_only_its_own_window(produced, tmp_path):
    """The reader cuts windows by the position each sidecar records, not by counting arrivals."""
    import shutil

    _, out, _ = produced
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    first = sorted(copy.glob("train-*.tar"))[0]
    with tarfile.open(first) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar]
    keys = list(dict.fromkeys(name.split(".")[0] for name, _ in members))
    gone = keys[1]  # position 1: in the first window, which is followed by another one
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            if name.split(".")[0] != gone:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    first.write_bytes(buf.getvalue())
    assert len(keys) > WINDOW + 1
    counter = SkipCounter()
    got = [k for (k,) in ReinforcedDataset(str(copy) + "/", keys=("__key__",), handler=counter)]
    every = [k for (k,) in ReinforcedDataset(str(out) + "/", keys=("__key__",))]
    assert got == [k for k in every if k not in keys[:WINDOW]]  # the later windows all survive
    assert counter.samples == WINDOW, counter.last  # the lost sample and its window's others, no more


def test_a_damaged_partner_image_is_named_as_the_partner(produced, tmp_path):
    _, out, _ = produced
    manifest = Manifest.from_json((out / "manifest.json").read_text())
    urls = [str(p) for p in sorted(out.glob("train-*.tar"))]
    victim = {}

    def damage_first_image(src):
        for i, sample in enumerate(src):
            sample["__position__"] = i
            if i == 0:
                ext = "jpg" if "jpg" in sample else "png"
                sample[ext] = sample[ext][:-1] + bytes([sample[ext][-1] ^ 1])
                victim["key"] = sample["__key__"]
            yield sample

    messages = []

    def handler(exc):
        messages.append((exc.key, str(exc)))
        return True

    for epoch in range(ROUNDS):
        ds = (
            wds.WebDataset(urls[:1], shardshuffle=False, empty_check=False)
            .compose(damage_first_image)
            .compose(*reinforce_stages(manifest, handler=handler, epoch=epoch))
        )
        list(ds)
    own = [m for k, m in messages if k == victim["key"]]
    others = [m for k, m in messages if k != victim["key"]]
    assert len(own) == ROUNDS and all("image member is damaged" in m for m in own)
    assert others and all(f"its mixing partner {victim['key']!r}: image bytes" in m for m in others)


def test_per_sample_steps_refuse_a_mixing_recipe(produced):
    _, out, _ = produced
    manifest = Manifest.from_json((out / "manifest.json").read_text())
    plan = ReplayPlan.build(manifest, LoaderOptions())
    with pytest.raises(UsageError, match="pairing window"):
        reinforce_sample({"__key__": "x"}, plan, 0)


def test_sidecar_sets_mix_the_same_way(produced, tmp_path):
    source, _, _ = produced
    shards = tmp_path / "plain"
    plain = make_shards(str(source), TEACHER, out=str(shards), **job_args(rounds=1, shard_size=7))
    assert plain.shards >= 2
    teacher = RecordingTeacher(load_teacher(TEACHER, num_classes=3, device="cpu"))
    sets = tmp_path / "sets"
    make_shards(
        f"{shards}/train-{{000000..{plain.shards - 1:06d}}}.tar", teacher, out=str(sets),
        recipe=_mix_recipe(), sidecars_only=True, round_group=2, **job_args(rounds=ROUNDS, shard_size=None),
    )  # fmt: skip
    images = _loader_images(sets, epochs=ROUNDS)
    assert len({r for _, r in images}) == ROUNDS
    for img in images.values():
        assert _digest(img) in teacher.seen

    # verify reruns the teacher on mixed rounds of the set; --grid finds the window; a second
    # teacher labels the same mixed views
    from wds_reinforce.produce.teacher_sets import add_teacher_set
    from wds_reinforce.read.picture import draw_rounds
    from wds_reinforce.read.verify import verify_shards

    plain_teacher = load_teacher(TEACHER, num_classes=3, device="cpu")
    report = verify_shards(str(sets), teacher=plain_teacher, checks=12, tolerance=0.01)
    assert report.ok and report.teacher_checks == 12, report.problems
    draw_rounds(str(sets), str(tmp_path / "grid.png"))
    other = load_teacher("timm:test_efficientnet", num_classes=3, device="cpu")
    add_teacher_set(str(sets), other, "second", progress=False)
    ds = ReinforcedDataset(str(sets) + "/", keys=("__key__", "image", "idx", "prob"), densify="sparse", teacher=1)
    checked = 0
    for _key, img, idx, _prob in ds:
        expected, _ = topk(other.predict(img[None]), 2)
        assert idx.tolist() == expected[0].tolist()
        checked += 1
    assert checked == len({k for k, _ in images})


def test_replay_of_the_unmixed_view_differs_where_mixed(produced):
    _, out, _ = produced
    sidecars = {key: sc for shard in _shard_sidecars(out) for key, sc in shard}
    images = _loader_images(out, epochs=1)
    recipe = Recipe.from_dict(Manifest.from_json((out / "manifest.json").read_text()).recipe)
    files = {}
    for path in out.glob("train-*.tar"):
        with tarfile.open(path) as tar:
            files.update({m.name: tar.extractfile(m).read() for m in tar})
    for (key, r), img in images.items():
        data = files.get(f"{key}.jpg") or files[f"{key}.png"]
        alone = replay(SourceImage(data), sidecars[key].round_params(r), recipe)
        assert torch.equal(alone, img) == (mix_kind({n: sidecars[key].ops[n][r] for n in MIX_COLUMNS}) == "none")


def test_verify_reruns_the_teacher_on_mixed_rounds(produced, tmp_path):
    from wds_reinforce.read.verify import verify_shards

    _, out, producer_teacher = produced
    teacher = RecordingTeacher(load_teacher(TEACHER, num_classes=3, device="cpu"))
    report = verify_shards(str(out), teacher=teacher, checks=16, tolerance=0.01)
    assert report.ok, report.problems
    assert report.teacher_checks == 16 and report.top1_agreement == 1.0
    # It showed the teacher what the producer's teacher saw: mixed views, not the unmixed ones.
    assert len(teacher.seen) == 16 and teacher.seen <= producer_teacher.seen


def _rewrite_shard(out: Path, dest: Path, change) -> None:
    """A copy of the data set whose first shard's sidecars pass through ``change(pos, key, Sidecar)``;
    the manifest is updated to the new shard's size and sha256, so only the sidecar is wrong."""
    import dataclasses
    import shutil

    from wds_reinforce.core.format import encode_sidecar
    from wds_reinforce.produce.jobs import write_tar

    shutil.copytree(out, dest)
    first = sorted(dest.glob("train-*.tar"))[0]
    with tarfile.open(first) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar]
    keys = [n.split(".")[0] for n, _ in members if n.endswith(".dr.mp")]
    rewritten = [
        (n, encode_sidecar(change(keys.index(n.split(".")[0]), n.split(".")[0], decode_sidecar(d))))
        if n.endswith(".dr.mp")
        else (n, d)
        for n, d in members
    ]
    with open(first, "wb") as f:
        write_tar(f, iter(rewritten))
    manifest = Manifest.from_json((dest / "manifest.json").read_text())
    data = first.read_bytes()
    manifest.shards[0] = dataclasses.replace(
        manifest.shards[0], bytes=len(data), sha256=hashlib.sha256(data).hexdigest()
    )
    (dest / "manifest.json").write_text(manifest.to_json())


def test_verify_checks_window_checksums_and_mixing_rows(produced, tmp_path):
    import dataclasses

    from wds_reinforce.read.verify import verify_shards

    _, out, _ = produced

    def bad_window(pos, key, sc):
        return dataclasses.replace(sc, window_crc=(sc.window_crc + 1) % 2**32) if pos == 1 else sc

    def self_partner(pos, key, sc):
        if pos != 2:
            return sc
        ops = {name: np.array(col) for name, col in sc.ops.items()}
        ops["mixp"][0, 0], ops["mixl"][0, 0] = 3, 10  # position 2 + 1: itself
        return dataclasses.replace(sc, ops=ops)

    for change, message in ((bad_window, "pairing window differs"), (self_partner, "its own mixing partner")):
        dest = tmp_path / change.__name__
        _rewrite_shard(out, dest, change)
        report = verify_shards(str(dest))
        assert not report.ok and len(report.problems) == 1, report.problems
        assert message in report.problems[0].message


def test_the_loader_refuses_mixing_rows_that_cannot_be_right(produced, tmp_path):
    import dataclasses

    _, out, _ = produced

    def self_partner(pos, key, sc):  # every round of the third sample names itself as partner
        if pos != 2:
            return sc
        ops = {name: np.array(col) for name, col in sc.ops.items()}
        ops["mixp"][:, 0], ops["mixl"][:, 0] = 3, 10
        return dataclasses.replace(sc, ops=ops)

    dest = tmp_path / "self_partner"
    _rewrite_shard(out, dest, self_partner)
    counter = SkipCounter()
    keys = [k for (k,) in ReinforcedDataset(str(dest) + "/", keys=("__key__",), handler=counter)]
    assert counter.count == 1 and "its own mixing partner" in counter.last
    assert len(keys) == num_samples(Manifest.from_json((dest / "manifest.json").read_text())) - 1


def test_grid_draws_a_sample_despite_a_damaged_sidecar_elsewhere(produced, tmp_path):
    from wds_reinforce.read.picture import draw_rounds

    _, out, _ = produced
    dest = tmp_path / "damaged"
    _rewrite_shard(out, dest, lambda pos, key, sc: sc)
    first = sorted(dest.glob("train-*.tar"))[0]
    with tarfile.open(first) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar]
    names = [n for n, _ in members if n.endswith(".dr.mp")]
    members = [(n, b"garbage" if n == names[0] else d) for n, d in members]  # window 0's first sidecar
    from wds_reinforce.produce.jobs import write_tar

    with open(first, "wb") as f:
        write_tar(f, iter(members))
    later = names[WINDOW].split(".")[0]  # in the next window
    same = names[1].split(".")[0]  # in the damaged one: its partner may be unreadable (drawn in red)
    assert draw_rounds(str(dest), str(tmp_path / "later.png"), key=later) == later
    assert draw_rounds(str(dest), str(tmp_path / "same.png"), key=same) == same


def test_grid_shows_own_view_partner_and_the_mixed_view_the_teacher_saw(produced, tmp_path):
    from PIL import Image

    from wds_reinforce.cli import inspect_shards as cli

    _, out, teacher = produced
    png = tmp_path / "grid.png"
    assert cli.main([str(out), "--grid", str(png), "--key", "cat_img_2"]) == 0
    grid = np.asarray(Image.open(png).convert("RGB"))
    zoom, tile_w, text_h = 4, 150, 60  # 32 px tiles shown x4, as draw_rounds lays them out
    assert grid.shape[1] == 3 * tile_w and grid.shape[0] == 34 + ROUNDS * (32 * zoom + text_h)
    for r in range(ROUNDS):
        y = 34 + r * (32 * zoom + text_h)
        shown = torch.from_numpy(grid[y : y + 32 * zoom : zoom, 2 * tile_w : 2 * tile_w + 32 * zoom : zoom].copy())
        assert _digest(shown.permute(2, 0, 1)) in teacher.seen, r  # the third tile is what the teacher saw


def test_resampled_shards_start_a_new_window_even_when_a_shard_repeats(produced):
    _, out, _ = produced
    urls = sorted(str(p) for p in out.glob("train-*.tar"))
    counter = SkipCounter()
    ds = ReinforcedDataset(urls[:1], keys=("__key__",), resampled=True, handler=counter, seed=3).with_epoch(40)
    keys = [k for (k,) in ds]
    assert len(keys) == 40 and counter.count == 0  # the one shard, read back to back: windows restart
