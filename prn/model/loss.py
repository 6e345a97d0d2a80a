"""The training loss of Sec. 3.5, Eq. 5: SmoothL1(M_o, M) + lambda * focal(M_o, M)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from prn.config import TrainingConfig


def _mean(values: Tensor, weight: Tensor | None) -> Tensor:
    """The mean of ``values``, or their mean over the pixels of ``weight`` 1 (0 counts none)."""
    if weight is None:
        return values.mean()
    return (values * weight).sum() / weight.sum().clamp_min(1.0)


def focal_loss(logits: Tensor, target: Tensor, alpha: float = 0.5, gamma: float = 4.0,
               weight: Tensor | None = None) -> Tensor:
    """Binary focal loss (Lin et al. 2017) on sigmoid probabilities, mean over all pixels (or the
    pixels of ``weight`` 1).

    FL = -alpha_t (1 - p_t)^gamma log(p_t), with p_t = p where the target is 1 and 1 - p where
    it is 0, and alpha_t = alpha or 1 - alpha likewise. logits, target: float (B, 1, H, W).
    Returns a float scalar.
    """
    logits, target = logits.float(), target.float()
    # -log(p_t) straight from the logits stays finite where sigmoid saturates to 0 or 1.
    nll = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p_t = torch.exp(-nll)
    alpha_t = alpha * target + (1 - alpha) * (1 - target)
    return _mean(alpha_t * (1 - p_t).pow(gamma) * nll, weight)


def prn_loss(logits: Tensor, mask: Tensor, cfg: TrainingConfig,
             weight: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """Eq. 5 with ``cfg``'s focal settings. logits: float (B, 1, S, S) from the training forward;
    mask: float (B, 1, S, S) in {0, 1}; weight: float (B, 1, S, S) in {0, 1}, the pixels that count
    (None: all; boxes and image labels leave some out, prn.anomalies.compose.TrainingSet).

    Returns (total scalar with grad, {"smooth_l1": detached scalar, "focal": detached scalar}).
    """
    if logits.shape != mask.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and mask {tuple(mask.shape)} differ in shape")
    # float32 even under autocast: the per-pixel terms are tiny and bfloat16 would round them.
    logits, mask = logits.float(), mask.float()
    if weight is not None and bool((weight > 0).all()):
        weight = None  # every pixel counts: the paper's plain means, to the last bit
    smooth_l1 = _mean(F.smooth_l1_loss(torch.sigmoid(logits), mask, reduction="none"), weight) \
        if weight is not None else F.smooth_l1_loss(torch.sigmoid(logits), mask)
    focal = focal_loss(logits, mask, cfg.focal_alpha, cfg.focal_gamma, weight)
    total = smooth_l1 + cfg.focal_weight * focal
    return total, {"smooth_l1": smooth_l1.detach(), "focal": focal.detach()}


def _top_k_mean(prob: Tensor, region: Tensor, k: int) -> Tensor:
    """Per image, the mean of the ``k`` largest of ``prob`` (B, N) over the pixels of ``region``
    (B, N) bool; a region smaller than k pixels counts its own pixels only. (B,)."""
    top = prob.masked_fill(~region, -1.0).topk(min(k, prob.shape[1]), dim=1).values
    counted = top >= 0
    return (top.clamp_min(0) * counted).sum(1) / counted.sum(1).clamp_min(1)


def weak_loss(logits: Tensor, region: Tensor, weak: Tensor, top_k: int) -> Tensor:
    """For defects known only by an image label or a loose box (multiple-instance learning): the
    mean probability of the map's ``top_k`` pixels inside the region (the box; anywhere for a
    label alone: an empty region) should be 1. -log of it, averaged over the images with
    ``weak`` 1; 0 when there are none. logits, region: (B, 1, H, W); weak: (B,)."""
    pick = weak > 0.5
    if not bool(pick.any()):
        return logits.new_zeros((), dtype=torch.float32)
    prob = torch.sigmoid(logits[pick].float()).flatten(1)
    inside = region[pick].flatten(1) > 0.5
    inside = inside | ~inside.any(dim=1, keepdim=True)  # no region: the whole image
    return -torch.log(_top_k_mean(prob, inside, top_k).clamp_min(1e-6)).mean()


def top_k_loss(logits: Tensor, mask: Tensor, weak: Tensor, top_k: int) -> Tensor:
    """The image score itself as a training target (ours): Eq. 5 weighs every pixel alike, so a
    few bright pixels on a good part cost it almost nothing, yet they are what the top-k image
    score (Sec. 3.5) reads. On every image annotated pixel by pixel (``weak`` 0: the normal
    images, the generated anomalies and the seen anomalies with a mask), the mean of the map's
    ``top_k`` pixels outside the defect should be 0 and, where there is a defect, the mean of its
    ``top_k`` pixels inside it should be 1: binary cross-entropy of each, summed, averaged over
    the images. Defects known by a label or a box alone have ``weak_loss``.
    logits, mask: (B, 1, H, W); weak: (B,). A float scalar."""
    pick = weak <= 0.5
    if not bool(pick.any()):
        return logits.new_zeros((), dtype=torch.float32)
    prob = torch.sigmoid(logits[pick].float()).flatten(1)
    inside = mask[pick].flatten(1) > 0.5
    outside = _top_k_mean(prob, ~inside, top_k)
    loss = -torch.log((1 - outside).clamp_min(1e-6)).mean()
    defect = inside.any(dim=1)
    if bool(defect.any()):
        within = _top_k_mean(prob[defect], inside[defect], top_k)
        loss = loss + -torch.log(within.clamp_min(1e-6)).sum() / len(prob)
    return loss
