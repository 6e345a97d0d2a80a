"""The training loop of PRN (Sec. 3.5, 4.1), written to be read top to bottom.

Optimiser: the paper's Adam (coupled weight decay) at a constant rate, or AdamW with no decay
on norm and bias parameters and a warm-up then cosine schedule counted in steps (``cfg.optimizer``,
``cfg.lr_schedule``). After every epoch the model is scored on the held-out validation fold of
the training data (``split.val_*``; never test data) into ``metrics.csv``; ``cfg.select_epoch =
"best"`` keeps the epoch that scored best there. The kept weights go to ``checkpoints/model.pt``.

Reproducibility and resumption rest on one rule: every random choice of epoch ``e`` is derived
from ``(cfg.seed, e)`` alone (batch order, which anomalies are generated, their parameters), and
the model, optimiser and history are checkpointed at the end of each epoch. A run stopped at any
point and resumed from its last checkpoint therefore ends with the same weights as a run that
was never stopped.
"""

from __future__ import annotations

import csv
import math
import random
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from prn.anomalies.compose import AnomalyGenerator, BalancedBatchSampler, TrainingSet, is_gray
from prn.checkpoint import check_compatible, load_checkpoint, save_checkpoint
from prn.config import MAP_SIGMAS, PRNConfig
from prn.data.datasets import load_sample
from prn.data.split import Split
from prn.errors import TrainingError
from prn.metrics import image_auroc, pixel_ap, pixel_auroc
from prn.model.loss import prn_loss
from prn.model.network import PRN

# Settings that change the network's shape or meaning: a resumed run must match them.
ARCHITECTURE_KEYS = ("backbone", "image_size", "image_hw", "use_prototypes", "use_attention", "use_fusion",
                     "attention_layers", "attention_patch_divisors", "attention_dim", "attention_scale",
                     "decoder_channels", "residual_prior")


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
    size, limit = cfg.input_hw, cfg.max_image_pixels
    normals = [load_sample(s, size, limit)[0] for s in split.train_normal]
    seen = [load_sample(s, size, limit) for s in split.train_anomalous]
    return normals, seen


def param_groups(model: PRN, weight_decay: float) -> list[dict]:
    """AdamW groups: decay on convolution and linear weights only. Decaying norm scales and
    biases only pulls them towards zero, which no prior asks for."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if name.startswith("encoder.") or not p.requires_grad:
            continue
        (decay if p.dim() > 1 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model: PRN, cfg: PRNConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr)
    return torch.optim.Adam(model.trainable_parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)


def lr_at(step: int, total: int, cfg: PRNConfig) -> float:
    """The learning rate of global step ``step`` (0-based) of ``total``: linear warm-up over
    cfg.warmup_fraction of the steps, then constant or cosine down to 1 % of cfg.lr."""
    warmup = int(cfg.warmup_fraction * total)
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    if cfg.lr_schedule == "constant":
        return cfg.lr
    t = (step - warmup) / max(1, total - warmup)
    return cfg.lr * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * t)))


@torch.no_grad()
def validate(model: torch.nn.Module, images: torch.Tensor, masks: np.ndarray, labels: np.ndarray,
             device: torch.device, batch_size: int) -> dict:
    """Image AUROC, pixel AUROC and pixel AP on the validation fold (nan where a class is missing)."""
    was_training = model.training
    model.eval()
    maps, scores = [], []
    for i in range(0, len(images), batch_size):
        out = model(images[i:i + batch_size].to(device))
        maps.append(out["anomaly_map"][:, 0].float().cpu().numpy())
        scores.append(out["pred_score"].double().cpu().numpy())
    model.train(was_training)
    maps_np, scores_np = np.concatenate(maps), np.concatenate(scores)
    has_defects = bool(masks.any()) and bool((~masks).any())
    return {"val_image_auroc": image_auroc(labels, scores_np),
            "val_pixel_auroc": pixel_auroc(masks, maps_np) if has_defects else math.nan,
            "val_pixel_ap": pixel_ap(masks, maps_np) if has_defects else math.nan}


def val_score(record: dict) -> float:
    """What "best" means for epoch selection: pixel AP + image AUROC on the validation fold
    (the terms that are defined; -inf when none is)."""
    terms = [record.get(k, math.nan) for k in ("val_pixel_ap", "val_image_auroc")]
    terms = [t for t in terms if not math.isnan(t)]
    return sum(terms) if terms else -math.inf


def append_metrics(path: Path, record: dict) -> None:
    """One row per epoch in the run folder's metrics.csv (header from the first row)."""
    keys = ["epoch", "steps", "seconds", "lr", "loss", "smooth_l1", "focal",
            "val_image_auroc", "val_pixel_auroc", "val_pixel_ap"]
    new = not path.is_file()
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        if new:
            writer.writeheader()
        writer.writerow({k: record.get(k, "") for k in keys})


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
        (run_dir / "metrics.csv").unlink(missing_ok=True)
    model.to(device)

    optimizer = make_optimizer(model, cfg)
    if resume and payload.get("optimizer"):
        optimizer.load_state_dict(payload["optimizer"])

    generator = AnomalyGenerator(cfg, seen, cfg.resolved_category_kind, texture_dir=cfg.texture_dir or None,
                                 gray=all(is_gray(n) for n in normals[:8]))
    dataset = TrainingSet(normals, generator, cfg)
    steps_per_epoch = len(BalancedBatchSampler(len(normals), cfg, seed=cfg.seed, epoch=0))
    total_steps = steps_per_epoch * cfg.epochs

    val = load_validation(cfg, split)
    best_path = run_dir / "checkpoints" / "best.pt"

    def checkpoint(epoch: int, path: Path = ckpt_path) -> None:
        save_checkpoint(path, model="prn", config=cfg.to_dict(), state_dict=model.state_dict(),
                        optimizer=optimizer.state_dict() if path == ckpt_path else None, epoch=epoch,
                        history=history, extra={"n_normal": len(normals), "n_seen": len(seen)})

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
            lr = lr_at(epoch * steps_per_epoch + steps, total_steps, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
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
        record = {"epoch": epoch + 1, "seconds": time.perf_counter() - t0, "steps": steps, "lr": lr}
        record.update({k: v / max(steps, 1) for k, v in sums.items()})
        if val is not None:
            record.update(validate(model, *val, device, cfg.eval_batch_size))
        history.append(record)
        append_metrics(run_dir / "metrics.csv", record)
        if progress:
            shown = "  ".join(f"{k[4:]} {record[k]:.3f}" for k in ("val_image_auroc", "val_pixel_ap")
                              if k in record and not math.isnan(record[k]))
            tqdm.write(f"epoch {epoch + 1}/{cfg.epochs}  loss {record['loss']:.4f}  "
                       f"({record['seconds']:.1f} s)  {shown}")
        if val is not None and val_score(record) > max(
                (val_score(r) for r in history[:-1] if "epoch" in r), default=-math.inf):
            checkpoint(epoch + 1, best_path)
        if (epoch + 1) % cfg.checkpoint_every == 0 or epoch + 1 == cfg.epochs:
            checkpoint(epoch + 1)
        if stop_after_epoch is not None and stop_after_epoch(epoch + 1):
            model.eval()
            return model
    if cfg.select_epoch == "best" and best_path.is_file():
        model.load_state_dict(load_checkpoint(best_path, expect_model="prn")["state_dict"])
    sigma_scores = {}
    if cfg.select_map_sigma and val is not None:
        cfg, sigma_scores = choose_map_sigma(model, cfg, val, device)
        if progress:
            tqdm.write(f"map_sigma {cfg.map_sigma:g} chosen on the validation fold")
    write_model(run_dir, cfg, model, history, sigma_scores)
    model.eval()
    return model


def load_validation(cfg: PRNConfig, split: Split):
    """The validation fold as (images float32 (N, 3, H, W), masks bool (N, H, W), labels (N,)), or
    None when the split holds none."""
    samples = split.val_normal + split.val_anomalous
    if not samples:
        return None
    pairs = [load_sample(s, cfg.input_hw, cfg.max_image_pixels) for s in samples]
    images = torch.cat(list(batches_of([p[0] for p in pairs], len(pairs))))
    masks = np.stack([p[1] for p in pairs])
    labels = np.array([s.label for s in samples], dtype=np.int64)
    return images, masks, labels


def choose_map_sigma(model: PRN, cfg: PRNConfig, val, device: torch.device) -> tuple[PRNConfig, dict]:
    """The map smoothing of MAP_SIGMAS that scores best (``val_score``) on the validation fold;
    a tie keeps the smaller sigma. Returns (cfg with it, {sigma: score}); sets it on the model."""
    scores = {}
    for sigma in MAP_SIGMAS:
        model.cfg = cfg.replace(map_sigma=sigma)
        scores[sigma] = val_score(validate(model, *val, device, cfg.eval_batch_size))
    best = max(MAP_SIGMAS, key=lambda s: (scores[s], -s))
    cfg = cfg.replace(map_sigma=best)
    model.cfg = cfg
    return cfg, scores


def write_model(run_dir: Path, cfg: PRNConfig, model: PRN, history: list, sigma_scores: dict | None = None) -> Path:
    """``checkpoints/model.pt``: the weights that test, predict and export use (the last epoch,
    or the best on validation with cfg.select_epoch = "best"), without optimiser state."""
    epochs = [r for r in history if "epoch" in r]
    chosen = len(epochs)
    if cfg.select_epoch == "best" and epochs:
        chosen = max(epochs, key=val_score)["epoch"] if any(
            val_score(r) > -math.inf for r in epochs) else len(epochs)
    return save_checkpoint(Path(run_dir) / "checkpoints" / "model.pt", model="prn", config=cfg.to_dict(),
                           state_dict=model.state_dict(), epoch=chosen, history=history,
                           extra={"selected_epoch": chosen, "select_epoch": cfg.select_epoch,
                                  "map_sigma": cfg.map_sigma,
                                  "map_sigma_scores": {str(k): v for k, v in (sigma_scores or {}).items()}})
