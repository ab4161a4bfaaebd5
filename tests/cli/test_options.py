"""Option names and help texts the tools share: one name per concept, help and a true default for every option."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))
import bench_producer  # noqa: E402
import experiment  # noqa: E402
import import_mldr  # noqa: E402
import make_shards  # noqa: E402


@pytest.mark.parametrize("tool", [import_mldr, make_shards])
@pytest.mark.parametrize("flag", ["--round-group", "--group-rounds"])
def test_round_group_has_one_name_and_the_old_one_still_works(tool, flag):
    parser = tool.build_parser()
    args = parser.parse_args([*(["--metadata", "m", "--images", "i", "--out", "o"] * (tool is import_mldr)), flag, "5"])
    assert args.round_group == 5
    assert "--round-group G, --group-rounds G" in parser.format_help()


@pytest.mark.parametrize("flag", ["--round-group", "--group-rounds"])
def test_import_mldr_passes_the_round_group_on(monkeypatch, capsys, flag):
    import wds_reinforce.importers.mldr as mldr

    seen: dict = {}

    class Summary:
        def format(self) -> str:
            return "done"

    monkeypatch.setattr(mldr, "import_mldr", lambda *a, **k: seen.update(k) or Summary())
    assert import_mldr.main(["--metadata", "m", "--images", "i", "--out", "o", flag, "50"]) == 0
    assert seen["group_rounds"] == 50


def test_the_archive_is_named_as_ml_dr_names_it():
    usage = import_mldr.build_parser().format_help() + (ROOT / "README.md").read_text()
    assert "rdata_" not in usage
    assert "--metadata imagenet_plus_randaug.tar.gz" in import_mldr.build_parser().format_help()


@pytest.mark.parametrize("tool", [experiment, bench_producer])
def test_every_option_has_help_and_its_default_once(tool):
    parser = tool.build_parser()
    text = parser.format_help()
    assert "(default: None)" not in text and "(default: ...)" not in text
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        assert action.help, f"{action.option_strings} has no help"
        if action.default not in (None, False):
            shown = " ".join(map(str, action.default)) if isinstance(action.default, list) else str(action.default)
            assert action.help.count("(default") == 1, action.option_strings
            assert f"default {shown}" in action.help or f"{shown} (default)" in action.help, action.option_strings
