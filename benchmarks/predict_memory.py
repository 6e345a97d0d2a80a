"""Peak memory and speed of `prn predict` as the number of images grows (it streams).

    python benchmarks/predict_memory.py                      # 1000 and 5000 images of 1250 x 500
    python benchmarks/predict_memory.py --counts 200 1000 --maps npy

A model of the cpu preset's shape (EfficientNet-Lite0, long side 384 with the aspect kept, so
384 x 160 for these images) is built with ImageNet encoder weights, prototypes from 20 of the
images and an untrained head, then calibrated on 8 of them: speed and memory do not depend on
the head's values. Images are smooth random JPEGs written once to a temporary folder (5,000 of
1250 x 500 take about 0.3 GB). Each count runs `prn predict` in its own process; its peak RSS is
that process's ru_maxrss (os.wait4), in MiB. Results: a markdown table on stdout and
benchmarks/results/predict_memory_<maps>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

RESULTS = Path(__file__).resolve().parent / "results" / "predict_memory_{maps}.json"


def make_images(folder: Path, n: int, hw=(500, 1250), seed: int = 0) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    g = np.random.default_rng(seed)
    small = g.integers(0, 256, (20, 50, 3), dtype=np.uint8)  # smooth after upscaling, like a photo
    base = np.array(Image.fromarray(small).resize((hw[1], hw[0]), Image.Resampling.BICUBIC))
    paths = []
    for i in range(n):
        path = folder / f"{i:05d}.jpg"
        if not path.exists():
            shift = np.roll(base, i * 7, axis=1)
            Image.fromarray(shift).save(path, quality=90)
        paths.append(path)
    return paths


def make_checkpoint(path: Path, images: list[Path]) -> Path:
    import torch
    from prn.checkpoint import save_checkpoint
    from prn.config import PRNConfig
    from prn.presets import PRESETS
    from prn.preprocess import resize_image, to_tensor
    from prn.data.io import read_image
    from prn.deploy.calibrate import calibrate
    from prn.model.network import PRN

    cfg = PRNConfig(**PRESETS["cpu"], image_hw=(160, 384), device="cpu")
    model = PRN.from_config(cfg.model).eval()
    batch = torch.stack([to_tensor(resize_image(read_image(p), cfg.model.input_hw)) for p in images[:20]])
    model.fit_prototypes([batch])
    with torch.no_grad():
        out = model(batch[:8])
    cal = calibrate(out["pred_score"].double().numpy(), out["anomaly_map"][:, 0].numpy(),
                    target_fpr=cfg.calibration.target_fpr, pixel_target_fpr=cfg.calibration.pixel_target_fpr)
    return save_checkpoint(path, model="prn", config=cfg.to_dict(), state_dict=model.state_dict(),
                           calibration=cal)


def run_predict(ckpt: Path, folder: Path, out: Path, maps: str) -> dict:
    # as a user runs it: `python -m prn` is the `prn` command (its allocator, its exit)
    cmd = [sys.executable, "-m", "prn", "predict", str(ckpt), str(folder), "--out", str(out), "--maps", maps,
           "--quiet"]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t0
    stdout, stderr = proc.stdout.read().decode(), proc.stderr.read().decode()
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"prn predict failed: {stderr}")
    rows = sum(1 for _ in open(out / "scores.csv")) - 1
    return {"seconds": seconds, "peak_rss_mb": usage.ru_maxrss / 1024, "rows": rows,
            "images_per_second": rows / seconds, "summary": stdout.strip().splitlines()[0]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--counts", type=int, nargs="+", default=[1000, 5000])
    ap.add_argument("--maps", choices=("npy", "png", "none"), default="none",
                    help="maps to write (npy for 5,000 images of 1250 x 500 is 12.5 GB)")
    ap.add_argument("--work", type=Path, help="folder for images and outputs (default: a temp folder)")
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="prn_predict_memory_"))
    images = make_images(work / "all", max(args.counts))
    ckpt = make_checkpoint(work / "model.pt", images)
    rows = []
    for n in args.counts:
        folder = work / f"in_{n}"
        folder.mkdir(exist_ok=True)
        for p in images[:n]:  # links, so each count is its own folder without copying
            if not (folder / p.name).exists():
                os.symlink(p, folder / p.name)
        result = run_predict(ckpt, folder, work / f"out_{n}", args.maps)
        rows.append({"images": n, "maps": args.maps, **result})
        print(f"{n} images: peak RSS {result['peak_rss_mb']:.0f} MB, {result['images_per_second']:.1f} images/s",
              flush=True)
    print("\n| images | maps | peak RSS (MB) | seconds | images/s |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['images']} | {r['maps']} | {r['peak_rss_mb']:.0f} | {r['seconds']:.0f} | {r['images_per_second']:.1f} |")
    results = Path(str(RESULTS).format(maps=args.maps))
    results.parent.mkdir(exist_ok=True)
    results.write_text(json.dumps({"machine": platform.platform(), "cpus": os.cpu_count(),
                                   "load_average": os.getloadavg(), "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
