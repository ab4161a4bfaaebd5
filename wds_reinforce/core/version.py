"""The package's version (read by setup.cfg without importing the package), and the check that
the installed torch and torchvision work together."""

from __future__ import annotations

import re
import sys
from importlib import import_module
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as installed_version
from importlib.util import find_spec
from pathlib import Path

__version__ = "0.1.0"

# README.md's command; from PyPI alone (no --index-url) both come built for CUDA, also a pair.
FIX = "pip install --force-reinstall torch torchvision --index-url https://download.pytorch.org/whl/cpu"


class TorchvisionError(ImportError):
    """torchvision does not load with the installed torch (usually builds from two indexes)."""


def _installed(name: str) -> str:
    """``name``'s version with its build tag (``2.13.0+cpu``, ``0.28.0+cu130``), without importing it:
    from its ``version.py``, else from pip's metadata (which may lack the tag)."""
    try:
        spec = find_spec(name)  # a top-level name: found, not imported
        text = Path(spec.origin).with_name("version.py").read_text() if spec and spec.origin else ""
    except (ImportError, ValueError, OSError):
        text = ""
    found = re.search(r"^__version__\s*=\s*['\"]([^'\"]+)", text, re.M)
    if found:
        return found.group(1)
    try:
        return installed_version(name)
    except PackageNotFoundError:
        return "(not installed)"


def require_torchvision() -> None:
    """Import torchvision, or raise ``TorchvisionError``: one line naming both installed versions
    and the pip command that installs a matching pair.

    A CPU torch beside a CUDA torchvision (pip falling back to PyPI for one of them) fails deep in
    torchvision's import with ``operator torchvision::nms does not exist``, which says nothing of
    the cause.
    """
    try:
        import_module("torchvision")
    except (RuntimeError, OSError, ImportError) as exc:
        cause = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        error = TorchvisionError(
            f"torchvision {_installed('torchvision')} does not work with torch {_installed('torch')} ({cause}); "
            f"install a matching pair from one index: {FIX} (or without --index-url for CUDA builds)"
        )
        _one_line_if_uncaught(error)
        raise error from None


def _one_line_if_uncaught(error: TorchvisionError) -> None:
    """A tool that dies of ``error`` prints its one line, as for any other bad setting, not a
    traceback through the package's imports; every other exception goes to the previous hook."""
    previous = sys.excepthook

    def hook(kind, value, tb):  # noqa: ANN001 - sys.excepthook's signature
        if value is error:
            print(f"error: {value}", file=sys.stderr)
        else:
            previous(kind, value, tb)

    sys.excepthook = hook
