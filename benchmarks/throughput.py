"""Training and inference images/s of PRN per precision (32, bf16, 16), on the CPU or CUDA.

    python benchmarks/throughput.py                                   # CPU: is bf16 faster here?
    python benchmarks/throughput.py --device cuda --backbone resnet18 --size 256 \\
        --train-batch 64 --infer-batches 1 16 64 --precisions 32 bf16 16

Training: the step of prn.train itself (``forward_loss`` under the precision's autocast, then
``optimizer_step``: backward, clipping, Adam) on one fixed batch of random images and masks, so
the figure is the model's, without anomaly synthesis or data loading. Inference: eval-mode
forward passes (maps and scores) under ``inference_autocast``. Images/s are the median of the
timed repeats after one warm-up; peak memory is torch.cuda.max_memory_allocated on CUDA (the
process's resident set is not comparable across precisions on the CPU, so none is given there).
Weights and prototypes are random: speed does not depend on their values. Writes JSON (--out).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from prn.config import PRNConfig
from prn.model.network import PRN
from prn.precision import PRECISIONS, check_precision, grad_scaler, inference_autocast
from prn import registry
from prn.train import forward_loss, make_optimizer, optimizer_step


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_model(backbone: str, size: int, device: torch.device, prototypes: int = 30) -> tuple[PRN, PRNConfig]:
    """PRN with random encoder weights and ``prototypes`` random prototypes per scale."""
    torch.manual_seed(0)
    cfg = PRNConfig(backbone=backbone, backbone_weights="random", image_size=size)
    model = registry.build("prn", cfg)
    shapes = [(prototypes, c, size // r, size // r) for c, r in zip(model.encoder.channels, model.encoder.reductions)]
    model.prototypes.set([torch.rand(s) for s in shapes])
    return model.to(device), cfg


def timed(fn, device: torch.device, repeats: int) -> list[float]:
    fn()  # warm-up: kernels chosen, caches and allocator filled
    seconds = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        seconds.append(time.perf_counter() - t0)
    return seconds


def train_throughput(model: PRN, cfg: PRNConfig, device: torch.device, precision: str, batch: int,
                     steps: int) -> dict:
    """Images/s of prn.train's step at ``precision``; peak CUDA memory of the step in MB."""
    check_precision(precision, device)
    cfg = cfg.replace(precision=precision)
    g = torch.Generator().manual_seed(0)
    h, w = cfg.model.input_hw
    images = torch.rand(batch, 3, h, w, generator=g).to(device)
    masks = (torch.rand(batch, 1, h, w, generator=g) > 0.97).float().to(device)
    optimizer = make_optimizer(model, cfg)
    scaler = grad_scaler(device, precision)
    model.train()

    def step():
        loss, _ = forward_loss(model, images, masks, cfg, device)
        optimizer_step(model, loss, optimizer, scaler, cfg)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds = timed(step, device, steps)
    out = {"precision": precision, "batch": batch, "steps": steps,
           "images_per_s": round(batch / statistics.median(seconds), 2)}
    if device.type == "cuda":
        out["peak_memory_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return out


@torch.no_grad()
def infer_throughput(model: PRN, device: torch.device, precision: str, batch: int, repeats: int,
                     size: tuple[int, int]) -> dict:
    """Images/s of eval-mode forward passes (map and score) at ``precision``."""
    model.eval()
    x = torch.rand(batch, 3, *size, generator=torch.Generator().manual_seed(1)).to(device)

    def forward():
        with inference_autocast(device, precision):
            out = model(x)
        assert out["pred_score"].dtype == torch.float32
        return out

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds = timed(forward, device, repeats)
    out = {"precision": precision, "batch": batch, "images_per_s": round(batch / statistics.median(seconds), 2)}
    if device.type == "cuda":
        out["peak_memory_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return out


def measure(device: str, backbone: str, size: int, train_batch: int, train_steps: int,
            infer_batches: list[int], infer_repeats: int, precisions: list[str]) -> dict:
    dev = torch.device(device)
    model, cfg = make_model(backbone, size, dev)
    result = {"setup": {"device": str(dev), "backbone": backbone, "size": size, "torch": torch.__version__,
                        "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
                        "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None,
                        "weights": "random"},
              "train": [], "infer": []}
    for precision in precisions:
        if precision == "16" and dev.type != "cuda":
            continue  # float16 training is CUDA only (prn.precision)
        start = {k: v.clone() for k, v in model.state_dict().items()}
        result["train"].append(train_throughput(model, cfg, dev, precision, train_batch, train_steps))
        model.load_state_dict(start)  # every precision starts from the same weights
        for batch in infer_batches:
            result["infer"].append(infer_throughput(model, dev, precision, batch, infer_repeats, cfg.model.input_hw))
    return result


def markdown(result: dict) -> str:
    s = result["setup"]
    lines = [f"{s['backbone']} {s['size']}x{s['size']}, {s['device']} ({s['gpu'] or s['cpu']}), "
             f"torch {s['torch']}, {s['threads']} threads; random weights", "",
             "| pass | precision | batch | images/s | peak MB |", "|---|---|---:|---:|---:|"]
    for kind in ("train", "infer"):
        for r in result[kind]:
            lines.append(f"| {kind} | {r['precision']} | {r['batch']} | {r['images_per_s']} | "
                         f"{r.get('peak_memory_mb', '')} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--backbone", default="tf_efficientnet_lite0")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--train-batch", type=int, default=16)
    ap.add_argument("--train-steps", type=int, default=3, help="timed steps after one warm-up")
    ap.add_argument("--infer-batches", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--infer-repeats", type=int, default=3)
    ap.add_argument("--precisions", nargs="+", choices=PRECISIONS, default=["32", "bf16"])
    ap.add_argument("--out", type=Path, help="write the results as JSON")
    args = ap.parse_args(argv)
    result = measure(args.device, args.backbone, args.size, args.train_batch, args.train_steps,
                     args.infer_batches, args.infer_repeats, args.precisions)
    print(markdown(result))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
