"""The GPU check: what a session lent a GPU runs, in under 8 minutes, into one JSON file.

    bash benchmarks/gpu_check.sh                        # $OUT/gpu_check.json (OUT=gpu_check)
    python benchmarks/gpu_check.py --cpu --out x.json   # the same parts on the CPU, tiny sizes

Parts, each timed and recorded even when it fails (one failure does not hide the others):

1. ``environment``: torch, CUDA, the GPUs and their memory;
2. ``cuda_tests``: ``pytest tests/test_cuda.py`` (CUDA maps equal CPU maps; fit, test and
   predict on CUDA in 32, bf16 and 16), its summary line and exit status;
3. ``throughput``: benchmarks/throughput.py, ResNet-18 (random weights) at 256 x 256: training
   images/s in float32 and bf16 at batch 64, inference images/s at batch 1, 16 and 64, and the
   peak GPU memory of each;
4. ``ddp``: the demo data trained by one process and by two (``torchrun -m prn fit``; with one
   GPU both ranks share it and talk over gloo), the training images/s of each from its
   metrics.csv, and the largest difference between their trained weights (SyncBatchNorm on CUDA
   makes the two the same computation up to float rounding and non-deterministic kernels);
5. ``fit_precisions``: the same demo fitted by one process in float32 and in bf16, the wall
   seconds and the seconds of each phase of both (timings.json).

``--cpu`` runs every part on the CPU at tiny sizes (the CUDA tests then skip), so this script is
checked where no GPU is (tests/test_gpu_check.py); its figures mean nothing.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

import throughput  # noqa: E402  (benchmarks/throughput.py)

# The sizes of the real check and of the --cpu dry run.
FULL = dict(device="cuda", backbone="resnet18", size=256, train_batch=64, train_steps=5,
            infer_batches=[1, 16, 64], infer_repeats=5, precisions=["32", "bf16"],
            ddp=dict(image_size=256, batch_size=64, epochs=2, steps_per_epoch=10, n_train=64))
DRY = dict(device="cpu", backbone="tf_efficientnet_lite0", size=64, train_batch=4, train_steps=1,
           infer_batches=[1, 4], infer_repeats=1, precisions=["32", "bf16"],
           ddp=dict(image_size=64, batch_size=8, epochs=1, steps_per_epoch=2, n_train=12,
                    decoder_channels=[16, 16, 8, 8], attention_dim=8, kmeans_max_iter=20, num_workers=0))


def part(report: dict, name: str, fn, *args) -> None:
    """Run one part into report[name]: its result, seconds, and the error if it failed."""
    t0 = time.perf_counter()
    try:
        report[name] = {"ok": True, **fn(*args)}
    except Exception as exc:  # noqa: BLE001 (a failed part is recorded, the others still run)
        report[name] = {"ok": False, "error": f"{type(exc).__name__}: {exc}",
                        "traceback": traceback.format_exc()[-3000:]}
    report[name]["seconds"] = round(time.perf_counter() - t0, 1)
    print(f"[gpu_check] {name}: {'ok' if report[name]['ok'] else 'FAILED ' + report[name]['error']} "
          f"({report[name]['seconds']} s)", flush=True)


def environment() -> dict:
    gpus = [{"name": torch.cuda.get_device_name(i),
             "memory_gb": round(torch.cuda.get_device_properties(i).total_memory / 2**30, 1)}
            for i in range(torch.cuda.device_count())]
    return {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if torch.cuda.is_available() else None,
            "bf16_supported": torch.cuda.is_available() and torch.cuda.is_bf16_supported(),
            "gpus": gpus, "cpus": os.cpu_count()}


def cuda_tests(timeout: float) -> dict:
    done = subprocess.run([sys.executable, "-m", "pytest", "tests/test_cuda.py", "-q", "-p", "no:cacheprovider"],
                          cwd=REPO, capture_output=True, text=True, timeout=timeout)
    lines = done.stdout.strip().splitlines()
    if done.returncode not in (0, 5):  # 5: nothing collected
        raise RuntimeError(f"pytest exited {done.returncode}: {' | '.join(lines[-15:])}")
    return {"returncode": done.returncode, "summary": lines[-1] if lines else "", "tail": lines[-15:]}


def run_throughput(sizes: dict) -> dict:
    return throughput.measure(sizes["device"], sizes["backbone"], sizes["size"], sizes["train_batch"],
                              sizes["train_steps"], sizes["infer_batches"], sizes["infer_repeats"],
                              sizes["precisions"])


def epoch_rates(run: Path, batch: int) -> list[float]:
    with (run / "metrics.csv").open() as f:
        return [round(int(r["steps"]) * batch / float(r["seconds"]), 2) for r in csv.DictReader(f)]


def demo_config(sizes: dict, work: Path):
    """The demo data in ``work/data`` and the check's config for it, saved as ``work/config.yaml``."""
    from prn.config import PRNConfig
    from prn.data.demo import make_demo_dataset

    d = dict(sizes["ddp"])
    n_train = d.pop("n_train")
    if not (work / "data").is_dir():  # made once, for every part that fits it
        make_demo_dataset(work / "data", seed=0, n_train=n_train, n_test_good=4, n_test_defect=6,
                          size=max(64, d["image_size"]))
    cfg = PRNConfig(dataset="demo", root=str(work / "data"), category="demo", backbone=sizes["backbone"],
                    backbone_weights="random", seen_anomalies=3, device=sizes["device"], output_dir=str(work),
                    **d)
    cfg.save(work / "config.yaml")
    return cfg


def config_summary(cfg) -> dict:
    """What a fitting part's report says of the config it fitted."""
    return {k: cfg.flat()[k] for k in ("backbone", "image_size", "batch_size", "epochs", "steps_per_epoch", "device")}


def fit_once(launcher: list[str], work: Path, run: Path, batch: int, timeout: float, *extra: str) -> dict:
    """``prn fit`` of work/config.yaml into ``run``: its wall seconds, training images/s per epoch
    and the seconds of each phase (timings.json)."""
    t0 = time.perf_counter()
    done = subprocess.run([*launcher, "fit", "--config", str(work / "config.yaml"), "--run-dir", str(run),
                           "--quiet", *extra], cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, PRN_DIST_TIMEOUT="120"))
    if done.returncode:
        raise RuntimeError(f"{run.name} exited {done.returncode}: {done.stderr[-2000:]}")
    return {"wall_seconds": round(time.perf_counter() - t0, 1),
            "train_images_per_s_by_epoch": epoch_rates(run, batch),
            "phases_seconds": json.loads((run / "timings.json").read_text()).get("fit_phases_seconds")}


def fit_precisions(sizes: dict, work: Path, timeout: float) -> dict:
    """The demo fitted by one process in float32 and in bf16: wall and phases of each (a bf16 fit
    of a real set on one H100 was much slower than float32's outside its training steps)."""
    cfg = demo_config(sizes, work)
    out = {"config": config_summary(cfg)}
    for precision in ("32", "bf16"):
        out[precision] = fit_once([sys.executable, "-m", "prn"], work, work / f"fit_{precision}",
                                  cfg.training.batch_size, timeout, "--precision", precision)
    return out


def ddp(sizes: dict, work: Path, timeout: float) -> dict:
    """One process, then two (torchrun), on the demo data with the same config and global batch."""
    from prn.checkpoint import load_checkpoint

    cfg = demo_config(sizes, work)
    out = {"config": config_summary(cfg)}
    commands = {"one_process": [sys.executable, "-m", "prn"],
                "two_processes": [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                  "--nproc_per_node", "2", "-m", "prn"]}
    for name, launcher in commands.items():
        out[name] = fit_once(launcher, work, work / name, cfg.training.batch_size, timeout)
    a = load_checkpoint(work / "one_process" / "checkpoints" / "last.pt")["state_dict"]
    b = load_checkpoint(work / "two_processes" / "checkpoints" / "last.pt")["state_dict"]
    from prn.model.network import trained_weight_keys
    head = trained_weight_keys(a)  # the trained head: what DDP and one process should agree on
    out["max_abs_weight_difference"] = max((a[k].float() - b[k].float()).abs().max().item() for k in head)
    out["max_abs_weight"] = max(a[k].float().abs().max().item() for k in head)
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cpu", action="store_true", help="dry run on the CPU at tiny sizes")
    ap.add_argument("--out", type=Path, default=Path("gpu_check") / "gpu_check.json")
    ap.add_argument("--skip", nargs="*", default=[], choices=("cuda_tests", "throughput", "ddp", "fit_precisions"))
    args = ap.parse_args(argv)
    sizes = DRY if args.cpu else FULL
    if not args.cpu and not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device here; use --cpu for the dry run")
    report: dict = {"mode": "cpu dry run (figures mean nothing)" if args.cpu else "gpu",
                    "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    part(report, "environment", environment)
    if "cuda_tests" not in args.skip:
        part(report, "cuda_tests", cuda_tests, 180)
    if "throughput" not in args.skip:
        part(report, "throughput", run_throughput, sizes)
    with tempfile.TemporaryDirectory(prefix="prn_gpu_check_") as work:  # one demo set for both
        if "ddp" not in args.skip:
            part(report, "ddp", ddp, sizes, Path(work), 150)
        if "fit_precisions" not in args.skip:
            part(report, "fit_precisions", fit_precisions, sizes, Path(work), 150)
    if torch.cuda.is_available():
        report["peak_gpu_memory_mb_this_process"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"[gpu_check] wrote {args.out}")
    if "throughput" in report and report["throughput"]["ok"]:
        print(throughput.markdown(report["throughput"]))
    return report


if __name__ == "__main__":
    main()
