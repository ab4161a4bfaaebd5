"""Reinforcing data kept elsewhere, end to end (README's "Reinforcing a dataset on the Hub").

A sidecar set is built beside plain image shards that sit in an fsspec store (and written into
that store), and beside the same shards behind an HTTP server that wants a bearer token, as a
gated Hub dataset does; each set is read, inspected (``inspect_shards``) and trained on
(``train``, one short epoch), and every (key, round) gives the same pixels and target as the set
built from the local copy. Everything is local: a folder under an fsspec protocol of its own and
a server on 127.0.0.1.
"""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import fsspec
import pytest
import torch
from fsspec.implementations.local import LocalFileSystem

from tests.conftest import encode, photo_like
from tests.producer_data import TEACHER
from tests.token_server import token_server
from wds_reinforce.cli import inspect_shards, train
from wds_reinforce.layouts import read_manifest
from wds_reinforce.produce.make import make_shards
from wds_reinforce.read.dataset import ReinforcedDataset

torch.set_num_threads(1)
TOKEN = "hf_gated-dataset-token"
SHARDS = "train-{000000..000001}.tar"
JOB = dict(
    teacher_num_classes=3,
    image_size=32,
    topk=2,
    rounds=4,
    round_group=2,
    batch_size=4,
    workers=0,
    seed=7,
    device="cpu",
    progress=False,
)


class HubLikeFS(LocalFileSystem):
    """A local folder as a remote store of its own protocol (``testfs:///abs/path``)."""

    protocol = "testfs"


def _write_shards(folder: Path) -> None:
    """Two plain webdataset shards of 6 small JPEGs each (jpg + cls), unique keys, as published."""
    folder.mkdir(parents=True)
    for s in range(2):
        with tarfile.open(folder / f"train-{s:06d}.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
            for i in range(6):
                for ext, data in (
                    ("jpg", encode(photo_like(40, 48, seed=10 * s + i), quality=85)),
                    ("cls", b"%d" % (i % 3)),
                ):
                    info = tarfile.TarInfo(f"img{s}_{i}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def local(tmp_path_factory) -> Path:
    """The image shards, and the sidecar set made from the local copy (the reference)."""
    root = tmp_path_factory.mktemp("hub")
    _write_shards(root / "images")
    make_shards(str(root / "images" / SHARDS), TEACHER, out=str(root / "local-set"), sidecars_only=True, **JOB)
    return root


@pytest.fixture(autouse=True)
def env(monkeypatch, loopback_only):
    fsspec.register_implementation("testfs", HubLikeFS, clobber=True)
    for name in ("HF_TOKEN", "WDS_REINFORCE_HTTP_HEADERS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WDS_REINFORCE_BACKOFF", "0.001")


def _rows(source: str) -> dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]]:
    ds = ReinforcedDataset(source, keys=("__key__", "round", "image", "target"))
    out = {}
    for epoch in range(4):
        ds.set_epoch(epoch)
        for key, r, image, target in ds:
            out[(key, int(r))] = (image, target)
    return out


def _same_as_local(local: Path, source: str) -> None:
    mine, ref = _rows(source), _rows(str(local / "local-set"))
    assert len(ref) == 12 * 4, "every round of every sample in 4 epochs"
    assert mine.keys() == ref.keys()
    for k in ref:
        assert torch.equal(mine[k][0], ref[k][0]) and torch.equal(mine[k][1], ref[k][1]), k


def _inspect_and_train(location: str, capsys) -> dict:
    """``inspect_shards`` passes; one epoch of ``train``: its JSON result."""
    assert inspect_shards.main([location, "--no-progress", "--device", "cpu"]) == 0, capsys.readouterr().err
    capsys.readouterr()
    argv = ["--data", location, "--epochs", "1", "--batch-size", "4", "--workers", "0", "--threads", "1"]
    assert train.main([*argv, "--device", "cpu", "--json"]) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_a_sidecar_set_in_an_fsspec_store_beside_shards_there(local, tmp_path, capsys):
    store = tmp_path / "store"
    shutil.copytree(local / "images", store / "datasets" / "org" / "name")
    images = f"testfs://{store}/datasets/org/name"
    out = f"testfs://{store}/sets/name-rrc"
    make_shards(f"{images}/{SHARDS}", TEACHER, out=out, sidecars_only=True, **JOB)
    manifest = read_manifest(f"{out}/manifest.json")
    assert [s.name for s in manifest.image_shards] == [f"{images}/train-00000{s}.tar" for s in range(2)]
    assert sorted(p.name for p in (store / "sets" / "name-rrc").iterdir()) == [
        ".done",
        "manifest.json",
        "rounds-00000-00001",
        "rounds-00002-00003",
    ]
    _same_as_local(local, f"{out}/")
    result = _inspect_and_train(f"{out}/", capsys)
    assert result["targets"] == "reinforced" and result["steps"] == 12 // 4


def test_a_sidecar_set_beside_shards_behind_a_token(local, tmp_path, monkeypatch, capsys):
    out = str(tmp_path / "set")
    with token_server(local / "images", TOKEN) as srv:
        source = f"{srv.base}/{SHARDS}"
        with pytest.raises(Exception, match="HTTP 401") as refused:  # no token: the first read says so
            make_shards(source, TEACHER, out=out, sidecars_only=True, **JOB)
        assert TOKEN not in str(refused.value)
        untold = len(srv.requests)
        monkeypatch.setenv(
            "WDS_REINFORCE_HTTP_HEADERS", json.dumps({"127.0.0.1": {"Authorization": f"Bearer {TOKEN}"}})
        )
        make_shards(source, TEACHER, out=out, sidecars_only=True, **JOB)
        assert untold and {auth for _, auth in srv.requests[:untold]} == {None}
        assert {auth for _, auth in srv.requests[untold:]} == {f"Bearer {TOKEN}"}
        _same_as_local(local, out)
        result = _inspect_and_train(out, capsys)
        assert result["steps"] == 12 // 4
        monkeypatch.delenv("WDS_REINFORCE_HTTP_HEADERS")
        assert inspect_shards.main([out, "--no-progress", "--device", "cpu"]) != 0
        said = capsys.readouterr()
        assert "HTTP 401" in said.out + said.err and TOKEN not in said.out + said.err
