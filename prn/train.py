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

Under torchrun the same loop runs on every process (prn.distributed): each takes its share of
every global batch, DDP averages the gradients, and rank 0 alone fits the prototypes, validates
and writes files. ``cfg.precision`` "bf16" or "16" runs the forward pass under autocast
(prn.precision); the loss, prototype distances and maps stay float32.
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

from prn import distributed
from prn.anomalies.compose import AnomalyGenerator, BalancedBatchSampler, TrainingSet, is_gray
from prn.checkpoint import check_compatible, load_checkpoint, save_checkpoint
from prn.config import MAP_SIGMAS, PRNConfig
from prn.data.datasets import load_sample
from prn.data.split import Split
from prn.errors import TrainingError
from prn.metrics import image_auroc, pixel_ap, pixel_auroc
from prn.model.loss import prn_loss
from prn.model.network import PRN
from prn.precision import autocast, check_precision, grad_scaler, inference_autocast

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


def loader_workers(requested: int, device: torch.device) -> int:
    """DataLoader workers per process: ``requested`` when >= 0; for -1, sized from the device
    and this machine's CPUs shared by the local ranks. On CUDA the CPU only feeds the GPU, so
    all but one of the process's CPUs (at most 8) make anomalies; on the CPU the workers take
    cores from the forward pass, and 2 measured best on the 2-core machine (BENCHMARKS.md)."""
    if requested >= 0:
        return requested
    per_rank = max(1, distributed.usable_cpus() // distributed.world().local_size)
    if device.type == "cuda":
        return min(8, max(1, per_rank - 1))
    return min(2, per_rank)


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


def forward_loss(net: torch.nn.Module, images: torch.Tensor, masks: torch.Tensor, cfg: PRNConfig,
                 device: torch.device) -> tuple[torch.Tensor, dict]:
    """The training forward pass under cfg.precision's autocast, and Eq. 5's loss in float32."""
    with autocast(device, cfg.precision):
        logits = net(images)
    return prn_loss(logits, masks, cfg)


def optimizer_step(model: PRN, loss: torch.Tensor, optimizer: torch.optim.Optimizer,
                   scaler: torch.amp.GradScaler, cfg: PRNConfig) -> None:
    """Backward (where DDP averages the gradients over the ranks), clipping of the unscaled
    gradients to cfg.grad_clip, and the step (skipped by the scaler when float16 overflowed)."""
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if cfg.grad_clip > 0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.trainable_parameters(), cfg.grad_clip)
    scaler.step(optimizer)
    scaler.update()


@torch.no_grad()
def validate(model: torch.nn.Module, images: torch.Tensor, masks: np.ndarray, labels: np.ndarray,
             device: torch.device, batch_size: int, precision: str = "32") -> dict:
    """Image AUROC, pixel AUROC and pixel AP on the validation fold (nan where a class is missing)."""
    was_training = model.training
    model.eval()
    maps, scores = [], []
    for i in range(0, len(images), batch_size):
        with inference_autocast(device, precision):
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
    (used by tests of resumption). Under torchrun every rank calls this with the same arguments
    (prn.distributed); only rank 0 writes to ``run_dir``.
    """
    run_dir = Path(run_dir)
    ckpt_path = run_dir / "checkpoints" / "last.pt"
    world, device = distributed.setup(resolve_device(cfg.device))
    check_precision(cfg.precision, device)
    distributed.check_batch(cfg.batch_size, world)
    main = world.is_main
    progress = progress and main
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
        history = []
        if main:  # k-means once, on rank 0; the other ranks receive its prototypes
            t0 = time.perf_counter()
            model.fit_prototypes(batches_of(normals, cfg.eval_batch_size))
            history = [{"event": "prototypes", "seconds": time.perf_counter() - t0}]
            (run_dir / "metrics.csv").unlink(missing_ok=True)
        distributed.share_buffers(model, ("prototypes.", "residual_stats"))
        start_epoch = 0
    model.to(device)
    if world.distributed and device.type == "cuda":
        distributed.sync_batch_norm(model)  # batch statistics of the global batch, as one process
    net = distributed.wrap(model, device)  # DDP on several processes, the model itself on one

    optimizer = make_optimizer(model, cfg)
    scaler = grad_scaler(device, cfg.precision)
    if resume and payload.get("optimizer"):
        optimizer.load_state_dict(payload["optimizer"])
    if resume and scaler.is_enabled() and payload["extra"].get("grad_scaler"):
        scaler.load_state_dict(payload["extra"]["grad_scaler"])

    generator = AnomalyGenerator(cfg, seen, cfg.resolved_category_kind, texture_dir=cfg.texture_dir or None,
                                 gray=all(is_gray(n) for n in normals[:8]))
    dataset = TrainingSet(normals, generator, cfg)
    steps_per_epoch = len(BalancedBatchSampler(len(normals), cfg, seed=cfg.seed, epoch=0))
    total_steps = steps_per_epoch * cfg.epochs
    workers = loader_workers(cfg.num_workers, device)

    val = load_validation(cfg, split) if main else None
    best_path = run_dir / "checkpoints" / "best.pt"

    def checkpoint(epoch: int, path: Path = ckpt_path) -> None:
        last = path == ckpt_path
        extra = {"n_normal": len(normals), "n_seen": len(seen)}
        if last and scaler.is_enabled():
            extra["grad_scaler"] = scaler.state_dict()
        save_checkpoint(path, model="prn", config=cfg.to_dict(), state_dict=model.state_dict(),
                        optimizer=optimizer.state_dict() if last else None, epoch=epoch,
                        history=history, extra=extra)

    if not resume and main:
        checkpoint(0)  # prototypes are the costly part of epoch 0: keep them even if stopped now
    for epoch in range(start_epoch, cfg.epochs):
        sampler = BalancedBatchSampler(len(normals), cfg, seed=cfg.seed, epoch=epoch,
                                       rank=world.rank, world_size=world.size)
        loader = DataLoader(dataset, batch_sampler=sampler, num_workers=workers,
                            pin_memory=device.type == "cuda", persistent_workers=False)
        net.train()
        sums = torch.zeros(3, dtype=torch.float64)  # loss, smooth_l1, focal
        steps, t0 = 0, time.perf_counter()
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not progress, leave=False)
        for batch in bar:
            lr = lr_at(epoch * steps_per_epoch + steps, total_steps, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            images = batch["image"].to(device, non_blocking=True)
            masks = batch["mask"].to(device, non_blocking=True)
            loss, parts = forward_loss(net, images, masks, cfg, device)
            # The global batch's losses are the ranks' mean (their shares are equal in size). This
            # one small all-reduce also stops every rank together when any loss is not finite.
            step = distributed.mean_over_ranks(torch.stack([loss.detach(), parts["smooth_l1"], parts["focal"]]))
            step = step.double().cpu()
            if not torch.isfinite(step[0]):
                raise TrainingError(
                    f"loss became {step[0].item()} at epoch {epoch + 1}, step {steps + 1}; training stopped. "
                    f"The last good checkpoint ({ckpt_path}, epoch {epoch}) is intact: lower --lr or "
                    f"keep grad_clip > 0 and resume with `prn fit --resume {run_dir}`")
            optimizer_step(model, loss, optimizer, scaler, cfg)
            steps += 1
            sums += step
            bar.set_postfix(loss=f"{sums[0].item() / steps:.4f}")
        with torch.no_grad():
            distributed.average_buffers(model, ("running_mean", "running_var"))
        record = {"epoch": epoch + 1, "seconds": time.perf_counter() - t0, "steps": steps, "lr": lr}
        record.update({k: v / max(steps, 1) for k, v in zip(("loss", "smooth_l1", "focal"), sums.tolist())})
        if val is not None:
            record.update(validate(model, *val, device, cfg.eval_batch_size, cfg.precision))
        history.append(record)
        if main:
            append_metrics(run_dir / "metrics.csv", record)
        if progress:
            shown = "  ".join(f"{k[4:]} {record[k]:.3f}" for k in ("val_image_auroc", "val_pixel_ap")
                              if k in record and not math.isnan(record[k]))
            tqdm.write(f"epoch {epoch + 1}/{cfg.epochs}  loss {record['loss']:.4f}  "
                       f"({record['seconds']:.1f} s)  {shown}")
        if val is not None and val_score(record) > max(
                (val_score(r) for r in history[:-1] if "epoch" in r), default=-math.inf):
            checkpoint(epoch + 1, best_path)
        if main and ((epoch + 1) % cfg.checkpoint_every == 0 or epoch + 1 == cfg.epochs):
            checkpoint(epoch + 1)
        if stop_after_epoch is not None and stop_after_epoch(epoch + 1):
            model.eval()
            return model
    if main:  # the other ranks hold the same weights and write nothing
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
        scores[sigma] = val_score(validate(model, *val, device, cfg.eval_batch_size, cfg.precision))
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
