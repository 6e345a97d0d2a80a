"""A memory of the seen defects: does matching their features at test time stop more defective parts?

Outside the paper. PRN learns its seen anomalies through the decoder; this study asks whether
also *remembering* them helps the decision where a defect covers a few pixels. For each run
folder, the frozen encoder's features at 1/4 and 1/8 of the input (3 x 3 means, the 1/8 map
up-sampled to 1/4, concatenated) give, at every pixel of an image:

- ``d_defect``: the distance to the nearest feature inside a seen defect's mask (every seen
  anomaly of the split with a mask, the validation fold's too; the mask max-pooled to 1/4 so a
  pit of a few pixels keeps its cell);
- ``d_good``: how far the pixel is from good parts, by ``--normal``: ``bank``, the distance to the
  nearest of ``--bank`` features drawn at random from the good training images (a PatchCore-like
  memory), or ``prototypes``, the norm of PRN's own prototype residual |F - P*| there (no bank,
  almost no cost).

The memory's image score is the largest ``d_good / d_defect`` of the image: high where a pixel
is far from good parts and near a seen defect. It is fused with the run's own image score as
z(PRN) + z(memory), each standardised on the held-out good images (split.json val_normal),
and the fused score is thresholded on those same images by the run's calibration rule
(prn.deploy.calibrate.image_threshold, target 1 %): no test image sets anything. Printed per run
and as mean +- sd over the runs: image AUROC, realised false rejects and recall at that
threshold, the oracle's recall at 1 % false rejects, and the recall of defects covering
< 0.05 % of the image (BSData's smallest pits), for PRN alone and fused. And, from the seen
defects alone: each seen defect image scored by the memory of the *other* seen defects, against
the held-out good images (an AUROC): whether the seen defects recognise one another, which can be
known before any test image exists.

``--views mirrored`` also remembers the seen defects mirrored (left-right, up-down and both):
four times the features, each counted as its defect's in the leave-one-out check.

``--features`` sets the pixel features matched: ``quarter`` the model's memory at stride 4
(above); ``half`` its memory at stride 2, the encoder's 1/2 map (3 x 3 means) beside those features
up-sampled to it, matched at 1/2 of the input (``d_good`` up-sampled from 1/4): twice the linear
resolution for pits under the 1/4 map's 4 x 4-pixel cell; ``raw`` the 1/4 features without their 3
x 3 mean; ``half-fine`` the 1/2 and 1/4 maps without the 1/8 one (``--normal prototypes`` for all
but ``quarter``). ``--coreset N`` keeps a greedy k-center subset of at most N defect features (the
model's memory at stride 2 keeps 256); ``--candidates N`` matches only the N pixels of an image
farthest from good parts (their prototype residual), a cheaper match that was tried.

    python benchmarks/defect_memory_study.py RUN [RUN ...] [--normal bank|prototypes] [--bank 40000]
        [--views seen|mirrored] [--features quarter|raw|half|half-fine] [--coreset N] [--candidates N]

Per-run features are cached in RUN/study/defect_memory_<normal>[_mirrored][_<features>][_topN][_coresetN].npz.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from prn.config import PRNConfig
from prn.data.datasets import ImageDataset
from prn.data.split import Split
from prn.deploy.calibrate import image_threshold
from prn.deploy.loading import load_model
from prn.metrics import image_auroc, oracle_threshold, recall_at
from prn.baselines.patchcore import greedy_coreset
from prn.model.defect_memory import features_inside, good_distance, largest_ratio, nearest_distance, pixel_features
from prn.registry import score_bound

TINY = 0.0005  # a defect covering < 0.05 % of the image: BENCHMARKS.md's smallest size class
SMALL_PIXELS = 16  # a defect under one cell of the encoder's 1/4 map (prn.metrics.PIXEL_BINS)


def study_features(taps: list[torch.Tensor], kind: str, half: torch.Tensor | None = None) -> torch.Tensor:
    """Pixel features of ``--features kind`` (the model's ``pixel_features`` for "quarter" and,
    with the 1/2 map, "half": its memory at stride 2)."""
    if kind in ("quarter", "half"):
        return pixel_features(taps, half if kind == "half" else None)
    if kind == "raw":
        fine = taps[0].float()
        coarse = F.interpolate(F.avg_pool2d(taps[1].float(), 3, 1, 1), size=fine.shape[-2:], mode="bilinear",
                               align_corners=False)
        return torch.cat([fine, coarse], dim=1)
    h = F.avg_pool2d(half.float(), 3, 1, 1)  # "half-fine": the 1/2 map and the 1/4 one, no 1/8
    up = F.interpolate(F.avg_pool2d(taps[0].float(), 3, 1, 1), size=h.shape[-2:], mode="bilinear", align_corners=False)
    return torch.cat([h, up], dim=1)


@torch.no_grad()
def outputs(run: Path, normal: str, bank_size: int, seed: int = 0, views: str = "seen",
            features: str = "quarter", candidates: int = 0, coreset: int = 0) -> dict:
    cache = run / "study" / (f"defect_memory_{normal}{'' if views == 'seen' else '_' + views}"
                             f"{'' if features == 'quarter' else '_' + features}"
                             f"{f'_top{candidates}' if candidates else ''}"
                             f"{f'_coreset{coreset}' if coreset else ''}.npz")
    if cache.is_file():
        data = dict(np.load(cache, allow_pickle=False))
        if "seen_loo" in data:
            return data
    loaded = load_model(run, device="cpu")
    model, cfg = loaded.model, loaded.cfg
    if cfg.model.tiles > 1 or model.prototypes is None:
        raise SystemExit(f"{run}: the study needs an untiled PRN with prototypes")
    model.defect_memory.clear()  # "prn" is PRN's own score, also for a run fitted with a memory
    split = Split.load(run / "split.json")
    hw, pixels = cfg.model.input_hw, cfg.data.max_image_pixels

    def batches(samples):
        return torch.utils.data.DataLoader(ImageDataset(samples, hw, pixels), batch_size=8)

    def pixel_mask(s) -> bool:
        return s.mask_path is not None and s.annotation == "mask"

    seen = [s for s in split.train_anomalous + split.val_anomalous if pixel_mask(s)]
    seen_images, seen_masks = [], []
    for b in batches(seen):
        seen_images.append(b["image"])
        seen_masks.append(b["mask"])
    seen_images, seen_masks = torch.cat(seen_images), torch.cat(seen_masks)
    seen_taps, seen_half = model.encoder(seen_images, half=True)
    taps, half, masks = seen_taps, seen_half, seen_masks
    if views == "mirrored":  # only the mirrors are encoded anew: the seen defects' taps are above
        flips = ([-1], [-2], [-2, -1])
        mirrored, mirrored_half = model.encoder(torch.cat([seen_images.flip(f) for f in flips]), half=True)
        taps = [torch.cat(scale) for scale in zip(seen_taps, mirrored)]
        half = torch.cat([seen_half, mirrored_half])
        masks = torch.cat([seen_masks] + [seen_masks.flip(f) for f in flips])
    defect, owner = features_inside(study_features(taps, features, half), masks)  # owner: each row's image
    if coreset and len(defect) > coreset:  # a greedy k-center subset of the bank, owners kept
        keep = greedy_coreset(defect, coreset)
        defect, owner = defect[keep], owner[keep]
    owner = owner % len(seen_images)  # a mirror belongs to its defect
    good_bank = None
    if normal == "bank":
        good = torch.cat([pixel_features(model.encoder(b["image"])).permute(0, 2, 3, 1).flatten(0, 2)
                          for b in batches(split.train_normal)])
        pick = np.random.default_rng(seed).choice(len(good), min(len(good), bank_size), replace=False)
        good_bank = good[torch.from_numpy(pick)]

    def memory_score(taps: list[torch.Tensor], bank: torch.Tensor, half: torch.Tensor | None = None) -> torch.Tensor:
        """(B,): each image's largest d_good / d_defect against the defect features ``bank``;
        taps: the images' encoder features, computed once for both distances."""
        f = study_features(taps, features, half)
        n, c, h, w = f.shape
        if good_bank is not None:
            d_good = nearest_distance(f.permute(0, 2, 3, 1).reshape(-1, c), good_bank).reshape(n, h, w)
            return largest_ratio(f, d_good, bank)
        # the model's own d_good (prn.model.defect_memory; for "quarter" and "half" its memory_scores)
        d_good = good_distance(model.prototypes.residuals([t.float() for t in taps]), (h, w))
        if not candidates:
            return largest_ratio(f, d_good, bank)
        # only the pixels farthest from good parts are matched
        d_good, pick = d_good.flatten(1).topk(min(candidates, h * w), dim=1)
        query = f.flatten(2).transpose(1, 2).gather(1, pick[..., None].expand(-1, -1, c))
        d_defect = nearest_distance(query.reshape(-1, c), bank).reshape(d_good.shape)
        return (d_good / (d_defect + 1e-6)).max(dim=1).values

    # Each seen defect scored by the memory of the other seen defects: whether they recognise one
    # another, known before any test image (judged against the held-out good images in main)
    seen_loo = torch.cat([memory_score([t[i:i + 1] for t in seen_taps], defect[owner != i], seen_half[i:i + 1])
                          for i in range(len(seen))])
    samples = split.val_normal + split.test
    prn_score, memory, area = [], [], []
    for b in batches(samples):
        x = b["image"]
        area.append(b["mask"].mean(dim=(1, 2, 3)))  # at the input size, as prn test's size classes
        prn_score.append(model(x)["pred_score"].float())
        taps, half = model.encoder(x, half=True)
        memory.append(memory_score(taps, defect, half))
    area = np.where([pixel_mask(s) for s in samples], torch.cat(area).numpy(), np.nan)
    data = {"part": np.array(["val"] * len(split.val_normal) + ["test"] * len(split.test)),
            "label": np.array([s.label for s in samples]), "area": area,
            "prn": torch.cat(prn_score).numpy(), "memory": torch.cat(memory).numpy(),
            "defect_features": np.array(len(defect)), "seen_loo": seen_loo.numpy(),
            "input_pixels": np.array(hw[0] * hw[1])}
    cache.parent.mkdir(exist_ok=True)
    np.savez_compressed(cache, **data)
    return data


def judge(d: dict, scores: np.ndarray, tail: str, probability: bool, target: float) -> dict:
    val, test = d["part"] == "val", d["part"] == "test"
    y, s = d["label"][test], scores[test]
    t, _ = image_threshold(scores[val], target, tail if probability else "gumbel",
                           score_bound=score_bound("prn") if probability else None)
    tiny = d["area"][test] < TINY
    small = d["area"][test] * float(d.get("input_pixels", np.nan)) < SMALL_PIXELS
    return {"I": image_auroc(y, s), "FRR": float(np.mean(s[y == 0] >= t)), "recall": recall_at(y, s, t),
            "oracle R@1%": recall_at(y, s, oracle_threshold(y, s, 0.01)),
            "tiny recall": float(np.mean(s[(y == 1) & tiny] >= t)) if np.any((y == 1) & tiny) else np.nan,
            f"< {SMALL_PIXELS} px recall": float(np.mean(s[(y == 1) & small] >= t)) if np.any((y == 1) & small)
            else np.nan}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", type=Path)
    p.add_argument("--normal", choices=("bank", "prototypes"), default="bank")
    p.add_argument("--bank", type=int, default=40000, help="good features in the bank (--normal bank)")
    p.add_argument("--target-fpr", type=float, default=0.01)
    p.add_argument("--views", choices=("seen", "mirrored"), default="seen",
                   help="remember the seen defects as they are, or also mirrored (three flips)")
    p.add_argument("--features", choices=("quarter", "raw", "half", "half-fine"), default="quarter",
                   help="the pixel features matched (see the module's docstring)")
    p.add_argument("--coreset", type=int, default=0,
                   help="keep at most this many defect features, a greedy k-center subset (0: all)")
    p.add_argument("--candidates", type=int, default=0,
                   help="match only this many pixels an image, those farthest from good parts (0: all)")
    args = p.parse_args(argv)
    if args.features != "quarter" and args.normal != "prototypes":
        p.error("--features raw|half needs --normal prototypes")
    if args.candidates and args.features == "quarter":
        p.error("--candidates is for --features raw|half")
    rows: dict[str, list[dict]] = {"PRN": [], "PRN + memory": []}
    loo = []
    for run in args.runs:
        d = outputs(run, args.normal, args.bank, views=args.views, features=args.features,
                    candidates=args.candidates, coreset=args.coreset)
        tail = PRNConfig.load(run / "config.yaml").calibration.calibration_tail
        val_good = d["part"] == "val"
        held_out = d["memory"][val_good]
        loo.append(image_auroc(np.r_[np.ones(len(d["seen_loo"])), np.zeros(len(held_out))],
                               np.r_[d["seen_loo"], held_out]))
        print(f"{run}  seen defects, each against the others' memory, vs the held-out goods: "
              f"AUROC {100 * loo[-1]:.1f}")

        def z(s):
            return (s - s[val_good].mean()) / max(s[val_good].std(), 1e-12)
        for name, scores, probability in (("PRN", d["prn"], True),
                                          ("PRN + memory", z(d["prn"]) + z(d["memory"]), False)):
            r = judge(d, scores, tail, probability, args.target_fpr)
            rows[name].append(r)
            print(f"{run}  {name:13s} " + "  ".join(f"{k} {100 * v:.1f}" for k, v in r.items()))
    v = 100 * np.array(loo)
    sd = v.std(ddof=1) if len(v) > 1 else np.nan
    print(f"\nseen defects recognise one another (leave-one-out AUROC, no test image): {v.mean():.1f} +- "
          f"{sd:.1f}, per run " + " / ".join(f"{x:.1f}" for x in v))
    keys = list(rows["PRN"][0])
    print(f"\n| score ({args.normal}) | " + " | ".join(keys) + " |")
    print("|---" * (len(keys) + 1) + "|")
    for name, rs in rows.items():
        cells = []
        for k in keys:
            v = 100 * np.array([r[k] for r in rs], dtype=float)
            sd = np.nanstd(v, ddof=1) if np.sum(~np.isnan(v)) > 1 else np.nan
            cells.append(f"{np.nanmean(v):.1f} +- {sd:.1f}" if np.any(~np.isnan(v)) else "-")
        print(f"| {name} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
