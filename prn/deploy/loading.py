"""A trained model as the line uses it: the network in eval mode, its config and its calibration,
from a run folder or a bare checkpoint file copied anywhere (everything needed is in the file)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from prn.checkpoint import checkpoint_file, load_checkpoint
from prn.config import PRNConfig
from prn.errors import CheckpointError, PRNError


@dataclass
class LoadedModel:
    model: torch.nn.Module   # eval mode, on ``device``
    cfg: PRNConfig
    kind: str                # "prn", "patchcore" or "prototypes"
    calibration: dict | None # prn.deploy.calibrate's thresholds; None for an uncalibrated checkpoint
    path: Path               # the checkpoint file read
    device: torch.device


def build(kind: str, cfg: PRNConfig, *, pretrained: bool = True) -> torch.nn.Module:
    """An untrained model of ``kind``: "prn", "patchcore" or "prototypes"."""
    if kind == "prn":
        from prn.train import build_model
        return build_model(cfg, pretrained=pretrained)
    if kind == "patchcore":
        from prn.baselines.run import build_patchcore
        return build_patchcore(cfg, pretrained=pretrained)
    if kind == "prototypes":
        from prn.baselines.run import build_prototype_map
        return build_prototype_map(cfg, pretrained=pretrained)
    raise PRNError(f"unknown model kind {kind!r}; expected prn, patchcore or prototypes")


def load_model(checkpoint: str | Path, *, device: str | None = None) -> LoadedModel:
    """Load a run folder's kept weights (``checkpoints/model.pt``) or any checkpoint file."""
    from prn.train import resolve_device

    path = checkpoint_file(checkpoint)
    payload = load_checkpoint(path)
    cfg = PRNConfig.from_dict(payload["config"])
    if device is not None:
        cfg = cfg.replace(device=device)
    kind = payload.get("model")
    try:
        model = build(kind, cfg, pretrained=False)
    except PRNError as exc:
        raise CheckpointError(f"{path}: {exc}") from exc
    try:
        model.load_state_dict(payload["state_dict"])
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: weights do not fit a {cfg.backbone} {kind} model: "
                       f"{str(exc).splitlines()[0]}") from exc
    dev = resolve_device(cfg.device)
    model.eval().to(dev)
    return LoadedModel(model, cfg, kind, payload.get("calibration"), path, dev)
