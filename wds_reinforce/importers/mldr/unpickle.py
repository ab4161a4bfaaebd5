"""Reading another project's pickles without running them: an unpickler that resolves no globals.

apple/ml-dr released its metadata as ``torch.save`` files, which are pickles. Nothing here runs
them: ``load_torch_save`` opens torch.save's zip container and unpickles ``data.pkl`` with an
unpickler that resolves no globals (the standard C unpickler, so protocol 4 with FRAME is read;
``torch.load(weights_only=True)`` rejects these files). Any global is refused with the file name,
except the few names numpy uses for a scalar, which become inert placeholders that are themselves
refused wherever a value is used (``check_plain``): mixing rounds hold CutMix boxes as numpy
integers, and ``--drop-mixing`` must be able to skip those rounds.
"""

from __future__ import annotations

import gc
import io
import pickle
import zipfile
from typing import Any

from wds_reinforce.importers import MetadataError

__all__ = ["restricted_loads", "load_torch_save", "check_plain", "Inert", "MAX_PICKLE_BYTES"]

MAX_PICKLE_BYTES = 256 << 20  # the largest data.pkl read (8000 rounds of top-10 are ~3 MB)
_MAX_NODES = 50_000_000  # values visited by check_plain


class Inert:
    """What one of the few allowed global names becomes: a placeholder that does nothing.

    No module is imported and no attribute looked up: calling it (REDUCE) gives another
    placeholder, ``__setstate__`` (BUILD) ignores its state, and ``check_plain`` and
    ``convert_rounds`` refuse it wherever it turns up in data that is used.
    """

    __slots__ = ("name",)

    def __init__(self, name: str):
        self.name = name

    def __call__(self, *args: Any, **kwargs: Any) -> Inert:
        return Inert(f"{self.name}(...)")

    def __setstate__(self, state: Any) -> None:
        pass

    def __repr__(self) -> str:
        return f"<{self.name}>"


# numpy scalars pickle as multiarray.scalar(dtype(...), bytes); their mixing rounds hold some.
_INERT_NAMES = frozenset(
    {("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"), ("numpy", "dtype")}
)


class _NoGlobals(pickle.Unpickler):
    def __init__(self, data: bytes, name: str):
        super().__init__(io.BytesIO(data))
        self._name = name

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _INERT_NAMES:
            return Inert(f"{module}.{name}")
        raise MetadataError(
            f"refused: the pickle needs the global {module}.{name}; their metadata holds only tuples, lists, "
            "dicts, numbers, strings, booleans and None, and nothing is unpickled beyond that",
            url=self._name,
        )

    def persistent_load(self, pid: Any) -> Any:
        raise MetadataError(
            "refused: the pickle refers to a persistent object (a tensor storage?); their metadata holds only "
            "plain values",
            url=self._name,
        )


# What the C unpickler raises for malformed or hostile input: all of it is bad data here.
_PICKLE_ERRORS = (
    pickle.UnpicklingError,
    EOFError,
    ValueError,
    TypeError,
    AttributeError,
    IndexError,
    KeyError,
    OverflowError,
    RecursionError,
)


def restricted_loads(data: bytes, name: str) -> Any:
    """Unpickle ``data`` (any protocol up to 5) resolving no globals; ``name`` is the file, for errors.

    Raises:
        MetadataError: a global other than numpy's scalar names (which become inert placeholders),
            a persistent id, or a malformed pickle.
    """
    # Tens of thousands of small acyclic containers per file: the cyclic collector would run
    # many times over them for nothing (a quarter of an import's time).
    collecting = gc.isenabled()
    gc.disable()
    try:
        return _NoGlobals(data, name).load()
    except MetadataError:
        raise
    except _PICKLE_ERRORS as exc:
        raise MetadataError(f"refused: not a readable pickle ({type(exc).__name__}: {exc})", url=name) from None
    finally:
        if collecting:
            gc.enable()


def load_torch_save(data: bytes, name: str) -> Any:
    """The object in a ``torch.save`` file (its zip container's ``data.pkl``), read by ``restricted_loads``.

    Raises:
        MetadataError: not a torch.save zip container, no single ``*/data.pkl``, or a refused pickle.
    """
    if data[:4] != b"PK\x03\x04":
        raise MetadataError("not a torch.save zip container (torch >= 1.6); other formats are not read", url=name)
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            found = [i for i in zf.infolist() if i.filename.endswith("/data.pkl") and i.filename.count("/") == 1]
            if len(found) != 1:
                raise MetadataError(f"expected one */data.pkl in the torch.save container, got {len(found)}", url=name)
            if found[0].file_size > MAX_PICKLE_BYTES:
                size = found[0].file_size
                raise MetadataError(f"data.pkl of {size} bytes is over the {MAX_PICKLE_BYTES} limit", url=name)
            raw = zf.read(found[0])
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError, NotImplementedError) as exc:
        if isinstance(exc, MetadataError):
            raise
        raise MetadataError(f"not a readable torch.save container ({type(exc).__name__}: {exc})", url=name) from None
    return restricted_loads(raw, name)


_LEAVES = (int, float, str, bool, type(None))


def _what(value: Any) -> str:
    return value.name if isinstance(value, Inert) else type(value).__name__


def check_plain(obj: Any, name: str) -> None:
    """Raise ``MetadataError`` unless ``obj`` holds only tuples, lists, dicts, numbers, strings, bools, None."""
    stack, seen, count = [obj], set(), 0
    while stack:
        value = stack.pop()
        count += 1
        if count > _MAX_NODES:
            raise MetadataError(f"refused: more than {_MAX_NODES} values", url=name)
        kind = type(value)
        if kind in (tuple, list, dict):
            if id(value) in seen:
                continue
            seen.add(id(value))
            if kind is dict:
                stack.extend(value.keys())
                stack.extend(value.values())
            else:
                stack.extend(value)
        elif kind not in _LEAVES:
            raise MetadataError(f"refused: holds a {_what(value)}, not a plain value", url=name)
