"""A torch and torchvision that do not work together (builds from two indexes) say so in one line."""

from __future__ import annotations

import os
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest
import torch

from wds_reinforce.core import version as check

ROOT = Path(__file__).resolve().parents[2]
NMS = "operator torchvision::nms does not exist"


def test_a_mismatched_pair_names_both_versions_and_the_fix(monkeypatch):
    def broken(name: str):
        raise RuntimeError(f"{NMS}\nmore lines of the C++ side")

    monkeypatch.setattr(check, "import_module", broken)
    monkeypatch.setattr(check, "_installed", {"torch": "2.13.0+cpu", "torchvision": "0.28.0+cu130"}.get)
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)  # the check's hook goes with the test
    with pytest.raises(check.TorchvisionError) as caught:
        check.require_torchvision()
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"torchvision 0.28.0+cu130 does not work with torch 2.13.0+cpu ({NMS}); ")
    assert "pip install --force-reinstall torch torchvision --index-url https://download.pytorch.org/whl/cpu" in message
    assert isinstance(caught.value, ImportError)


def test_versions_keep_their_build_tag():
    assert check._installed("torch") == torch.__version__  # "+cpu" or "+cu130": what tells the builds apart
    assert check._installed("msgpack") == version("msgpack")  # no version.py: pip's metadata
    assert check._installed("no_such_package_here") == "(not installed)"


def test_a_working_pair_passes(monkeypatch):
    before = sys.excepthook
    check.require_torchvision()
    assert sys.excepthook is before


@pytest.mark.parametrize("tool", ["make_shards.py", "inspect_shards.py", "import_mldr.py", "train.py"])
def test_a_tool_prints_one_line_not_a_traceback(tmp_path, tool):
    # A torchvision that fails to load as the mismatched CUDA build does, found before the real one.
    fake = tmp_path / "torchvision"
    fake.mkdir()
    (fake / "__init__.py").write_text(f"raise RuntimeError({NMS!r})\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), str(ROOT)]), OMP_NUM_THREADS="1")
    done = subprocess.run(
        [sys.executable, str(ROOT / "tools" / tool), "--help"], capture_output=True, text=True, env=env
    )
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    assert done.stderr.startswith(
        f"error: torchvision {version('torchvision')} does not work with torch {torch.__version__} ({NMS}); "
    )
    assert "--index-url https://download.pytorch.org/whl/cpu" in done.stderr
