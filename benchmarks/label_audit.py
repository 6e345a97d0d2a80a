"""Are the highest-scoring "good" test images good? A blind look, for a human.

A test image labelled good that the model ranks above most defects is either the model's error
or the dataset's (BSData's README: "defect-free" means "not annotated"). Looking only at those
images would find what one looks for, so this puts them beside as many good test images drawn at
random, crops each around its map's peak (in the original image's pixels), and shuffles them into
one numbered sheet. The person judging sees numbers only; the key stays in a file until they have
written their judgments.

    python benchmarks/label_audit.py sheet RUN OUT [--top 10] [--random 10] [--seed 0]
        -> OUT/sheet.png (numbered crops), OUT/key.json (which number is which: do not open yet)
    (write OUT/judged.txt: one line per number, "3 yes", "7 no", "12 unsure": a defect visible?)
    python benchmarks/label_audit.py reveal OUT [--scores RUN/predictions/scores.csv]
        -> how many of each group were judged defective, and the run's image AUROC with the goods
           judged defective left out (a sensitivity figure, never a result)

The crops come from the run's own model and predictions (``predictions/scores.csv`` of
``prn test``); nothing is trained or chosen here.
"""

from __future__ import annotations

import argparse
import csv
import json
import random
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from prn.data.split import Split
from prn.deploy.loading import load_model
from prn.infer import predict_samples
from prn.metrics import image_auroc

CROP = 200  # side of the crop, original pixels
SHOWN = 300  # side of a crop on the sheet
COLUMNS = 5
ANSWERS = ("yes", "unsure", "no")


def read_scores(path: Path) -> list[dict]:
    rows = list(csv.DictReader(path.open()))
    if not rows or "label" not in rows[0]:
        raise SystemExit(f"{path}: needs the labelled scores.csv that `prn test` writes")
    return rows


def sample_of(samples: list, path: str):
    """The sample scores.csv's ``path`` names: a path under the data root (file names repeat
    across folders, e.g. MVTec's 000.png), or absolute."""
    for s in samples:
        posix = s.image_path.as_posix()
        if posix == path or posix.endswith("/" + path):
            return s
    raise SystemExit(f"{path}: in scores.csv but not among the split's good test images")


def sheet(run: Path, out: Path, top: int, n_random: int, seed: int) -> None:
    rows = read_scores(run / "predictions" / "scores.csv")
    goods = sorted((r for r in rows if r["label"] == "0"), key=lambda r: -float(r["score"]))
    if len(goods) < top + n_random:
        raise SystemExit(f"{run}: {len(goods)} good test images, fewer than --top + --random")
    picked = [(r, "top") for r in goods[:top]]
    picked += [(r, "random") for r in random.Random(seed).sample(goods[top:], n_random)]
    random.Random(seed + 1).shuffle(picked)
    loaded = load_model(run, device="cpu")
    test_goods = [s for s in Split.load(run / "split.json").test if s.label == 0]
    samples = [sample_of(test_goods, r["path"]) for r, _ in picked]
    preds = predict_samples(loaded.model, samples, loaded.cfg.model.input_hw,
                            batch_size=loaded.cfg.runtime.eval_batch_size, precision=loaded.cfg.training.precision,
                            detail=loaded.cfg.model.detail)
    tiles, key = [], []
    for i, ((row, group), sample, amap) in enumerate(zip(picked, samples, preds.maps)):
        image = Image.open(sample.image_path).convert("RGB")
        y, x = np.unravel_index(int(amap.argmax()), amap.shape)
        cx, cy = (x + 0.5) * image.width / amap.shape[1], (y + 0.5) * image.height / amap.shape[0]
        box = [int(cx - CROP / 2), int(cy - CROP / 2), int(cx + CROP / 2), int(cy + CROP / 2)]
        tiles.append(image.crop(box))
        key.append({"number": i + 1, "path": row["path"], "group": group, "score": float(row["score"]),
                    "peak_xy": [round(cx), round(cy)]})
    out.mkdir(parents=True, exist_ok=True)
    numbered_sheet(tiles).save(out / "sheet.png")
    (out / "key.json").write_text(json.dumps({"run": str(run), "seed": seed, "crops": key}, indent=1) + "\n")
    print(f"{out / 'sheet.png'}: {len(key)} crops; write {out / 'judged.txt'} before opening key.json")


def numbered_sheet(crops: list[Image.Image]) -> Image.Image:
    """The crops enlarged to SHOWN x SHOWN, numbered 1, 2, ... in red, COLUMNS to a row."""
    board = Image.new("RGB", (COLUMNS * SHOWN, -(-len(crops) // COLUMNS) * SHOWN), "black")
    for i, crop in enumerate(crops):
        tile = crop.resize((SHOWN, SHOWN))
        ImageDraw.Draw(tile).text((6, 6), str(i + 1), fill=(255, 40, 40))
        board.paste(tile, ((i % COLUMNS) * SHOWN, (i // COLUMNS) * SHOWN))
    return board


def print_judgments(crops: list[dict], judged: dict[int, str], groups: tuple[str, ...]) -> None:
    """The markdown table of how many crops of each group were judged yes / unsure / no."""
    print("| group | crops | defect visible | unsure | none |\n|---|---|---|---|---|")
    for group in groups:
        answers = [judged[c["number"]] for c in crops if c["group"] == group]
        print(f"| {group} | {len(answers)} | " + " | ".join(str(answers.count(a)) for a in ANSWERS) + " |")


def read_judgments(path: Path, n: int) -> dict[int, str]:
    judged = {}
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        number, answer = line.split()[:2]
        if answer not in ANSWERS or not number.isdigit() or not 1 <= int(number) <= n:
            raise SystemExit(f"{path}: '{line}' is not 'NUMBER yes|no|unsure' with NUMBER in 1..{n}")
        judged[int(number)] = answer
    if len(judged) != n:
        raise SystemExit(f"{path}: {n - len(judged)} of the {n} crops are not judged")
    return judged


def reveal(out: Path, scores: Path | None) -> None:
    key = json.loads((out / "key.json").read_text())
    crops = key["crops"]
    judged = read_judgments(out / "judged.txt", len(crops))
    print_judgments(crops, judged, ("top", "random"))
    rows = read_scores(scores or Path(key["run"]) / "predictions" / "scores.csv")
    flagged = {Path(c["path"]).name for c in crops if judged[c["number"]] == "yes"}
    labels = np.array([int(r["label"]) for r in rows])
    values = np.array([float(r["score"]) for r in rows])
    kept = np.array([Path(r["path"]).name not in flagged for r in rows])
    print(f"image AUROC {100 * image_auroc(labels, values):.2f}; without the {len(flagged)} goods judged "
          f"defective {100 * image_auroc(labels[kept], values[kept]):.2f} (sensitivity only)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
    s = sub.add_parser("sheet")
    s.add_argument("run", type=Path)
    s.add_argument("out", type=Path)
    s.add_argument("--top", type=int, default=10)
    s.add_argument("--random", type=int, default=10)
    s.add_argument("--seed", type=int, default=0)
    r = sub.add_parser("reveal")
    r.add_argument("out", type=Path)
    r.add_argument("--scores", type=Path)
    args = ap.parse_args()
    if args.command == "sheet":
        sheet(args.run, args.out, args.top, args.random, args.seed)
    else:
        reveal(args.out, args.scores)


if __name__ == "__main__":
    main()
