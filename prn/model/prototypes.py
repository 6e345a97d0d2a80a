"""Multi-scale prototypes and residual representations (Sec. 3.1, Eq. 1).

The prototypes of one scale are K feature maps of normal images, clustered with k-means over
whole flattened maps (L2 over c*h*w). An input's residual at that scale is the element-wise
distance ``|F - P*|`` to its nearest prototype ``P*``.

    >>> protos = Prototypes()
    >>> protos.set([kmeans_prototypes(f, num_prototypes(len(f), 0.1)) for f in normal_feats])
    >>> residuals = protos.residuals(feats)          # list of (B, c_j, h_j, w_j)
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import numpy as np
import torch
from torch import Tensor, nn

SCALE_NAMES = ("p1", "p2", "p3")


def num_prototypes(n_normal: int, ratio: float) -> int:
    """K = ceil(ratio * n_normal), at least 1 and at most n_normal."""
    if n_normal < 1:
        raise ValueError(f"need at least one normal image to build prototypes, got {n_normal}")
    # The small tolerance keeps float products such as 0.1 * 30 = 3.0000000000000004 at 3.
    k = math.ceil(ratio * n_normal - 1e-9)
    return max(1, min(n_normal, k))


def kmeans_prototypes(features: Tensor, k: int, max_iter: int = 300, seed: int = 0) -> Tensor:
    """Cluster whole feature maps with k-means; returns the k centres.

    features: float (N, c, h, w). Returns float32 (k, c, h, w) on the device of ``features``.
    With k >= N there is nothing to cluster: every map is a prototype (Table 6's 100%).
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    # a copy: _kmeans centres its input in place
    flat = features.detach().float().reshape(features.shape[0], -1).cpu().numpy().copy()
    return _kmeans(flat, k, max_iter, seed).reshape(-1, *features.shape[1:]).to(features.device)


def _kmeans(flat: np.ndarray, k: int, max_iter: int, seed: int) -> Tensor:
    """k-means centres of the rows of float32 (N, D) ``flat``: float32 (min(k, N), D); with k >= N
    every row is a centre (``flat`` itself, not copied). ``flat`` is centred in place and put back
    (copy_x=False: no second copy of what can be gigabytes)."""
    if k >= len(flat):
        return torch.from_numpy(flat)
    from sklearn.cluster import KMeans

    # k-means++ seeding starts from K of the normal maps, as the paper does (Sec. 3.1), but
    # samples them spread out, so one run does not leave two seeds inside one cluster.
    km = KMeans(n_clusters=k, init="k-means++", n_init=1, max_iter=max_iter, random_state=seed, copy_x=False)
    km.fit(flat)
    return torch.from_numpy(km.cluster_centers_).float()


def nearest_prototype(features: Tensor, prototypes: Tensor) -> Tensor:
    """Index of the nearest prototype of each map (L2 over c*h*w).

    features: (B, c, h, w); prototypes: (K, c, h, w). Returns int64 (B,).
    """
    # Flattened pixel-major (h, w, c): a free view of channels_last maps. L2 ignores the order.
    a = features.permute(0, 2, 3, 1).reshape(features.shape[0], -1)
    b = prototypes.permute(0, 2, 3, 1).reshape(prototypes.shape[0], -1)
    # ||a - b||^2 = ||a||^2 - 2ab + ||b||^2 (one matrix product), with ||a||^2 left out as it is
    # the same for every prototype. Taken about the origin, float32 cancellation loses the argmin
    # when maps share a large offset and differ little; about the prototypes' mean the offset is
    # gone (the subtractions are exact for values within a factor 2 of the mean), so the rounding
    # scales with the maps' spread, not their magnitude. Float32 throughout, so the same code
    # runs in exported graphs (ONNX, TorchScript) as in eager mode.
    centre = b.mean(dim=0, keepdim=True)
    a, b = a - centre, b - centre
    d2 = b.square().sum(dim=1)[None, :] - 2.0 * (a @ b.T)
    return d2.argmin(dim=1)


class Prototypes(nn.Module):
    """Prototype buffers ``p1, p2, p3`` of shape (K, c_j, h_j, w_j), fixed after fitting, kept
    in channels_last layout like the network's feature maps.

    A state dict with any K loads into a fresh instance: the buffers take the stored shapes.
    Forward passes keep no state (``residuals_and_indices`` returns the indices), so the module
    exports to ONNX and TorchScript as it runs.
    """

    def __init__(self, num_scales: int = 3):
        super().__init__()
        self.names = SCALE_NAMES[:num_scales]
        for name in self.names:
            self.register_buffer(name, torch.empty(0))

    @property
    def fitted(self) -> bool:
        return all(getattr(self, n).dim() == 4 and getattr(self, n).shape[0] > 0 for n in self.names)

    def set(self, prototypes: list[Tensor]) -> None:
        """prototypes: one float (K_j, c_j, h_j, w_j) tensor per scale."""
        if len(prototypes) != len(self.names):
            raise ValueError(f"expected {len(self.names)} prototype tensors, got {len(prototypes)}")
        for name, p in zip(self.names, prototypes):
            if p.dim() != 4 or p.shape[0] < 1:
                raise ValueError(f"prototypes {name} must be (K, c, h, w) with K >= 1, got {tuple(p.shape)}")
            old = getattr(self, name)
            p = p.detach().to(device=old.device, dtype=torch.float32)
            setattr(self, name, p.contiguous(memory_format=torch.channels_last))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Resize the buffers to the stored K (and map size) so any checkpoint loads.
        for name in self.names:
            stored = state_dict.get(prefix + name)
            if stored is not None:
                old = getattr(self, name)
                layout = torch.channels_last if stored.dim() == 4 else torch.contiguous_format
                setattr(self, name, torch.empty(stored.shape, dtype=stored.dtype, device=old.device,
                                                memory_format=layout))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def residuals(self, feats: list[Tensor]) -> list[Tensor]:
        """feats: per scale (B, c_j, h_j, w_j). Returns per scale D_j = |F_j - P*_j|, same shape."""
        return self.residuals_and_indices(feats)[0]

    def residuals_and_indices(self, feats: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        """The residuals D_j and, per scale, the nearest prototype's index, int64 (B,)."""
        if not self.fitted:
            raise RuntimeError("prototypes are not fitted: call PRN.fit_prototypes(normal_batches) first")
        out, indices = [], []
        for name, f in zip(self.names, feats):
            protos = getattr(self, name)
            if protos.shape[1:] != f.shape[1:]:
                raise ValueError(
                    f"prototypes {name} have map shape {tuple(protos.shape[1:])} but features are "
                    f"{tuple(f.shape[1:])}; were they fitted at another image size?")
            idx = nearest_prototype(f, protos)
            out.append(torch.sub(f, protos[idx]).abs_())
            indices.append(idx)
        return out, indices

    def extra_repr(self) -> str:
        return ", ".join(f"{n}={tuple(getattr(self, n).shape)}" for n in self.names)


def batch_images(batch: Tensor | Mapping) -> Tensor:
    """The images of a batch given as a tensor or as a dict holding them under "image"."""
    return batch["image"] if isinstance(batch, Mapping) else batch


@torch.no_grad()
def fit_prototypes(encoder: nn.Module, prototypes: Prototypes, batches: Iterable[Tensor | Mapping],
                   ratio: float, max_iter: int = 300, seed: int = 0) -> None:
    """Cluster the ``encoder`` features of normal images into ``prototypes`` (Sec. 3.1).

    batches: float32 (B, 3, H, W) in [0, 1] (or dicts holding one under "image").
    K = ceil(ratio * number of images), per scale. The features are kept once, as flat float32
    arrays, and each scale's are let go once it is clustered: the features of every normal image
    are the fit's largest allocation.
    """
    device = next(iter(encoder.buffers()), torch.empty(0)).device
    per_scale: list[list[np.ndarray]] = [[] for _ in prototypes.names]
    shapes: list[tuple[int, ...]] = []
    for batch in batches:
        feats = encoder(batch_images(batch).to(device))
        shapes = [tuple(f.shape[1:]) for f in feats]
        for store, f in zip(per_scale, feats):
            store.append(f.float().reshape(len(f), -1).cpu().numpy())
        del feats
    if not per_scale[0]:
        raise ValueError("fitting prototypes needs at least one batch of normal images")
    centres = []
    for store, shape in zip(per_scale, shapes):
        flat = np.concatenate(store)
        store.clear()
        k = num_prototypes(len(flat), ratio)
        centres.append(_kmeans(flat, k, max_iter, seed).reshape(-1, *shape))
        del flat
    prototypes.set(centres)


def residual_map(residuals: list[Tensor], size: tuple[int, int]) -> Tensor:
    """The untrained anomaly map of the residuals alone: per scale the channel mean of
    |F - P*|, up-sampled (bilinear) to ``size`` and summed over scales. list of (B, c_j, h_j, w_j)
    -> float (B, 1, H, W)."""
    out = None
    for r in residuals:
        m = torch.nn.functional.interpolate(r.float().mean(dim=1, keepdim=True), size=tuple(size),
                                            mode="bilinear", align_corners=False)
        out = m if out is None else out + m
    return out
