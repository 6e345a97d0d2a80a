"""The training loop of PRN (Sec. 3.5, 4.1), written to be read top to bottom.

Optimiser: the paper's Adam (coupled weight decay) at a constant rate, or AdamW with no decay
on norm and bias parameters and a warm-up then cosine schedule counted in steps (``cfg.training.optimizer``,
``cfg.training.lr_schedule``). After every epoch the model is scored on the held-out validation fold of
the training data (``split.val_*``; never test data) into ``metrics.csv``; ``cfg.training.select_epoch =
"best"`` keeps the epoch that scored best there. The kept weights go to ``checkpoints/model.pt``.

Reproducibility and resumption rest on one rule: every random choice of epoch ``e`` is derived
from ``(cfg.training.seed, e)`` alone (batch order, which anomalies are generated, their parameters), and
the model, optimiser and history are checkpointed at the end of each epoch. A run stopped at any
point and resumed from its last checkpoint therefore ends with the same weights as a run that
was never stopped.

Under torchrun the same loop runs on every process (prn.distributed): each takes its share of
every global batch, DDP averages the gradients, and rank 0 alone fits the prototypes, validates
and writes files. ``cfg.training.precision`` "bf16" or "16" runs the forward pass under autocast
(prn.precision); the loss, prototype distances and maps stay float32.
"""

from __future__ import annotations

import csv
import itertools
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from prn import distributed, registry
from prn.anomalies.compose import (AnomalyGenerator, BalancedBatchSampler, EpochBatches, TrainingSet, is_gray,
                                  seen_draw_weights)
from prn.checkpoint import check_compatible, load_checkpoint, save_checkpoint
from prn.config import PRNConfig
from prn.data.datasets import load_training_arrays, load_validation, small_seen_defects
from prn.data.split import Split
from prn.errors import TrainingError
from prn.infer import Predictions, validate
from prn.model.loss import prn_loss, top_k_loss, weak_loss
from prn.model.network import PRN
from prn.precision import autocast, check_precision, grad_scaler, inference_autocast
from prn.preprocess import batches_of, to_tensor
from prn.runtime import loader_workers, release_memory, resolve_device, seed_everything, timed


# the per-epoch means in metrics.csv: the total, Eq. 5's parts, the image head's, weak labels' and
# the top-k image loss
LOSS_TERMS = ("loss", "smooth_l1", "focal", "image", "weak", "top_k")


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
    if cfg.training.optimizer == "adamw":
        return torch.optim.AdamW(param_groups(model, cfg.training.weight_decay), lr=cfg.training.lr)
    return torch.optim.Adam(model.trainable_parameters(), lr=cfg.training.lr, weight_decay=cfg.training.weight_decay)


def lr_at(step: int, total: int, cfg: PRNConfig) -> float:
    """The learning rate of global step ``step`` (0-based) of ``total``: linear warm-up over
    cfg.training.warmup_fraction of the steps, then constant or cosine down to 1 % of cfg.training.lr."""
    warmup = int(cfg.training.warmup_fraction * total)
    if step < warmup:
        return cfg.training.lr * (step + 1) / warmup
    if cfg.training.lr_schedule == "constant":
        return cfg.training.lr
    t = (step - warmup) / max(1, total - warmup)
    return cfg.training.lr * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * t)))


def forward_loss(net: torch.nn.Module, images: torch.Tensor, masks: torch.Tensor, cfg: PRNConfig,
                 device: torch.device, weight: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                 weak: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """The training forward pass under cfg.training.precision's autocast, and Eq. 5's loss in
    float32 over the pixels of ``weight`` (all by default). Defects known by a label or a box
    alone (``weak``) add ``weak_loss`` weighted by cfg.training.weak_loss_weight (parts["weak"]);
    an image head adds its BCE on the images' ``labels`` (default: a mask with any pixel is
    defective) weighted by cfg.training.image_loss_weight (parts["image"]); the top-k image loss
    (``top_k_loss``) is weighted by cfg.training.top_k_loss_weight (parts["top_k"])."""
    with autocast(device, cfg.training.precision):
        out = net(images)
    logits, image_logits = out if isinstance(out, tuple) else (out, None)
    loss, parts = prn_loss(logits, masks, cfg.training, weight)
    if weak is not None and bool((weak > 0.5).any()):
        extra = weak_loss(logits, masks, weak, cfg.model.k_of(*logits.shape[-2:]))
        loss = loss + cfg.training.weak_loss_weight * extra
        parts["weak"] = extra.detach()
    if cfg.training.top_k_loss_weight > 0:
        extra = top_k_loss(logits, masks, masks.new_zeros(len(masks)) if weak is None else weak,
                           cfg.model.k_of(*logits.shape[-2:]))
        loss = loss + cfg.training.top_k_loss_weight * extra
        parts["top_k"] = extra.detach()
    if image_logits is not None:
        if labels is None:
            labels = (masks.flatten(1).amax(dim=1) > 0.5).float()
        image = torch.nn.functional.binary_cross_entropy_with_logits(image_logits.float(), labels.float())
        loss = loss + cfg.training.image_loss_weight * image
        parts["image"] = image.detach()
    return loss, parts


def optimizer_step(model: PRN, loss: torch.Tensor, optimizer: torch.optim.Optimizer,
                   scaler: torch.amp.GradScaler, cfg: PRNConfig) -> None:
    """Backward (where DDP averages the gradients over the ranks), clipping of the unscaled
    gradients to cfg.training.grad_clip, and the step (skipped by the scaler when float16 overflowed)."""
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if cfg.training.grad_clip > 0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.trainable_parameters(), cfg.training.grad_clip)
    scaler.step(optimizer)
    scaler.update()


def val_score(record: dict) -> float:
    """What "best" means for epoch selection: pixel AP + image AUROC on the validation fold
    (the terms that are defined; -inf when none is)."""
    terms = [record.get(k, math.nan) for k in ("val_pixel_ap", "val_image_auroc")]
    terms = [t for t in terms if not math.isnan(t)]
    return sum(terms) if terms else -math.inf


def append_metrics(path: Path, record: dict) -> None:
    """One row per epoch in the run folder's metrics.csv (header from the first row)."""
    # top_k last: a run resumed from a metrics.csv written before it keeps its columns in place
    keys = ["epoch", "steps", "seconds", "lr", "loss", "smooth_l1", "focal", "image", "weak",
            "val_image_auroc", "val_pixel_auroc", "val_pixel_ap", "top_k"]
    new = not path.is_file()
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        if new:
            writer.writeheader()
        writer.writerow({k: record.get(k, "") for k in keys})


@dataclass
class TrainResult:
    """What ``train`` leaves: the kept model (eval mode), the per-epoch history, the epoch kept,
    the validation fold's outputs of that model (None without a fold), and the seconds this
    process spent in each phase (``phases``: loading images, prototypes, training steps,
    validation, the defect memory; ``timings.json`` keeps them as ``fit_phases_seconds``)."""
    model: PRN
    history: list
    epoch: int
    validation: Predictions | None
    phases: dict = field(default_factory=dict)


def train(cfg: PRNConfig, split: Split, run_dir: Path, *, resume: bool = False,
          progress: bool = True, stop_after_epoch: Callable[[int], bool] | None = None,
          init_from: Path | None = None) -> TrainResult:
    """Fit PRN on ``split`` and keep ``run_dir/checkpoints/last.pt`` up to date; the caller
    (``prn.api.fit``) calibrates the returned model and writes ``checkpoints/model.pt``.
    ``init_from``: a checkpoint whose weights, prototypes included, training starts from (a
    retraining, ``prn fit --from``): no k-means, the schedule of ``cfg`` from its first epoch.

    ``stop_after_epoch(e)`` returning True ends training after epoch ``e`` as if interrupted
    (used by tests of resumption). Under torchrun every rank calls this with the same arguments
    (prn.distributed); only rank 0 writes to ``run_dir``, and only rank 0's result holds the
    validation outputs.
    """
    run_dir = Path(run_dir)
    ckpt_path = run_dir / "checkpoints" / "last.pt"
    world, device = distributed.setup(resolve_device(cfg.runtime.device))
    check_precision(cfg.training.precision, device)
    distributed.check_batch(cfg.training.batch_size, world)
    main = world.is_main
    progress = progress and main
    seed_everything(cfg.training.seed)
    torch.use_deterministic_algorithms(device.type == "cpu", warn_only=True)

    # Seconds per phase, so a slow fit shows where it went (``timings.json``); a resumed fit
    # counts its own part.
    phases = dict.fromkeys(("load images", "prototypes", "training", "validation", "defect memory"), 0.0)
    with timed(phases, "load images"):
        normals, seen = load_training_arrays(cfg, split)
    if resume:
        payload = load_checkpoint(ckpt_path, expect_model="prn")
        check_compatible(ckpt_path, payload, cfg)
        model = registry.build("prn", cfg, pretrained=False)
        model.load_state_dict(payload["state_dict"])
        start_epoch, history = payload["epoch"], payload["history"]
    elif init_from is not None:
        payload = load_checkpoint(init_from, expect_model="prn")
        check_compatible(init_from, payload, cfg)
        model = registry.build("prn", cfg, pretrained=False)
        model.load_state_dict(payload["state_dict"])
        if model.defect_memory is not None:  # the parent's memory is rebuilt from this split, if asked
            model.defect_memory.clear()
        start_epoch, history = 0, [{"event": "warm start", "from": str(init_from)}]
        if main:
            (run_dir / "metrics.csv").unlink(missing_ok=True)
    else:
        model = registry.build("prn", cfg)
        history = []
        if main:  # k-means once, on rank 0; the other ranks receive its prototypes
            with timed(phases, "prototypes"):
                # the frozen encoder's features on the fit's device (they went through the CPU's
                # encoder on a GPU machine); the prototypes stay where the model is until it moves
                model.encoder.to(device)
                model.fit_prototypes(batches_of(normals, cfg.runtime.eval_batch_size), seed=cfg.training.seed)
            history = [{"event": "prototypes", "seconds": phases["prototypes"]}]
            release_memory()  # k-means' copies of the features, before training's activations
            (run_dir / "metrics.csv").unlink(missing_ok=True)
        distributed.share_buffers(model, ("prototypes.",))
        start_epoch = 0
    model.to(device)
    if world.distributed and device.type == "cuda":
        distributed.sync_batch_norm(model)  # batch statistics of the global batch, as one process
    net = distributed.wrap(model, device)  # DDP on several processes, the model itself on one

    optimizer = make_optimizer(model, cfg)
    scaler = grad_scaler(device, cfg.training.precision)
    if resume and payload.get("optimizer"):
        optimizer.load_state_dict(payload["optimizer"])
    if resume and scaler.is_enabled() and payload["extra"].get("grad_scaler"):
        scaler.load_state_dict(payload["extra"]["grad_scaler"])

    generator = AnomalyGenerator(cfg, seen, cfg.data.resolved_category_kind,
                                 texture_dir=cfg.synthesis.texture_dir or None,
                                 gray=all(is_gray(n) for n in normals[:8]),
                                 seen_weights=seen_draw_weights(split.train_anomalous, cfg.training.added_seen_share))
    history.append({"event": "strokes", **generator.strokes})
    if progress and cfg.synthesis.strokes == "auto":
        tqdm.write(f"thin strokes among the simulated anomalies: {'on' if generator.strokes['used'] else 'off'} "
                   f"({generator.strokes['why']})")
    cell = model.encoder.reductions[0]  # a defect under one cell of the finest map is barely drawn
    small = small_seen_defects(seen, cell * cell)
    history.append({"event": "small seen defects", **small})
    if progress and small["small"]:
        h, w = cfg.model.input_hw
        tqdm.write(f"note: {small['small']} of {small['masks']} seen defects cover fewer than {cell * cell} pixels "
                   f"of the {w} x {h} input (the smallest {small['smallest']}; one {cell} x {cell} cell of the "
                   f"encoder's finest map): defects this small are drawn faintly if at all, and most pass the "
                   f"threshold (README, \"Small defects\")")
    dataset = TrainingSet(normals, generator, cfg)
    steps_per_epoch = len(BalancedBatchSampler(len(normals), cfg, seed=cfg.training.seed, epoch=0))
    total_steps = steps_per_epoch * cfg.training.epochs
    workers = loader_workers(cfg.runtime.num_workers, device)

    with timed(phases, "load images"):
        val = load_validation(cfg, split) if main else None
    val_outputs = None
    best_path = run_dir / "checkpoints" / "best.pt"

    def checkpoint(epoch: int, path: Path = ckpt_path) -> None:
        last = path == ckpt_path
        extra = {"n_normal": len(normals), "n_seen": len(seen)}
        if last and scaler.is_enabled():
            extra["grad_scaler"] = scaler.state_dict()
        save_checkpoint(path, model="prn", config=cfg.to_dict(runtime=False), state_dict=model.state_dict(),
                        optimizer=optimizer.state_dict() if last else None, epoch=epoch,
                        history=history, extra=extra)

    if not resume and main:
        checkpoint(0)  # prototypes are the costly part of epoch 0: keep them even if stopped now
    samplers = [BalancedBatchSampler(len(normals), cfg.replace(training=cfg.training.at_epoch(epoch)),
                                     seed=cfg.training.seed, epoch=epoch, rank=world.rank, world_size=world.size)
                for epoch in range(start_epoch, cfg.training.epochs)]
    # One loader for the whole fit: its workers start once and read ahead across epochs (EpochBatches).
    batches = _closable(DataLoader(dataset, batch_sampler=EpochBatches(samplers), num_workers=workers,
                                   pin_memory=device.type == "cuda"))
    try:
        for epoch, sampler in zip(range(start_epoch, cfg.training.epochs), samplers):
            net.train()
            sums = torch.zeros(len(LOSS_TERMS), dtype=torch.float64)
            steps, t0 = 0, time.perf_counter()
            bar = tqdm(itertools.islice(batches, len(sampler)), total=len(sampler),
                       desc=f"epoch {epoch + 1}/{cfg.training.epochs}", disable=not progress, leave=False)
            for batch in bar:
                lr = lr_at(epoch * steps_per_epoch + steps, total_steps, cfg)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                images = batch["image"].to(device, non_blocking=True)
                masks = batch["mask"].to(device, non_blocking=True)
                loss, parts = forward_loss(net, images, masks, cfg, device, batch["weight"].to(device),
                                           batch["label"].to(device), batch["weak"].to(device))
                # The global batch's losses are the ranks' mean (their shares are equal in size). This
                # one small all-reduce also stops every rank together when any loss is not finite.
                step = distributed.mean_over_ranks(torch.stack(
                    [loss.detach()] + [parts.get(k, torch.zeros_like(loss)) for k in LOSS_TERMS[1:]]))
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
            phases["training"] += record["seconds"]
            record.update({k: v / max(steps, 1) for k, v in zip(LOSS_TERMS, sums.tolist())
                           if k in ("loss", "smooth_l1", "focal") or v})  # image, weak, top_k: when trained
            every = cfg.training.val_every
            if val is not None and (epoch + 1 == cfg.training.epochs or (every and (epoch + 1) % every == 0)):
                with timed(phases, "validation"):
                    scores, val_outputs = validate(model, val, device, cfg.runtime.eval_batch_size, cfg.training.precision)
                record.update(scores)
            history.append(record)
            if main:
                append_metrics(run_dir / "metrics.csv", record)
            if progress:
                shown = "  ".join(f"{k[4:]} {record[k]:.3f}" for k in ("val_image_auroc", "val_pixel_ap")
                                  if k in record and not math.isnan(record[k]))
                tqdm.write(f"epoch {epoch + 1}/{cfg.training.epochs}  loss {record['loss']:.4f}  "
                           f"({record['seconds']:.1f} s)  {shown}")
            if val is not None and val_score(record) > max(
                    (val_score(r) for r in history[:-1] if "epoch" in r), default=-math.inf):
                checkpoint(epoch + 1, best_path)
            if main:
                checkpoint(epoch + 1)
            if stop_after_epoch is not None and stop_after_epoch(epoch + 1):
                model.eval()
                return TrainResult(model, history, epoch + 1, val_outputs, phases)
    finally:
        batches.close()  # the workers stop here, on an early return or an error as well

    kept = len([r for r in history if "epoch" in r])
    if main and cfg.training.select_epoch == "best" and best_path.is_file():
        best = load_checkpoint(best_path, expect_model="prn")
        model.load_state_dict(best["state_dict"])
        kept = best["epoch"]
        if val is not None:  # the fold's outputs of the weights kept, for calibration
            with timed(phases, "validation"):
                val_outputs = validate(model, val, device, cfg.runtime.eval_batch_size, cfg.training.precision)[1]
    model.eval()
    if main and cfg.model.defect_memory != "off":
        t0 = time.perf_counter()
        found = remember_seen_defects(model, cfg, seen, val, val_outputs, device)
        history.append({"event": "defect memory", "seconds": time.perf_counter() - t0, **found})
        if progress:
            from prn.model.defect_memory import memory_summary
            tqdm.write(memory_summary(found))
        if found["used"]:  # the fold's outputs with the fused score, for calibration
            val_outputs = validate(model, val, device, cfg.runtime.eval_batch_size, cfg.training.precision)[1]
        phases["defect memory"] = time.perf_counter() - t0
    return TrainResult(model, history, kept, val_outputs, phases)


def _closable(loader: DataLoader) -> Iterator[dict]:
    """The loader's batches as a generator, whose ``close()`` ends the loader's iterator and so
    stops its worker processes, even while a progress bar or an error's traceback still refers to
    the generator (a DataLoader iterator has no close of its own)."""
    yield from loader


def remember_seen_defects(model: PRN, cfg: PRNConfig, seen: list, val, val_outputs: Predictions | None,
                          device: torch.device) -> dict:
    """Build the model's defect memory (``prn.model.defect_memory.remember``) from the seen
    anomalies with pixel masks, training's and the held-out fold's, judged against the fold's good
    images. seen: ``load_training_arrays``' (image, mask, annotation) triples; val: the fold."""
    from prn.model.defect_memory import left_out, remember

    if not cfg.model.memory_possible:  # e.g. the cpu preset's "auto" with tiles or without MP
        return left_out("a memory needs the prototypes and whole images (use_prototypes true, tiles 1)")
    model.defect_memory.clear()  # PRN's own scores of the fold, below, without any memory
    if val is None:
        return left_out("no held-out good images to judge a memory against")
    if val_outputs is None:
        val_outputs = validate(model, val, device, cfg.runtime.eval_batch_size, cfg.training.precision)[1]
    images = [to_tensor(i) for i, _, a in seen if a == "mask"]
    masks = [torch.from_numpy(m)[None].float() for _, m, a in seen if a == "mask"]
    if cfg.data.seen_annotation == "as_given":  # the fold's defects, where they have pixel masks
        for k, sample in enumerate(val.samples):
            if sample.label == 1 and sample.annotation == "mask":
                images.append(val.images[k])
                masks.append(torch.from_numpy(val.masks[k])[None].float())
    good = val.labels == 0
    shape = (0, 3, *cfg.model.input_hw)
    with inference_autocast(device, cfg.training.precision):  # the encoder as inference will run it
        return remember(model, torch.stack(images) if images else torch.empty(shape),
                        torch.stack(masks) if masks else torch.empty(0, 1, *cfg.model.input_hw),
                        val.images[torch.from_numpy(good)], torch.from_numpy(val_outputs.scores[good]),
                        mode=cfg.model.defect_memory, gate=cfg.model.defect_memory_gate,
                        batch_size=cfg.runtime.eval_batch_size)
