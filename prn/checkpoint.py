"""Checkpoints: tensors and plain config only, written atomically, read with ``weights_only=True``.

A checkpoint is a dict of plain types and tensors:

    {"format": "prn-checkpoint", "format_version": 1, "prn_version": "0.1.0", "model": "prn",
     "config": {...PRNConfig.to_dict()...}, "state_dict": {...}, "optimizer": {...} | None,
     "epoch": int, "history": [{...floats...}], "extra": {...},
     "calibration": {...thresholds, prn.deploy.calibrate...} | None}

The encoder's frozen weights are inside ``state_dict`` too, so a checkpoint predicts offline even
when it was trained with ResNet-18 weights that this machine could not download.
"""

from __future__ import annotations

import os
import pickle
import tempfile
from pathlib import Path
from typing import Any

import torch

from prn import __version__
from prn.errors import CheckpointError

FORMAT = "prn-checkpoint"
FORMAT_VERSION = 1


def save_checkpoint(path: str | Path, *, model: str, config: dict, state_dict: dict,
                    optimizer: dict | None = None, epoch: int = 0,
                    history: list | None = None, extra: dict | None = None,
                    calibration: dict | None = None) -> Path:
    """Write a checkpoint so that a crash at any point leaves the previous file intact.

    The data goes to a temporary file in the same folder, is flushed to disk, then renamed over
    the target (an atomic replace on POSIX and Windows). A full disk fails before the rename.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "prn_version": __version__,
        "model": model, "config": config,
        "state_dict": {k: v.detach().cpu() for k, v in state_dict.items()},
        "optimizer": optimizer, "epoch": int(epoch), "history": history or [], "extra": extra or {},
        "calibration": calibration,
    }
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(payload, fh)
            fh.flush()
            os.fsync(fh.fileno())
        # mkstemp makes the file private (0600); give it the permissions a plain open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def checkpoint_file(path: str | Path) -> Path:
    """The file a run folder or checkpoint path stands for: a run's ``checkpoints/model.pt`` (the
    weights a finished fit kept), else its ``checkpoints/last.pt`` (the latest epoch); a file as is."""
    path = Path(path)
    if path.is_dir():
        chosen = path / "checkpoints" / "model.pt"
        return chosen if chosen.is_file() else path / "checkpoints" / "last.pt"
    return path


def load_checkpoint(path: str | Path, *, expect_model: str | None = None) -> dict[str, Any]:
    """Read a checkpoint safely. Anything but tensors and plain data is refused, never executed."""
    path = checkpoint_file(path)
    if not path.is_file():
        from prn.runs import why_no_checkpoint  # what became of the run: failed, running...
        raise CheckpointError(f"{path}: checkpoint not found{why_no_checkpoint(path)}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{path}: refused: the file holds objects other than tensors and plain data, "
            f"which prn never unpickles ({str(exc).splitlines()[0]})") from exc
    except Exception as exc:  # truncated zip, not a torch file, ...
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(exc).__name__}: {exc})") from exc
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a prn checkpoint (no '{FORMAT}' header)")
    version = payload.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format version {version} is not supported by prn {__version__} "
            f"(which reads version {FORMAT_VERSION}); retrain or use the prn version that wrote it "
            f"({payload.get('prn_version')})")
    if expect_model is not None and payload.get("model") != expect_model:
        raise CheckpointError(
            f"{path}: holds a {payload.get('model')!r} model, expected {expect_model!r}")
    return payload


def set_calibration(path: str | Path, calibration: dict | None) -> Path:
    """Store ``calibration`` in the checkpoint that ``path`` stands for (rewritten atomically)."""
    return update_checkpoint(path, calibration=calibration)


def update_checkpoint(path: str | Path, **changes) -> Path:
    """Replace fields of the checkpoint that ``path`` stands for (``calibration``, ``config``,
    ``state_dict``, ``history``, ``extra``), the others kept; rewritten atomically."""
    path = checkpoint_file(path)
    payload = load_checkpoint(path)
    payload.update(changes)
    keys = ("config", "state_dict", "optimizer", "epoch", "history", "extra", "calibration")
    return save_checkpoint(path, model=payload["model"], **{k: payload.get(k) for k in keys})


def check_compatible(path: str | Path, payload: dict, cfg) -> None:
    """Fail clearly when a checkpoint's model section (the network's shape, input and outputs)
    differs from ``cfg``'s (a ``PRNConfig``), as when a run is resumed with another config."""
    from prn.config import PRNConfig
    saved = PRNConfig.from_dict(payload.get("config", {})).model
    # where the encoder's weights came from, and the defect memory (built after training, from the
    # split), leave the network's shape as it is
    free = ("backbone_weights", "defect_memory", "defect_memory_gate")
    diffs = [f"{k}: checkpoint has {v!r}, config has {getattr(cfg.model, k)!r}"
             for k, v in vars(saved).items() if k not in free and getattr(cfg.model, k) != v]
    if diffs:
        raise CheckpointError(f"{path}: incompatible with this config ({'; '.join(diffs)})")
