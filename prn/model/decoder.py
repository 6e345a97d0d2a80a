"""U-Net-like decoder: skip maps at 1/4, 1/8, 1/16 -> one logit map at input resolution.

Starting from the deepest skip (narrowed by a 1x1 convolution), each stage doubles the
resolution (bilinear), concatenates the skip of that size if there is one, and applies a 3x3
convolution, batch norm and ReLU. With the encoder's 1/4 tap, ``channels`` has four widths:
stages at 1/8, 1/4, 1/2 and 1/1, then a 1x1 convolution gives the logits.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def conv_bn_relu(c_in: int, c_out: int, kernel: int = 3) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, kernel, padding=kernel // 2, bias=False),
                         nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class Decoder(nn.Module):
    """forward(skips: [(B, s_0, H/r, W/r), (B, s_1, H/2r, W/2r), (B, s_2, H/4r, W/4r)], size=(H, W))
    -> float logits (B, 1, H, W), where r is the finest skip's reduction (4 for both encoders).

    skip_channels: s_0, s_1, s_2 (finest first). channels: one width per stage, coarse to fine;
    len(skip_channels) - 1 stages merge skips and log2(r) more reach full resolution.
    """

    def __init__(self, skip_channels: list[int], channels: tuple[int, ...], finest_reduction: int = 4):
        super().__init__()
        n_merge = len(skip_channels) - 1
        n_up = int(math.log2(finest_reduction))
        if 2 ** n_up != finest_reduction:
            raise ValueError(f"finest reduction must be a power of two, got {finest_reduction}")
        if len(channels) != n_merge + n_up:
            raise ValueError(f"decoder_channels needs {n_merge + n_up} widths, one per stage from "
                             f"1/{finest_reduction * 2 ** (n_merge - 1)} to 1/1, got {len(channels)}")
        # The deepest skip is the widest (2c_3 = 512 for ResNet-18); narrowing it at 1/16 with a
        # 1x1 convolution halves the first 3x3 stage (1.8 -> 0.9 GFLOPs per 256 px image).
        self.lateral = conv_bn_relu(skip_channels[-1], channels[0], kernel=1)
        stages = []
        c_prev = channels[0]
        for i, c in enumerate(channels):
            skip = skip_channels[-2 - i] if i < n_merge else 0
            stages.append(conv_bn_relu(c_prev + skip, c))
            c_prev = c
        self.n_merge = n_merge
        self.stages = nn.ModuleList(stages)
        self.head = nn.Conv2d(c_prev, 1, kernel_size=1)

    @property
    def finest_skip_channels(self) -> int:
        """Width of the stage at the finest skip's resolution (1/4): what ``forward`` returns
        beside the logits with ``features=True``."""
        return self.stages[self.n_merge - 1][0].out_channels

    def forward(self, skips: list[Tensor], size: tuple[int, int], features: bool = False):
        """Logits (B, 1, H, W); with ``features`` also the stage at the finest skip's resolution."""
        x = self.lateral(skips[-1])
        n = len(self.stages)
        finest = None
        for i, stage in enumerate(self.stages):
            if i < self.n_merge:
                skip = skips[-2 - i]
                x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
                x = torch.cat([x, skip], dim=1)
            else:
                # The last stage lands exactly on the input size, whatever rounding came before.
                target = size if i == n - 1 else (x.shape[-2] * 2, x.shape[-1] * 2)
                x = F.interpolate(x, size=target, mode="bilinear", align_corners=False)
            x = stage(x)
            if i == self.n_merge - 1:
                finest = x
        return (self.head(x), finest) if features else self.head(x)
