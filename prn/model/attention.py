"""Multi-size self-attention (Sec. 3.3, Eq. 3).

Each head cuts the map into square patches of its own size p_s = h / d (d in
``cfg.model.attention_patch_divisors``, so p_s in {h, h/2, h/4, h/8}); every patch is one token, and
the tokens of a head attend to each other.

Embedding. The paper embeds each flattened 2c x p x p patch with a fully connected layer; for
p = h that layer alone would have (2c h^2)^2 weights, so q, k and v are embedded by 1x1
convolutions before cutting patches: the same linear map at every pixel, giving tokens of
dimension c^s = d_head * p * p.

Softmax scale. Eq. 3 divides the logits by c^s. We divide by sqrt(c^s), as in the Transformer:
with unit-variance embeddings q.k has standard deviation sqrt(c^s), so this keeps the logits at
unit scale for every patch size, while 1/c^s shrinks them by another 1/sqrt(c^s) (1/90 for the
32 x 32 patches of scale 1 with d_head = 8), so the large-patch heads would average their tokens
almost uniformly and learn slowly.
``cfg.model.attention_scale = "paper"`` selects 1/c^s.

Block. The heads are concatenated (d_head * heads channels), passed through a residual block
of two 3x3 convolutions with batch norm and an identity skip, projected back to the block's
width 2c by a 1x1 convolution and added to the block's input, so a stack of blocks refines the
skip map rather than replacing it. ``cfg.model.attention_layers`` blocks are stacked per scale.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

SCALES = ("sqrt", "paper")


def patch_size(size: int, divisor: int) -> int:
    """The patch side for a map side ``size``: size // divisor, lowered until it tiles the side."""
    p = max(1, size // divisor)
    while size % p:
        p -= 1
    return p


def to_patches(x: Tensor, ph: int, pw: int) -> Tensor:
    """(B, C, H, W) -> (B, N, C*ph*pw) tokens, N = (H/ph)(W/pw), in F.unfold's order."""
    b, c, h, w = x.shape
    x = x.reshape(b, c, h // ph, ph, w // pw, pw).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // ph) * (w // pw), c * ph * pw)


def from_patches(t: Tensor, c: int, h: int, w: int, ph: int, pw: int) -> Tensor:
    """Inverse of ``to_patches``: (B, N, C*ph*pw) -> (B, C, H, W) in channels_last layout."""
    b = t.shape[0]
    t = t.reshape(b, h // ph, w // pw, c, ph, pw).permute(0, 1, 4, 2, 5, 3)
    return t.reshape(b, h, w, c).permute(0, 3, 1, 2)


def conv_bn(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out))


class ResidualBlock(nn.Module):
    """x + BN(conv3x3(ReLU(BN(conv3x3(x))))): (B, C, H, W) -> (B, C, H, W)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = conv_bn(channels, channels)
        self.conv2 = conv_bn(channels, channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv2(F.relu(self.conv1(x), inplace=True)).add_(x)


class MSABlock(nn.Module):
    """One multi-size self-attention block at one scale: (B, C, H, W) -> (B, C, H, W).

    divisors: one head per divisor, patch side H / divisor. head_dim: q/k/v channels per head.
    scale: "sqrt" (1/sqrt(c^s)) or "paper" (1/c^s). The heads (head_dim * heads channels) go
    through the residual block, a 1x1 projection back to C, and are added to the input.
    """

    def __init__(self, channels: int, divisors: tuple[int, ...], head_dim: int, scale: str = "sqrt"):
        super().__init__()
        if scale not in SCALES:
            raise ValueError(f"attention scale must be one of {SCALES}, got {scale!r}")
        if not divisors:
            raise ValueError("attention needs at least one patch divisor (one head)")
        self.divisors = tuple(divisors)
        self.head_dim = head_dim
        self.scale = scale
        inner = head_dim * len(self.divisors)
        self.qkv = nn.Conv2d(channels, 3 * inner, kernel_size=1)
        self.block = ResidualBlock(inner)
        # No batch norm after this linear map: the residual block already ends in one, and
        # another would cost a pass over the block's widest map.
        self.proj = nn.Conv2d(inner, channels, kernel_size=1)

    def patch_sizes(self, h: int, w: int) -> list[tuple[int, int]]:
        return [(patch_size(h, d), patch_size(w, d)) for d in self.divisors]

    def attend(self, x: Tensor) -> Tensor:
        """The concatenated heads: (B, C, H, W) -> (B, head_dim * heads, H, W)."""
        _, _, h, w = x.shape
        q, k, v = self.qkv(x).chunk(3, dim=1)
        heads = []
        for s, (ph, pw) in enumerate(self.patch_sizes(h, w)):
            part = slice(s * self.head_dim, (s + 1) * self.head_dim)
            if ph == h and pw == w:
                # One token attends only to itself (softmax over one logit is 1): the output is V.
                heads.append(v[:, part])
                continue
            qs, ks, vs = (to_patches(t[:, part], ph, pw).unsqueeze(1) for t in (q, k, v))
            dim = qs.shape[-1]
            scale = 1.0 / math.sqrt(dim) if self.scale == "sqrt" else 1.0 / dim
            out = F.scaled_dot_product_attention(qs, ks, vs, scale=scale).squeeze(1)
            heads.append(from_patches(out, self.head_dim, h, w, ph, pw))
        return torch.cat(heads, dim=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(self.block(self.attend(x))).add_(x)


class MultiSizeSelfAttention(nn.Module):
    """``layers`` stacked MSA blocks per scale: list of (B, C_j, H_j, W_j) -> same shapes.

    head_dim 0 means C_j / heads (the full width at every scale).
    """

    def __init__(self, channels: list[int], divisors: tuple[int, ...], layers: int = 3,
                 head_dim: int = 0, scale: str = "sqrt"):
        super().__init__()
        heads = max(1, len(divisors))
        self.stacks = nn.ModuleList(
            nn.Sequential(*[MSABlock(c, divisors, head_dim or max(1, c // heads), scale) for _ in range(layers)])
            for c in channels
        )

    def forward(self, maps: list[Tensor]) -> list[Tensor]:
        return [stack(m) for stack, m in zip(self.stacks, maps)]
