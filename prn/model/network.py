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

import math
from collections.abc import Iterable

import torch
from torch import Tensor, nn

from prn.config import PRNConfig
from prn.model.attention import MultiSizeSelfAttention
from prn.model.backbone import Encoder, create_encoder
from prn.model.decoder import Decoder
from prn.model.fusion import MultiScaleFusion
from prn.model.prototypes import Prototypes, fit_prototypes, residual_map
from prn.precision import full_precision


def smooth_map(anomaly_map: Tensor, sigma: float) -> Tensor:
    """Gaussian smoothing of (B, 1, H, W) maps with ``sigma`` px (kernel 2 * round(4 sigma) + 1, as
    PatchCore's); sigma 0 returns the maps unchanged."""
    if sigma <= 0:
        return anomaly_map
    from torchvision.transforms.v2.functional import gaussian_blur
    k = 2 * int(4 * sigma + 0.5) + 1
    return gaussian_blur(anomaly_map, kernel_size=[k, k], sigma=[sigma, sigma])


def top_k_score(anomaly_map: Tensor, top_k: int) -> Tensor:
    """Image score (Sec. 3.5): the mean of the ``top_k`` largest pixels of each map. (B, 1, H, W) -> (B,)."""
    k = min(top_k, anomaly_map[0].numel())
    return anomaly_map.flatten(1).topk(k, dim=1).values.mean(dim=1)


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
        self.residual_prior = None
        if cfg.residual_prior and cfg.use_prototypes:
            # ours: logits = head + w (R - mu) / sd, with R the untrained residual map and mu, sd
            # its mean and spread over the normal training images: training starts from
            # the prototype map and learns a correction, instead of having to rediscover it.
            self.register_buffer("residual_stats", torch.tensor([0.0, 1.0]))
            self.residual_prior = nn.Parameter(torch.tensor(1.0))
        if cfg.output_bias_prior > 0:
            # Start every pixel at probability p, not 0.5 (RetinaNet's prior): the first steps
            # then learn defects instead of pushing the background down.
            p = cfg.output_bias_prior
            nn.init.constant_(self.decoder.head.bias, math.log(p / (1 - p)))
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
        feats = fit_prototypes(self.encoder, self.prototypes, batches, self.cfg.prototype_ratio,
                               self.cfg.kmeans_max_iter, self.cfg.seed)
        if self.residual_prior is not None:
            sums = torch.zeros(2, dtype=torch.float64)
            n = 0
            for i in range(0, len(feats[0]), 16):
                chunk = [f[i:i + 16].to(self.residual_stats.device) for f in feats]
                r0 = self.encoder.reductions[0]
                size = (chunk[0].shape[-2] * r0, chunk[0].shape[-1] * r0)
                r = residual_map(self.prototypes.residuals(chunk), size).double()
                sums += torch.stack([r.sum(), r.square().sum()]).cpu()
                n += r.numel()
            mean = sums[0] / n
            sd = (sums[1] / n - mean ** 2).clamp_min(1e-12).sqrt()
            self.residual_stats.copy_(torch.stack([mean, sd]).float())

    def skips(self, x: Tensor) -> list[Tensor]:
        """x: float32 (B, 3, H, W) in [0, 1] -> skip maps (B, skip_channels[j], H/r_j, W/r_j)."""
        return self.skips_and_residuals(x)[0]

    def skips_and_residuals(self, x: Tensor) -> tuple[list[Tensor], list[Tensor] | None]:
        """The skip maps and the raw residuals |F_j - P*_j| (None without MP)."""
        feats = self.encoder(x)
        maps = self.fuse_features(feats) if self.fuse_features is not None else feats
        raw = None
        if self.prototypes is not None:
            # float32 under autocast too: in bfloat16 the distances pick wrong nearest prototypes
            with full_precision(x):
                raw = self.prototypes.residuals([f.float() for f in feats])
            res = self.fuse_residuals(raw) if self.fuse_residuals is not None else raw
            maps = [torch.cat([m, r], dim=1) for m, r in zip(maps, res)]
        if self.attention is not None:
            maps = self.attention(maps)
            if self.fuse_attention is not None:
                maps = self.fuse_attention(maps)
        return maps, raw

    def forward(self, x: Tensor) -> Tensor | dict[str, Tensor]:
        """Training: logits (B, 1, H, W). Eval: {"anomaly_map": sigmoid map (B, 1, H, W) in [0, 1],
        smoothed by ``cfg.map_sigma``, "pred_score": mean of its top ``cfg.top_k`` pixels, (B,)}."""
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"PRN expects images of shape (B, 3, H, W), got {tuple(x.shape)}")
        x = x.contiguous(memory_format=torch.channels_last)
        maps, raw = self.skips_and_residuals(x)
        logits = self.decoder(maps, x.shape[-2:])
        if self.residual_prior is not None:
            mean, sd = self.residual_stats
            prior = (residual_map(raw, x.shape[-2:]) - mean) / sd
            logits = logits + self.residual_prior * prior.to(logits.dtype)
        if self.training:
            return logits
        with full_precision(x):  # a bfloat16 map would round image scores into ties
            anomaly_map = smooth_map(torch.sigmoid(logits.float()), self.cfg.map_sigma)
            return {"anomaly_map": anomaly_map, "pred_score": top_k_score(anomaly_map, self.cfg.top_k)}


class PrototypeResidualMap(nn.Module):
    """PRN's prototypes with no learned head: the map is the residual |F - P*| alone
    (``residual_map``), smoothed by ``cfg.map_sigma``, scored by its top ``cfg.top_k`` pixels.
    It shows what the trained head adds, and is a mode that trains nothing.

    eval forward(x (B, 3, H, W) in [0, 1]) -> {"anomaly_map": (B, 1, H, W) >= 0, "pred_score": (B,)}.
    """

    def __init__(self, encoder: Encoder, cfg: PRNConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = encoder
        self.prototypes = Prototypes(len(encoder.channels))

    @classmethod
    def from_config(cls, cfg: PRNConfig) -> "PrototypeResidualMap":
        return cls(create_encoder(cfg.backbone, cfg.backbone_weights), cfg)

    @torch.no_grad()
    def fit_prototypes(self, batches: Iterable[Tensor]) -> None:
        fit_prototypes(self.encoder, self.prototypes, batches, self.cfg.prototype_ratio,
                       self.cfg.kmeans_max_iter, self.cfg.seed)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"expected images of shape (B, 3, H, W), got {tuple(x.shape)}")
        feats = self.encoder(x)
        with full_precision(x):
            res = self.prototypes.residuals([f.float() for f in feats])
            anomaly_map = smooth_map(residual_map(res, x.shape[-2:]), self.cfg.map_sigma)
        return {"anomaly_map": anomaly_map, "pred_score": top_k_score(anomaly_map, self.cfg.top_k)}


def from_config(cfg: PRNConfig) -> PRN:
    """Build PRN with the encoder named by ``cfg.backbone`` / ``cfg.backbone_weights``."""
    return PRN.from_config(cfg)
