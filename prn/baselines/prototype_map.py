"""PRN's prototypes with no learned head: the anomaly map is the residual |F - P*| alone.

It shows what PRN's trained head adds, and it is a mode that trains nothing (``prn fit --model
prototypes``): k-means of the normal training images' features, as PRN's prototypes (Sec. 3.1),
and per scale the channel mean of the residual to the nearest prototype, up-sampled and summed
(``prn.model.prototypes.residual_map``), smoothed by ``map_sigma`` and scored by its top-k pixels.

    >>> model = build_prototype_map(cfg)
    >>> model.fit_prototypes(normal_batches, seed=0)
    >>> model(x)   # {"anomaly_map": (B, 1, H, W) >= 0, "pred_score": (B,)}
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

from prn.config import ModelConfig
from prn.model.backbone import Encoder, create_encoder
from prn.model.prototypes import Prototypes, fit_prototypes, residual_map
from prn.model.scoring import smoothed_and_scored, top_k_score
from prn.precision import full_precision


class PrototypeResidualMap(nn.Module):
    """eval forward(x (B, 3, H, W) in [0, 1]) -> {"anomaly_map": (B, 1, H, W) >= 0, "pred_score": (B,)}."""

    def __init__(self, encoder: Encoder, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = encoder
        self.prototypes = Prototypes(len(encoder.channels))

    @torch.no_grad()
    def fit_prototypes(self, batches: Iterable[Tensor], seed: int = 0) -> None:
        fit_prototypes(self.encoder, self.prototypes, batches, self.cfg.prototype_ratio,
                       self.cfg.kmeans_max_iter, seed)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"expected images of shape (B, 3, H, W), got {tuple(x.shape)}")
        feats = self.encoder(x)
        with full_precision(x):
            res = self.prototypes.residuals([f.float() for f in feats])
            anomaly_map, scored = smoothed_and_scored(residual_map(res, x.shape[-2:]), self.cfg)
        return {"anomaly_map": anomaly_map, "pred_score": top_k_score(scored, self.cfg.top_k)}


def build_prototype_map(cfg, *, pretrained: bool = True) -> PrototypeResidualMap:
    """An unfitted prototype map from a ``PRNConfig``'s model section."""
    m = cfg.model
    return PrototypeResidualMap(create_encoder(m.backbone, m.backbone_weights if pretrained else "random"), m)
