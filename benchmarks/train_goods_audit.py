"""Are the good training images good? A cross-fitted audit (an experiment,
not a prn feature).

A model scores the images it trained on low whatever they show (it was taught to give them zero),
so unannotated defects among the good training images cannot be found by the run's own model. Here
the good training images of a run's split are cut in two halves; a model fitted on each half (the
run's config and the rest of its split: seen anomalies, held-out goods, test) scores the other half,
and an image at or above that model's calibrated threshold is flagged.

    python benchmarks/train_goods_audit.py halves RUN OUT [--set KEY=VALUE ...]
        -> OUT/half_A, OUT/half_B: two fits (with their own `prn test`), each on half the goods
    python benchmarks/train_goods_audit.py score OUT
        -> OUT/oof.json (every training good's out-of-fold score), OUT/flagged.txt (one path a line)
    python benchmarks/train_goods_audit.py sheet OUT [--random 6] [--seed 7]
        -> OUT/sheet.png: the flagged and as many unflagged goods at random, cropped around the
           map's peak and shuffled; OUT/key.json (do not open before writing OUT/judged.txt,
           "NUMBER yes|no|unsure" a line, as for label_audit.py)
    python benchmarks/train_goods_audit.py reveal OUT
    python benchmarks/train_goods_audit.py refit RUN OUT --drop OUT/flagged.txt [--set ...]
        -> a fit on all the training goods less those listed (a baseline: the same without --drop)

Nothing here changes a run; the refit's figures on the run's test split are a sensitivity figure
of one split, not a result.
"""

from __future__ import annotations

import argparse
import json
import random
from dataclasses import replace
from pathlib import Path

import numpy as np
from PIL import Image

from label_audit import CROP, numbered_sheet, print_judgments, read_judgments
from prn import api
from prn.config import PRNConfig
from prn.data.io import read_image
from prn.data.split import Split
from prn.deploy.predict import Predictor
from prn.settings import parse_sets

HALVES = ("A", "B")


def goods_of(run: Path) -> tuple[PRNConfig, Split, list]:
    split = Split.load(run / "split.json")
    return PRNConfig.load(run / "config.yaml"), split, sorted(split.train_normal, key=lambda s: s.image_path.as_posix())


def fit_on(cfg: PRNConfig, split: Split, goods: list, out: Path) -> None:
    print(f"{out}: fitting on {len(goods)} of the good training images", flush=True)
    run = api.fit(cfg, run_dir=out, split=replace(split, train_normal=goods), progress=False)
    api.test(run, progress=False, overlays=0)


def halves(run: Path, out: Path, sets: dict) -> None:
    cfg, split, goods = goods_of(run)
    cfg = cfg.replace(**sets)
    order = list(range(len(goods)))
    random.Random(0).shuffle(order)
    cut = len(goods) // 2
    for name, picked in zip(HALVES, (order[:cut], order[cut:])):
        fit_on(cfg, split, [goods[i] for i in sorted(picked)], out / f"half_{name}")


def score(out: Path) -> None:
    rows = []
    fitted = {h: {s.image_path.as_posix() for s in Split.load(out / f"half_{h}" / "split.json").train_normal}
              for h in HALVES}
    for model, other in (HALVES, HALVES[::-1]):
        predictor = Predictor(out / f"half_{model}")
        for path in sorted(fitted[other] - fitted[model]):
            value = float(predictor.scores([read_image(path)])[0])
            rows.append({"path": path, "model": model, "score": value, "threshold": predictor.threshold,
                         "above": value >= predictor.threshold})
        mine = [r for r in rows if r["model"] == model]
        print(f"model {model} (threshold {predictor.threshold:.4f}) scores {len(mine)} goods it did not "
              f"train on: {sum(r['above'] for r in mine)} at or above, largest {max(r['score'] for r in mine):.4f}")
    rows.sort(key=lambda r: -r["score"] / r["threshold"])
    (out / "oof.json").write_text(json.dumps(rows, indent=1) + "\n")
    (out / "flagged.txt").write_text("".join(r["path"] + "\n" for r in rows if r["above"]))
    print(f"{out / 'flagged.txt'}: {sum(r['above'] for r in rows)} of {len(rows)} flagged")


def sheet(out: Path, n_random: int, seed: int) -> None:
    rows = json.loads((out / "oof.json").read_text())
    rng = random.Random(seed)
    picked = [(r, "flagged") for r in rows if r["above"]]
    unflagged = [r for r in rows if not r["above"]]
    picked += [(r, "random") for r in rng.sample(unflagged, min(n_random, len(unflagged)))]
    rng.shuffle(picked)
    predictors = {h: Predictor(out / f"half_{h}") for h in HALVES}
    tiles, key = [], []
    for i, (row, group) in enumerate(picked):
        image = read_image(row["path"])
        amap = predictors[row["model"]].predict_arrays([image])[0]["map"]  # at the image's own size
        cy, cx = np.unravel_index(int(amap.argmax()), amap.shape)
        # the crop kept inside the photo, so that each tile is all image
        x0 = int(np.clip(cx - CROP // 2, 0, max(0, image.shape[1] - CROP)))
        y0 = int(np.clip(cy - CROP // 2, 0, max(0, image.shape[0] - CROP)))
        tiles.append(Image.fromarray(image[y0:y0 + CROP, x0:x0 + CROP]))
        key.append({"number": i + 1, "path": row["path"], "group": group, "score": row["score"]})
    numbered_sheet(tiles).save(out / "sheet.png")
    (out / "key.json").write_text(json.dumps({"seed": seed, "crops": key}, indent=1) + "\n")
    print(f"{out / 'sheet.png'}: {len(key)} crops; write {out / 'judged.txt'} before opening key.json")


def reveal(out: Path) -> None:
    crops = json.loads((out / "key.json").read_text())["crops"]
    print_judgments(crops, read_judgments(out / "judged.txt", len(crops)), ("flagged", "random"))


def refit(run: Path, out: Path, drop: Path | None, sets: dict) -> None:
    cfg, split, goods = goods_of(run)
    dropped = set() if drop is None else {line.strip() for line in drop.read_text().splitlines() if line.strip()}
    kept = [s for s in goods if s.image_path.as_posix() not in dropped]
    if len(goods) - len(kept) != len(dropped):
        raise SystemExit(f"{drop}: {len(dropped) - len(goods) + len(kept)} listed paths are not good training images of {run}")
    fit_on(cfg.replace(**sets), split, kept, out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
    for name in ("halves", "refit"):
        p = sub.add_parser(name)
        p.add_argument("run", type=Path)
        p.add_argument("out", type=Path)
        p.add_argument("--set", action="append", default=[], help="KEY=VALUE over the run's config")
        if name == "refit":
            p.add_argument("--drop", type=Path)
    for name in ("score", "sheet", "reveal"):
        p = sub.add_parser(name)
        p.add_argument("out", type=Path)
        if name == "sheet":
            p.add_argument("--random", type=int, default=6)
            p.add_argument("--seed", type=int, default=7)
    args = ap.parse_args()
    if args.command == "halves":
        halves(args.run, args.out, parse_sets(args.set))
    elif args.command == "refit":
        refit(args.run, args.out, args.drop, parse_sets(args.set))
    elif args.command == "score":
        score(args.out)
    elif args.command == "sheet":
        sheet(args.out, args.random, args.seed)
    else:
        reveal(args.out)


if __name__ == "__main__":
    main()
