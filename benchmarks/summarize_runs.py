"""Mean +- sample standard deviation over split seeds of tested runs, per variant and data set.

    python benchmarks/summarize_runs.py VARIANT_DIR [VARIANT_DIR ...]

Each VARIANT_DIR holds run folders named ``<dataset>_s<seed>`` (as the ablation scripts make them),
each tested (``results.json``). Prints one markdown row per variant and data set: the paper's four
metrics, image AP, the oracle's recall at 1 % false rejects, and at the calibrated threshold the
realised false-reject rate, the recall and the oracle's recall at that rate (all x100), the
test's milliseconds per image (the paper's T; measured under whatever else ran) and the fit's wall
seconds (timings.json). Runs tested since `prn test` reports figures per defect size add two more
tables, the defects binned by their share of the image and by their pixels at the model's input:
per bin, the defects over all seeds, image AUROC and recall at the calibrated threshold. Runs whose
test records whether one held-out good image's score was the threshold (``threshold_from_one_image``)
add a line per variant and data set: on how many of them it was.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import numpy as np

COLUMNS = (("I", "image_auroc"), ("P", "pixel_auroc"), ("O", "pro"), ("A", "pixel_ap"),
           ("image AP", "image_ap"), ("R@1% oracle", "recall_at_1%"), ("FRR", "false_reject_rate"),
           ("recall", "recall"), ("oracle R@FRR", "oracle_recall_at_frr"))


def runs_of(variant: Path) -> dict[str, list[tuple[dict, float]]]:
    out: dict[str, list[tuple[dict, float]]] = {}
    for run in sorted(variant.iterdir()):
        m = re.fullmatch(r"(.+)_s(\d+)", run.name)
        if not m or not (run / "results.json").is_file():
            continue
        metrics = next(iter(json.loads((run / "results.json").read_text())["categories"].values()))
        timings = run / "timings.json"
        fit = json.loads(timings.read_text()).get("fit_seconds", float("nan")) if timings.is_file() else float("nan")
        out.setdefault(m.group(1), []).append((metrics, fit))
    return out


def cell(values: list[float], scale: float = 100.0, decimals: int = 1) -> str:
    v = np.array([x for x in values if x is not None], dtype=float) * scale
    v = v[np.isfinite(v)]
    if not v.size:
        return "-"
    if v.size == 1:
        return f"{v[0]:.{decimals}f}"
    return f"{v.mean():.{decimals}f} +- {v.std(ddof=1):.{decimals}f}"


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("variants", nargs="+", type=Path, metavar="VARIANT_DIR",
                    help="a folder of tested runs named <dataset>_s<seed>")
    args = ap.parse_args(argv)
    for variant in args.variants:
        if not variant.is_dir():
            ap.error(f"{variant}: not a folder")
    print("| variant | data | seeds | " + " | ".join(c for c, _ in COLUMNS) + " | T (ms) | fit (s) |")
    print("|---" * (len(COLUMNS) + 5) + "|")
    for variant in args.variants:
        for data, rows in sorted(runs_of(variant).items()):
            cells = [cell([m.get(k) for m, _ in rows]) for _, k in COLUMNS]
            ms = cell([m.get("seconds_per_image") for m, _ in rows], 1000.0, 0)
            print(f"| {variant.name} | {data} | {len(rows)} | " + " | ".join(cells)
                  + f" | {ms} | {cell([f for _, f in rows], 1.0, 0)} |")
    one_image_lines(args.variants)
    size_rows(args.variants)


def one_image_lines(variants: list[Path]) -> None:
    """Per variant and data set, of the runs whose test records ``threshold_from_one_image``, how
    many had their threshold set by one held-out good image's score (the floor of the rule)."""
    lines = []
    for variant in variants:
        for data, rows in sorted(runs_of(variant).items()):
            said = [m["threshold_from_one_image"] for m, _ in rows if m.get("threshold_from_one_image") is not None]
            if said:
                lines.append(f"- {variant.name}, {data}: on {sum(v == 1.0 for v in said)} of {len(said)} runs")
    if lines:
        print("\nThreshold set by one held-out good image's score:\n" + "\n".join(lines))


def size_rows(variants: list[Path]) -> None:
    """Per defect size (``prn test``'s ``size_*[...]`` keys, the share of the image, and
    ``pixels_*[...]``, the pixels at the model's input, when the runs have them): the defects summed
    over the seeds, and image AUROC and recall at the calibrated threshold, mean +- sd."""
    for kind, column in (("size", "defect area"), ("pixels", "defect pixels at the input")):
        lines = []
        for variant in variants:
            for data, rows in sorted(runs_of(variant).items()):
                prefix = f"{kind}_n["
                sizes = dict.fromkeys(k[len(prefix):-1] for m, _ in rows for k in m if k.startswith(prefix))
                for size in sizes:
                    n = sum(int(m.get(f"{kind}_n[{size}]") or 0) for m, _ in rows)
                    lines.append(f"| {variant.name} | {data} | {size} | {n} | "
                                 f"{cell([m.get(f'{kind}_auroc[{size}]') for m, _ in rows])} | "
                                 f"{cell([m.get(f'{kind}_recall[{size}]') for m, _ in rows])} |")
        if lines:
            print(f"\n| variant | data | {column} | defects | I | recall |\n|---|---|---|---|---|---|")
            print("\n".join(lines))


if __name__ == "__main__":
    main(sys.argv[1:])
