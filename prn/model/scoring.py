"""Anomaly maps to image scores (Sec. 3.5), shared by every model kind.

``smooth_map`` is the one Gaussian smoothing of maps in prn (PRN's optional ``map_sigma``, the
prototype map's, and PatchCore's sigma 4); ``smoothed_and_scored`` applies a model section's
``map_sigma`` and ``score_smoothed`` to a map; ``top_k_score`` is the paper's image score, the mean
of a map's largest pixels.

    >>> amap = smooth_map(torch.rand(2, 1, 64, 64), sigma=4.0)
    >>> top_k_score(amap, 100).shape
    torch.Size([2])
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def smooth_map(anomaly_map: Tensor, sigma: float) -> Tensor:
    """Gaussian smoothing of (B, 1, H, W) maps with ``sigma`` px, the kernel truncated at 4 sigma
    (2 * round(4 sigma) + 1 taps, as scipy and PatchCore), borders reflected; sigma 0 returns the
    maps unchanged.

    Written here as two 1-D passes because torchvision's ``gaussian_blur`` (the same kernel and
    border) convolves with the k x k outer product: 81 taps a pixel at sigma 1 instead of 18, 3.4 %
    of the `cpu` preset's forward pass (BENCHMARKS.md, "The map smoothed in two passes"). The
    outputs agree to float32 rounding (tests/test_values_model.py)."""
    if sigma <= 0:
        return anomaly_map
    k = 2 * int(4 * sigma + 0.5) + 1
    taps = torch.linspace(-(k // 2), k // 2, k, dtype=torch.float32, device=anomaly_map.device)
    kernel = torch.exp(-0.5 * (taps / sigma) ** 2)
    kernel = (kernel / kernel.sum()).to(anomaly_map.dtype)
    padded = F.pad(anomaly_map, [k // 2] * 4, mode="reflect")
    return F.conv2d(F.conv2d(padded, kernel.view(1, 1, k, 1)), kernel.view(1, 1, 1, k))


def smoothed_and_scored(raw: Tensor, cfg) -> tuple[Tensor, Tensor]:
    """(the map smoothed by ``cfg.map_sigma``, the map the image score is taken from: that one,
    or ``raw`` when ``cfg.score_smoothed`` is false) for (B, 1, H, W) maps and a model section."""
    anomaly_map = smooth_map(raw, cfg.map_sigma)
    return anomaly_map, (anomaly_map if cfg.score_smoothed else raw)


def top_k_score(anomaly_map: Tensor, top_k: int) -> Tensor:
    """Image score (Sec. 3.5): the mean of the ``top_k`` largest pixels of each map. (B, 1, H, W) -> (B,)."""
    k = min(top_k, anomaly_map[0].numel())
    return anomaly_map.flatten(1).topk(k, dim=1).values.mean(dim=1)
