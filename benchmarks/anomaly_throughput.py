"""How many training anomalies per second prn makes on this machine.

Measures EA, HEA and HOA separately (one process, object and texture categories), then whole
2:1:1 batches through a DataLoader with 0 and 2 workers. Synthetic inputs (procedural textures,
textured disks as objects) so it runs anywhere, offline.

    python benchmarks/anomaly_throughput.py --size 256 --samples 40 --batch-size 16 --batches 6
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch
from torch.utils.data import DataLoader

from prn.anomalies.compose import AnomalyGenerator, BalancedBatchSampler, TrainingSet
from prn.anomalies.textures import procedural_texture
from prn.config import PRNConfig


def synthetic_object(size: int, rng: np.random.Generator) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size]
    cy, cx = size / 2 + rng.normal(0, size / 20, 2)
    disk = np.hypot(yy - cy, xx - cx) < size * rng.uniform(0.25, 0.4)
    image = rng.integers(0, 30, (size, size, 3)).astype(np.uint8)
    image[disk] = 80 + procedural_texture(size, rng)[disk] // 2
    return image


def synthetic_seen(normals: list[np.ndarray], rng: np.random.Generator) -> list[tuple[np.ndarray, np.ndarray]]:
    """Seen anomalies: a normal image with a random elliptic blotch of another colour."""
    seen = []
    size = normals[0].shape[0]
    yy, xx = np.mgrid[0:size, 0:size]
    for image in normals[:5]:
        cy, cx = rng.uniform(0.35, 0.65, 2) * size
        ry, rx = rng.uniform(0.03, 0.12, 2) * size
        mask = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1
        image = image.copy()
        image[mask] = rng.integers(0, 256, 3)
        seen.append((image, mask))
    return seen


def per_strategy(cfg: PRNConfig, normals, seen, kind: str, samples: int) -> dict[str, float]:
    gen = AnomalyGenerator(cfg, seen, kind)
    foregrounds = [gen.foreground(n) for n in normals]  # TrainingSet caches these per image
    rates = {}
    for strategy in gen.strategies:
        t0 = time.perf_counter()
        for s in range(samples):
            i = s % len(normals)
            gen.make(strategy, normals[i], np.random.default_rng(s), foregrounds[i])
        rates[strategy] = samples / (time.perf_counter() - t0)
    return rates


def batches(cfg: PRNConfig, normals, seen, workers: int, n_batches: int) -> float:
    data = TrainingSet(normals, AnomalyGenerator(cfg, seen, "object"), cfg)
    sampler = BalancedBatchSampler(len(normals), cfg, seed=0, epoch=0, steps=n_batches)
    loader = DataLoader(data, batch_sampler=sampler, num_workers=workers)
    t0 = time.perf_counter()
    n = sum(len(b["kind"]) for b in loader)
    return n / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--samples", type=int, default=40, help="samples per strategy")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--batches", type=int, default=6)
    parser.add_argument("--normals", type=int, default=16)
    args = parser.parse_args()

    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    cfg = PRNConfig(image_size=args.size, batch_size=args.batch_size)
    objects = [synthetic_object(args.size, rng) for _ in range(args.normals)]
    textures = [procedural_texture(args.size, rng) for _ in range(args.normals)]
    print(f"{args.size}x{args.size} px, {os.cpu_count()} CPUs, torch threads 1")
    for kind, normals in (("object", objects), ("texture", textures)):
        rates = per_strategy(cfg, normals, synthetic_seen(normals, rng), kind, args.samples)
        print(f"{kind:8s} " + "  ".join(f"{k}: {v:6.1f}/s" for k, v in rates.items()))
    seen = synthetic_seen(objects, rng)
    for workers in (0, 2):
        rate = batches(cfg, objects, seen, workers, args.batches)
        print(f"2:1:1 batches of {args.batch_size} (object), {workers} workers: {rate:6.1f} samples/s "
              f"({rate / args.batch_size:.2f} batches/s; half the samples are normal)")


if __name__ == "__main__":
    main()
