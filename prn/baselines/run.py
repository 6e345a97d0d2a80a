"""Fitting the models that train nothing in prn's harness: PatchCore and PRN's prototype residuals
alone. Same config, split, run folder and checkpoint format as PRN."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from prn.baselines.patchcore import PatchCore
from prn.checkpoint import save_checkpoint
from prn.config import PRNConfig
from prn.data.split import Split
from prn.model.backbone import create_encoder
from prn.runs import start_run


def build_patchcore(cfg: PRNConfig, *, pretrained: bool = True) -> PatchCore:
    encoder = create_encoder(cfg.backbone, cfg.backbone_weights if pretrained else "random")
    return PatchCore(encoder, cfg.input_hw, coreset_ratio=cfg.patchcore_coreset_ratio,
                     num_neighbors=cfg.patchcore_num_neighbors, seed=cfg.seed,
                     max_bank=cfg.patchcore_max_bank or None)


def fit_patchcore(cfg: PRNConfig, *, run_dir: str | Path, progress: bool = True,
                  split: Split | None = None) -> Path:
    """PatchCore is unsupervised: it uses the split's normal images only. The seen anomalies are
    still removed from the test set, so PatchCore and PRN are tested on the same images."""
    from prn.train import batches_of, load_training_arrays, resolve_device

    run_dir, split, cfg = start_run(cfg, run_dir, split)
    normals, _ = load_training_arrays(cfg, dataclasses.replace(split, train_anomalous=[]))
    device = resolve_device(cfg.device)
    model = build_patchcore(cfg).to(device)
    t0 = time.perf_counter()
    model.fit(b.to(device) for b in batches_of(normals, cfg.eval_batch_size))
    seconds = time.perf_counter() - t0
    save_checkpoint(run_dir / "checkpoints" / "last.pt", model="patchcore", config=cfg.to_dict(),
                    state_dict=model.state_dict(), epoch=0,
                    history=[{"event": "memory_bank", "seconds": seconds}],
                    extra={"n_normal": len(normals), "bank_size": int(model.memory_bank.shape[0])})
    if progress:
        print(f"PatchCore: memory bank of {model.memory_bank.shape[0]} patches in {seconds:.1f} s")
    return run_dir


def build_prototype_map(cfg: PRNConfig, *, pretrained: bool = True):
    from prn.model.network import PrototypeResidualMap
    return PrototypeResidualMap(create_encoder(cfg.backbone, cfg.backbone_weights if pretrained else "random"), cfg)


def fit_prototype_map(cfg: PRNConfig, *, run_dir: str | Path, progress: bool = True,
                      split: Split | None = None) -> Path:
    """The zero-training mode: k-means prototypes of the normal training images, and the map
    |F - P*| alone (``PrototypeResidualMap``). Saved as model kind "prototypes"."""
    from prn.train import (batches_of, choose_map_sigma, load_training_arrays, load_validation,
                           resolve_device)

    run_dir, split, cfg = start_run(cfg, run_dir, split)
    normals, _ = load_training_arrays(cfg, dataclasses.replace(split, train_anomalous=[]))
    device = resolve_device(cfg.device)
    model = build_prototype_map(cfg).to(device)
    t0 = time.perf_counter()
    model.fit_prototypes(batches_of(normals, cfg.eval_batch_size))
    seconds = time.perf_counter() - t0
    sigma_scores = {}
    val = load_validation(cfg, split) if cfg.select_map_sigma else None
    if val is not None:
        cfg, sigma_scores = choose_map_sigma(model, cfg, val, device)
    save_checkpoint(run_dir / "checkpoints" / "last.pt", model="prototypes", config=cfg.to_dict(),
                    state_dict=model.state_dict(), epoch=0,
                    history=[{"event": "prototypes", "seconds": seconds}],
                    extra={"n_normal": len(normals), "map_sigma": cfg.map_sigma,
                           "map_sigma_scores": {str(k): v for k, v in sigma_scores.items()}})
    if progress:
        print(f"prototypes of {len(normals)} normal images in {seconds:.1f} s")
    return run_dir
