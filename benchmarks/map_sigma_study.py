"""How much should the map be smoothed? An offline study over trained runs.

For each run folder, the model maps its test split once without smoothing; each sigma then smooths
those maps (``prn.model.scoring.smooth_map``, as ``map_sigma`` does inside the model) and the
pixel metrics (pixel AUROC, PRO, pixel AP) are computed on them, with the image AUROC of the score
taken from the smoothed map (``score_smoothed`` true) beside that of the map before it (false: the
same for every sigma). The run's own ``map_sigma`` is set aside, so a run fitted with smoothing is
measured from its raw map too.

Nothing here chooses anything on test data by itself: it prints every sigma; which one a preset
uses is a decision stated in BENCHMARKS.md with these figures.

    python benchmarks/map_sigma_study.py RUN [RUN ...] [--sigmas 0 1 1.5 2] [--json out.json] [--device D]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch

from prn.api import evaluate
from prn.data.split import Split
from prn.deploy.loading import load_model
from prn.metrics import compute_all
from prn.model.scoring import smooth_map, top_k_score


SMOOTHED_KINDS = ("prn", "prototypes")  # the models that smooth their own map (map_sigma)


def study(run: Path, sigmas: list[float], device: str | None = None) -> list[dict]:
    loaded = load_model(run, device=device)
    if loaded.kind not in SMOOTHED_KINDS:
        raise SystemExit(f"{run}: a {loaded.kind} run; the study needs a PRN or prototype-map run "
                         f"(map_sigma is theirs; PatchCore blurs with its own fixed sigma)")
    model, cfg = loaded.model, loaded.cfg
    model.cfg = dataclasses.replace(model.cfg, map_sigma=0.0)  # the raw map; each sigma below smooths it
    _, preds = evaluate(model, cfg, Split.load(run / "split.json").test)
    exact, k = preds.pixel_exact, cfg.model.k_of(*preds.maps.shape[-2:])
    raw = torch.from_numpy(preds.maps)[:, None]
    before = float(compute_all(preds.labels, preds.scores)["image_auroc"])  # the same for every sigma
    rows = []
    for sigma in sigmas:
        maps = smooth_map(raw, sigma)
        scores = top_k_score(maps, k).double().numpy()
        m = compute_all(preds.labels, scores, preds.masks[exact], maps[:, 0].numpy()[exact])
        rows.append({"run": str(run), "sigma": sigma, "image_auroc_smoothed_score": m["image_auroc"],
                     "image_auroc": before,
                     "pixel_auroc": m["pixel_auroc"], "pro": m["pro"], "pixel_ap": m["pixel_ap"]})
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", type=Path, help="run folders (with split.json and a checkpoint)")
    ap.add_argument("--sigmas", nargs="+", type=float, default=[0.0, 1.0, 1.5, 2.0])
    ap.add_argument("--json", type=Path, help="also write every row as JSON")
    ap.add_argument("--device", help="cpu, cuda, ... (default: this machine's)")
    args = ap.parse_args(argv)
    if any(s < 0 for s in args.sigmas):
        ap.error("--sigmas must be >= 0")
    missing = [str(r) for r in args.runs if not (r / "split.json").is_file()]
    if missing:
        ap.error(f"not run folders (no split.json): {', '.join(missing)}")
    rows = []
    print("| run | sigma | I (score before smoothing) | I (score of the smoothed map) | P | O | A |")
    print("|---|---|---|---|---|---|---|")
    for run in args.runs:
        for r in study(run, args.sigmas, args.device):
            rows.append(r)
            print(f"| {run} | {r['sigma']:g} | " + " | ".join(f"{100 * r[key]:.2f}" for key in (
                "image_auroc", "image_auroc_smoothed_score", "pixel_auroc", "pro", "pixel_ap")) + " |", flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
