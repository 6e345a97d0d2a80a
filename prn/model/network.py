"""The Prototypical Residual Network (Sec. 3, Fig. 3).

Skip branch of scale j (j = 1, 2, 3; 1/4, 1/8, 1/16 of the input):

    F_j --MF--> F*_j ----------------------\
    F_j --MP--> D_j = |F_j - P*_j| --MF--> D*_j --concat--> C_j (2c_j) --MSA x N--> T_j --MF--> T*_j

and a U-Net decoder turns T*_1..3 into a logit map. The ablation switches of Table 4 drop parts:
without MP the skip is F*_j alone (c_j channels); without MF every fusion is skipped; without MSA
C_j goes straight to the decoder (the final MF only fuses attention outputs). All three off is
the plain U-Net baseline whose skips are the encoder features.

    >>> model = from_config(PRNConfig(backbone_weights="random"))
    >>> model.fit_prototypes(normal_batches)     # iterable of float32 (B, 3, S, S) in [0, 1]
    >>> logits = model.train()(x)                # (B, 1, S, S)
    >>> out = model.eval()(x)                    # {"anomaly_map": (B,1,S,S), "pred_score": (B,)}
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import Tensor, nn

from prn.config import PRNConfig
from prn.model.attention import MultiSizeSelfAttention
from prn.model.backbone import Encoder, create_encoder
from prn.model.decoder import Decoder
from prn.model.fusion import MultiScaleFusion
from prn.model.prototypes import Prototypes, kmeans_prototypes, num_prototypes


class PRN(nn.Module):
    """PRN around a frozen ``encoder`` with three taps; configured by ``cfg`` (network section)."""

    def __init__(self, encoder: Encoder, cfg: PRNConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = encoder
        feat = list(encoder.channels)
        self.skip_channels = [2 * c for c in feat] if cfg.use_prototypes else feat
        self.prototypes = Prototypes(len(feat)) if cfg.use_prototypes else None
        self.fuse_features = MultiScaleFusion(feat) if cfg.use_fusion else None
        self.fuse_residuals = MultiScaleFusion(feat) if cfg.use_fusion and cfg.use_prototypes else None
        self.attention = None
        self.fuse_attention = None
        if cfg.use_attention:
            self.attention = MultiSizeSelfAttention(
                self.skip_channels, cfg.attention_patch_divisors, cfg.attention_layers,
                cfg.attention_dim, cfg.attention_scale)
            if cfg.use_fusion:
                self.fuse_attention = MultiScaleFusion(self.skip_channels)
        self.decoder = Decoder(self.skip_channels, cfg.decoder_channels, encoder.reductions[0])
        # channels_last made the whole forward about 1.3x faster on CPU (benchmarks/speed.py,
        # docs/model.md): bilinear up-sampling and 1x1 convolutions avoid layout reorders.
        self.to(memory_format=torch.channels_last)

    @classmethod
    def from_config(cls, cfg: PRNConfig) -> "PRN":
        return cls(create_encoder(cfg.backbone, cfg.backbone_weights), cfg)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Every parameter outside the frozen encoder."""
        return [p for name, p in self.named_parameters() if not name.startswith("encoder.") and p.requires_grad]

    @torch.no_grad()
    def fit_prototypes(self, batches: Iterable[Tensor]) -> None:
        """Cluster the encoder features of normal images into prototypes (Sec. 3.1).

        batches: float32 (B, 3, S, S) in [0, 1] (or dicts holding one under "image").
        K = ceil(cfg.prototype_ratio * number of images), per scale. A model without MP has
        nothing to fit and returns at once.
        """
        if self.prototypes is None:
            return
        device = self.encoder.mean.device
        per_scale: list[list[Tensor]] = [[] for _ in self.encoder.channels]
        for batch in batches:
            images = batch["image"] if isinstance(batch, Mapping) else batch
            for store, f in zip(per_scale, self.encoder(images.to(device))):
                store.append(f.float().cpu())
        if not per_scale[0]:
            raise ValueError("fit_prototypes needs at least one batch of normal images")
        feats = [torch.cat(store) for store in per_scale]
        k = num_prototypes(len(feats[0]), self.cfg.prototype_ratio)
        self.prototypes.set([kmeans_prototypes(f, k, self.cfg.kmeans_max_iter, self.cfg.seed) for f in feats])

    def skips(self, x: Tensor) -> list[Tensor]:
        """x: float32 (B, 3, S, S) in [0, 1] -> skip maps (B, skip_channels[j], S/r_j, S/r_j)."""
        feats = self.encoder(x)
        maps = self.fuse_features(feats) if self.fuse_features is not None else feats
        if self.prototypes is not None:
            res = self.prototypes.residuals(feats)
            if self.fuse_residuals is not None:
                res = self.fuse_residuals(res)
            maps = [torch.cat([m, r], dim=1) for m, r in zip(maps, res)]
        if self.attention is not None:
            maps = self.attention(maps)
            if self.fuse_attention is not None:
                maps = self.fuse_attention(maps)
        return maps

    def forward(self, x: Tensor) -> Tensor | dict[str, Tensor]:
        """Training: logits (B, 1, S, S). Eval: {"anomaly_map": sigmoid map (B, 1, S, S) in [0, 1],
        "pred_score": mean of the top ``cfg.top_k`` map pixels, (B,)}."""
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"PRN expects images of shape (B, 3, S, S), got {tuple(x.shape)}")
        x = x.contiguous(memory_format=torch.channels_last)
        logits = self.decoder(self.skips(x), x.shape[-2:])
        if self.training:
            return logits
        anomaly_map = torch.sigmoid(logits)
        k = min(self.cfg.top_k, anomaly_map[0].numel())
        score = anomaly_map.flatten(1).topk(k, dim=1).values.mean(dim=1)
        return {"anomaly_map": anomaly_map, "pred_score": score}


def from_config(cfg: PRNConfig) -> PRN:
    """Build PRN with the encoder named by ``cfg.backbone`` / ``cfg.backbone_weights``."""
    return PRN.from_config(cfg)
