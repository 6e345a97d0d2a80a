"""Which image score decides best? An offline study over trained runs.

For each run folder, the model scores its held-out fold (split.json val_*) and its test split once;
the largest pixels of these maps are kept per image (``study/outputs.npz`` in the run folder;
each map is the one the run's image score reads: before smoothing where its ``score_smoothed``
is false, as the ``cpu`` presets'):
PRN's map; PRN's map averaged with those of the mirrored images, mirrored back (test-time flips:
left-right, up-down, and all four); the prototype residual map |F - P*| of the same model's
prototypes (a normal-only map: PRN's own encoder and prototypes, no learned head); and with an
image head (``image_score`` head or mean), its logit; and the map averaged over square windows of
WINDOWS pixels (the mean of a window, as a small defect covers one, rather than of the top pixels
wherever they lie); and the map judged against where good parts light up: less the per-pixel largest
value of the training good images' maps (widened by a 5-pixel maximum filter, for parts that sit a
little off), and standardised per pixel by those maps' mean and deviation (smoothed, sigma 2);
and the map averaged along short line segments of LINES pixels at 8 angles, the largest of the
8 at each pixel (a thin crack lies along a line, a speck does not). Rules on the map's logits
(log p / (1 - p) of its largest pixels) are computed from the same kept values.
Image-score rules are then computed from
those, and each rule is judged as the line would use it:

- image AUROC and AP, per-kind AUROC;
- recall at 0.1 / 1 / 5 % false rejects with the threshold taken on the test goods (an oracle);
- the threshold calibrated on the held-out good images alone (prn.deploy.calibrate, target 1 %):
  the realised false-reject rate on the test goods, the recall, and the oracle's recall at that
  same realised rate.

Nothing here chooses anything on test data by itself: it prints every rule; which one a preset
uses is a decision stated in BENCHMARKS.md with these figures.

    python benchmarks/image_score_study.py RUN [RUN ...] [--target-fpr 0.01] [--json out.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import torch
from scipy.ndimage import gaussian_filter, maximum_filter

from prn.config import PRNConfig
from prn.data.datasets import ImageDataset
from prn.data.split import Split
from prn.deploy.calibrate import image_threshold
from prn.deploy.loading import load_model
from prn.metrics import image_auroc, oracle_threshold, recall_at, decision_metrics
from prn.model.prototypes import residual_map
from prn.registry import score_bound
from prn.tiling import from_tiles, to_tiles

KEEP = 4096  # largest pixels kept per map: enough for top-k up to ~7 % of a 384 x 160 map
WINDOWS = (3, 5, 9, 15)  # sides of the square windows the map is averaged over
POSITION_KEYS = ("less_train_max", "train_z")
LINES = (9, 17, 33)  # lengths of the line segments the map is averaged along
ANGLES = 8


def line_kernels(length: int, angles: int = ANGLES) -> torch.Tensor:
    """(angles, 1, L, L) kernels, each the mean along a segment of ``length`` pixels through the
    centre at one of ``angles`` angles in [0, pi). Hand-written: none of prn's dependencies draws a line."""
    c = (length - 1) / 2
    kernels = torch.zeros(angles, 1, length, length)
    for i in range(angles):
        a = np.pi * i / angles
        t = np.linspace(-c, c, 4 * length)
        rows, cols = np.rint(c - t * np.sin(a)).astype(int), np.rint(c + t * np.cos(a)).astype(int)
        kernels[i, 0, rows, cols] = 1.0
    return kernels / kernels.sum(dim=(2, 3), keepdim=True)


def line_mean(maps: torch.Tensor, length: int) -> torch.Tensor:
    """(B, H, W): at each pixel the largest of the map's means along the segments of line_kernels."""
    return torch.nn.functional.conv2d(maps, line_kernels(length), padding=length // 2).amax(dim=1)


def position_stats(maps: np.ndarray) -> dict[str, np.ndarray]:
    """From the training good images' maps (N, H, W): what each pixel of a map is judged against."""
    maps = maps.astype(np.float64)
    return {"max": maximum_filter(maps.max(axis=0), size=5).astype(np.float32),
            "mean": gaussian_filter(maps.mean(axis=0), 2).astype(np.float32),
            "sd": gaussian_filter(maps.std(axis=0), 2).astype(np.float32)}


def position_maps(maps: torch.Tensor, stats: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """(B, H, W) maps -> the same maps less the training goods' largest value at each pixel, and
    standardised per pixel (the deviation floored at 0.02: goods' maps are near 0 almost everywhere)."""
    t = {k: torch.from_numpy(v) for k, v in stats.items()}
    return {"less_train_max": maps - t["max"], "train_z": (maps - t["mean"]) / (t["sd"] + 0.02)}


def largest(maps: torch.Tensor) -> np.ndarray:
    """The KEEP largest pixels of each map (all of a smaller map's), largest first."""
    flat = maps.flatten(1)
    return flat.topk(min(KEEP, flat.shape[1]), dim=1).values.numpy()


@torch.no_grad()
def outputs(run: Path, batch_size: int = 8) -> dict:
    """Scores the run's held-out fold and test split; caches study/outputs.npz in the run."""
    cache = run / "study" / "outputs.npz"
    if cache.is_file():
        data = dict(np.load(cache, allow_pickle=False))
        if (all(f"window{w}" in data for w in WINDOWS) and all(k in data for k in POSITION_KEYS)
                and all(f"line{n}" in data for n in LINES) and "scored" in data):
            return data
    loaded = load_model(run, device="cpu")
    model, cfg = loaded.model, loaded.cfg
    if not model.cfg.score_smoothed:
        # The run's image score reads the map before smoothing; so does every rule here, or the
        # "paper" rule would not be the score the run calibrated and tested.
        model.cfg = dataclasses.replace(model.cfg, map_sigma=0.0)
    split = Split.load(run / "split.json")
    train = torch.utils.data.DataLoader(ImageDataset(split.train_normal, cfg.model.input_hw, cfg.data.max_image_pixels),
                                        batch_size=batch_size)
    stats = position_stats(np.concatenate([model(b["image"])["anomaly_map"][:, 0].numpy() for b in train]))
    samples = split.val_normal + split.val_anomalous + split.test
    part = np.array(["val"] * (len(split.val_normal) + len(split.val_anomalous)) + ["test"] * len(split.test))
    loader = torch.utils.data.DataLoader(ImageDataset(samples, cfg.model.input_hw, cfg.data.max_image_pixels),
                                         batch_size=batch_size)
    prn_top, flip_top, vflip_top, flip4_top, res_top, heads, area = [], [], [], [], [], [], None
    windows = {w: [] for w in WINDOWS}
    lines = {n: [] for n in LINES}
    position = {k: [] for k in POSITION_KEYS}
    for batch in loader:
        x = batch["image"]
        out = model(x)
        amap = out["anomaly_map"].flatten(1)
        if getattr(model, "image_head", None) is not None:
            quarter = model.decoder(model.skips(x), x.shape[-2:], features=True)[1]
            heads.append(model.image_head(quarter, out["anomaly_map"]).numpy())  # logits
        t = cfg.model.tiles  # prototypes of a tiled run are those of its tiles
        feats = model.encoder(to_tiles(x, t))
        res = residual_map(model.prototypes.residuals([f.float() for f in feats]), cfg.model.tile_hw)
        res = from_tiles(res, t).flatten(1)
        prn_top.append(largest(amap))
        # test-time flips: the maps of the mirrored images, mirrored back, averaged with the map
        h, v, hv = ([-1], [-2], [-2, -1])
        fl = {d: model(torch.flip(x, dims=d))["anomaly_map"].flip(dims=d).flatten(1) for d in (tuple(h), tuple(v), tuple(hv))}
        flip_top.append(largest(0.5 * (amap + fl[(-1,)])))
        vflip_top.append(largest(0.5 * (amap + fl[(-2,)])))
        flip4_top.append(largest(0.25 * (amap + fl[(-1,)] + fl[(-2,)] + fl[(-2, -1)])))
        res_top.append(largest(res))
        for w in WINDOWS:  # stride 1, no padding: every window lies inside the map
            pooled = torch.nn.functional.avg_pool2d(out["anomaly_map"], w, stride=1)
            windows[w].append(largest(pooled))
        for n in LINES:
            lines[n].append(largest(line_mean(out["anomaly_map"], n)))
        for k, m in position_maps(out["anomaly_map"][:, 0], stats).items():
            position[k].append(largest(m))
        area = amap.shape[1]
    data = {"part": part, "label": np.array([s.label for s in samples]),
            "kind": np.array([s.defect_type for s in samples]),
            "prn": np.concatenate(prn_top), "flip": np.concatenate(flip_top),
            "vflip": np.concatenate(vflip_top), "flip4": np.concatenate(flip4_top), "res": np.concatenate(res_top), "area": np.array(area),
            "top_k": np.array(cfg.model.top_k), "scored": np.array("smoothed" if model.cfg.map_sigma > 0 else "raw"),
            **{f"window{w}": np.concatenate(v) for w, v in windows.items()},
            **{f"line{n}": np.concatenate(v) for n, v in lines.items()},
            **{k: np.concatenate(v) for k, v in position.items()}}
    if heads:
        data["head"] = np.concatenate(heads)
    cache.parent.mkdir(exist_ok=True)
    np.savez_compressed(cache, **data)
    return data


def topk(values: np.ndarray, k: int) -> np.ndarray:
    return values[:, :max(1, min(k, values.shape[1]))].mean(axis=1)


def rules(d: dict) -> dict[str, np.ndarray]:
    """Image scores of every rule studied, for every image (val and test alike)."""
    area = int(d["area"])
    val_good = (d["part"] == "val") & (d["label"] == 0)
    out = {"top-100 (paper)": topk(d["prn"], 100), "max": topk(d["prn"], 1), "top-10": topk(d["prn"], 10)}
    for share in (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02):
        out[f"top {100 * share:g} % of area"] = topk(d["prn"], round(share * area))
    for w in WINDOWS:
        out[f"max of the {w} x {w} window mean"] = topk(d[f"window{w}"], 1)
        out[f"top-100 of the {w} x {w} window mean"] = topk(d[f"window{w}"], 100)
    for n in LINES:
        out[f"max of the {n}-pixel line mean"] = topk(d[f"line{n}"], 1)
        out[f"top-100 of the {n}-pixel line mean"] = topk(d[f"line{n}"], 100)
    p = np.clip(d["prn"], 1e-6, 1 - 1e-6)
    logits = np.log(p / (1 - p))  # the kept pixels stay the largest: the logit is monotone
    for k in (25, 100, 400):
        out[f"mean of the top-{k} logits"] = topk(logits, k)
    out["residual top-100 (normal only)"] = topk(d["res"], 100)
    out["top-100 of the map less the training goods' largest"] = topk(d["less_train_max"], 100)
    out["top-100 of the map standardised per pixel on the training goods"] = topk(d["train_z"], 100)
    out["top-100 of the flip-averaged map"] = topk(d["flip"], 100)
    out["top-100, vertical flip"] = topk(d["vflip"], 100)
    out["top-100, 4 flips"] = topk(d["flip4"], 100)
    if "head" in d:
        out["image head (probability)"] = 1.0 / (1.0 + np.exp(-d["head"]))
        out["image head (logit)"] = d["head"]
        out["mean(top-100, head probability)"] = 0.5 * (out["top-100 (paper)"] + out["image head (probability)"])

    def z(s):  # standardised on the held-out good images, as a fused score would be at fit time
        mu, sd = s[val_good].mean(), s[val_good].std(ddof=1)
        return (s - mu) / max(sd, 1e-12)
    for name in ("top-100 (paper)", "top 0.25 % of area", "top 1 % of area"):
        out[f"z({name}) + z(residual)"] = z(out[name]) + z(out["residual top-100 (normal only)"])
        out[f"max(z({name}), z(residual))"] = np.maximum(z(out[name]), z(out["residual top-100 (normal only)"]))
    if "head" in d:
        out["z(top-100) + z(head logit)"] = z(out["top-100 (paper)"]) + z(d["head"])
    return out


def judge(d: dict, scores: np.ndarray, target: float, tail: str = "gumbel") -> dict:
    """One rule's figures on the test split, its threshold set on the held-out good images with
    the run's calibration tail, as fit calibrates. Rules whose scores are not probabilities
    (z-scores, logits) have no score bound, and a logit tail is not defined for them: Gumbel."""
    test = d["part"] == "test"
    y, s, kinds = d["label"][test], scores[test], d["kind"][test]
    val_good = scores[(d["part"] == "val") & (d["label"] == 0)]
    probability = bool(np.all((scores >= 0) & (scores <= 1)))
    if tail == "gumbel_logit" and not probability:
        tail = "gumbel"
    t, _ = image_threshold(val_good, target, tail, score_bound=score_bound("prn") if probability else None)
    realised = float(np.mean(s[y == 0] >= t))
    row = {"image_auroc": image_auroc(y, s), **decision_metrics(y, s, kinds, t),
           "calibrated_frr": realised, "calibrated_recall": recall_at(y, s, t),
           "oracle_recall_at_realised": recall_at(y, s, oracle_threshold(y, s, realised))}
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", type=Path)
    p.add_argument("--target-fpr", type=float, default=0.01)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    table: dict[str, dict[str, dict]] = {}
    for run in args.runs:
        d = outputs(run)
        tail = PRNConfig.load(run / "config.yaml").calibration.calibration_tail
        for name, scores in rules(d).items():
            table.setdefault(name, {})[str(run)] = judge(d, scores, args.target_fpr, tail)
    keys = ("image_auroc", "image_ap", "recall_at_0.1%", "recall_at_1%", "recall_at_5%",
            "calibrated_frr", "calibrated_recall", "oracle_recall_at_realised")
    print("| rule | " + " | ".join(keys) + " |")
    print("|---" * (len(keys) + 1) + "|")
    for name, per_run in table.items():
        means = [np.nanmean([r[k] for r in per_run.values()]) for k in keys]
        print(f"| {name} | " + " | ".join(f"{100 * m:.1f}" for m in means) + " |")
    if args.json:
        args.json.write_text(json.dumps(table, indent=1, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
