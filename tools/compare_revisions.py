#!/usr/bin/env python
"""Prove that a refactor changed no behaviour: run the shard-producing jobs and the loader with two versions.

Generates tiny inputs once (an ImageFolder of smooth JPEGs, the same images as plain webdataset
shards, two random resnet10t teachers, a synthetic apple/ml-dr metadata archive), then runs on
each side, as subprocesses in that side's checkout and with that side's tools/*.py:

  sc, mix, sc_wds      make_shards.py: self-contained rrc+ra/re and rrc+mix shards from the ImageFolder,
                       and rrc+ra/re from the plain shards
  sets_r4, sets_r8     make_shards.py --sidecars-only: a sidecar set of rounds 0-3, then rounds 4-7 added
  sets_t2              make_shards.py --add-teacher t2 on that set
  sets_mix, _t2        the same for an rrc+mix sidecar set (mixed views for both teachers)
  verify_*, grid_*     inspect_shards.py: verify's report (with the teacher rerun) and the rounds picture
  mldr_sc, mldr_sets   import_mldr.py: the archive into self-contained shards and into a sidecar set

and compares every file those jobs write (sha256 per relative path, hidden .done/ markers and job
files included). Then each side's ReinforcedDataset reads the BASELINE side's outputs (identical
bytes for both) for epochs 0-3 in several configurations, and the digests of everything it yields
(key, round, each tensor's dtype, shape and bytes) are compared.

    python tools/compare_revisions.py --against HEAD~3                # baseline HEAD~3, this working tree under test
    python tools/compare_revisions.py --against main --head HEAD --json
    python tools/compare_revisions.py --against v0.1 --head ../other-checkout --keep /tmp/cmp

Exit status: 0 when everything is identical, 1 when anything differs or a job fails, 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

REPO = Path(__file__).resolve().parents[1]
CLASSES, PER_CLASS, PLAIN_SHARDS = 3, 16, 3
EPOCHS = 4
MAX_LINES = 12  # differing files listed per row in the table
TIMEOUT_S = 600  # a job on these inputs takes seconds; a hang should not stall the comparison forever


class UsageError(Exception):
    """Bad arguments: one line on stderr, exit status 2."""


@dataclass
class Side:
    """One version of the code: its checkout, and where its jobs write."""

    label: str  # "against" or "head"
    spec: str  # what the user gave
    root: Path
    out: Path
    worktree: bool = False
    package: str = ""  # wds_reinforce.__file__ as that side imports it


@dataclass
class Row:
    """One line of the report: a job's output files, or one loader configuration's digest."""

    kind: str  # "job" or "loader"
    name: str
    count: int = 0  # files compared, or items yielded
    same: bool = False
    seconds: dict[str, float] = field(default_factory=dict)
    different: list[str] = field(default_factory=list)
    only: dict[str, list[str]] = field(default_factory=dict)
    error: str = ""


# ---------------------------------------------------------------- sides


def _git(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True)


def _commit(rev: str, complaint: str) -> str:
    done = _git("rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}")
    if done.returncode != 0:
        raise UsageError(complaint)
    return done.stdout.strip()


def _locate(label: str, spec: str | None) -> tuple[Path | None, str]:
    """(checkout folder, "") for the working tree (spec None) or a checkout's path, else (None, commit sha).

    Raises UsageError for anything else, before anything is made.
    """
    if spec is None:
        return REPO, ""
    path = Path(spec).expanduser()
    if label == "head" and path.is_dir():
        if not (path / "wds_reinforce" / "__init__.py").is_file() or not (path / "tools" / "make_shards.py").is_file():
            raise UsageError(f"--head {spec!r} is not a checkout of wds_reinforce (no tools/make_shards.py)")
        return path.resolve(), ""
    what = "neither a checkout's folder nor a revision" if label == "head" else "not a revision"
    return None, _commit(spec, f"--{label} {spec!r} is {what} of {REPO}")


def _side(label: str, spec: str | None, found: tuple[Path | None, str], tmp: Path, out: Path) -> Side:
    """The side at its checkout, or its revision checked out (detached) into a temporary worktree."""
    root, sha = found
    if root is not None:
        return Side(label, spec or "working tree", root, out)
    root = tmp / f"worktree-{label}"
    done = _git("worktree", "add", "--detach", str(root), sha)
    if done.returncode != 0:
        raise RuntimeError(f"git worktree add {spec} failed: {done.stderr.strip()}")
    return Side(label, f"{spec} ({sha[:10]})", root, out, worktree=True)


def _remove_worktree(side: Side) -> None:
    if side.worktree and side.root.exists():
        _git("worktree", "remove", "--force", str(side.root))


def _env() -> dict[str, str]:
    """One thread, no torchrun rank, nothing on PYTHONPATH: each side imports only its own checkout."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    return env


def _python(side: Side, code: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code, str(side.root), *args],
        cwd=side.root,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )


PACKAGE_CODE = """
import sys
sys.path.insert(0, sys.argv[1])  # as the tools do
import wds_reinforce
print(wds_reinforce.__file__)
"""


def _check_package(side: Side) -> None:
    """The package this side's tools import must live in this side's checkout: no mix-up of the two versions."""
    done = _python(side, PACKAGE_CODE)
    if done.returncode != 0:
        raise RuntimeError(f"{side.label}: cannot import wds_reinforce in {side.root}:\n{done.stderr.strip()}")
    side.package = done.stdout.strip().splitlines()[-1]
    if not Path(side.package).resolve().is_relative_to(side.root.resolve()):
        raise RuntimeError(f"{side.label}: wds_reinforce comes from {side.package}, not from {side.root}")


# ---------------------------------------------------------------- inputs


def _smooth_image(rng: Any, label: int, height: int, width: int) -> Any:
    """A smooth RGB image (a gradient and a soft blob), so JPEG and resizing behave as on photos, not noise."""
    import numpy as np

    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    angle = rng.uniform(0, 2 * np.pi)
    ramp = (np.cos(angle) * x / width + np.sin(angle) * y / height)[..., None]
    base = np.array([60 + 70 * label, 160 - 40 * label, 90 + 30 * label], np.float32)
    tint = rng.uniform(-40, 40, 3).astype(np.float32)
    cy, cx, r = rng.uniform(0.3, 0.7) * height, rng.uniform(0.3, 0.7) * width, rng.uniform(6, 14)
    blob = np.exp(-((y - cy) ** 2 + (x - cx) ** 2) / (2 * r * r))[..., None]
    colour = rng.uniform(0, 255, 3).astype(np.float32)
    img = base + tint + 60 * ramp
    img = img * (1 - blob) + colour * blob
    return np.clip(img, 0, 255).astype(np.uint8)


def _make_folder(root: Path) -> list[tuple[str, bytes, int]]:
    """The ImageFolder root/c{k}/img_{i}.jpg; returns (key, jpeg, label) per image."""
    import numpy as np
    from PIL import Image

    samples = []
    for label in range(CLASSES):
        (root / f"c{label}").mkdir(parents=True)
        for i in range(PER_CLASS):
            rng = np.random.default_rng([7, label, i])
            arr = _smooth_image(rng, label, 40 + 4 * (i % 3), 48 - 2 * (i % 2))
            buf = io.BytesIO()
            Image.fromarray(arr).save(buf, "JPEG", quality=90)
            (root / f"c{label}" / f"img_{i:03d}.jpg").write_bytes(buf.getvalue())
            samples.append((f"c{label}_img_{i:03d}", buf.getvalue(), label))
    return samples


def _write_plain_shards(samples: list[tuple[str, bytes, int]], out: Path) -> str:
    """Plain webdataset shards of the same images in a fixed mixed order; returns their brace pattern."""
    import numpy as np

    out.mkdir(parents=True)
    order = np.random.default_rng(3).permutation(len(samples)).tolist()
    per = -(-len(samples) // PLAIN_SHARDS)
    for s in range(PLAIN_SHARDS):
        with tarfile.open(out / f"train-{s:06d}.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
            for i in order[s * per : (s + 1) * per]:
                key, jpeg, label = samples[i]
                for name, data in ((f"{key}.jpg", jpeg), (f"{key}.cls", b"%d" % label)):
                    info = tarfile.TarInfo(name)
                    info.size, info.mtime = len(data), 0
                    tar.addfile(info, io.BytesIO(data))
    return str(out / f"train-{{000000..{PLAIN_SHARDS - 1:06d}}}.tar")


def _write_teachers(inputs: Path) -> None:
    import timm
    import torch

    for seed in (1, 2):
        torch.manual_seed(seed)
        model = timm.create_model("resnet10t", num_classes=CLASSES)
        torch.save(model.state_dict(), inputs / f"t{seed}.pt")


MLDR_CODE = """
import json, sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from tests.mldr_archive import config_dict, make_folder, write_metadata, write_plain_shards
root = Path(sys.argv[2])
sizes = [[(40, 48), (44, 40), (48, 52), (36, 44)]] * 3
folder = make_folder(root / "train", sizes)
write_metadata(root / "meta.tar.gz", folder, config_dict("rrc+ra/re", rounds=4, topk=3, size=32, num_classes=3))
print(json.dumps(write_plain_shards(folder, root / "plain", shard_size=5)))
"""


def _write_mldr(head: Side, root: Path) -> str:
    """The ml-dr archive, its ImageFolder and plain shards, by the head side's test helper; returns the pattern."""
    done = _python(head, MLDR_CODE, str(root))
    if done.returncode != 0:
        raise RuntimeError(f"tests/mldr_archive.py of {head.root} failed:\n{done.stderr.strip()}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def make_inputs(inputs: Path, head: Side) -> dict[str, str]:
    """Every input, generated once for both sides; returns the paths and patterns the jobs name."""
    samples = _make_folder(inputs / "folder")
    pattern = _write_plain_shards(samples, inputs / "shards")
    _write_teachers(inputs)
    mldr_pattern = _write_mldr(head, inputs / "mldr")
    return {
        "folder": str(inputs / "folder"),
        "shards": pattern,
        "t1": str(inputs / "t1.pt"),
        "t2": str(inputs / "t2.pt"),
        "meta": str(inputs / "mldr" / "meta.tar.gz"),
        "mldr_folder": str(inputs / "mldr" / "train"),
        "mldr_shards": mldr_pattern,
    }


# ---------------------------------------------------------------- jobs


@dataclass
class Job:
    name: str
    tool: str  # tools/<tool>
    args: list[str]  # with {out} for the side's output root
    folder: str  # the output folder under {out} it writes and that is compared after it
    stdout: str | None = None  # a report the tool prints: kept as this file under {out}/{folder}, compared too


def jobs(inp: dict[str, str]) -> list[Job]:
    """The jobs in order (the sidecar set's jobs build on each other); the same arguments on both sides."""
    common = ["--teacher", "timm:resnet10t", "--image-size", "32", "--topk", "3", "--workers", "0"]
    common += ["--device", "cpu", "--no-progress"]
    t1 = ["--teacher-checkpoint", inp["t1"]]
    sc = [*t1, "--rounds", "4", "--shard-size", "20", *common]  # self-contained, without --source
    sets = ["--source", inp["shards"], *t1, "--recipe", "rrc+ra/re", "--sidecars-only", "--round-group", "2", *common]
    add = ["--add-teacher", "t2", "--teacher", "timm:resnet10t", "--teacher-checkpoint", inp["t2"]]
    add += ["--workers", "0", "--device", "cpu", "--no-progress"]
    mldr = ["--metadata", inp["meta"], "--no-progress"]
    folder = inp["folder"]
    mix_sets = [*sets[: sets.index("--recipe")], "--recipe", "rrc+mix", *sets[sets.index("--recipe") + 2 :]]
    inspect = ["--teacher-checkpoint", inp["t1"], "--checks", "8", "--device", "cpu", "--no-progress"]
    return [
        Job("sc", "make_shards.py", ["--source", folder, *sc, "--recipe", "rrc+ra/re", "--out", "{out}/sc"], "sc"),
        Job("mix", "make_shards.py", ["--source", folder, *sc, "--recipe", "rrc+mix", "--out", "{out}/mix"], "mix"),
        Job(
            "sc_wds",
            "make_shards.py",
            ["--source", inp["shards"], *sc, "--recipe", "rrc+ra/re", "--out", "{out}/sc_wds"],
            "sc_wds",
        ),
        Job("sets_r4", "make_shards.py", [*sets, "--rounds", "4", "--out", "{out}/sets"], "sets"),
        Job("sets_r8", "make_shards.py", [*sets, "--rounds", "8", "--out", "{out}/sets"], "sets"),
        Job("sets_t2", "make_shards.py", [*add, "--out", "{out}/sets"], "sets"),
        Job("sets_mix", "make_shards.py", [*mix_sets, "--rounds", "4", "--out", "{out}/sets_mix"], "sets_mix"),
        Job("sets_mix_t2", "make_shards.py", [*add, "--out", "{out}/sets_mix"], "sets_mix"),
        *[
            Job(f"verify_{s}", "inspect_shards.py", [f"{{out}}/{s}", *inspect], "reports", f"verify_{s}.txt")
            for s in ("sc", "mix", "sets", "sets_mix")
        ],
        *[
            Job(f"grid_{s}", "inspect_shards.py", [f"{{out}}/{s}", "--grid", f"{{out}}/reports/{s}.png"], "reports")
            for s in ("sc", "mix", "sets", "sets_mix")
        ],
        Job(
            "mldr_sc",
            "import_mldr.py",
            [*mldr, "--images", inp["mldr_folder"], "--shard-size", "5", "--out", "{out}/mldr_sc"],
            "mldr_sc",
        ),
        Job(
            "mldr_sets",
            "import_mldr.py",
            [*mldr, "--images", inp["mldr_shards"], "--group-rounds", "2", "--out", "{out}/mldr_sets"],
            "mldr_sets",
        ),
    ]


def _run_job(side: Side, job: Job) -> tuple[float, subprocess.CompletedProcess]:
    argv = [sys.executable, str(side.root / "tools" / job.tool)]
    argv += [a.replace("{out}", str(side.out)) for a in job.args]
    t0 = time.perf_counter()
    done = subprocess.run(argv, cwd=side.root, env=_env(), capture_output=True, text=True, timeout=TIMEOUT_S)
    return time.perf_counter() - t0, done


def tree_digests(folder: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under folder, hidden ones (.done/, job files) included.

    Nothing is excluded: the tools write no times or temporary paths into their outputs (the
    manifests name inputs by absolute path, and both sides read the same generated inputs).
    """
    out = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file() or path.is_symlink():
            out[path.relative_to(folder).as_posix()] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def compare_trees(row: Row, a: dict[str, str], b: dict[str, str]) -> None:
    row.count = len(a.keys() | b.keys())
    row.different = sorted(k for k in a.keys() & b.keys() if a[k] != b[k])
    row.only = {"against": sorted(a.keys() - b.keys()), "head": sorted(b.keys() - a.keys())}
    row.same = not row.different and not row.only["against"] and not row.only["head"]


def _tar_members(path: Path) -> dict[str, tuple[str, str]]:
    """Member name -> (header fields, sha256 of data)."""
    out = {}
    with tarfile.open(path) as tar:
        for info in tar:
            data = tar.extractfile(info).read() if info.isfile() else b""
            header = f"{info.mode} {info.uid} {info.gid} {info.uname} {info.gname} {info.mtime} {info.type!r}"
            out[info.name] = (header, hashlib.sha256(data).hexdigest())
    return out


def _tar_detail(a: Path, b: Path) -> str:
    ma, mb = _tar_members(a), _tar_members(b)
    both = [n for n in ma if n in mb]
    parts = []
    for what, i in (("headers", 0), ("data", 1)):
        names = [n for n in both if ma[n][i] != mb[n][i]]
        if names:
            parts.append(f"{len(names)} of {len(both)} members' {what} (first {names[0]})")
    other = sorted(ma.keys() ^ mb.keys())
    if other:
        parts.append(f"{len(other)} members on one side only (first {other[0]})")
    return "; ".join(parts) or "same members, tar layout differs"


def _file_detail(a: Path, b: Path) -> str:
    """What differs inside a differing .tar (members' headers or data) or .json (top-level keys) file."""
    try:
        if a.suffix == ".tar":
            return _tar_detail(a, b)
        if a.suffix == ".json":
            ja, jb = json.loads(a.read_text()), json.loads(b.read_text())
            if isinstance(ja, dict) and isinstance(jb, dict):
                return "keys " + ", ".join(sorted(k for k in ja.keys() | jb.keys() if ja.get(k) != jb.get(k)))
    except (OSError, ValueError, tarfile.TarError) as e:
        return f"unreadable: {e}"
    return ""


def run_job(job: Job, sides: tuple[Side, Side], parallel: bool) -> Row:
    """Run the job on both sides (at once when parallel: each is one thread) and compare its output folder."""
    row = Row("job", job.name)
    with ThreadPoolExecutor(max_workers=2 if parallel else 1) as pool:
        results = list(pool.map(lambda s: _run_job(s, job), sides))
    for side, (seconds, done) in zip(sides, results):
        row.seconds[side.label] = seconds
        if done.returncode != 0:
            tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-15:])
            row.error += f"{side.label}: exit {done.returncode}\n{tail}\n"
    if row.error:
        return row
    folders = [s.out / job.folder for s in sides]
    if job.stdout is not None:  # the report it printed, e.g. verify's
        for folder, (_, done) in zip(folders, results):
            folder.mkdir(parents=True, exist_ok=True)
            (folder / job.stdout).write_text(done.stdout)
    compare_trees(row, *(tree_digests(f) for f in folders))
    details = [_file_detail(folders[0] / name, folders[1] / name) for name in row.different]
    row.different = [f"{name}: {d}" if d else name for name, d in zip(row.different, details)]
    return row


# ---------------------------------------------------------------- loader

DENSE = ["__key__", "round", "image", "target"]
SPARSE = ["__key__", "round", "image", "idx", "prob"]

# name -> (output folder of the baseline side, ReinforcedDataset keyword arguments)
LOADER_CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    "sc dense": ("sc", {"keys": DENSE}),
    "sc sparse": ("sc", {"keys": SPARSE, "densify": "sparse"}),
    "sc p=0.5 ls=0.1 zeros": ("sc", {"keys": DENSE, "p": 0.5, "label_smoothing": 0.1, "densify": "zeros"}),
    "sc float": ("sc", {"keys": DENSE, "output": "float"}),
    "sc_wds dense": ("sc_wds", {"keys": DENSE}),
    "mix dense": ("mix", {"keys": DENSE}),
    "mix shuffle=8": ("mix", {"keys": DENSE, "shuffle": 8}),
    "sets teacher=0": ("sets", {"keys": DENSE, "teacher": 0}),
    "sets teacher=1": ("sets", {"keys": DENSE, "teacher": 1}),
    "sets teacher=mean": ("sets", {"keys": DENSE, "teacher": "mean"}),
    "sets sparse p=0.5": ("sets", {"keys": SPARSE, "densify": "sparse", "p": 0.5, "label_smoothing": 0.1}),
    "sets_mix teacher=mean": ("sets_mix", {"keys": DENSE, "teacher": "mean"}),
    "sets_mix shuffle=8 p=0.7": ("sets_mix", {"keys": DENSE, "shuffle": 8, "p": 0.7}),
    "mldr_sc p=0.9": ("mldr_sc", {"keys": DENSE, "p": 0.9}),
    "mldr_sets p=0.9": ("mldr_sets", {"keys": DENSE, "p": 0.9}),
}

# Runs under one side (its own package first on sys.path); reads the configurations from a JSON file and
# prints one JSON line: the package's file, and per configuration the digest of every item of EPOCHS epochs
# plus, per item, a short digest of each field (to say where a difference starts).
LOADER_CODE = """
import hashlib, json, sys, time, traceback
sys.path.insert(0, sys.argv[1])
import torch
import wds_reinforce
from wds_reinforce import ReinforcedDataset

def field_bytes(value):
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous()
        return f"tensor {t.dtype} {tuple(t.shape)}|".encode() + t.reshape(-1).view(torch.uint8).numpy().tobytes()
    return f"{type(value).__name__} {value!r}|".encode()

configs, epochs = json.load(open(sys.argv[2])), int(sys.argv[3])
results = {}
for name, (source, kwargs) in configs.items():
    t0, h, items = time.perf_counter(), hashlib.sha256(), []
    try:
        ds = ReinforcedDataset(source, **kwargs)
        for epoch in range(epochs):
            ds.set_epoch(epoch)
            h.update(b"epoch %d|" % epoch)
            for item in ds:
                fields = [field_bytes(v) for v in item]
                for data in fields:
                    h.update(data)
                label = [str(v.tolist() if isinstance(v, torch.Tensor) else v) for v in item[:2]]
                items.append([epoch, *label, [hashlib.sha256(d).hexdigest()[:12] for d in fields]])
        results[name] = {"sha256": h.hexdigest(), "items": items}
    except Exception:
        results[name] = {"error": traceback.format_exc(limit=3).strip(), "items": items}
    results[name]["seconds"] = time.perf_counter() - t0
print(json.dumps({"package": wds_reinforce.__file__, "results": results}))
"""


def _run_loader(side: Side, config_file: Path) -> dict[str, Any]:
    done = _python(side, LOADER_CODE, str(config_file), str(EPOCHS))
    if done.returncode != 0:
        raise RuntimeError(f"{side.label}: the loader snippet failed:\n{done.stderr.strip()}")
    report = json.loads(done.stdout.strip().splitlines()[-1])
    if not Path(report["package"]).resolve().is_relative_to(side.root.resolve()):
        raise RuntimeError(f"{side.label}: the loader imported {report['package']}, not {side.root}'s package")
    return report["results"]


def _first_difference(keys: list[str], a: list[list], b: list[list]) -> str:
    """Where two item streams part: how many items differ, and the first one's epoch, key, round and fields."""
    if len(a) != len(b):
        return f"{len(a)} items against {len(b)} on the head side"
    diffs = [(x, y) for x, y in zip(a, b) if x != y]
    if not diffs:
        return "same items, different digest"
    (epoch, key, rnd, fa), (_, key_b, rnd_b, fb) = diffs[0]
    fields = [k for k, u, v in zip(keys, fa, fb) if u != v]
    where = f"epoch {epoch} key {key} round {rnd}"
    if (key, rnd) != (key_b, rnd_b):
        where += f" (head: key {key_b} round {rnd_b})"
    return f"{len(diffs)} of {len(a)} items differ; first at {where}: {', '.join(fields)}"


def run_loader(sides: tuple[Side, Side], baseline_out: Path, tmp: Path, parallel: bool) -> list[Row]:
    """Both sides read the baseline's outputs (identical bytes), so only the loader's code can differ."""
    config_file = tmp / "loader_configs.json"
    configs = {name: (str(baseline_out / folder), kw) for name, (folder, kw) in LOADER_CONFIGS.items()}
    config_file.write_text(json.dumps(configs))
    with ThreadPoolExecutor(max_workers=2 if parallel else 1) as pool:
        results = dict(zip((s.label for s in sides), pool.map(lambda s: _run_loader(s, config_file), sides)))
    rows = []
    for name, (_, kwargs) in LOADER_CONFIGS.items():
        row = Row("loader", name)
        a, b = results["against"][name], results["head"][name]
        row.seconds = {"against": a["seconds"], "head": b["seconds"]}
        row.error = "".join(f"{label}: {r['error']}\n" for label, r in (("against", a), ("head", b)) if "error" in r)
        row.count = max(len(a["items"]), len(b["items"]))
        row.same = not row.error and a["sha256"] == b["sha256"]
        if not row.same and not row.error:
            row.different = [_first_difference(kwargs["keys"], a["items"], b["items"])]
        rows.append(row)
    return rows


# ---------------------------------------------------------------- report


def _status(row: Row) -> str:
    if row.error:
        return "FAILED"
    return "same" if row.same else "DIFFERENT"


def print_table(rows: list[Row], sides: tuple[Side, Side]) -> None:
    for side in sides:
        print(f"{side.label:8} {side.spec}: {side.package}")
    print()
    header = f"{'':6} {'job / loader config':24} {'compared':>12} {'result':>10} {'against s':>10} {'head s':>8}"
    print(header)
    print("-" * len(header))
    for row in rows:
        unit = "files" if row.kind == "job" else "items"
        sec = [f"{row.seconds[s.label]:.1f}" if s.label in row.seconds else "-" for s in sides]
        count = f"{row.count} {unit}"
        print(f"{row.kind:6} {row.name:24} {count:>12} {_status(row):>10} {sec[0]:>10} {sec[1]:>8}")
        lines = [f"differs: {name}" for name in row.different]
        lines += [f"only on the {label} side: {name}" for label, names in row.only.items() for name in names]
        for line in lines[:MAX_LINES]:
            print(f"{'':8}{line}")
        if len(lines) > MAX_LINES:
            print(f"{'':8}... and {len(lines) - MAX_LINES} more (--json lists all)")
        for line in row.error.strip().splitlines():
            print(f"{'':8}{line}")


def as_json(rows: list[Row], sides: tuple[Side, Side], seconds: float) -> dict[str, Any]:
    return {
        "identical": all(r.same and not r.error for r in rows),
        "sides": {s.label: {"spec": s.spec, "root": str(s.root), "package": s.package} for s in sides},
        "rows": [
            {
                "kind": r.kind,
                "name": r.name,
                "count": r.count,
                "result": _status(r),
                "seconds": {k: round(v, 2) for k, v in r.seconds.items()},
                "different": r.different,
                "only": {k: v for k, v in r.only.items() if v},
                "error": r.error,
            }
            for r in rows
        ],
        "seconds": round(seconds, 1),
    }


# ---------------------------------------------------------------- main


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, as for the other bad arguments
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--against", required=True, metavar="REV", help="baseline revision (e.g. HEAD~3 or a sha)")
    parser.add_argument(
        "--head",
        metavar="REV_OR_PATH",
        help="the version under test: a checkout's path or a revision (default: this working tree)",
    )
    parser.add_argument(
        "--keep",
        metavar="DIR",
        help="keep the generated inputs and both sides' outputs in DIR (new or empty); default a temporary folder",
    )
    parser.add_argument(
        "--sequential",
        action="store_true",
        help="run the two sides one after the other (default: both at once, one thread each)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    return parser


def _work_dir(keep: str | None) -> Path:
    if keep is None:
        return Path(tempfile.mkdtemp(prefix="wdsr-compare-"))
    path = Path(keep).expanduser().resolve()
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise UsageError(f"--keep {keep!r} exists and is not an empty folder")
    path.mkdir(parents=True, exist_ok=True)
    return path


def run_all(sides: tuple[Side, Side], work: Path, parallel: bool, say: Callable[[str], None]) -> list[Row]:
    for side in sides:
        _check_package(side)
        say(f"{side.label}: {side.spec} imports {side.package}")
    say(f"generating inputs in {work / 'inputs'}")
    inputs = make_inputs(work / "inputs", sides[1])
    rows: list[Row] = []
    failed: set[str] = set()
    for job in jobs(inputs):
        if job.folder in failed:  # the sidecar set's jobs build on each other: skip what follows a failure
            rows.append(Row("job", job.name, error=f"skipped: an earlier job into {job.folder}/ failed"))
            continue
        say(f"job {job.name}")
        rows.append(run_job(job, sides, parallel))
        if rows[-1].error:
            failed.add(job.folder)
    if failed:  # the loader reads every job's output
        return rows
    say("loader")
    return rows + run_loader(sides, sides[0].out, work, parallel)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    say = (lambda msg: print(f"[compare] {msg}", file=sys.stderr, flush=True)) if not args.json else (lambda m: None)
    t0 = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="wdsr-compare-wt-"))  # worktrees: always removed
    sides: list[Side] = []
    work: Path | None = None
    try:
        found = {label: _locate(label, spec) for label, spec in (("against", args.against), ("head", args.head))}
        work = _work_dir(args.keep)
        for label, spec in (("against", args.against), ("head", args.head)):
            sides.append(_side(label, spec, found[label], tmp, work / f"out_{label}"))
        pair = (sides[0], sides[1])
        rows = run_all(pair, work, not args.sequential, say)
    except UsageError as e:
        print(f"compare_revisions.py: error: {e}", file=sys.stderr)
        return 2
    except (RuntimeError, subprocess.TimeoutExpired) as e:  # a side that cannot run at all: not identical
        print(f"compare_revisions.py: {e}", file=sys.stderr)
        return 1
    finally:
        for side in sides:
            _remove_worktree(side)
        shutil.rmtree(tmp, ignore_errors=True)
        if work is not None and args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
        elif work is not None:
            say(f"inputs and outputs kept in {work}")
    report = as_json(rows, pair, time.perf_counter() - t0)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_table(rows, pair)
        print(f"\n{'identical' if report['identical'] else 'DIFFERENCES FOUND'} ({report['seconds']:.0f} s)")
    return 0 if report["identical"] else 1


if __name__ == "__main__":
    sys.exit(main())
