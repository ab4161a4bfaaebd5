"""ml-dr metadata files are size-checked before they are read: a huge member of a small ``.tar.gz``
(or a huge file of an extracted folder) is refused from its size, naming the archive and the member,
without being read (the cap is lowered here so that the files stay small)."""

from __future__ import annotations

import re
import tracemalloc
from pathlib import Path

import pytest

from tests.importers.test_mldr import SIZE, SIZES
from tests.mldr_archive import config_dict, make_folder, write_metadata
from wds_reinforce.cli.import_mldr import main
from wds_reinforce.importers.mldr import MetadataError, import_mldr
from wds_reinforce.importers.mldr import metadata as mldr_metadata

CAP = 1 << 20
HUGE = 48 << 20  # zeros: ~50 kB gzipped


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    return make_folder(tmp_path / "train", SIZES)


def _huge_fifth(index, obj):
    return bytes(HUGE) if index == 5 else obj


@pytest.mark.parametrize("as_dir", [False, True])
def test_a_huge_member_is_refused_unread_naming_archive_and_member(tmp_path, folder, monkeypatch, as_dir):
    monkeypatch.setattr(mldr_metadata, "MAX_FILE_BYTES", CAP)
    meta = tmp_path / ("meta" if as_dir else "meta.tar.gz")
    write_metadata(meta, folder, config_dict("rrc", rounds=3, topk=2, size=SIZE), as_dir=as_dir, edit=_huge_fifth)
    where = re.escape(f"{meta}/reinforced_data/5.pth.tar" if as_dir else f"{meta}: reinforced_data/5.pth.tar")
    tracemalloc.start()
    try:
        with pytest.raises(MetadataError, match=rf"^{where}: refused unread: {HUGE} bytes, over the {CAP}-byte limit"):
            import_mldr(meta, folder, tmp_path / "out", shard_size=3)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < HUGE // 4, peak  # the member was never read whole
    assert not list((tmp_path / "out").glob("**/*.tar"))


def test_the_cli_refusal_is_one_line(tmp_path, folder, monkeypatch, capsys):
    monkeypatch.setattr(mldr_metadata, "MAX_FILE_BYTES", CAP)
    meta = tmp_path / "meta.tar.gz"
    write_metadata(meta, folder, config_dict("rrc", rounds=3, topk=2, size=SIZE), edit=_huge_fifth)
    assert main(["--metadata", str(meta), "--images", str(folder), "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(f"import_mldr.py: error: {meta}: reinforced_data/5.pth.tar: refused unread: {HUGE} bytes")


def test_a_member_header_over_the_tar_reader_s_cap_names_the_archive(tmp_path, folder, monkeypatch):
    import wds_reinforce.io.tario as tario

    monkeypatch.setattr(tario, "MAX_MEMBER_BYTES", CAP)  # what a 2**40-byte header meets, made small
    meta = tmp_path / "meta.tar.gz"
    write_metadata(meta, folder, config_dict("rrc", rounds=3, topk=2, size=SIZE), edit=_huge_fifth)
    with pytest.raises(
        MetadataError, match=rf"^{meta}: cannot read the archive .*'reinforced_data/5\.pth\.tar' claims"
    ):
        import_mldr(meta, folder, tmp_path / "out", shard_size=3)
