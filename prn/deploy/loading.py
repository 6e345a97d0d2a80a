"""A trained model as the line uses it: the network in eval mode, its config and its calibration,
from a run folder or a bare checkpoint file copied anywhere (everything needed is in the file).

Where it infers in float32, its batch norms are folded into their convolutions
(``prn.model.folding``): the same outputs to float32 rounding, faster. Under bfloat16 or float16
autocast they are left as trained, so scores stay those the run's thresholds were set on."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from prn import registry
from prn.checkpoint import checkpoint_file, load_checkpoint
from prn.config import PRNConfig
from prn.errors import CheckpointError, PRNError
from prn.model.folding import fold_batch_norms
from prn.precision import infers_in_float32
from prn.runtime import resolve_device


@dataclass
class LoadedModel:
    model: torch.nn.Module   # eval mode, on ``device``
    cfg: PRNConfig
    kind: str                # "prn", "patchcore" or "prototypes"
    calibration: dict | None # prn.deploy.calibrate's thresholds; None for an uncalibrated checkpoint
    path: Path               # the checkpoint file read
    device: torch.device
    folded: int = 0          # batch norms folded into their convolutions (prn.model.folding)


def load_model(checkpoint: str | Path, *, device: str | None = None, fold: bool = True) -> LoadedModel:
    """Load a run folder's kept weights (``checkpoints/model.pt``) or any checkpoint file. The
    checkpoint's config has no runtime section (device, workers...): this machine's defaults
    apply, with ``device`` if given. Flat configs of checkpoints written before the config had
    sections load too. ``fold``: fold the batch norms where inference is float32 (the model is
    then for inference only; ``fold=False`` keeps the trained modules)."""
    path = checkpoint_file(checkpoint)
    payload = load_checkpoint(path)
    try:
        cfg = PRNConfig.from_dict(payload["config"])
    except ValueError as exc:
        raise CheckpointError(f"{path}: {exc}") from exc
    if device is not None:
        cfg = cfg.replace(device=device)
    kind = payload.get("model")
    try:
        model = registry.build(kind, cfg, pretrained=False)
    except PRNError as exc:
        raise CheckpointError(f"{path}: {exc}") from exc
    try:
        model.load_state_dict(payload["state_dict"])
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: weights do not fit a {cfg.model.backbone} {kind} model: "
                              f"{str(exc).splitlines()[0]}") from exc
    dev = resolve_device(cfg.runtime.device)
    model.eval().to(dev)
    calibration = payload.get("calibration")
    if calibration and calibration.get("precision"):
        # the thresholds hold for scores at the precision they were set at (prn calibrate
        # --precision), so every inference runs at it; the training section keeps no other use here
        cfg = cfg.replace(precision=calibration["precision"])
    folded = 0
    if fold and infers_in_float32(dev, cfg.training.precision):
        example = torch.rand(1, 3, *cfg.model.input_hw, generator=torch.Generator().manual_seed(0)).to(dev)
        folded = fold_batch_norms(model, example)
    return LoadedModel(model, cfg, kind, calibration, path, dev, folded)
