"""PatchCore (Roth et al., CVPR 2022): nearest-neighbour anomaly detection on a coreset of patch features.

Set beside PRN with the same frozen encoder (``prn.model.backbone``): no training, only a memory
bank of locally aggregated patch features from normal images, thinned by greedy k-center
coreset selection. A test patch's anomaly is its distance to the nearest bank entry.

    >>> import torch
    >>> from prn.model.backbone import create_encoder
    >>> model = PatchCore(create_encoder("resnet18", "random"), image_size=64).fit([torch.rand(4, 3, 64, 64)])
    >>> model.predict(torch.rand(2, 3, 64, 64))["anomaly_map"].shape
    torch.Size([2, 1, 64, 64])
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from prn.model.scoring import smooth_map

# Pairwise-distance blocks are capped at this many entries (64 MiB of float32) for a batch of
# NOMINAL_BATCH images; the blocks run over an image's patches, so a batch of B holds B / 16 of that.
_BLOCK = 1 << 24
NOMINAL_BATCH = 16


def random_projection(x: torch.Tensor, dim: int, generator: torch.Generator) -> torch.Tensor:
    """Johnson-Lindenstrauss projection of ``x`` float (N, D) to (N, dim); ``x`` itself when D <= dim.

    The Gaussian matrix is drawn on the CPU from ``generator`` so the result does not depend on
    the device.
    """
    if x.shape[1] <= dim:
        return x
    matrix = torch.randn(x.shape[1], dim, generator=generator) / math.sqrt(dim)
    return x @ matrix.to(device=x.device, dtype=x.dtype)


def greedy_coreset(x: torch.Tensor, n: int, start: int = 0) -> torch.Tensor:
    """Indices int64 (n,) of a greedy k-center coreset of ``x`` float (N, D), starting at ``start``.

    Each pick is the point farthest from all points picked so far (Gonzalez's algorithm), kept
    as one min-distance vector updated in O(N * D) per pick.
    """
    n = min(n, x.shape[0])
    sq = x.square().sum(1)
    # One fused product per pick gives |x_i|^2 + |x_c|^2 - 2 x_i.x_c for every i:
    # addmm(|x|^2, [x_c, |x_c|^2], [-2 x^T; 1]). The (D, N) layout also runs ~3x faster than a
    # matrix-vector product on MKL CPUs, and this loop is where fit spends its time.
    rows = torch.cat([x, sq[:, None]], 1)
    cols = torch.cat([-2 * x.t(), torch.ones_like(sq)[None]]).contiguous()
    min_dist = torch.full_like(sq, float("inf"))
    picked = torch.empty(n, dtype=torch.long, device=x.device)
    idx = torch.tensor(start, device=x.device)  # stays a tensor: no GPU sync per pick
    for i in range(n):
        picked[i] = idx
        torch.minimum(min_dist, torch.addmm(sq[None], rows[idx][None], cols)[0], out=min_dist)
        # Rounding can leave a picked point a tiny positive distance; it must never come back.
        min_dist.index_fill_(0, idx.view(1), -float("inf"))
        idx = min_dist.argmax()
    return picked


def squared_distances(queries: torch.Tensor, bank: torch.Tensor, bank_sq: torch.Tensor | None = None) -> torch.Tensor:
    """Squared Euclidean distances (..., M) >= 0 of queries (..., D) to every bank row (M, D), as
    |q|^2 - 2 q.m + |m|^2 (one matrix product, ``torch.cdist``'s fast path); ``bank_sq`` is |m|^2."""
    bank_sq = bank.square().sum(-1) if bank_sq is None else bank_sq
    return (queries.square().sum(-1, keepdim=True) - 2.0 * (queries @ bank.T) + bank_sq).clamp_min(0.0)


def exact_distances(queries: torch.Tensor, bank: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """||q - bank[j]|| for the bank rows ``indices`` (..., k) of each query ``queries`` (..., D) -> (..., k).

    The matrix-product form of ``squared_distances`` loses small distances to cancellation (a
    patch that is in the bank gets sqrt(eps |q|^2), 0.01 for typical features, not 0), so the
    chosen neighbours' distances are recomputed directly."""
    return torch.linalg.vector_norm(queries.unsqueeze(-2) - bank[indices], dim=-1)


def nearest_neighbors(queries: torch.Tensor, bank: torch.Tensor, k: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """The k nearest bank rows of each query (..., D): (distances (..., k), indices int64 (..., k)),
    nearest first. The queries' last-but-one axis is taken in blocks (see _BLOCK)."""
    bank_sq = bank.square().sum(-1)
    step = max(1, _BLOCK // (NOMINAL_BATCH * max(1, bank.shape[0])))
    dists, idxs = [], []
    for start in range(0, queries.shape[-2], step):
        chunk = queries[..., start:start + step, :]
        i = squared_distances(chunk, bank, bank_sq).topk(k, dim=-1, largest=False).indices
        dists.append(exact_distances(chunk, bank, i))
        idxs.append(i)
    return torch.cat(dists, -2), torch.cat(idxs, -2)


def image_scores(patches: torch.Tensor, bank: torch.Tensor, num_neighbors: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Patch distances float (B, P) and image scores float (B,) of ``patches`` (B, P, D) against ``bank`` (M, D).

    The image score is PatchCore's Eq. 7: the largest patch distance s* = ||m_test - m*||,
    scaled by 1 - exp||m_test - m*|| / sum over the b nearest bank neighbours m of m*
    (m* among them) of exp||m_test - m||. As ||m_test - m|| >= s*, the factor lies in
    [1 - 1/b, 1): near 1 when m* is an isolated (rare) bank entry, lowest when m* sits in a
    dense cluster of normal patches. The blocks run over the P patches of an image for the whole
    batch at once, so the same code exports with a dynamic batch size.
    """
    d = patches.shape[-1]
    dist, nn_idx = nearest_neighbors(patches, bank, k=1)
    dist, nn_idx = dist[..., 0], nn_idx[..., 0]  # (B, P)
    worst = dist.argmax(1, keepdim=True)  # (B, 1)
    m_test = patches.gather(1, worst[:, :, None].expand(-1, 1, d))[:, 0]  # (B, D)
    m_star = bank[nn_idx.gather(1, worst)[:, 0]]  # (B, D)
    k = min(num_neighbors, bank.shape[0])
    support = squared_distances(m_star, bank).topk(k, dim=1, largest=False).indices  # (B, k)
    d_support = torch.linalg.vector_norm(bank[support] - m_test[:, None], dim=-1)
    s_star = torch.linalg.vector_norm(m_test - m_star, dim=-1)
    weight = 1 - torch.exp(s_star - torch.logsumexp(d_support, dim=1))
    return dist, weight * s_star


class PatchCore(nn.Module):
    """PatchCore on a frozen ``prn.model.backbone.Encoder``.

    layers: 0-based taps of the encoder (1, 2 = its 1/8 and 1/16 outputs, the paper's mid-level
    features). neighbourhood: side of the local average pooling. embed_dim: 0 keeps every
    channel; else each tap is averaged over channel groups down to embed_dim // len(layers)
    (the paper's fixed-width features, taps weighing equally). max_bank: when the training
    images give more patches, a seeded random subset of max_bank is kept before the coreset
    (the greedy loop costs O(patches * coreset size)); coreset_ratio applies to what is kept;
    None keeps all. The learned state is the buffer ``memory_bank`` float (M, D).
    """

    def __init__(self, encoder: nn.Module, image_size: int | tuple[int, int], layers: tuple[int, ...] = (1, 2),
                 neighbourhood: int = 3, coreset_ratio: float = 0.1, num_neighbors: int = 9,
                 seed: int = 0, embed_dim: int = 0, max_bank: int | None = 100_000,
                 projection_dim: int = 128, sigma: float = 4.0):
        super().__init__()
        if not 0 < coreset_ratio <= 1:
            raise ValueError(f"coreset_ratio must be in (0, 1], got {coreset_ratio}")
        if embed_dim % len(layers):
            raise ValueError(f"embed_dim {embed_dim} must be a multiple of the number of layers {len(layers)}")
        self.encoder = encoder
        self.image_size = image_size
        self.layers = tuple(layers)
        self.neighbourhood = neighbourhood
        self.coreset_ratio = coreset_ratio
        self.num_neighbors = num_neighbors
        self.seed = seed
        self.embed_dim = embed_dim
        self.max_bank = max_bank
        self.projection_dim = projection_dim
        self.sigma = sigma
        dim = embed_dim or sum(encoder.channels[i] for i in self.layers)
        self.register_buffer("memory_bank", torch.empty(0, dim))

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Patch features float (B, h, w, D) of images float (B, 3, S, S) in [0, 1]; h = S / 8 for the default taps."""
        feats = self.encoder(images)
        k = self.neighbourhood
        # Border patches average only the neighbours that exist, not zero padding.
        taps = [F.avg_pool2d(feats[i], k, stride=1, padding=k // 2, count_include_pad=False)
                for i in self.layers]
        size = max((t.shape[-2:] for t in taps), key=lambda s: s[0] * s[1])
        taps = [t if t.shape[-2:] == size else F.interpolate(t, size=size, mode="bilinear", align_corners=False)
                for t in taps]
        if self.embed_dim:
            width = self.embed_dim // len(self.layers)
            taps = [F.adaptive_avg_pool1d(t.flatten(2).transpose(1, 2), width).transpose(1, 2).view(
                t.shape[0], width, *size) for t in taps]
        return torch.cat(taps, dim=1).permute(0, 2, 3, 1)

    def _check(self, images: torch.Tensor) -> torch.Tensor:
        hw = (self.image_size,) * 2 if isinstance(self.image_size, int) else tuple(self.image_size)
        expected = (3, *hw)
        if images.ndim != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(f"PatchCore expects images of shape (B, {', '.join(map(str, expected))}), "
                             f"got {tuple(images.shape)}")
        return images.to(device=self.memory_bank.device, dtype=self.memory_bank.dtype)

    @torch.no_grad()
    def fit(self, batches: Iterable[torch.Tensor | Mapping[str, torch.Tensor]]) -> PatchCore:
        """Build the memory bank from normal images: tensors (B, 3, S, S) in [0, 1] or dicts with "image"."""
        chunks = []
        for batch in batches:
            images = batch["image"] if isinstance(batch, Mapping) else batch
            chunks.append(self.embed(self._check(images)).flatten(0, 2))
        if not chunks:
            raise ValueError("PatchCore.fit got no training images")
        bank = torch.cat(chunks)
        gen = torch.Generator().manual_seed(self.seed)
        if self.max_bank and bank.shape[0] > self.max_bank:
            keep = torch.randperm(bank.shape[0], generator=gen)[: self.max_bank]
            bank = bank[keep.to(bank.device)]
        n = math.ceil(self.coreset_ratio * bank.shape[0])
        if n < bank.shape[0]:
            start = int(torch.randint(bank.shape[0], (1,), generator=gen))
            bank = bank[greedy_coreset(random_projection(bank, self.projection_dim, gen), n, start)]
        self.memory_bank = bank.contiguous()
        return self

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Images float (B, 3, S, S) in [0, 1] -> {"anomaly_map": float (B, 1, S, S), "pred_score": float (B,)}.

        Both are unnormalised distances in feature space (larger = more anomalous). The map is
        the patch distances upsampled bilinearly to S and Gaussian-smoothed (sigma 4).
        """
        if self.memory_bank.shape[0] == 0:
            raise RuntimeError("PatchCore has an empty memory bank: call fit() first")
        images = self._check(images)
        patches = self.embed(images)
        b, h, w, d = patches.shape
        dist, score = image_scores(patches.reshape(b, h * w, d), self.memory_bank, self.num_neighbors)
        amap = F.interpolate(dist.view(b, 1, h, w), size=images.shape[-2:], mode="bilinear", align_corners=False)
        return {"anomaly_map": smooth_map(amap, self.sigma), "pred_score": score}

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.predict(images)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # The bank's row count is only known after fit: take the checkpoint's before copying.
        # The feature width is kept, so a bank from other taps still fails with a size mismatch.
        bank = state_dict.get(prefix + "memory_bank")
        if isinstance(bank, torch.Tensor) and bank.ndim == 2:
            self.memory_bank = self.memory_bank.new_empty(bank.shape[0], self.memory_bank.shape[1])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def build_patchcore(cfg, *, pretrained: bool = True) -> PatchCore:
    """An empty PatchCore from a ``PRNConfig``: the model section's encoder and input size, the
    patchcore section's bank settings, the training seed."""
    from prn.model.backbone import create_encoder
    encoder = create_encoder(cfg.model.backbone, cfg.model.backbone_weights if pretrained else "random")
    return PatchCore(encoder, cfg.model.input_hw, coreset_ratio=cfg.patchcore.patchcore_coreset_ratio,
                     num_neighbors=cfg.patchcore.patchcore_num_neighbors, seed=cfg.training.seed,
                     max_bank=cfg.patchcore.patchcore_max_bank or None)
