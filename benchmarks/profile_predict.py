"""Where `prn predict` spends its time, and what it reaches end to end, per engine.

    python benchmarks/profile_predict.py RUN FOLDER                  # e.g. a cpu-preset run, KSDD images
    python benchmarks/profile_predict.py RUN FOLDER --images 200 --skip-e2e
    python benchmarks/profile_predict.py RUN FOLDER --cases torch:none:0 onnx:npy:1 --out OUT.json

Stages, each timed alone over the same images in the run's batches (median of --repeat): decode
(prn.data.io.read_image), resize to the model's input (the one pre-process), the encoder alone,
the whole model in torch, the exported graph in onnxruntime (made on first use), the map resized
back to the image (resize_map), the defect regions, and writing the map as .npy. End to end:
`prn predict` in its own process for each engine, with --maps none and npy, --workers 0 and 1:
images/s over the whole command (start-up included) and its peak memory: PSS of the process and
its decoding workers, polled, and the predicting process's own working peak RSS (VmHWM read before
the interpreter's shutdown, whose teardown of torch's libraries adds ~130 MB of RSS). The ratio of
PRN's forward to its encoder's images/s is printed too. Writes benchmarks/results/profile_predict.json.
Figures depend on the machine's load: say which when you quote them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

RESULTS = Path(__file__).resolve().parent / "results" / "profile_predict.json"


def timed(fn, repeat: int) -> float:
    """Median seconds of ``repeat`` calls after one warm-up."""
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def stages(run: Path, files: list[Path], repeat: int) -> dict[str, float]:
    """Seconds per image of each stage."""
    from prn.data.io import read_image
    from prn.deploy.engine import make_engine
    from prn.deploy.predict import Predictor
    from prn.postprocess import resize_map
    from prn.preprocess import scale

    predictor = Predictor(run, device="cpu")
    n, bs = len(files), predictor.batch_size
    images = [read_image(f, predictor.cfg.data.max_image_pixels) for f in files]
    resized = torch.stack([torch.from_numpy(predictor.resize(im)) for im in images])  # (N, H, W, 3), as engines take
    stacked = [resized[i:i + bs] for i in range(0, n, bs)]
    batches = [b.permute(0, 3, 1, 2).contiguous() for b in stacked]  # (B, 3, H, W) for the modules
    onnx = make_engine(predictor, "onnx")
    maps = predictor.forward(scale(batches[0]))[1]
    big = resize_map(maps[0], images[0].shape[:2])
    out = {
        "decode": timed(lambda: [read_image(f, predictor.cfg.data.max_image_pixels) for f in files], repeat) / n,
        "resize": timed(lambda: [predictor.resize(im) for im in images], repeat) / n,
    }
    with torch.no_grad():
        out["encoder"] = timed(lambda: [predictor.model.encoder(scale(b)) for b in batches], repeat) / n
    out["model torch"] = timed(lambda: [predictor.forward(scale(b)) for b in batches], repeat) / n
    out["model onnx"] = timed(lambda: [onnx(b) for b in stacked], repeat) / n
    out["map to image size"] = timed(lambda: resize_map(maps[0], images[0].shape[:2]), repeat)
    if predictor.pixel_threshold is not None:
        out["regions"] = timed(lambda: predictor.regions(big), repeat)
    with tempfile.TemporaryDirectory() as tmp:
        out["write .npy"] = timed(lambda: np.save(Path(tmp) / "m.npy", big), repeat)
    return out


# The `prn` command's own entry point, and at exit (atexit runs before the interpreter shuts down)
# the process's resident-size high-water mark on stderr: the shutdown's teardown of this torch
# build's libraries pages in another ~130 MB (`import torch` alone: 520 MB working, 647 MB by
# time -v), which os.wait4's ru_maxrss would count.
PREDICT_THEN_PEAK = """import atexit, sys
def peak():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            print("VmHWM_KiB", line.split()[1], file=sys.stderr)
atexit.register(peak)
from prn.cli import entry
entry()"""


def end_to_end(run: Path, folder: Path, engine: str, maps: str, workers: int, batch: int | None = None) -> dict:
    """`prn predict` in its own process; its peak memory with its decoding workers, polled every
    0.1 s as the sum of their proportional set sizes (PSS: pages a worker shares with the process
    that forked it are counted once; os.wait4's ru_maxrss would count the memory this process held
    when it forked, and a sum of RSS would count shared pages twice); and the predicting process's
    own peak resident size while it works (VmHWM before exit; Linux)."""
    import psutil
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-c", PREDICT_THEN_PEAK, "predict", str(run), str(folder), "--out", tmp, "--maps", maps,
               "--engine", engine, "--workers", str(workers), "--quiet"]
        cmd += ["--batch-size", str(batch)] if batch else []
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        root, peak = psutil.Process(proc.pid), 0
        while proc.poll() is None:
            try:
                tree = [root] + root.children(recursive=True)
                peak = max(peak, sum(p.memory_full_info().pss for p in tree))
            except psutil.Error:
                pass
            time.sleep(0.1)
        wall = time.perf_counter() - t0
        err = proc.stderr.read().decode()
        if proc.returncode:
            raise SystemExit(f"prn {' '.join(cmd[3:])} failed: {err[-2000:]}")
        n = sum(1 for _ in open(Path(tmp) / "scores.csv")) - 1
    hwm = [line.split()[1] for line in err.splitlines() if line.startswith("VmHWM_KiB")]
    return {"engine": engine, "maps": maps, "workers": workers, "batch": batch, "images": n, "seconds": wall,
            "images_per_second": n / wall, "peak_pss_mb": peak / 2**20,
            "peak_rss_mib": int(hwm[0]) / 1024 if hwm else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path)
    ap.add_argument("folder", type=Path, help="images to predict (every image under it)")
    ap.add_argument("--images", type=int, default=64, help="images for the per-stage timings")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--skip-e2e", action="store_true")
    ap.add_argument("--skip-stages", action="store_true")
    ap.add_argument("--cases", nargs="+", metavar="ENGINE:MAPS:WORKERS[:BATCH]",
                    help="end-to-end cases to run (default: torch and onnx x maps none and npy x workers 0 "
                         "and 1, at predict's default batch size)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    from prn.data.io import require_images
    files = require_images(args.folder, what="image folder")
    per_image, ratio = {}, float("nan")
    if not args.skip_stages:
        per_image = stages(args.run, files[:args.images], args.repeat)
        ratio = per_image["encoder"] / per_image["model torch"]
    print(f"torch threads {torch.get_num_threads()}, {platform.processor() or platform.machine()}, "
          f"load average {os.getloadavg()[0]:.1f}")
    print("| stage | ms per image |\n|---|---|")
    for k, v in per_image.items():
        print(f"| {k} | {1000 * v:.2f} |")
    print(f"PRN forward / encoder images/s (torch): {ratio:.2f}")
    rows = []
    if not args.skip_e2e:
        print("\n| engine | maps | workers | batch | images | s | images/s | peak PSS MB | working peak RSS MiB |\n"
              "|---|---|---|---|---|---|---|---|---|")
        cases = args.cases or [f"{e}:{m}:{w}" for e in ("torch", "onnx") for m in ("none", "npy") for w in (0, 1)]
        for case in cases:
            engine, maps, workers, *batch = case.split(":")
            r = end_to_end(args.run, args.folder, engine, maps, int(workers), int(batch[0]) if batch else None)
            rows.append(r)
            print(f"| {engine} | {maps} | {workers} | {r['batch'] or 'default'} | {r['images']} | {r['seconds']:.1f} | "
                  f"{r['images_per_second']:.1f} | {r['peak_pss_mb']:.0f} | {r['peak_rss_mib'] or 0:.0f} |", flush=True)
    args.out.parent.mkdir(exist_ok=True)
    args.out.write_text(json.dumps({"stages_seconds_per_image": per_image, "forward_over_encoder": ratio,
                                   "end_to_end": rows, "load_average": os.getloadavg(),
                                   "threads": torch.get_num_threads()}, indent=1) + "\n")


if __name__ == "__main__":
    main()
