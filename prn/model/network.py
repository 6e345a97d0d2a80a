"""The Prototypical Residual Network (Sec. 3, Fig. 3).

Skip branch of scale j (j = 1, 2, 3; 1/4, 1/8, 1/16 of the input):

    F_j --MF--> F*_j ----------------------\
    F_j --MP--> D_j = |F_j - P*_j| --MF--> D*_j --concat--> C_j (2c_j) --MSA x N--> T_j --MF--> T*_j

and a U-Net decoder turns T*_1..3 into a logit map. The ablation switches of Table 4 drop parts:
without MP the skip is F*_j alone (c_j channels); without MF every fusion is skipped; without MSA
C_j goes straight to the decoder (the final MF only fuses attention outputs). All three off is
the plain U-Net baseline whose skips are the encoder features.

    >>> model = PRN.from_config(ModelConfig(backbone_weights="random"))
    >>> model.fit_prototypes(normal_batches)     # iterable of float32 (B, 3, S, S) in [0, 1]
    >>> logits = model.train()(x)                # (B, 1, S, S)
    >>> out = model.eval()(x)                    # {"anomaly_map": (B,1,S,S), "pred_score": (B,)}
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import Tensor, nn

from prn.config import TEST_FLIPS, ModelConfig
from prn.model.attention import MultiSizeSelfAttention
from prn.model.backbone import Encoder, create_encoder
from prn.model.decoder import Decoder
from prn.model.defect_memory import DefectMemory
from prn.model.fusion import MultiScaleFusion
from prn.model.image_head import ImageHead
from prn.model.prototypes import Prototypes, batch_images, fit_prototypes
from prn.model.scoring import smoothed_and_scored, top_k_score
from prn.precision import full_precision
from prn.tiling import from_tiles, to_tiles


def trained_weight_keys(state_dict: dict) -> list[str]:
    """The keys of a PRN state dict that gradient descent sets: not the frozen encoder, the k-means
    prototypes or the memory of the seen defects (built after training), nor batch norms' running
    statistics (DDP averages them over ranks): what two ways of training one model are compared on."""
    return [k for k in state_dict if not k.startswith(("encoder.", "prototypes.", "defect_memory."))
            and not k.endswith(("running_mean", "running_var", "num_batches_tracked"))]


class PRN(nn.Module):
    """PRN around a frozen ``encoder`` with three taps, built from the model section ``cfg``."""

    def __init__(self, encoder: Encoder, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = encoder
        feat = list(encoder.channels)
        self.skip_channels = [2 * c for c in feat] if cfg.use_prototypes else feat
        self.prototypes = Prototypes(len(feat), cfg.prototype_match) if cfg.use_prototypes else None
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
        # ours: the seen defects' features, matched at test time (built after training, when
        # cfg.defect_memory asks; empty, it changes nothing)
        self.defect_memory = DefectMemory(cfg.defect_memory_stride) if cfg.use_prototypes else None
        self.image_head = None
        if cfg.image_score in ("head", "mean"):  # ours: a learned image-level decision
            self.image_head = ImageHead(self.decoder.finest_skip_channels, cfg.top_k)
        if cfg.output_bias_prior > 0:
            # Start every pixel at probability p, not 0.5 (RetinaNet's prior): the first steps
            # then learn defects instead of pushing the background down.
            p = cfg.output_bias_prior
            nn.init.constant_(self.decoder.head.bias, math.log(p / (1 - p)))
        # channels_last made the whole forward about 1.3x faster on CPU (benchmarks/speed.py,
        # docs/model.md): bilinear up-sampling and 1x1 convolutions avoid layout reorders.
        self.to(memory_format=torch.channels_last)

    @classmethod
    def from_config(cls, cfg: ModelConfig) -> "PRN":
        return cls(create_encoder(cfg.backbone, cfg.backbone_weights), cfg)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Every parameter outside the frozen encoder."""
        return [p for name, p in self.named_parameters() if not name.startswith("encoder.") and p.requires_grad]

    @torch.no_grad()
    def fit_prototypes(self, batches: Iterable[Tensor], seed: int = 0) -> None:
        """Cluster the encoder features of normal images into prototypes (Sec. 3.1), k-means
        seeded by ``seed``.

        batches: float32 (B, 3, S, S) in [0, 1] (or dicts holding one under "image").
        K = ceil(cfg.prototype_ratio * number of images), per scale. A model without MP has
        nothing to fit and returns at once.
        """
        if self.prototypes is None:
            return
        t, ratio = self.cfg.tiles, self.cfg.prototype_ratio
        if t > 1:
            # Prototypes of the grid's tiles; K stays ratio x the number of images (k-means' cost
            # grows with K times the number of tiles, so K per tile would cost t^4 times as much).
            # Tiles go to the encoder in chunks of the batch's size: t^2 times its activations at
            # once would be the fit's peak.
            images = (batch_images(b) for b in batches)
            batches = (chunk for x in images for chunk in to_tiles(x, t).split(len(x)))
            ratio = ratio / (t * t)
        fit_prototypes(self.encoder, self.prototypes, batches, ratio, self.cfg.kmeans_max_iter, seed)

    def skips(self, x: Tensor) -> list[Tensor]:
        """x: float32 (B, 3, H, W) in [0, 1] -> skip maps (B, skip_channels[j], H/r_j, W/r_j)."""
        return self.skips_and_residuals(x)[0]

    def skips_and_residuals(self, x: Tensor) -> tuple[list[Tensor], list[Tensor] | None]:
        """The skip maps and the raw residuals |F_j - P*_j| (None without MP)."""
        return self.encode(x)[:2]

    def encode(self, x: Tensor, half: bool = False
               ) -> tuple[list[Tensor], list[Tensor] | None, list[Tensor], Tensor | None]:
        """The skip maps, the raw residuals (None without MP), the encoder's taps F_j, and its map
        at 1/2 of the input where ``half`` asks (else None)."""
        feats, finest = self.encoder(x, half=True) if half else (self.encoder(x), None)
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
        return maps, raw, feats, finest

    def forward(self, x: Tensor) -> Tensor | tuple[Tensor, Tensor] | dict[str, Tensor]:
        """Training: logits (B, 1, H, W), and with an image head (``cfg.image_score`` "head" or
        "mean") the tuple (logits, image logits (B,)). Eval: {"anomaly_map": sigmoid map (B, 1,
        H, W) in [0, 1], averaged with the maps of mirrored copies of the image (mirrored back)
        when ``cfg.test_flips`` asks, smoothed by ``cfg.map_sigma``, "pred_score": the image score (B,)}: of
        the smoothed map, or of the map before smoothing with ``cfg.score_smoothed`` false, the
        mean of the map's top ``cfg.top_k`` pixels (or top ``cfg.top_k_share`` of its area), the
        head's probability, or the mean of the two (``cfg.image_score``), fused with the defect
        memory's where one is built (``prn.model.defect_memory``). With ``cfg.tiles`` > 1 an eval
        input is cut into tiles that pass one by one in a batch, and their maps are put back
        together before smoothing and scoring; training batches are tiles already."""
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"PRN expects images of shape (B, 3, H, W), got {tuple(x.shape)}")
        x = x.contiguous(memory_format=torch.channels_last)
        tiles = 1 if self.training else self.cfg.tiles  # training batches are tiles already
        if tiles > 1:
            x = to_tiles(x, tiles).contiguous(memory_format=torch.channels_last)
        remembered = not self.training and self.defect_memory is not None and self.defect_memory.built
        skips, raw, taps, half = self.encode(x, half=remembered and self.defect_memory.needs_half)
        if self.image_head is None:
            logits, quarter = self.decoder(skips, x.shape[-2:]), None
        else:
            logits, quarter = self.decoder(skips, x.shape[-2:], features=True)
        if self.training:
            if self.image_head is None:
                return logits
            return logits, self.image_head(quarter, torch.sigmoid(logits.float()))
        with full_precision(x):  # a bfloat16 map would round image scores into ties
            probability = torch.sigmoid(logits.float())
            flips = TEST_FLIPS[self.cfg.test_flips]
            if flips:
                probability = (probability + self.flipped_maps(x, flips)) / (1 + len(flips))
            probability = from_tiles(probability, tiles)
            anomaly_map, scored = smoothed_and_scored(probability, self.cfg)
            score = self.image_score(scored, quarter)
            if remembered:
                score = self.defect_memory.fuse(score, taps, raw, half)
            return {"anomaly_map": anomaly_map, "pred_score": score}

    def flipped_maps(self, x: Tensor, flips: tuple[tuple[int, ...], ...]) -> Tensor:
        """The sum of the probability maps of ``x`` mirrored along each of ``flips`` (dims),
        each mirrored back: one forward pass over the mirrored copies stacked in one batch."""
        b = x.shape[0]
        mirrored = torch.cat([x.flip(dims) for dims in flips]).contiguous(memory_format=torch.channels_last)
        maps = torch.sigmoid(self.decoder(self.skips(mirrored), x.shape[-2:]).float())
        return sum(maps[i * b:(i + 1) * b].flip(dims) for i, dims in enumerate(flips))

    def image_score(self, anomaly_map: Tensor, quarter: Tensor | None) -> Tensor:
        """(B,) scores of eval maps (B, 1, H, W) by ``cfg.image_score``."""
        top = top_k_score(anomaly_map, self.cfg.k_of(*anomaly_map.shape[-2:]))
        if self.image_head is None:
            return top
        head = torch.sigmoid(self.image_head(quarter, anomaly_map))
        return head if self.cfg.image_score == "head" else 0.5 * (top + head)
