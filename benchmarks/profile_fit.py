"""Where a training step of `prn fit` spends its time (and what the fit holds in memory).

    python benchmarks/profile_fit.py --root ../shared/data/kolektorsdd [--steps 10] [--threads 2]

Builds the `cpu` preset's PRN at the dataset's input size (the aspect kept, long side 384) with
its real training set (the split's normal images and seen anomalies, anomaly synthesis as in
training) and times, over ``--steps`` steps of 16 images, each stage of a step in the main
process: making the batch (decode is done once before: the arrays are in memory; this is the
synthesis), the encoder, the prototype residuals, the rest of the network (fusion, attention,
decoder), the loss, backward, the optimiser step. Also times k-means on the normal images and one
validation pass, and reports the process's resident memory after each phase, its peak up to the
end of training (the allocator's share of it moves with glibc's settings, e.g.
MALLOC_MMAP_THRESHOLD_ in the environment), and what autograd saves for backward in one step, by
module. The figures are
those of one process with ``--threads`` threads; ``prn fit`` makes the batches in DataLoader
workers beside the model (the share "batch" then overlaps the rest). Like the ``prn`` command it
runs under tcmalloc where the machine has it (prn.allocator; ``PRN_ALLOCATOR=system`` for glibc's),
and says which.
"""

from __future__ import annotations

import argparse
import collections
import json
import resource
import time
from pathlib import Path

from prn import allocator

if __name__ == "__main__":  # before torch is loaded, as the prn command does
    allocator.reexec_for_command("profile_fit.py")

import numpy as np
import psutil
import torch

from prn import registry
from prn.anomalies.compose import AnomalyGenerator, BalancedBatchSampler, TrainingSet, is_gray
from prn.config import PRNConfig
from prn.data.datasets import load_training_arrays, load_validation
from prn.infer import validate
from prn.model.loss import prn_loss
from prn.preprocess import batches_of
from prn.precision import autocast
from prn.presets import PRESETS
from prn.runs import make_split, resolve_input_size
from prn.runtime import release_memory
from prn.train import make_optimizer


def rss_mb() -> float:
    return psutil.Process().memory_info().rss / 2**20


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def saved_for_backward(model, images, depth: int = 2) -> dict[str, float]:
    """MB of the tensors autograd keeps for backward in one forward pass, by the module (its first
    ``depth`` name parts) that saved them; each storage counted once."""
    stack, sizes, seen = [], collections.Counter(), set()
    hooks = []
    for name, module in model.named_modules():
        tag = ".".join(name.split(".")[:depth]) or "(model)"
        hooks.append(module.register_forward_pre_hook(lambda m, a, tag=tag: stack.append(tag) and None))
        hooks.append(module.register_forward_hook(lambda m, a, o: stack.pop() and None))

    def pack(t):
        storage = t.untyped_storage()
        key = (storage.data_ptr(), storage.nbytes())
        if key not in seen:
            seen.add(key)
            sizes[stack[-1] if stack else "(outside modules)"] += key[1] / 2**20
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(images)
    for h in hooks:
        h.remove()
    return dict(sizes.most_common())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from prn.settings import parse_field
    changes = {k: parse_field(k, v) for k, v in (s.split("=", 1) for s in args.set)}
    cfg = PRNConfig(dataset="mvtec", root=str(args.root), backbone_weights="imagenet", device="cpu",
                    **{**PRESETS["cpu"], **changes})
    memory = {"start": rss_mb()}
    t0 = time.perf_counter()
    split = make_split(cfg)
    cfg = resolve_input_size(cfg, split)
    normals, seen = load_training_arrays(cfg, split)
    load_s = time.perf_counter() - t0
    memory["arrays loaded"] = rss_mb()
    model = registry.build("prn", cfg)
    t0 = time.perf_counter()
    model.fit_prototypes(batches_of(normals, cfg.runtime.eval_batch_size), seed=0)
    kmeans_s = time.perf_counter() - t0
    memory["prototypes fitted"] = rss_mb()
    release_memory()  # as prn.train does after k-means
    memory["released"] = rss_mb()
    data = TrainingSet(normals, AnomalyGenerator(cfg, seen, cfg.data.resolved_category_kind,
                                                 gray=all(is_gray(n) for n in normals[:8])), cfg)
    sampler = iter(BalancedBatchSampler(len(normals), cfg, seed=0, epoch=0, steps=args.steps + 1))
    optimizer = make_optimizer(model, cfg)
    stages = {k: [] for k in ("batch", "encoder", "prototypes", "fusion+attention+decoder", "loss",
                              "backward", "optimizer")}
    model.train()
    cpu = torch.device("cpu")
    for step in range(args.steps + 1):
        t = [time.perf_counter()]
        items = [data[key] for key in next(sampler)]
        images = torch.stack([i["image"] for i in items]).contiguous(memory_format=torch.channels_last)
        masks = torch.stack([i["mask"] for i in items])
        t.append(time.perf_counter())
        with torch.no_grad(), autocast(cpu, cfg.training.precision):
            feats = model.encoder(images)
        t.append(time.perf_counter())
        with torch.no_grad():
            raw = model.prototypes.residuals([f.float() for f in feats])
        t.append(time.perf_counter())
        with autocast(cpu, cfg.training.precision):  # as prn.train.forward_loss runs the network
            maps = model.fuse_features(feats)
            res = model.fuse_residuals(raw)
            maps = model.fuse_attention(model.attention([torch.cat([m, r], 1) for m, r in zip(maps, res)]))
            logits = model.decoder(maps, images.shape[-2:])
        t.append(time.perf_counter())
        loss, _ = prn_loss(logits, masks, cfg.training)
        t.append(time.perf_counter())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.trainable_parameters(), 1.0)
        t.append(time.perf_counter())
        optimizer.step()
        t.append(time.perf_counter())
        if step:  # the first step warms up
            for name, a, b in zip(stages, t, t[1:]):
                stages[name].append(b - a)
    memory["training"] = rss_mb()
    memory["peak up to now"] = peak_mb()  # k-means' peak, where it is higher (tiled runs), included
    with autocast(cpu, cfg.training.precision):
        saved = saved_for_backward(model, images)
    val = load_validation(cfg, split)
    t0 = time.perf_counter()
    validate(model, val, torch.device("cpu"), cfg.runtime.eval_batch_size, cfg.training.precision)
    val_s = time.perf_counter() - t0
    memory["validated"] = rss_mb()
    per_step = {k: float(np.mean(v)) for k, v in stages.items()}
    total = sum(per_step.values())
    result = {"input_hw": list(cfg.model.input_hw), "threads": args.threads, "steps": args.steps,
              "precision": cfg.training.precision, "allocator": allocator.in_use(),
              "n_normal": len(normals), "load_seconds": load_s, "kmeans_seconds": kmeans_s,
              "validation_seconds": val_s, "n_validation": len(val.samples),
              "step_seconds": per_step, "step_total": total, "rss_mb": memory,
              "saved_for_backward_mb": saved}
    print(f"input {cfg.model.input_hw}, {args.threads} threads, {len(normals)} normal images, "
          f"precision {cfg.training.precision}, allocator {result['allocator']}")
    print(f"load {load_s:.1f} s, k-means {kmeans_s:.1f} s, one validation pass ({len(val.samples)} images) {val_s:.1f} s")
    print("| stage | seconds per step | share |\n|---|---|---|")
    for k, v in per_step.items():
        print(f"| {k} | {v:.3f} | {100 * v / total:.0f} % |")
    print(f"| total | {total:.3f} | |")
    print("resident memory (MB): " + ", ".join(f"{k} {v:.0f}" for k, v in memory.items()))
    print(f"saved for backward in one step: {sum(saved.values()):.0f} MB; "
          + ", ".join(f"{k} {v:.0f}" for k, v in saved.items() if v >= 1))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
