"""Numeric precision of training and inference: ``cfg.training.precision`` is "32", "bf16" or "16".

- "32": float32 everywhere (the default, and what every figure in BENCHMARKS.md used unless it
  says otherwise).
- "bf16": ``torch.autocast`` to bfloat16 on CUDA or on the CPU. bfloat16 keeps float32's range,
  so no loss scaling is needed. On a CPU without native bfloat16 instructions (AVX512-BF16 or
  AMX) it is emulated and slower than float32: BENCHMARKS.md has the figures of this project's CPU.
- "auto": "bf16" where the device computes bfloat16 natively (a CUDA GPU that supports it, a CPU
  with AVX512-BF16 or AMX), "32" elsewhere; ``prn fit`` fixes it when the run starts and writes
  the result to config.yaml, so a run never changes precision with the machine it is moved to.
- "16": ``torch.autocast`` to float16 with a ``torch.amp.GradScaler`` (float16's range is small
  enough for gradients to underflow without loss scaling). CUDA only for training; inference of a
  model trained so runs in float32 on the CPU.

Whatever the precision, the loss (``prn.model.loss``), the distances to prototypes and the map's
tail (sigmoid, smoothing, top-k score; ``prn.model.network``) are computed in float32: those are
the places where bfloat16's 8-bit mantissa would pick wrong prototypes or quantise image scores
into ties. Weights and optimiser state stay float32 (autocast casts per operation).

    >>> with autocast(device, cfg.training.precision):
    ...     logits = model(images)
"""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path

import torch

from prn.config import PRECISIONS
from prn.errors import UsageError

_DTYPES = {"bf16": torch.bfloat16, "16": torch.float16}


@functools.lru_cache(maxsize=None)
def _cpu_flags() -> frozenset[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: no flags known, so no native bfloat16 assumed
        return frozenset()
    return frozenset(word for line in text.splitlines() if line.startswith("flags") for word in line.split())


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bfloat16 natively: on a CPU without AVX512-BF16 or AMX, torch
    emulates it at 0.3-0.6 times float32's speed (BENCHMARKS.md), with them it is faster."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return bool({"avx512_bf16", "amx_bf16"} & _cpu_flags())
    return False


def resolve_precision(precision: str, device: torch.device) -> str:
    """``precision`` with "auto" replaced by "bf16" or "32" for ``device`` (see the module)."""
    if precision != "auto":
        return precision
    return "bf16" if native_bf16(device) else "32"


def check_precision(precision: str, device: torch.device) -> None:
    """Fail with a message when ``precision`` cannot train on ``device``."""
    if precision not in PRECISIONS:
        raise UsageError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "16" and device.type != "cuda":
        raise UsageError(f"precision 16 (float16 with loss scaling) needs CUDA, and this run is on "
                       f"{device}; use --precision bf16 or 32 on the CPU")
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UsageError(f"precision bf16: {torch.cuda.get_device_name(device)} has no bfloat16 support; "
                       f"use --precision 16 or 32")


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """The autocast context of ``precision`` on ``device`` for training (see check_precision)."""
    precision = resolve_precision(precision, device)
    if precision == "32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=_DTYPES[precision])


def infers_in_float32(device: torch.device, precision: str) -> bool:
    """Whether inference at ``precision`` on ``device`` runs in plain float32 (no autocast)."""
    precision = resolve_precision(precision, device)
    return precision == "32" or (precision == "16" and device.type != "cuda")


def inference_autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """As ``autocast``, but float16 falls back to float32 off CUDA: a model trained in float16 on
    a GPU still predicts on a CPU (slower, not different)."""
    if infers_in_float32(device, precision):
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=_DTYPES[resolve_precision(precision, device)])


def grad_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler:
    """Loss scaling for float16; a disabled scaler (its calls pass through) otherwise."""
    return torch.amp.GradScaler(device.type, enabled=precision == "16")


def full_precision(x: torch.Tensor) -> contextlib.AbstractContextManager:
    """Autocast switched off on ``x``'s device while it is on; nothing otherwise, so traced and
    exported graphs (where autocast is off) hold no trace of it."""
    kind = x.device.type
    if torch.is_autocast_enabled(kind):
        return torch.autocast(kind, enabled=False)
    return contextlib.nullcontext()
