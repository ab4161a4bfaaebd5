#!/usr/bin/env python3
"""Benchmark the sidecar: bytes per round and encode / decode time per sample.

Teacher outputs are simulated, since the size of dictionary-coded ids depends on how many
distinct classes a sample's rounds put in the top-k: each sample gets fixed logits over
``--classes`` classes (its label and a few look-alikes high, the rest noise) and every round
adds independent noise, a stand-in for the augmentation changing the teacher's view. The
JSON reports the resulting mean distinct ids per sample so the assumption is visible.

    python tools/bench_format.py            # a table
    python tools/bench_format.py --json     # one JSON object per line
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from wds_reinforce.core.augment import Recipe  # noqa: E402
from wds_reinforce.core.format import Sidecar, crc32c, decode_sidecar, encode_sidecar  # noqa: E402


def simulated_topk(rng: np.random.Generator, rounds: int, topk: int, classes: int) -> tuple[np.ndarray, np.ndarray]:
    base = rng.normal(0, 1.0, classes)
    label = rng.integers(classes)
    base[label] += 7.0
    base[rng.choice(classes, 6, replace=False)] += 4.0
    logits = base[None, :] + rng.normal(0, 1.0, (rounds, classes))
    prob = np.exp(logits - logits.max(axis=1, keepdims=True))
    prob /= prob.sum(axis=1, keepdims=True)
    idx = np.argsort(-prob, axis=1)[:, :topk]
    return idx, np.take_along_axis(prob, idx, axis=1).astype(np.float16)


def bench(recipe_name: str, rounds: int, topk: int, samples: int, classes: int, seed: int) -> dict:
    recipe = Recipe.from_spec(recipe_name)
    rng = np.random.default_rng(seed)
    sidecars = []
    for i in range(samples):
        idx, prob = simulated_topk(rng, rounds, topk, classes)
        ops = recipe.sample_rounds(seed, f"sample_{i:06d}", rounds, (375, 500))
        # as the producer writes them: image and label checksums, and the sample's place
        crc = crc32c(f"sample_{i:06d}".encode())  # not drawn from rng: the simulated outputs stay as they were
        checks = {"image_crc": crc, "label_crc": crc ^ 1, "place": (i // 1000, i % 1000, 0)}
        sidecars.append(Sidecar(recipe.fingerprint, idx, prob, ops, **checks))
    t0 = time.perf_counter()
    blobs = [encode_sidecar(sc) for sc in sidecars]
    t1 = time.perf_counter()
    repeats = max(1, 20000 // (samples * max(1, rounds // 50)))
    for _ in range(repeats):
        for blob in blobs:
            decode_sidecar(blob)
    t2 = time.perf_counter()
    total = sum(len(b) for b in blobs)
    return {
        "recipe": recipe_name,
        "rounds": rounds,
        "topk": topk,
        "bytes_per_round": round(total / (samples * rounds), 2),
        "encode_us": round((t1 - t0) / samples * 1e6, 2),
        "decode_us": round((t2 - t1) / (samples * repeats) * 1e6, 2),
        "sidecar_bytes": round(total / samples, 1),
        "distinct_ids": round(float(np.mean([np.unique(sc.idx).size for sc in sidecars])), 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="print one JSON object per line instead of a table")
    parser.add_argument("--recipes", nargs="+", default=["rrc", "rrc+ra/re"], help="recipe presets to measure")
    parser.add_argument("--rounds", nargs="+", type=int, default=[8, 50, 400], help="rounds R per sample")
    parser.add_argument("--topk", nargs="+", type=int, default=[5, 10], help="top-k values")
    parser.add_argument("--samples", type=int, default=200, help="samples per configuration (default 200)")
    parser.add_argument("--classes", type=int, default=1000, help="teacher classes (default 1000)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    rows = [
        bench(recipe, rounds, topk, args.samples, args.classes, args.seed)
        for recipe in args.recipes
        for rounds in args.rounds
        for topk in args.topk
    ]
    if args.json:
        for row in rows:
            print(json.dumps(row))
        return 0
    cols = list(rows[0])
    print(" | ".join(cols))
    print(" | ".join("---" for _ in cols))
    for row in rows:
        print(" | ".join(str(row[c]) for c in cols))
    return 0


if __name__ == "__main__":
    sys.exit(main())
