"""The rounds picture: one sample's stored rounds replayed as the teacher saw them.

``draw_rounds`` (``inspect_shards.py --grid``) finds a sample in a data set (self-contained or a
sidecar set), replays its rounds and draws them with the stored top-3 under each; for a mixing
recipe each round is its own view, its partner's and the mixed view the teacher saw.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from wds_reinforce.core.augment import Recipe, replay
from wds_reinforce.core.augment.mixing import WEIGHT_SCALE, mix_kind, mix_row
from wds_reinforce.core.decode import SourceImage
from wds_reinforce.core.errors import DataError, FormatError
from wds_reinforce.core.format import SIDECAR_EXT, Manifest, Sidecar, decode_sidecar
from wds_reinforce.core.schedule import pairing_windows
from wds_reinforce.io.shards import image_bytes, image_member
from wds_reinforce.io.storage import dirname_url
from wds_reinforce.layouts import layout_of, load_manifest, read_unit
from wds_reinforce.read.verify import partner_view

__all__ = ["draw_rounds", "class_text"]


Found = tuple[str, dict, "Sidecar | None"]  # a sample's key, members and sidecar (None: unreadable)


def _in_window(
    samples: Iterator[tuple[str, dict]], key: str | None, width: int, decode: Any
) -> tuple[Found, list[Found]] | None:
    """The sample ``key`` (None: the first) of a shard's (key, members), with its pairing window of
    ``width``; only those sidecars are decoded (``decode(key, members)``), the window's others
    as None where they cannot be."""
    for window in pairing_windows(samples, width):
        found = next((n for n, (k, _) in enumerate(window) if key is None or k == key), None)
        if found is not None:
            break
    else:
        return None
    decoded: list[Found] = []
    for n, (k, members) in enumerate(window):
        try:
            decoded.append((k, members, decode(k, members)))
        except (DataError, KeyError):
            if n == found:
                raise  # the sample asked for: say why it cannot be drawn
            decoded.append((k, members, None))
    return decoded[found], decoded


def _find_sample(
    url: str, manifest: Manifest, key: str | None, max_rounds: int, width: int = 1
) -> tuple[Found, list[Found]]:
    """A sample's key, members and sidecar (of a sidecar set: its first groups' rounds, joined),
    and its pairing window's samples (``width`` 1: itself)."""
    layout = layout_of(manifest, url)
    groups = -(-max_rounds // layout.group_rounds(manifest))  # those holding the first max_rounds rounds
    for unit in layout.units(manifest, dirname_url(url)):
        sides = [parts[0] for parts in unit.groups[:groups]]
        samples = ((s["__key__"], s) for s in read_unit(unit.images, sides, layout.skipped(manifest)))
        hit = _in_window(samples, key, width, _joined)
        if hit is not None:
            return hit
    raise ValueError(f"key {key!r} is not in {url}")


def _joined(key: str, sample: dict) -> Sidecar:
    """The sample's sidecars (``dr.mp``, then ``dr.mp.1``, ... of the next round groups) as one of all their rounds."""
    raws = [sample[SIDECAR_EXT]]
    while f"{SIDECAR_EXT}.{len(raws)}" in sample:
        raws.append(sample[f"{SIDECAR_EXT}.{len(raws)}"])
    parts = [decode_sidecar(raw, key) for raw in raws]
    if len(parts) == 1:
        return parts[0]
    return Sidecar(
        parts[0].fingerprint,
        np.concatenate([p.idx for p in parts]),
        np.concatenate([p.prob for p in parts]),
        {c: np.concatenate([p.ops[c] for p in parts]) for c in parts[0].ops},
        parts[0].image_crc,
        parts[0].window_crc,
    )


def class_text(c: int, names: list[str], width: int = 14) -> str:
    """Class ``c`` as the picture writes it: ``circle (5)`` where the manifest names it, else ``class 5``
    (never a bare number that a probability beside it would run into)."""
    name = names[c] if 0 <= c < len(names) else ""
    if not name or name == str(c):
        return f"class {c}"
    return f"{name[:width]} ({c})"


class _Sheet:
    """The picture being drawn: a title, then one tile per round (or, mixing, a row of three per round)."""

    def __init__(self, recipe: Recipe, rounds: int, columns: int):
        from PIL import Image, ImageDraw

        # Small tiles (CIFAR's 32 px) are unreadable as they are: enlarge them, nearest, to ~128 px.
        self.zoom = max(1, -(-128 // max(recipe.size)))
        self.h, self.w = recipe.size[0] * self.zoom, recipe.size[1] * self.zoom
        self.tile_w, self.text_h = max(self.w, 150), 3 * 14 + 18
        self.columns = columns
        rows = -(-rounds // columns) if recipe.mix is None else rounds
        self.canvas = Image.new("RGB", (columns * self.tile_w, 34 + rows * (self.h + self.text_h)), "white")
        self.draw = ImageDraw.Draw(self.canvas)

    def paste(self, pixels: torch.Tensor, x: int, y: int) -> None:
        from PIL import Image

        tile = Image.fromarray(pixels.permute(1, 2, 0).contiguous().numpy())
        self.canvas.paste(tile.resize((self.w, self.h), Image.NEAREST) if self.zoom > 1 else tile, (x, y))

    def text(self, x: int, y: int, text: str, fill: str = "gray") -> None:
        self.draw.text((x, y), text, fill=fill)

    def top3(self, x: int, y: int, sidecar: Sidecar, r: int, names: list[str]) -> None:
        """The stored top-3 of round r under the tile at (x, y)."""
        for i in range(min(3, sidecar.topk)):
            c, p = int(sidecar.idx[r, i]), float(sidecar.prob[r, i])
            self.text(x + 2, y + self.h + 16 + 14 * i, f"{class_text(c, names)}: {p:.2f}", "black")


def _title(
    manifest: Manifest, members: dict, key: str, rounds: int, stored: int, recipe: Recipe, zoom: int
) -> list[str]:
    """The picture's two title lines: the sample and its true label; the recipe and size."""
    names = manifest.class_names
    try:
        label = f"label {class_text(int(members.get('cls', b'').decode().strip()), names)}"
    except ValueError:
        label = "no label"
    # A recipe file is named by its file when made by make_shards.py; otherwise "custom": list its ops.
    name = manifest.recipe.get("name") or "custom"
    if name == "custom":
        name = "custom " + " + ".join(str(op.get("op")) for op in manifest.recipe.get("ops", []))
    size = "x".join(str(v) for v in recipe.size)
    return [
        f"{key}: {label}; {rounds} of {stored} rounds, teacher's top-3 under each",
        f"recipe {name} at {size} px" + (f", shown x{zoom}" if zoom > 1 else ""),
    ]


def _mixed_round(sheet: _Sheet, src: SourceImage, sidecar: Sidecar, r: int, recipe: Recipe, window: list) -> None:
    """Row r of a mixing recipe's picture: own view | partner's view | what the teacher saw."""
    y, tile_w, h = 34 + r * (sheet.h + sheet.text_h), sheet.tile_w, sheet.h
    pairs = [((image_member(m) or (None, None))[1], sc) for _, m, sc in window]
    view, other = replay(src, sidecar.round_params(r), recipe), None
    try:
        other = partner_view(sidecar, r, recipe, pairs)
    except FormatError as exc:
        sheet.text(tile_w + 2, y + h + 2, str(exc)[:40], "red")
    mixed = view if other is None else recipe.mix.apply(view, other, mix_row(sidecar.ops, r))
    sheet.paste(view, 0, y)
    sheet.text(2, y + h + 2, f"round {r}: own view")
    partner = int(sidecar.ops["mixp"][r][0]) - 1
    if other is not None:
        sheet.paste(other, tile_w, y)
        what = mix_kind(mix_row(sidecar.ops, r))
        weight = int(sidecar.ops["mixl"][r][0]) / WEIGHT_SCALE
        sheet.text(tile_w + 2, y + h + 2, f"partner {window[partner][0][:16]}")
        sheet.text(tile_w + 2, y + h + 16, f"{what}" + (f", weight {weight:.2f}" if weight else ""))
    elif partner < 0:
        sheet.text(tile_w + 2, y + h + 2, "not mixed")
    sheet.paste(mixed, 2 * tile_w, y)
    sheet.text(2 * tile_w + 2, y + h + 2, "the teacher saw")


def draw_rounds(location: str, out: str, key: str | None = None, max_rounds: int = 16, columns: int = 4) -> str:
    """Draw one sample's replayed rounds with the stored top-3 under each; return the key drawn.

    The title gives the sample's true label and the recipe's name (a recipe file's name); tiles
    smaller than 128 px are enlarged (nearest neighbour, so the pixels stay the teacher's). For a
    mixing recipe each round is a row of three tiles: the sample's own view, its partner's view
    (named, with what mixes them) and the mixed view the teacher saw, with the top-3 under it.

    Args:
        location: shard directory / URL prefix, or the manifest's URL.
        out: the PNG to write.
        key: the sample to draw (default: the first of the first shard).
        max_rounds: draw at most this many rounds.
        columns: tiles per row.
    """
    url, manifest = load_manifest(location)
    recipe = Recipe.from_dict(manifest.recipe)
    width = recipe.pairing_window
    (key, members, sidecar), window = _find_sample(url, manifest, key, max_rounds, width)
    src = SourceImage(image_bytes(members))
    n = min(sidecar.rounds, max_rounds)
    sheet = _Sheet(recipe, n, 3 if recipe.mix is not None else columns)
    for line, text in enumerate(_title(manifest, members, key, n, sidecar.rounds, recipe, sheet.zoom)):
        sheet.text(4, 4 + 14 * line, text, "black")
    for r in range(n):
        if recipe.mix is None:
            x, y = (r % sheet.columns) * sheet.tile_w, 34 + (r // sheet.columns) * (sheet.h + sheet.text_h)
            sheet.paste(replay(src, sidecar.round_params(r), recipe), x, y)
            sheet.text(x + 2, y + sheet.h + 2, f"round {r}")
        else:
            x, y = 2 * sheet.tile_w, 34 + r * (sheet.h + sheet.text_h)
            _mixed_round(sheet, src, sidecar, r, recipe, window)
        sheet.top3(x, y, sidecar, r, manifest.class_names)
    sheet.canvas.save(out)
    return key
