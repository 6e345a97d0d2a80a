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

from torch import Tensor
from torchvision.transforms.v2.functional import gaussian_blur


def smooth_map(anomaly_map: Tensor, sigma: float) -> Tensor:
    """Gaussian smoothing of (B, 1, H, W) maps with ``sigma`` px, the kernel truncated at 4 sigma
    (2 * round(4 sigma) + 1 taps, as scipy and PatchCore); sigma 0 returns the maps unchanged."""
    if sigma <= 0:
        return anomaly_map
    k = 2 * int(4 * sigma + 0.5) + 1
    return gaussian_blur(anomaly_map, kernel_size=[k, k], sigma=[sigma, sigma])


def smoothed_and_scored(raw: Tensor, cfg) -> tuple[Tensor, Tensor]:
    """(the map smoothed by ``cfg.map_sigma``, the map the image score is taken from: that one,
    or ``raw`` when ``cfg.score_smoothed`` is false) for (B, 1, H, W) maps and a model section."""
    anomaly_map = smooth_map(raw, cfg.map_sigma)
    return anomaly_map, (anomaly_map if cfg.score_smoothed else raw)


def top_k_score(anomaly_map: Tensor, top_k: int) -> Tensor:
    """Image score (Sec. 3.5): the mean of the ``top_k`` largest pixels of each map. (B, 1, H, W) -> (B,)."""
    k = min(top_k, anomaly_map[0].numel())
    return anomaly_map.flatten(1).topk(k, dim=1).values.mean(dim=1)
