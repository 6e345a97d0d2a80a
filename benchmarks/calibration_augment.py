"""Thresholds from held-out good images seen as the line might see them.

A run's threshold comes from its held-out good images (``split.json`` ``val_normal``). On
KolektorSDD the good test parts score above every held-out one on some splits (the held-out fold
comes from other images than the test's), and the threshold, fitted to the held-out scores,
rejects several per cent of them. This study scores each held-out good image ``--views`` more
times under the variations a line brings (brightness and contrast within 10 %, a crop of 95-100 %
of the area with the aspect nearly kept, resized back: the part shifts and scales a little; a
slight blur on some views; torchvision ``transforms.v2``, seeded) and sets thresholds from those
scores with ``prn.deploy.calibrate.image_threshold``:

- ``plain``: the held-out scores (what ``fit`` does);
- ``pooled``: the held-out scores and their views together (n x (views + 1) scores, enough for an
  empirical quantile at 1 % once they pass 100);
- ``worst view``: per image its largest score over its views, fitted as the plain scores are.

Each rule is judged on the run's test split (``predictions/scores.csv``): realised false-reject rate
on its good parts and recall on its defects. Nothing is chosen here; it prints every rule.

    python benchmarks/calibration_augment.py RUN [RUN ...] [--views 8] [--target-fpr 0.01]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from torchvision.transforms import v2

from prn.data.datasets import load_sample
from prn.data.split import Split
from prn import registry
from prn.deploy.calibrate import image_threshold, rates_at
from prn.deploy.loading import load_model
from prn.preprocess import to_tensor
from threshold_tails import test_labels_and_scores  # benchmarks/ is the script's folder, so on sys.path


def line_views(hw: tuple[int, int]) -> v2.Transform:
    h, w = hw
    return v2.Compose([
        v2.RandomResizedCrop((h, w), scale=(0.95, 1.0), ratio=(0.98 * w / h, 1.02 * w / h), antialias=True),
        v2.ColorJitter(brightness=0.1, contrast=0.1),
        v2.RandomApply([v2.GaussianBlur(5, sigma=(0.1, 1.0))], p=0.3),
    ])


@torch.no_grad()
def held_out_scores(run: Path, views: int, seed: int) -> tuple[np.ndarray, np.ndarray, str]:
    """(n,) scores of the held-out good images, (n, views) of their views, and the run's tail."""
    loaded = load_model(run, device="cpu")
    model, cfg = loaded.model, loaded.cfg
    split = Split.load(run / "split.json")
    torch.manual_seed(seed)
    transform = line_views(cfg.model.input_hw)
    plain, viewed = [], []
    for sample in split.val_normal:
        image = to_tensor(load_sample(sample, cfg.model.input_hw, cfg.data.max_image_pixels, cfg.model.detail)[0])
        batch = torch.stack([image] + [transform(image).clamp(0, 1) for _ in range(views)])
        scores = model(batch)["pred_score"].float().numpy()
        plain.append(scores[0])
        viewed.append(scores[1:])
    return np.array(plain), np.array(viewed), cfg.calibration.calibration_tail


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", type=Path, nargs="+")
    ap.add_argument("--views", type=int, default=8)
    ap.add_argument("--target-fpr", type=float, default=0.01)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    results = []
    print("| run | rule | threshold | FRR % | recall % |\n|---|---|---|---|---|")
    for run in args.runs:
        plain, viewed, tail = held_out_scores(run, args.views, args.seed)
        labels, test_scores = test_labels_and_scores(run)
        rules = {"plain": plain, "pooled": np.concatenate([plain, viewed.ravel()]),
                 "worst view": np.maximum(plain, viewed.max(axis=1))}
        for rule, scores in rules.items():
            threshold, _ = image_threshold(scores, args.target_fpr, tail, score_bound=registry.score_bound("prn"))
            rates = rates_at(labels, test_scores, threshold)
            frr, recall = rates["false_reject_rate"], rates["recall"]
            results.append({"run": str(run), "rule": rule, "threshold": threshold, "frr": frr, "recall": recall})
            print(f"| {run.parent.name}/{run.name} | {rule} | {threshold:.4f} | {100 * frr:.1f} | {100 * recall:.1f} |")
    print("\n| rule | runs | mean FRR % | runs over 2x target | worst FRR % | mean recall % |\n|---|---|---|---|---|---|")
    for rule in ("plain", "pooled", "worst view"):
        r = [x for x in results if x["rule"] == rule]
        frr = np.array([x["frr"] for x in r])
        print(f"| {rule} | {len(r)} | {100 * frr.mean():.2f} | {(frr > 2 * args.target_fpr).sum()} | "
              f"{100 * frr.max():.1f} | {100 * np.mean([x['recall'] for x in r]):.1f} |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
