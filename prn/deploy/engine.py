"""Which engine runs the model inside ``prn predict``: torch (default) or onnxruntime.

The ONNX engine runs the run's exported graph (``prn.deploy.export``: the same pre-process, model
and post-process modules, traced), made on first use at ``RUN/export/model.onnx`` (beside the
checkpoint for a bare checkpoint file) and made again when the checkpoint is newer than it (a
recalibration rewrites the checkpoint). The images it receives are already at the model's input
size, so the graph's resize is the identity there; decisions stay with the Predictor's
post-process, so a ``--threshold`` or a recalibration applies to both engines alike. Both give the
same scores and maps within the export's parity tolerance (1e-4 of the map's scale; tested).

    >>> predictor = Predictor("runs/ksdd/latest")
    >>> forward = make_engine(predictor, "onnx")
    >>> scores, maps = forward(uint8_batch_nhwc)      # as Predictor.forward on the scaled batch
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from prn.errors import UsageError
from prn.preprocess import scale

ENGINES = ("torch", "onnx")
Engine = Callable[[torch.Tensor], tuple[np.ndarray, np.ndarray]]  # uint8 (B, H, W, 3) -> scores, maps


def onnx_file(predictor) -> Path:
    """Where the run's exported graph lives: RUN/export/model.onnx, or beside a bare checkpoint."""
    from prn.deploy.export import default_out
    ckpt = predictor.loaded.path
    return default_out(ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt, "onnx")


def ensure_exported(predictor, progress: bool = False) -> Path:
    """The ONNX file of the predictor's checkpoint, exported (and checked) when missing or older
    than the checkpoint, or made for another input size."""
    from prn.deploy.export import export, read_metadata
    path, ckpt = onnx_file(predictor), predictor.loaded.path
    if path.is_file() and path.stat().st_mtime >= ckpt.stat().st_mtime:
        meta = read_metadata(path)
        if (int(meta["input_height"]), int(meta["input_width"])) == tuple(predictor.input_hw):
            return path
    if progress:
        print(f"exporting {ckpt} to {path} for the onnx engine (once)")
    return export(ckpt, "onnx", path)


class OnnxEngine:
    """onnxruntime on the run's exported graph, with ``threads`` threads (default: as many as
    torch is given)."""

    def __init__(self, predictor, progress: bool = False, threads: int | None = None):
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise UsageError("--engine onnx needs onnxruntime: pip install 'prn[export]'") from exc
        self.path = ensure_exported(predictor, progress)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        providers = ["CPUExecutionProvider"]
        if predictor.loaded.device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        self.session = ort.InferenceSession(str(self.path), options, providers=providers)
        self.names = [o.name for o in self.session.get_outputs()]

    def __call__(self, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        nchw = images.permute(0, 3, 1, 2).contiguous().numpy()  # the graph's input contract
        out = dict(zip(self.names, self.session.run(None, {"images": nchw})))
        return out["score"].astype(np.float64), out["anomaly_map"][:, 0]


def make_engine(predictor, engine: str = "torch", progress: bool = False, threads: int | None = None) -> Engine:
    """A function from a uint8 (B, H, W, 3) batch at the model's input size (images as decoded
    and resized, stacked) to (scores float64 (B,), maps float32 (B, H, W)), run by ``engine``.
    ``threads``: onnxruntime's (default: torch's); torch's own are set with ``torch.set_num_threads``."""
    if engine not in ENGINES:
        raise UsageError(f"unknown engine {engine!r}; choose {' or '.join(ENGINES)}")
    if engine == "onnx":
        precision = predictor.cfg.training.precision
        if precision != "32":
            print(f"prn: warning: the exported graph computes in float32, but this run infers, and was "
                  f"calibrated, at precision {precision}; its scores can differ a little from those its "
                  f"thresholds were set on (prn calibrate RUN --precision 32 sets them for float32)",
                  file=sys.stderr)
        return OnnxEngine(predictor, progress, threads)
    return lambda images: predictor.forward(scale(images.permute(0, 3, 1, 2).contiguous()))
