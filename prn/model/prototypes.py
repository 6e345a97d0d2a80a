"""Multi-scale prototypes and residual representations (Sec. 3.1, Eq. 1).

The prototypes of one scale are K feature maps of normal images, clustered with k-means over
whole flattened maps (L2 over c*h*w). An input's residual at that scale is the element-wise
distance ``|F - P*|`` to its nearest prototype ``P*`` (match "map", Eq. 1). With match "position"
(ours) ``P*`` is taken at each position on its own: the prototypes' feature vector there nearest
to the input's (L2 over c), so a good part is matched where it looks like any of the K maps.

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

from prn.config import PROTOTYPE_MATCHES

SCALE_NAMES = ("p1", "p2", "p3")
PREPARED = ("_centre", "_centred", "_norms")  # non-persistent buffers of Prototypes, per scale


def exporting() -> bool:
    """Whether a graph is being traced or exported (TorchScript's trace, torch.export, ONNX), where
    work the eager model keeps from call to call is done in the graph instead. (A traced graph is
    what gets scripted, so scripting never runs this module's Python.)"""
    return torch.jit.is_tracing() or torch.compiler.is_exporting() or torch.onnx.is_in_onnx_export()


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


def prepare_map(prototypes: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """What ``nearest_prototype`` needs of (K, c, h, w) ``prototypes`` whatever the input: their
    mean (1, D), the prototypes about it (K, D), pixel-major, and their squared norms (K,)."""
    # Flattened pixel-major (h, w, c): a free view of channels_last maps. L2 ignores the order.
    b = prototypes.permute(0, 2, 3, 1).reshape(prototypes.shape[0], -1)
    centre = b.mean(dim=0, keepdim=True)
    b = b - centre
    return centre, b, b.square().sum(dim=1)


def nearest_prototype(features: Tensor, prototypes: Tensor,
                      prepared: tuple[Tensor, Tensor, Tensor] | None = None) -> Tensor:
    """Index of the nearest prototype of each map (L2 over c*h*w).

    features: (B, c, h, w); prototypes: (K, c, h, w); ``prepared``: ``prepare_map(prototypes)``,
    made once where the prototypes are fixed. Returns int64 (B,).
    """
    # ||a - b||^2 = ||a||^2 - 2ab + ||b||^2 (one matrix product), with ||a||^2 left out as it is
    # the same for every prototype. Taken about the origin, float32 cancellation loses the argmin
    # when maps share a large offset and differ little; about the prototypes' mean the offset is
    # gone (the subtractions are exact for values within a factor 2 of the mean), so the rounding
    # scales with the maps' spread, not their magnitude. Float32 throughout, so the same code
    # runs in exported graphs (ONNX, TorchScript) as in eager mode.
    centre, b, norms = prepared if prepared is not None else prepare_map(prototypes)
    a = features.permute(0, 2, 3, 1).reshape(features.shape[0], -1) - centre
    return (norms[None, :] - 2.0 * (a @ b.T)).argmin(dim=1)


def prepare_position(prototypes: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """What ``nearest_per_position`` needs of (K, c, h, w) ``prototypes``, position-major: their
    mean (h*w, 1, c), the prototypes about it (h*w, c, K) and their squared norms (h*w, 1, K)."""
    k, c, h, w = prototypes.shape
    centre = prototypes.mean(dim=0, keepdim=True)
    b = (prototypes - centre).permute(2, 3, 1, 0).reshape(h * w, c, k)
    return centre.permute(2, 3, 0, 1).reshape(h * w, 1, c), b, b.square().sum(dim=1, keepdim=True)


def nearest_per_position(features: Tensor, prototypes: Tensor,
                         prepared: tuple[Tensor, Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
    """At each position, the prototypes' feature vector nearest to the input's (L2 over c).

    features: (B, c, h, w); prototypes: (K, c, h, w); ``prepared``: ``prepare_position(prototypes)``.
    Returns the matched maps (B, c, h, w, channels_last), each vector a prototype's exactly, and
    the index of the prototype chosen at each position, int64 (B, h, w).
    """
    # The expansion of nearest_prototype about the prototypes' mean, one small matrix product per
    # position (a batch of h*w).
    centre, b, norms = prepared if prepared is not None else prepare_position(prototypes)
    n, c, h, w = features.shape
    a = features.permute(2, 3, 0, 1).reshape(h * w, n, c) - centre
    index = (norms - 2.0 * torch.bmm(a, b)).argmin(dim=2)  # (h*w, B)
    # The chosen vectors gathered from the prototypes as rows (K*h*w, c), a free view of
    # channels_last maps: no copy of the prototypes per input, in eager mode or in exported graphs.
    rows = prototypes.permute(0, 2, 3, 1).reshape(-1, c)
    position = torch.arange(h * w, device=index.device)[:, None]
    matched = rows[(index * (h * w) + position).reshape(-1)].reshape(h * w, n, c).transpose(0, 1)
    return matched.reshape(n, h, w, c).permute(0, 3, 1, 2), index.transpose(0, 1).reshape(n, h, w)


def _nearest_whole_map(features: Tensor, prototypes: Tensor,
                       prepared: tuple[Tensor, Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
    """The nearest prototype of each map (Eq. 1) and its index, as ``nearest_per_position`` returns."""
    index = nearest_prototype(features, prototypes, prepared)
    return prototypes[index], index


# Per match: what it prepares of the prototypes once, and the match itself -> (matched maps, indices).
MATCHERS = {"map": (prepare_map, _nearest_whole_map), "position": (prepare_position, nearest_per_position)}


class Prototypes(nn.Module):
    """Prototype buffers ``p1, p2, p3`` of shape (K, c_j, h_j, w_j), fixed after fitting, kept
    in channels_last layout like the network's feature maps.

    A state dict with any K loads into a fresh instance: the buffers take the stored shapes.
    Forward passes keep no state (``residuals_and_indices`` returns the indices), so the module
    exports to ONNX and TorchScript as it runs.
    """

    def __init__(self, num_scales: int = 3, match: str = "map"):
        super().__init__()
        if match not in PROTOTYPE_MATCHES:
            raise ValueError(f"match must be one of {', '.join(PROTOTYPE_MATCHES)}, got {match!r}")
        self.names = SCALE_NAMES[:num_scales]
        self.match = match
        for name in self.names:
            self.register_buffer(name, torch.empty(0))
            # What the match needs of the prototypes whatever the input, made once when they are set
            # or loaded (remade per batch it was most of the match's time), and never saved.
            for part in PREPARED:
                self.register_buffer(name + part, torch.empty(0), persistent=False)

    def _prepare(self) -> None:
        prepare = MATCHERS[self.match][0]
        for name in self.names:
            p = getattr(self, name)
            parts = prepare(p) if p.dim() == 4 and p.shape[0] > 0 else (torch.empty(0, device=p.device),) * 3
            for part, value in zip(PREPARED, parts):
                setattr(self, name + part, value)

    def prepared(self, name: str) -> tuple[Tensor, Tensor, Tensor] | None:
        """What the match prepared of scale ``name``'s prototypes; None while a graph is exported,
        which makes them from the prototypes instead, as it did before they were kept: stored
        beside the prototypes they made KolektorSDD's ONNX file 37.2 MB instead of 22.7 MB, and
        onnxruntime's graph optimisations can fold a graph's constant parts when it loads it."""
        if exporting():
            return None
        return tuple(getattr(self, name + part) for part in PREPARED)

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
        self._prepare()

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
        self._prepare()

    def residuals(self, feats: list[Tensor]) -> list[Tensor]:
        """feats: per scale (B, c_j, h_j, w_j). Returns per scale D_j = |F_j - P*_j|, same shape."""
        return self.residuals_and_indices(feats)[0]

    def residuals_and_indices(self, feats: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        """The residuals D_j and, per scale, the nearest prototype's index: int64 (B,), or (B, h_j,
        w_j) with match "position"."""
        if not self.fitted:
            raise RuntimeError("prototypes are not fitted: call PRN.fit_prototypes(normal_batches) first")
        out, indices = [], []
        for name, f in zip(self.names, feats):
            protos = getattr(self, name)
            if protos.shape[1:] != f.shape[1:]:
                raise ValueError(
                    f"prototypes {name} have map shape {tuple(protos.shape[1:])} but features are "
                    f"{tuple(f.shape[1:])}; were they fitted at another image size?")
            matched, idx = MATCHERS[self.match][1](f, protos, self.prepared(name))
            out.append(torch.sub(f, matched).abs_())
            indices.append(idx)
        return out, indices

    def extra_repr(self) -> str:
        shapes = ", ".join(f"{n}={tuple(getattr(self, n).shape)}" for n in self.names)
        return shapes if self.match == "map" else f"{shapes}, match={self.match}"


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
