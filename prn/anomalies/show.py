"""Picture grids of generated anomalies, one PNG per enabled strategy (EA, HEA, HOA).

Each row shows: the normal image, the generated anomaly, its mask (white), and the target area
(the normal image dimmed outside it).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from prn.anomalies.compose import AnomalyGenerator
from prn.viz import PNG_COMPRESS_LEVEL, label_font

COLUMNS = ("normal", "anomaly", "mask", "target area")
LABELS = {"extended": "EA", "heterologous": "HEA", "homologous": "HOA"}
PAD = 4
HEADER = 18  # the label strip: 12 px text and its descenders clear of the tiles


def _row(normal: np.ndarray, image: np.ndarray, mask: np.ndarray, target: np.ndarray) -> list[np.ndarray]:
    mask_rgb = np.repeat(mask[..., None], 3, axis=-1).astype(np.uint8) * 255
    dimmed = np.where(target[..., None], normal, (normal * 0.25).astype(np.uint8))
    return [normal, image, mask_rgb, dimmed]


def _grid(rows: list[list[np.ndarray]], title: str) -> Image.Image:
    h, w = rows[0][0].shape[:2]
    cols = len(rows[0])
    canvas = Image.new("RGB", (cols * (w + PAD) + PAD, HEADER + len(rows) * (h + PAD) + PAD), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for c, name in enumerate(COLUMNS):
        draw.text((PAD + c * (w + PAD), 2), f"{name} ({title})" if name == "anomaly" else name, fill=(0, 0, 0),
                  font=label_font())
    for r, row in enumerate(rows):
        for c, tile in enumerate(row):
            canvas.paste(Image.fromarray(tile), (PAD + c * (w + PAD), HEADER + r * (h + PAD)))
    return canvas


def show_anomalies(normals: Sequence[np.ndarray], generator: AnomalyGenerator, out_dir: str | Path,
                   n: int = 6, seed: int = 0) -> list[Path]:
    """Writes ``anomalies_<strategy>.png`` (n rows each) into ``out_dir``; returns the paths.

    normals: uint8 (S, S, 3) images; row r of strategy s uses a seed derived from (seed, s, r).
    """
    if len(normals) == 0:
        raise ValueError("show_anomalies needs at least one normal image")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for s, strategy in enumerate(generator.strategies):
        rows = []
        for r in range(n):
            rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(s, r)))
            normal = normals[int(rng.integers(len(normals)))]
            image, mask, target = generator.make(strategy, normal, rng)
            rows.append(_row(normal, image, mask, target))
        path = out_dir / f"anomalies_{strategy}.png"
        _grid(rows, LABELS[strategy]).save(path, compress_level=PNG_COMPRESS_LEVEL)
        paths.append(path)
    return paths
