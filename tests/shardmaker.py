"""Tiny reinforced shards for loader tests, made without the producer (fake teacher outputs).

Parameters come from ``recipe.sample_rounds`` and pixels from ``augment.replay``, the same calls
the producer makes, so ``Made.pixels[(key, r)]`` is what the teacher would have seen.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from tests.conftest import encode, photo_like
from wds_reinforce.core.augment import Recipe, replay
from wds_reinforce.core.decode import SourceImage
from wds_reinforce.core.format import Manifest, ShardInfo, Sidecar, crc32c, encode_sidecar
from wds_reinforce.layouts import timm_info

Mutate = Callable[[str, str, bytes], "bytes | None"]  # (key, ext, data) -> data, or None to drop it


@dataclass
class Made:
    root: Path
    urls: list[str]
    manifest: Manifest
    recipe: Recipe
    keys: list[str]
    labels: dict[str, int]
    sidecars: dict[str, Sidecar]
    pixels: dict[tuple[str, int], torch.Tensor] = field(default_factory=dict)

    @property
    def pattern(self) -> str:
        n = len(self.urls)
        return str(self.root / f"shard-{{000000..{n - 1:06d}}}.tar")


def fake_topk(rng: np.random.Generator, rounds: int, topk: int, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Valid fake teacher rows: distinct ids, fp16 probabilities falling along each row, sum < 1."""
    idx = np.stack([rng.choice(num_classes, topk, replace=False) for _ in range(rounds)]).astype(np.uint16)
    prob = rng.dirichlet(np.ones(topk + 1), size=rounds)[:, :topk] * 0.98
    prob = -np.sort(-prob.astype(np.float16), axis=1)
    return idx, prob


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uname, info.gname = len(data), 0, 0o644, "", ""
    tar.addfile(info, io.BytesIO(data))


def make_shards(
    root: Path,
    *,
    num_shards: int = 4,
    per_shard: int = 3,
    rounds: int = 3,
    topk: int = 3,
    num_classes: int = 10,
    recipe: str | Recipe = "rrc",
    size: int = 32,
    decode: str = "full",
    seed: int = 0,
    image_hw: tuple[int, int] = (48, 64),
    mutate: Mutate | None = None,
    record_pixels: bool = True,
    bound: bool = True,
) -> Made:
    """``bound``: sidecars record their place and label checksum, as the producer writes them
    (False: as sidecars written before those fields)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    recipe = recipe if isinstance(recipe, Recipe) else Recipe.from_spec(recipe, size=size, decode=decode)
    rng = np.random.default_rng(seed)
    made = Made(root, [], None, recipe, [], {}, {})  # type: ignore[arg-type]
    shards = []
    for s in range(num_shards):
        name = f"shard-{s:06d}.tar"
        buf = io.BytesIO()
        keys = []
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for i in range(per_shard):
                key = f"s{s:02d}_{i:04d}"
                h, w = image_hw[0] + 4 * (i % 3), image_hw[1] - 4 * (i % 2)
                jpg = encode(photo_like(h, w, seed=1000 * s + i), quality=90)
                label = int(rng.integers(num_classes))
                cols = recipe.sample_rounds(seed, key, rounds, SourceImage(jpg).size)
                idx, prob = fake_topk(rng, rounds, topk, num_classes)
                cls = str(label).encode()
                where = {"place": (s, i, 0), "label_crc": crc32c(cls)} if bound else {}
                sidecar = Sidecar(recipe.fingerprint, idx, prob, cols, crc32c(jpg), **where)
                if record_pixels:
                    src = SourceImage(jpg)
                    for r in range(rounds):
                        made.pixels[(key, r)] = replay(src, {c: v[r] for c, v in cols.items()}, recipe)
                members = {"jpg": jpg, "cls": cls, "dr.mp": encode_sidecar(sidecar)}
                for ext, data in members.items():
                    data = mutate(key, ext, data) if mutate else data
                    if data is not None:  # a mutation may drop the member
                        _add(tar, f"{key}.{ext}", data)
                made.keys.append(key)
                made.labels[key] = label
                made.sidecars[key] = sidecar
                keys.append(key)
        data = buf.getvalue()
        (root / name).write_bytes(data)
        made.urls.append(str(root / name))
        shards.append(ShardInfo(name, per_shard, len(data), hashlib.sha256(data).hexdigest(), keys[0], keys[-1]))
    made.manifest = Manifest(
        recipe=recipe.to_dict(),
        fingerprint=recipe.fingerprint.hex(),
        teacher={"name": "fake"},
        num_classes=num_classes,
        rounds=rounds,
        topk=topk,
        seed=seed,
        shards=shards,
        name="tiny",
        places=bound,
    )
    (root / "manifest.json").write_text(made.manifest.to_json())
    (root / "_info.json").write_text(json.dumps(timm_info(made.manifest)))
    return made
