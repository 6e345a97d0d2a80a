"""Images/s of an exported model: onnxruntime (CPU) beside torch, batch 1 and 16.

    python benchmarks/onnx_speed.py                    # the cpu preset's shape: Lite0, 384 x 160
    python benchmarks/onnx_speed.py --repeats 10 --batches 1 16 64

The model is the `cpu` preset's (tf_efficientnet_lite0, input 384 x 160 as KolektorSDD's, one
attention stack of three blocks per scale) with random weights and 30 random prototypes per
scale (speed does not depend on their values), exported by ``prn.deploy.export`` with a
calibration, so every output is computed. Each backend runs the same whole graph on the same
uint8 batch at the input size (the in-graph resize is then the identity):

- torch: ``prn.pipeline.InferencePipeline`` in eager mode, under ``torch.no_grad``, as prn runs it;
- TorchScript: the traced file;
- onnxruntime: the ONNX file, CPUExecutionProvider, default graph optimisations.

Backends take turns (torch, TorchScript, onnxruntime, torch, ...) so they see the same load;
the fastest of ``--repeats`` passes is kept (the least disturbed on a shared machine), the
median shown beside it. Threads: torch and onnxruntime both use ``--threads`` (default: every
core); onnxruntime's threads do not spin-wait between runs (they would take the cores from the
next backend). Results go to benchmarks/results/onnx_speed.json and print as a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from prn.checkpoint import save_checkpoint
from prn.config import PRNConfig
from prn.presets import PRESETS
from prn.deploy.export import export
from prn.model.network import PRN
from prn.pipeline import InferencePipeline

RESULTS = Path(__file__).resolve().parent / "results" / "onnx_speed.json"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def build_checkpoint(path: Path, hw: tuple[int, int], prototypes: int) -> PRNConfig:
    cfg = PRNConfig(**{**PRESETS["cpu"], "image_hw": hw, "backbone_weights": "random", "device": "cpu"})
    torch.manual_seed(0)
    model = PRN.from_config(cfg.model).eval()
    # random prototypes of the right shapes: what k-means would give, minus the minutes
    with torch.no_grad():
        feats = model.encoder(torch.rand(1, 3, *hw))
    model.prototypes.set([torch.randn(prototypes, *f.shape[1:]) for f in feats])
    calibration = {"image_threshold": 0.5, "pixel_threshold": 0.5, "target_fpr": 0.01,
                   "pixel_target_fpr": 0.001, "score_min": 0.0, "score_max": 1.0, "pixel_min": 0.0,
                   "pixel_max": 1.0, "n_normal": 0, "n_anomalous": 0, "source": "benchmark (random)"}
    save_checkpoint(path, model="prn", config=cfg.to_dict(), state_dict=model.state_dict(),
                    calibration=calibration)
    return cfg


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--height", type=int, default=384)
    ap.add_argument("--width", type=int, default=160)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--prototypes", type=int, default=30)
    args = ap.parse_args()
    import onnxruntime as ort

    torch.set_num_threads(args.threads)
    hw = (args.height, args.width)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "model.pt"
        build_checkpoint(ckpt, hw, args.prototypes)
        t0 = time.perf_counter()
        onnx_path = export(ckpt, "onnx", Path(tmp) / "model.onnx")
        onnx_export_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        ts_path = export(ckpt, "torchscript", Path(tmp) / "model.torchscript.pt")
        ts_export_s = time.perf_counter() - t0
        from prn.deploy.export import build_graph
        from prn.deploy.loading import load_model
        graph: InferencePipeline = build_graph(load_model(ckpt, device="cpu"))
        traced = torch.jit.load(str(ts_path), map_location="cpu")
        options = ort.SessionOptions()
        options.intra_op_num_threads = args.threads
        # onnxruntime's threads spin for a while after each run by default; the backends take
        # turns, so spinning threads would take the cores from the next backend's run.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
        onnx_mb = onnx_path.stat().st_size / 2**20

        rows = []
        for b in args.batches:
            x = torch.randint(0, 256, (b, 3, *hw), dtype=torch.uint8, generator=torch.Generator().manual_seed(b))
            xn = x.numpy()
            runners = {
                "torch": lambda: graph(x),
                "torchscript": lambda: traced(x),
                "onnxruntime": lambda: session.run(None, {"images": xn}),
            }
            times = {k: [] for k in runners}
            with torch.no_grad():
                for fn in runners.values():  # warm-up: first-call allocations, ORT's arena
                    fn()
                for _ in range(args.repeats):
                    for name, fn in runners.items():
                        t = time.perf_counter()
                        fn()
                        times[name].append(time.perf_counter() - t)
                want = graph(x)["anomaly_map"].numpy()
            got = session.run(["anomaly_map"], {"images": xn})[0]
            row = {"batch": b, "max_map_diff_onnx_vs_torch": float(np.abs(got - want).max())}
            for name, ts in times.items():
                row[name] = {"images_per_s_best": b / min(ts), "images_per_s_median": b / statistics.median(ts)}
            rows.append(row)
    load_after = os.getloadavg()
    result = {
        "machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "threads": args.threads,
                    "loadavg_before": load_before, "loadavg_after": load_after},
        "versions": {"torch": torch.__version__, "onnxruntime": ort.__version__},
        "model": {"preset": "cpu", "backbone": "tf_efficientnet_lite0", "input_hw": hw,
                  "prototypes_per_scale": args.prototypes, "onnx_mb": onnx_mb},
        "export_seconds": {"onnx": onnx_export_s, "torchscript": ts_export_s},
        "repeats": args.repeats, "rows": rows,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{result['machine']['cpu']}, {args.threads} threads, load average before "
          f"{load_before[0]:.2f}, after {load_after[0]:.2f}; export: ONNX {onnx_export_s:.0f} s "
          f"({onnx_mb:.1f} MB), TorchScript {ts_export_s:.0f} s\n")
    print("| batch | torch images/s | TorchScript images/s | onnxruntime images/s | onnxruntime / torch | max map diff |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        cells = [f"{r[k]['images_per_s_best']:.1f} ({r[k]['images_per_s_median']:.1f})"
                 for k in ("torch", "torchscript", "onnxruntime")]
        ratio = r["onnxruntime"]["images_per_s_best"] / r["torch"]["images_per_s_best"]
        print(f"| {r['batch']} | {' | '.join(cells)} | {ratio:.2f} | {r['max_map_diff_onnx_vs_torch']:.1e} |")


if __name__ == "__main__":
    main()
