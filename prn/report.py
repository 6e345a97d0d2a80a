"""Run outputs: metric tables (results.json / .md / .csv) and per-image predictions.

The table follows the paper's Table 3: I / P / O / A are image AUROC, pixel AUROC, PRO and pixel
AP x 100 with one decimal, F1 is image F1-max x 100, T is inference seconds per image.
``results`` maps a category name to the dict of ``prn.metrics.compute_all`` plus, optionally,
``seconds_per_image``. Missing or undefined (nan) values print as ``-`` and are ``null`` in JSON.

    >>> print(markdown_table({"bottle": {"image_auroc": 0.99412, "seconds_per_image": 0.0642}}))
    | Category | I | P | O | A | F1 | T |
    |---|---|---|---|---|---|---|
    | bottle | 99.4 | - | - | - | - | 0.064 |
    | mean | 99.4 | - | - | - | - | 0.064 |
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from prn.errors import DataError

# (column, results key, scale, decimals)
COLUMNS = (
    ("I", "image_auroc", 100.0, 1),
    ("P", "pixel_auroc", 100.0, 1),
    ("O", "pro", 100.0, 1),
    ("A", "pixel_ap", 100.0, 1),
    ("F1", "f1_max", 100.0, 1),
    ("T", "seconds_per_image", 1.0, 3),
)
MEAN_ROW = "mean"


def _number(value) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return math.nan
    return value if math.isfinite(value) else math.nan


def mean_metrics(results: dict[str, dict]) -> dict[str, float]:
    """Per-key mean over categories, skipping categories where the value is missing or nan."""
    keys = sorted({k for metrics in results.values() for k in metrics})
    out = {}
    for key in keys:
        values = [_number(m.get(key)) for m in results.values()]
        values = [v for v in values if not math.isnan(v)]
        out[key] = float(np.mean(values)) if values else math.nan
    return out


def table_rows(results: dict[str, dict], with_mean: bool = True,
               first_column: str = "Category") -> list[list[str]]:
    """Header, one row per category, then the mean row; cells are formatted strings.

    with_mean=False for tables whose rows are not categories (ablation variants).
    """
    rows = [[first_column] + [c[0] for c in COLUMNS]]
    entries = list(results.items()) + ([(MEAN_ROW, mean_metrics(results))] if with_mean else [])
    for name, metrics in entries:
        row = [name]
        for _, key, scale, decimals in COLUMNS:
            value = _number(metrics.get(key))
            row.append("-" if math.isnan(value) else f"{value * scale:.{decimals}f}")
        rows.append(row)
    return rows


def markdown_table(results: dict[str, dict], **table_options) -> str:
    rows = table_rows(results, **table_options)
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    lines += ["| " + " | ".join(r) + " |" for r in rows[1:]]
    return "\n".join(lines)


def write_csv(path: str | Path, results: dict[str, dict], **table_options) -> Path:
    """The same table as ``markdown_table`` (same scaling and rounding) as CSV."""
    path = Path(path)
    with path.open("w", newline="") as f:
        csv.writer(f).writerows(table_rows(results, **table_options))
    return path


def json_safe(value):
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, (np.generic, float)):
        value = value.item() if isinstance(value, np.generic) else value
        return None if isinstance(value, float) and not math.isfinite(value) else value
    return value


def write_results(run_dir: str | Path, results: dict[str, dict], title: str,
                  **table_options) -> dict[str, Path]:
    """Write results.json (raw values, nan as null), results.md and results.csv into run_dir.

    results: {category: {"image_auroc": float, ..., "seconds_per_image": float}}.
    Returns the paths written, keyed "json", "md" and "csv".
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    payload = {"title": title, "categories": results, "mean": mean_metrics(results)}
    paths = {"json": run_dir / "results.json", "md": run_dir / "results.md", "csv": run_dir / "results.csv"}
    paths["json"].write_text(json.dumps(json_safe(payload), indent=2) + "\n")
    legend = ("I: image AUROC, P: pixel AUROC, O: PRO (FPR <= 0.3), A: pixel AP, F1: image F1-max "
              "(all x100); T: seconds per image. The mean row skips undefined values (-).")
    paths["md"].write_text(f"# {title}\n\n{markdown_table(results, **table_options)}\n\n{legend}\n"
                           + decisions_table(results))
    write_csv(paths["csv"], results, **table_options)
    return paths


def decisions_table(results: dict[str, dict]) -> str:
    """Markdown of what the line would do at each category's calibrated threshold (the keys of
    ``prn.deploy.calibrate.rates_at``); empty when no category has one."""
    rows = [(name, m) for name, m in results.items() if m.get("threshold") is not None]
    if not rows:
        return ""

    def pct(value, count):
        value = _number(value)
        return "-" if math.isnan(value) else f"{100 * value:.1f} % ({count})"

    lines = ["", "## Decisions at the calibrated threshold", "",
             "Set on held-out good training parts, not on this test set.", "",
             "| Category | threshold | false rejects (good parts) | misses (defective parts) |",
             "|---|---|---|---|"]
    lines += [f"| {name} | {_number(m['threshold']):.4g} | {pct(m.get('false_reject_rate'), m.get('false_rejects'))} "
              f"| {pct(m.get('miss_rate'), m.get('misses'))} |" for name, m in rows]
    return "\n".join(lines) + "\n"


def _relative_to_root(image_path: Path, root: Path) -> Path | None:
    """image_path relative to root (lexically, no symlinks followed), or None when outside it."""
    image = Path(os.path.abspath(image_path))
    try:
        rel = image.relative_to(os.path.abspath(root))
    except ValueError:
        return None
    return rel if rel.parts and ".." not in rel.parts else None


def _inside(path: Path, folder: Path) -> bool:
    return path.resolve().is_relative_to(folder.resolve())


def shown_path(image_path: Path, root: Path) -> str:
    """How an image is named in scores.csv: relative to root, absolute outside it."""
    rel = _relative_to_root(image_path, root)
    return str(Path(os.path.abspath(image_path))) if rel is None else rel.as_posix()


def mirrored_path(image_path: Path, root: Path, folder: Path, suffix: str, used: set | None = None) -> Path:
    """Where an output file for ``image_path`` goes under ``folder`` (its parent folder made):
    ``root/good/000.png`` -> ``folder/good/000.png<suffix>``; outside root ->
    ``folder/_external/<file name><suffix>``. A path already in ``used`` (two images, one
    target) or one that would leave ``folder`` raises DataError; the path is added to ``used``."""
    image_path = Path(image_path)
    rel = _relative_to_root(image_path, root)
    target = folder / "_external" / f"{image_path.name}{suffix}" if rel is None else folder / f"{rel}{suffix}"
    if used is not None and target in used:
        raise DataError(f"{image_path}: another image already wrote its output to {target} "
                        "(same path, or same file name outside the root folder)")
    if not _inside(target.parent, folder):
        raise DataError(f"{image_path}: output path {target} would leave {folder}")
    if used is not None:
        used.add(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    return target


def write_predictions(out_dir: str | Path, records: Iterable[tuple], root: str | Path,
                      threshold: float | None = None) -> Path:
    """Write scores.csv and one float32 ``.npy`` anomaly map per image under out_dir/maps.

    records: tuples ``(image_path, score, map float (H, W) at the image's size[, label])``; the
    label may be None, and the map None to write the score only. scores.csv has columns path,
    score, then label when any record has one, then prediction (1 when score >= threshold) when
    a finite threshold is given. Paths are relative to root, absolute outside it. An image at
    ``root/good/000.png`` gets ``maps/good/000.png.npy`` (the full name is kept, so ``a.png`` and
    ``a.jpg`` never collide); images outside root go to ``maps/_external/<file name>.npy``.
    Returns the path of scores.csv.
    """
    out_dir, root = Path(out_dir), Path(root)
    if threshold is not None and not math.isfinite(threshold):
        threshold = None  # e.g. F1-max undefined on a test set without anomalies
    maps_dir = out_dir / "maps"
    out_dir.mkdir(parents=True, exist_ok=True)
    rows, used = [], set()
    for record in records:
        if len(record) not in (3, 4):
            raise ValueError(f"a prediction record is (path, score, map[, label]), got {len(record)} items")
        image_path, score, amap = Path(record[0]), float(record[1]), record[2]
        label = record[3] if len(record) == 4 else None
        rows.append((shown_path(image_path, root), score, label))
        if amap is None:
            continue
        amap = np.asarray(amap)
        if amap.ndim != 2:
            raise DataError(f"{image_path}: anomaly map must be 2-D (H, W), got shape {amap.shape}")
        np.save(mirrored_path(image_path, root, maps_dir, ".npy", used), amap.astype(np.float32, copy=False))

    with_labels = any(label is not None for _, _, label in rows)
    header = ["path", "score"] + (["label"] if with_labels else [])
    header += ["prediction"] if threshold is not None else []
    path = out_dir / "scores.csv"
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for shown, score, label in rows:
            row = [shown, repr(score)]
            if with_labels:
                row.append("" if label is None else int(label))
            if threshold is not None:
                row.append(int(score >= threshold))
            writer.writerow(row)
    return path
