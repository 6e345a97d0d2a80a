"""Speed of PRN's forward pass against its encoder alone, and of prototype k-means.

    python benchmarks/speed.py                     # 256 x 256, batch 16, both backbones, CPU
    python benchmarks/speed.py --device cuda --backbones resnet18

For each backbone, the encoder alone and the full model (eval mode, torch.no_grad) run on one
batch. Reported per model: GFLOPs per image (torch.utils.flop_counter.FlopCounterMode,
multiply-add = 2 FLOPs); images/s from ``--repeats`` passes of each, taken in turn (encoder,
PRN, encoder, ...) so both see the same load, keeping the fastest (the least disturbed by other
processes on a shared machine); achieved GFLOP/s; and peak memory, from one cold pass in a fresh
process: on CPU the resident set size sampled every 5 ms minus its size just before (what the
forward allocates, model and input excluded), on CUDA torch.cuda.max_memory_allocated likewise.

Weights are random ("random" backbone weights, randomly filled prototypes): speed does not depend
on their values. Prototype k-means is timed on random features of the right shapes for
``--normals`` images (K = ceil(cfg.model.prototype_ratio * normals)); random features have no cluster
structure, so k-means may run more iterations than on real features. Results are printed as a
markdown table and written to benchmarks/results/speed.json.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import threading
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from prn.config import PRNConfig
from prn.model.backbone import create_encoder
from prn.model.network import PRN
from prn.model.prototypes import kmeans_prototypes, num_prototypes

RESULTS = Path(__file__).resolve().parent / "results" / "speed.json"


def _cpu_sdpa_flops(q_shape, k_shape, v_shape, *args, **kwargs) -> int:
    return sdpa_flop_count(q_shape, k_shape, v_shape)


# FlopCounterMode knows the CUDA attention kernels but not the CPU one that SDPA dispatches to.
CUSTOM_FLOPS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops}


def rss_bytes() -> int:
    try:
        import psutil
        return psutil.Process().memory_info().rss
    except ImportError:  # Linux without psutil: resident pages from /proc
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Samples the resident set size in a thread; ``peak - base`` is what the block added."""

    def __init__(self, period: float = 0.005):
        self.period = period

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(self.period)

    def __enter__(self) -> "PeakRSS":
        self.base = self.peak = rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build(name: str, size: int, k: int, device: torch.device) -> PRN:
    torch.manual_seed(0)
    cfg = PRNConfig(backbone=name, backbone_weights="random", image_size=size)
    model = PRN(create_encoder(name, "random"), cfg.model).to(device).eval()
    g = torch.Generator().manual_seed(cfg.training.seed)
    shapes = [(k, c, size // r, size // r) for c, r in zip(model.encoder.channels, model.encoder.reductions)]
    model.prototypes.set([torch.rand(s, generator=g) for s in shapes])
    return model


def parts(model: PRN, x: torch.Tensor) -> dict:
    # The encoder alone runs in the same channels_last layout that PRN gives it.
    return {"encoder": (model.encoder, x.contiguous(memory_format=torch.channels_last)), "prn": (model, x)}


@torch.no_grad()
def memory_case(name: str, part: str, size: int, batch: int, k: int, device: str) -> float:
    """MB that one cold forward pass allocates, model and input excluded."""
    device = torch.device(device)
    net, x = parts(build(name, size, k, device), torch.rand(batch, 3, size, size, device=device))[part]
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        net(x)
        sync(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    with PeakRSS() as rss:
        net(x)
    return (rss.peak - rss.base) / 2**20


@torch.no_grad()
def speed_case(name: str, size: int, batch: int, repeats: int, k: int, device: str) -> dict:
    """FLOPs, then encoder and PRN passes taken in turn, so both see the same machine load."""
    device = torch.device(device)
    model = build(name, size, k, device)
    cases = parts(model, torch.rand(batch, 3, size, size, device=device))
    out = {}
    for label, (net, x) in cases.items():
        with FlopCounterMode(display=False, custom_mapping=CUSTOM_FLOPS) as counter:
            net(x)
        out[label] = {"gflops_per_image": counter.get_total_flops() / batch / 1e9, "best": float("inf")}
    for _ in range(repeats):
        for label, (net, x) in cases.items():
            sync(device)
            t0 = time.perf_counter()
            net(x)
            sync(device)
            out[label]["best"] = min(out[label]["best"], time.perf_counter() - t0)
    for m in out.values():
        best = m.pop("best")
        ips = batch / best
        # rounded to 3 significant digits: a tiny input on a busy machine achieves well under 0.1
        # GFLOP/s, and the ratio of two rounded-to-zero rates is undefined
        m.update(gflops_per_image=float(f"{m['gflops_per_image']:.3g}"), images_per_s=round(ips, 2),
                 achieved_gflop_s=float(f"{m['gflops_per_image'] * ips:.3g}"), seconds_per_batch=round(best, 3))
    out["trainable_params_m"] = round(sum(p.numel() for p in model.trainable_parameters()) / 1e6, 2)
    return out


def in_fresh_process(fn, *args):
    # A new process per measurement, so memory freed by an earlier model cannot hide this one's.
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(fn, args)


def time_kmeans(cfg: PRNConfig, channels: list[int], reductions: list[int], size: int, normals: int) -> dict:
    g = torch.Generator().manual_seed(cfg.training.seed)
    k = num_prototypes(normals, cfg.model.prototype_ratio)
    t0 = time.perf_counter()
    for c, r in zip(channels, reductions):
        feats = torch.rand((normals, c, size // r, size // r), generator=g)
        kmeans_prototypes(feats, k, cfg.model.kmeans_max_iter, cfg.training.seed)
    return {"normals": normals, "k": k, "seconds": round(time.perf_counter() - t0, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--backbones", nargs="+", default=["resnet18", "tf_efficientnet_lite0"])
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=4)
    ap.add_argument("--normals", type=int, default=300, help="normal images for the k-means timing")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--no-kmeans", action="store_true")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()

    device = torch.device(args.device)
    rows = []
    for name in args.backbones:
        k = num_prototypes(args.normals, PRNConfig().model.prototype_ratio)
        row = {"backbone": name}
        row.update(in_fresh_process(speed_case, name, args.size, args.batch, args.repeats, k, args.device))
        for part in ("encoder", "prn"):
            mb = in_fresh_process(memory_case, name, part, args.size, args.batch, k, args.device)
            row[part]["peak_memory_mb"] = round(mb, 1)
        enc, full = row["encoder"], row["prn"]
        row["flops_ratio"] = round(full["gflops_per_image"] / enc["gflops_per_image"], 2)
        row["efficiency_ratio"] = round(full["achieved_gflop_s"] / enc["achieved_gflop_s"], 2)
        row["goals"] = {"flops_at_most_5x_encoder": row["flops_ratio"] <= 5,
                        "gflop_s_within_25pct_of_encoder": row["efficiency_ratio"] >= 0.75,
                        "at_least_4_images_per_s": full["images_per_s"] >= 4}
        if not args.no_kmeans:
            encoder = create_encoder(name, "random")
            row["kmeans"] = time_kmeans(PRNConfig(), encoder.channels, encoder.reductions, args.size, args.normals)
        rows.append(row)

    print(f"\n{args.size}x{args.size}, batch {args.batch}, {device}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; random weights\n")
    print("| backbone | model | GFLOPs/img | images/s | GFLOP/s | peak mem MB |")
    print("|---|---|---:|---:|---:|---:|")
    for r in rows:
        for label in ("encoder", "prn"):
            m = r[label]
            print(f"| {r['backbone']} | {label} | {m['gflops_per_image']:.2f} | {m['images_per_s']:.2f} | "
                  f"{m['achieved_gflop_s']:.1f} | {m['peak_memory_mb']:.0f} |")
    print()
    for r in rows:
        line = (f"{r['backbone']}: PRN/encoder FLOPs {r['flops_ratio']}x, GFLOP/s ratio "
                f"{r['efficiency_ratio']}, trainable params {r['trainable_params_m']} M")
        if "kmeans" in r:
            km = r["kmeans"]
            line += f"; k-means of {km['normals']} normals (K={km['k']}, 3 scales): {km['seconds']} s"
        print(line)
        print("  goals (set for ResNet-18): " + ", ".join(f"{k} {'met' if v else 'MISSED'}"
                                                       for k, v in r["goals"].items()))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"size": args.size, "batch": args.batch, "device": str(device), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
            "weights": "random", "prototypes": "random"}
    args.out.write_text(json.dumps({"setup": meta, "results": rows}, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
