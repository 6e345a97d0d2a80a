"""Multi-scale fusion (Sec. 3.2, Eq. 2): output j = sum_r f_rj(F_r).

- r == j: identity.
- r <  j: depth-wise separable convolution, stride s = 2^(j-r), kernel s + 1, padding s / 2,
  then a point-wise 1x1 convolution to c_j channels.
- r >  j: bilinear up-sampling to the size of scale j, then a 1x1 convolution to c_j channels.

Each non-identity branch ends in batch norm (ours, as in HRNet's fusion): the identity branch
carries raw encoder features or residuals, and the normalised branches are added to it at a
comparable scale instead of swamping or vanishing next to it.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class DownBranch(nn.Sequential):
    """Depth-wise separable down-sampling by ``stride`` (a power of two).

    (B, c_in, h, w) -> (B, c_out, h / stride, w / stride).
    """

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__(
            nn.Conv2d(c_in, c_in, kernel_size=stride + 1, stride=stride, padding=stride // 2,
                      groups=c_in, bias=False),
            nn.Conv2d(c_in, c_out, kernel_size=1, bias=False),
            nn.BatchNorm2d(c_out),
        )


class UpBranch(nn.Module):
    """Bilinear up-sampling to ``size`` then a 1x1 convolution: (B, c_in, h, w) -> (B, c_out, *size).

    Computed as 1x1 convolution, batch norm, up-sampling: the same map in eval mode; in training
    the batch statistics are taken before up-sampling.
    """

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel_size=1, bias=False)
        self.bn = nn.BatchNorm2d(c_out)

    def forward(self, x: Tensor, size: tuple[int, int]) -> Tensor:
        # A 1x1 convolution and bilinear interpolation commute exactly (one mixes channels, the
        # other pixels, with weights summing to one), so convolving first gives the paper's
        # result at a fraction of the cost; so does eval-mode batch norm (HRNet's order).
        return F.interpolate(self.bn(self.conv(x)), size=size, mode="bilinear", align_corners=False)


class MultiScaleFusion(nn.Module):
    """Fuse maps of several scales, each half the size of the previous.

    forward(list of (B, c_r, h_r, w_r)) -> list of (B, c_j, h_j, w_j), shapes unchanged.
    ``branches[r][j]`` is f_rj (an nn.Identity when r == j).
    """

    def __init__(self, channels: list[int]):
        super().__init__()
        self.channels = list(channels)
        n = len(channels)
        self.branches = nn.ModuleList()
        for r in range(n):
            row = nn.ModuleList()
            for j in range(n):
                if r == j:
                    row.append(nn.Identity())
                elif r < j:
                    row.append(DownBranch(channels[r], channels[j], 2 ** (j - r)))
                else:
                    row.append(UpBranch(channels[r], channels[j]))
            self.branches.append(row)

    def forward(self, maps: list[Tensor]) -> list[Tensor]:
        if len(maps) != len(self.channels):
            raise ValueError(f"expected {len(self.channels)} maps, got {len(maps)}")
        out = []
        for j, target in enumerate(maps):
            acc = None
            for r, x in enumerate(maps):
                if r == j:
                    continue
                f = self.branches[r][j]
                y = f(x) if r < j else f(x, target.shape[-2:])
                # In place on the branch outputs (never on the inputs): fewer large allocations.
                acc = y if acc is None else acc.add_(y)
            out.append(target if acc is None else acc.add_(target))
        return out
