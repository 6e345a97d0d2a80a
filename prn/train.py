"""The training loop of PRN (Sec. 3.5, 4.1), written to be read top to bottom.

Reproducibility and resumption rest on one rule: every random choice of epoch ``e`` is derived
from ``(cfg.seed, e)`` alone (batch order, which anomalies are generated, their parameters), and
the model, optimiser and history are checkpointed at the end of each epoch. A run stopped at any
point and resumed from its last checkpoint therefore ends with the same weights as a run that
was never stopped.
"""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from prn.anomalies.compose import AnomalyGenerator, BalancedBatchSampler, TrainingSet
from prn.checkpoint import check_compatible, load_checkpoint, save_checkpoint
from prn.config import PRNConfig
from prn.data.datasets import load_sample
from prn.data.split import Split
from prn.errors import TrainingError
from prn.model.loss import prn_loss
from prn.model.network import PRN

# Settings that change the network's shape or meaning: a resumed run must match them.
ARCHITECTURE_KEYS = ("backbone", "image_size", "use_prototypes", "use_attention", "use_fusion",
                     "attention_layers", "attention_patch_divisors", "attention_dim", "attention_scale",
                     "decoder_channels")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TrainingError(f"device {name!r} was asked for, but CUDA is not available here; use --device cpu")
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def batches_of(images: list[np.ndarray], batch_size: int):
    """uint8 (S,S,3) arrays -> float32 (B,3,S,S) tensors in [0,1]."""
    for i in range(0, len(images), batch_size):
        chunk = np.stack(images[i:i + batch_size])
        yield torch.from_numpy(chunk).permute(0, 3, 1, 2).float().div_(255.0)


def load_training_arrays(cfg: PRNConfig, split: Split):
    size, limit = cfg.image_size, cfg.max_image_pixels
    normals = [load_sample(s, size, limit)[0] for s in split.train_normal]
    seen = [load_sample(s, size, limit) for s in split.train_anomalous]
    return normals, seen


def build_model(cfg: PRNConfig, *, pretrained: bool = True) -> PRN:
    """A PRN whose encoder gets ImageNet weights, or none when a checkpoint will supply them."""
    weights = cfg.backbone_weights if pretrained else "random"
    return PRN.from_config(cfg.replace(backbone_weights=weights))


def train(cfg: PRNConfig, split: Split, run_dir: Path, *, resume: bool = False,
          progress: bool = True, stop_after_epoch: Callable[[int], bool] | None = None) -> PRN:
    """Fit PRN on ``split`` and keep ``run_dir/checkpoints/last.pt`` up to date.

    ``stop_after_epoch(e)`` returning True ends training after epoch ``e`` as if interrupted
    (used by tests of resumption).
    """
    run_dir = Path(run_dir)
    ckpt_path = run_dir / "checkpoints" / "last.pt"
    device = resolve_device(cfg.device)
    seed_everything(cfg.seed)
    torch.use_deterministic_algorithms(device.type == "cpu", warn_only=True)

    normals, seen = load_training_arrays(cfg, split)
    if resume:
        payload = load_checkpoint(ckpt_path, expect_model="prn")
        check_compatible(ckpt_path, payload, cfg.to_dict(), ARCHITECTURE_KEYS)
        model = build_model(cfg, pretrained=False)
        model.load_state_dict(payload["state_dict"])
        start_epoch, history = payload["epoch"], payload["history"]
    else:
        model = build_model(cfg)
        t0 = time.perf_counter()
        model.fit_prototypes(batches_of(normals, cfg.eval_batch_size))
        history = [{"event": "prototypes", "seconds": time.perf_counter() - t0}]
        start_epoch = 0
    model.to(device)

    optimizer = torch.optim.Adam(model.trainable_parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    if resume and payload.get("optimizer"):
        optimizer.load_state_dict(payload["optimizer"])

    generator = AnomalyGenerator(cfg, seen, cfg.resolved_category_kind, texture_dir=cfg.texture_dir or None)
    dataset = TrainingSet(normals, generator, cfg)

    def checkpoint(epoch: int) -> None:
        save_checkpoint(ckpt_path, model="prn", config=cfg.to_dict(), state_dict=model.state_dict(),
                        optimizer=optimizer.state_dict(), epoch=epoch, history=history,
                        extra={"n_normal": len(normals), "n_seen": len(seen)})

    if not resume:
        checkpoint(0)  # prototypes are the costly part of epoch 0: keep them even if stopped now
    for epoch in range(start_epoch, cfg.epochs):
        sampler = BalancedBatchSampler(len(normals), cfg, seed=cfg.seed, epoch=epoch)
        loader = DataLoader(dataset, batch_sampler=sampler, num_workers=cfg.num_workers,
                            pin_memory=device.type == "cuda", persistent_workers=False)
        model.train()
        sums = {"loss": 0.0, "smooth_l1": 0.0, "focal": 0.0}
        steps, t0 = 0, time.perf_counter()
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not progress, leave=False)
        for batch in bar:
            images = batch["image"].to(device, non_blocking=True)
            masks = batch["mask"].to(device, non_blocking=True)
            logits = model(images)
            loss, parts = prn_loss(logits, masks, cfg)
            if not torch.isfinite(loss):
                raise TrainingError(
                    f"loss became {loss.item()} at epoch {epoch + 1}, step {steps + 1}; training stopped. "
                    f"The last good checkpoint ({ckpt_path}, epoch {epoch}) is intact: lower --lr or "
                    f"keep grad_clip > 0 and resume with `prn fit --resume {run_dir}`")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.trainable_parameters(), cfg.grad_clip)
            optimizer.step()
            steps += 1
            sums["loss"] += loss.item()
            for k, v in parts.items():
                sums[k] += float(v)
            bar.set_postfix(loss=f"{sums['loss'] / steps:.4f}")
        record = {"epoch": epoch + 1, "seconds": time.perf_counter() - t0, "steps": steps}
        record.update({k: v / max(steps, 1) for k, v in sums.items()})
        history.append(record)
        if progress:
            tqdm.write(f"epoch {epoch + 1}/{cfg.epochs}  loss {record['loss']:.4f}  "
                       f"({record['seconds']:.1f} s)")
        if (epoch + 1) % cfg.checkpoint_every == 0 or epoch + 1 == cfg.epochs:
            checkpoint(epoch + 1)
        if stop_after_epoch is not None and stop_after_epoch(epoch + 1):
            break
    model.eval()
    return model
