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
from pathlib import Path

import numpy as np

from prn.errors import DataError, UsageError
from prn.postprocess import MIN_REGION_AREA, check_min_area

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
    """Per-key mean over categories, skipping categories where the value is missing or nan. A
    figure's interval bounds (``*_low``, ``*_high``) are left out: their mean bounds nothing."""
    keys = sorted({k for metrics in results.values() for k in metrics if not k.endswith(("_low", "_high"))})
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
                           + decisions_table(results, with_mean=table_options.get("with_mean", True)))
    write_csv(paths["csv"], results, **table_options)
    return paths


DECISION_COLUMNS = (
    ("image AP", "image_ap"), ("R@0.1%", "recall_at_0.1%"), ("R@1%", "recall_at_1%"),
    ("R@5%", "recall_at_5%"), ("FRR", "false_reject_rate"), ("recall", "recall"),
    ("oracle R@FRR", "oracle_recall_at_frr"), ("review", "review_rate"), ("R+review", "recall_with_review"))
# 95 % intervals of one test set's figures (prn.metrics.CONFIDENCE); a mean over categories has none
INTERVAL_COLUMNS = (("I 95 %", "image_auroc"), ("FRR 95 %", "false_reject_rate"), ("recall 95 %", "recall"))


def decisions_table(results: dict[str, dict], with_mean: bool = True) -> str:
    """Markdown of the decision a line acts on, per category: image AP; the recall an oracle
    threshold reaches at 0.1 / 1 / 5 % false rejects on this test set (the best any threshold
    could do); at the calibrated threshold (set on held-out good training parts, never on this
    test set), the false-reject rate, the recall, and the oracle's recall at that same false-reject
    rate; with a review band, the share of good parts it passed to a person and the recall counting
    the defective parts it passed; then image AUROC and recall per defect kind. Empty when no category
    has these keys."""
    rows = [(name, m) for name, m in results.items() if "image_ap" in m]
    if not rows:
        return ""
    if with_mean and len(rows) > 1:
        rows.append((MEAN_ROW, mean_metrics(dict(rows))))

    def pct(value):
        value = _number(value)
        return "-" if math.isnan(value) else f"{100 * value:.1f}"

    lines = ["", "## Decisions", "",
             "R@x%: recall with the threshold an oracle sets on this test set's good parts at x % false "
             "rejects. FRR, recall: at the calibrated threshold (set on held-out good training parts, "
             "not on this test set); oracle R@FRR: the oracle's recall at that same false-reject rate; "
             "review: good parts passed to a person by the review band, R+review: defective parts stopped "
             "or passed to it (- without a band). "
             "x 95 %: the interval a test set of this size leaves the figure in (image AUROC: bootstrap; "
             "rates: exact binomial). All x100.", "",
             "| Category | threshold | " + " | ".join(c for c, _ in DECISION_COLUMNS + INTERVAL_COLUMNS) + " |",
             "|---" * (len(DECISION_COLUMNS) + len(INTERVAL_COLUMNS) + 2) + "|"]

    def interval(m, key):
        low, high = pct(m.get(f"{key}_low")), pct(m.get(f"{key}_high"))
        return "-" if "-" in (low, high) else f"{low}-{high}"
    for name, m in rows:
        t = _number(m.get("threshold"))
        cells = [pct(m.get(k)) for _, k in DECISION_COLUMNS]
        cells += ["-" if name == MEAN_ROW else interval(m, k) for _, k in INTERVAL_COLUMNS]
        lines.append(f"| {name} | {'-' if math.isnan(t) else f'{t:.4g}'} | " + " | ".join(cells) + " |")
    from prn.deploy.calibrate import not_good_advice, threshold_warning
    warnings = [(name, threshold_warning(m)) for name, m in results.items()]
    lines += [f"\n**{name}**: {text}." for name, text in warnings if text]
    for name, m in results.items():
        if name != MEAN_ROW and m.get("threshold_from_one_image") == 1.0:
            nxt = _number(m.get("threshold_image_next_score"))
            lines.append(f"\n**{name}**: the threshold is the score of one held-out good image ("
                         f"`threshold_image` in calibration.json names it"
                         + ("" if math.isnan(nxt) else f"; the next held-out good part scores {nxt:.4g}")
                         + "): if that image shows a defect, the threshold stands above where the "
                         f"other good parts put it; look at it; {not_good_advice([])}.")
    for name, m in results.items():
        if "defect_memory_kept" not in m or name == MEAN_ROW:
            continue
        auroc = _number(m.get("defect_memory_auroc"))
        said = "" if math.isnan(auroc) else (f" (the seen defects, each against the memory of the others: "
                                             f"AUROC {100 * auroc:.1f})")
        lines.append(f"\n**{name}**: the image score "
                     + ("is fused with the memory of the seen defects" if m["defect_memory_kept"] else
                        "is PRN's alone: the memory of the seen defects was left out") + f"{said}.")
    def recall_interval(recall, n):  # a few defects of a kind or size leave a recall wide open
        from prn.metrics import proportion_interval
        recall, n = _number(recall), _number(n)
        if math.isnan(recall) or math.isnan(n) or n < 1:
            return "-"
        low, high = proportion_interval(round(recall * n), int(n))
        return f"{pct(low)}-{pct(high)}"
    kinds = [(name, k[6:-1], m[k], m.get(f"recall[{k[6:-1]}]"), m.get(f"n[{k[6:-1]}]")) for name, m in results.items()
             for k in m if k.startswith("auroc[")]
    if kinds:
        lines += ["", "### Per defect kind", "",
                  "| Category | kind | defects | image AUROC | recall at the calibrated threshold | recall 95 % |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {name} | {kind} | {'-' if n is None else int(_number(n))} | {pct(auroc)} | {pct(recall)} | "
                  f"{recall_interval(recall, n)} |" for name, kind, auroc, recall, n in kinds]
    for kind, heading, what, column in (
            ("size", "Per defect size", "The share of the image each defect's mask covers", "defect area"),
            ("pixels", "Per defect size at the model's input",
             "The pixels each defect's mask covers at the model's input; one cell of the encoder's finest map "
             "is 16", "defect pixels")):
        prefix = f"{kind}_n["
        sizes = [(name, k[len(prefix):-1], m[k]) for name, m in results.items() for k in m if k.startswith(prefix)]
        if not sizes:
            continue
        lines += ["", f"### {heading}", "", f"{what} (defects with a mask only).", "",
                  f"| Category | {column} | defects | image AUROC | recall at the calibrated threshold | recall 95 % |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {name} | {size} | {int(_number(n))} | {pct(results[name].get(f'{kind}_auroc[{size}]'))} | "
                  f"{pct(results[name].get(f'{kind}_recall[{size}]'))} | "
                  f"{recall_interval(results[name].get(f'{kind}_recall[{size}]'), n)} |" for name, size, n in sizes]
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


PICTURE_SIDE = (256, 512)  # a result picture's panels: the longer side at least, at most (pixels)


def check_out_folder(path: str | Path, option: str = "--out") -> Path:
    """``path`` as a folder results can be written to: refused, before any work, where it or the
    nearest of its parents that exists is a file (os.makedirs would fail there, after the model
    had loaded and with only "[Errno 17] File exists")."""
    path = Path(path)
    existing = next((p for p in (path, *path.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        where = "is a file" if existing == path else f"is inside {existing}, which is a file"
        raise UsageError(f"{path}: {option} {where}; give a folder for the results")
    return path


def _save_png(array: np.ndarray, path: Path) -> None:
    from prn.viz import png_bytes  # here: prn.viz loads matplotlib, which npy maps and scores do not need
    path.write_bytes(png_bytes(array))


def result_picture(path: Path, image, amap, postprocess, truth=None, title: str | None = None) -> Path:
    """The picture of one result, the same in test and predict: image | ground truth | heat map |
    predicted region, the map shown as ``postprocess.display_map`` (0.5 = the pixel threshold)
    with the region's contour there. image: uint8 (h, w, 3) and amap (h, w) at the model's input
    size; truth: bool (h, w) or None. Each panel shows the model's input at its own size, its
    longer side kept within PICTURE_SIDE: at the 256 pixels of earlier pictures a KolektorSDD
    image of the `cpu` preset (input 384 x 154) was shrunk to two thirds, its thin cracks with it.
    The region's label names the pixel threshold in the map's own units: the display map's 0.5
    read as a probability of 0.5 in earlier pictures."""
    from prn.viz import save_overlay
    side = min(max(max(np.shape(amap)), PICTURE_SIDE[0]), PICTURE_SIDE[1])
    label = None
    if postprocess.pixel_threshold is not None:
        label = f"Region (map >= pixel threshold {postprocess.pixel_threshold:.3g})"
    return save_overlay(path, image, postprocess.display_map(amap), truth, threshold=0.5, title=title,
                        panel_size=side, region_label=label)


SCORE_COLUMNS = ("path", "score", "normalized_score", "prediction", "review", "label", "error")
REGION_COLUMN = "regions"     # prn predict's last column: the image's number of defect regions
REGIONS_FILE = "regions.jsonl"
MAP_FORMATS = ("npy", "png", "none")


class ResultWriter:
    """The files of a set of results, written image by image under ``out_dir``, the same for
    ``prn test`` and ``prn predict``:

    - ``scores.csv``: SCORE_COLUMNS, one row per image (path relative to ``root``, absolute
      outside it; normalized_score and prediction from ``postprocess``, empty when uncalibrated;
      review 1 for a part that passes but scores in the review band (``Postprocess.review``),
      empty without a band;
      label when known; error for an unreadable file, its other cells empty);
    - ``maps/<path>.npy`` (raw float32 map at the image's size) or ``.png`` (the display map,
      128 = the pixel threshold), per ``maps``; ``masks/<path>.png`` (pixels >= the pixel
      threshold) when ``masks``; ``images/<path>.png`` pictures through ``overlay``.

    - with ``regions`` (``prn predict``): a last column ``regions``, the number of defect regions
      of the image (``Postprocess.regions`` with at least ``min_region_area`` pixels), and
      ``regions.jsonl`` beside scores.csv, one line per scored image:
      ``{"path", "width", "height", "regions": [{"x", "y", "width", "height", "area", "peak",
      "mean"}, ...]}``. Without a pixel threshold the column stays empty and no regions.jsonl is
      written (``regions_path`` is None): there is nothing to cut the map at.

    Output paths mirror the input tree (``mirrored_path``): ``root/good/000.png`` gets
    ``maps/good/000.png.npy``, so ``a.png`` and ``a.jpg`` never collide.

        >>> with ResultWriter(out, root, post, maps="npy") as w:
        ...     w.add(path, score, normalized, prediction, amap_small, original_hw)
    """

    def __init__(self, out_dir: str | Path, root: str | Path, postprocess, *, maps: str = "none",
                 masks: bool = False, regions: bool = False, min_region_area: int = MIN_REGION_AREA):
        if maps not in MAP_FORMATS:
            raise DataError(f"maps must be one of {', '.join(MAP_FORMATS)}, got {maps!r}")
        self.out, self.root, self.post = Path(out_dir), Path(root), postprocess
        self.maps, self.masks = maps, masks
        self.regions, self.min_region_area = regions, check_min_area(min_region_area)
        self.out.mkdir(parents=True, exist_ok=True)
        self.csv_path = self.out / "scores.csv"
        self._fh = self.csv_path.open("w", newline="")
        self._csv = csv.writer(self._fh)
        self._csv.writerow(SCORE_COLUMNS + ((REGION_COLUMN,) if regions else ()))
        self.regions_path = self._jsonl = None
        if regions and postprocess.pixel_threshold is not None:
            self.regions_path = self.out / REGIONS_FILE
            self._jsonl = self.regions_path.open("w")
        self._used: dict[str, set] = {"maps": set(), "masks": set(), "images": set()}

    def __enter__(self) -> "ResultWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._fh.close()
        if self._jsonl is not None:
            self._jsonl.close()

    def flush(self) -> None:
        self._fh.flush()
        if self._jsonl is not None:
            self._jsonl.flush()

    def error(self, image_path: Path, message: str) -> None:
        self._csv.writerow([shown_path(image_path, self.root), "", "", "", "", "", message]
                           + ([""] if self.regions else []))

    def add(self, image_path: Path, score: float, normalized: float | None, prediction: int | None,
            amap=None, hw: tuple[int, int] | None = None, label: int | None = None,
            review: int | None = None) -> None:
        """One image's row, and its map, mask and regions at its original size ``hw`` (from
        ``amap`` float32 (h, w) at the model's input size) when asked for. ``prediction`` and
        ``review`` are the post-process's (``judge``, ``review``), None where it has none."""
        row = [shown_path(image_path, self.root), repr(float(score)),
               "" if normalized is None else repr(float(normalized)),
               "" if prediction is None else int(prediction), "" if review is None else int(review),
               "" if label is None else int(label), ""]
        wanted = self.maps != "none" or self.masks or self._jsonl is not None
        full, found = None, None
        if amap is not None and wanted:
            if np.ndim(amap) != 2:
                raise DataError(f"{image_path}: anomaly map must be 2-D (H, W), got shape {np.shape(amap)}")
            if hw is None:
                raise DataError(f"{image_path}: maps, masks and regions need the image's size")
            full = self.post.map_for(amap, hw, regions_only=self.maps == "none" and not self.masks)
            if full is None:
                found = []  # regions alone are asked for and none can exist: no map at the image's size
        if self.regions:
            if full is not None and self._jsonl is not None:
                found = self.post.regions(full, self.min_region_area)
            row.append("" if found is None else len(found))
            if found is not None:
                self._jsonl.write(json.dumps({"path": row[0], "width": int(hw[1]), "height": int(hw[0]),
                                              "regions": [r.as_dict() for r in found]}) + "\n")
        self._csv.writerow(row)
        if full is None:
            return
        if self.maps == "npy":
            np.save(self._target(image_path, "maps", ".npy"), full)
        elif self.maps == "png":
            level = np.round(self.post.display_map(full) * 255).astype(np.uint8)
            _save_png(level, self._target(image_path, "maps", ".png"))
        if self.masks:
            region = self.post.region(full).astype(np.uint8) * 255
            _save_png(region, self._target(image_path, "masks", ".png"))

    def overlay(self, image_path: Path, image, amap, truth=None, title: str | None = None) -> Path:
        """``images/<path>.png``: ``result_picture`` of one image."""
        return result_picture(self._target(image_path, "images", ".png"), image, amap, self.post, truth, title)

    def _target(self, image_path: Path, folder: str, suffix: str) -> Path:
        return mirrored_path(image_path, self.root, self.out / folder, suffix, self._used[folder])
