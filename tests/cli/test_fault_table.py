"""tools/fault_table.py: every attack on bound data yields nothing foreign and counts every loss."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
import fault_table  # noqa: E402

pytestmark = pytest.mark.usefixtures("loopback_only")


def test_one_trial_of_every_attack_on_the_smallest_data(tmp_path, capsys):
    seed = 3
    assert (
        fault_table.main(["--trials", "1", "--shards", "2", "--seed", str(seed), "--json", "--out", str(tmp_path)]) == 0
    )
    table = json.loads(capsys.readouterr().out)
    rows = {row["attack"]: row for row in table["rows"]}
    assert list(rows) == [name for name, _, _ in fault_table.ATTACKS], f"seed {seed}"
    for name, row in rows.items():
        assert set(row) == set(fault_table.FIELDS) and row["trials"] == 1, name
        if row["bound"]:  # attacks 1-7: nothing damaged or foreign comes out, every loss is counted
            assert (row["damaged_or_foreign_yielded"], row["loss_counted_exactly"]) == (0, 1), (name, row, seed)
    assert rows["1 swap"]["lost"] == rows["1 swap"]["counter_samples"] == 6  # a whole shard, refused
    assert rows["5 label"]["lost"] == 1 and rows["6 mix-1"]["lost"] == 4  # one sample; its pairing window
    old = rows["8 swap (old)"]  # without places, the manifest's first key still tells the shards apart
    assert (old["damaged_or_foreign_yielded"], old["loss_counted_exactly"], old["counter_samples"]) == (0, 1, 6)


def test_bad_arguments_are_one_line_errors(tmp_path, capsys):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    assert fault_table.main(["--out", str(tmp_path / "full")]) == 2
    assert (
        capsys.readouterr().err.strip()
        == f"fault_table.py: error: expected --out a new or empty folder, got {str(tmp_path / 'full')!r}"
    )
    assert fault_table.main(["--trials", "0", "--out", str(tmp_path / "new")]) == 2
    assert "expected trials an integer >= 1, got 0" in capsys.readouterr().err
