"""The training loss of Sec. 3.5, Eq. 5: SmoothL1(M_o, M) + lambda * focal(M_o, M)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from prn.config import TrainingConfig


def focal_loss(logits: Tensor, target: Tensor, alpha: float = 0.5, gamma: float = 4.0) -> Tensor:
    """Binary focal loss (Lin et al. 2017) on sigmoid probabilities, mean over all pixels.

    FL = -alpha_t (1 - p_t)^gamma log(p_t), with p_t = p where the target is 1 and 1 - p where
    it is 0, and alpha_t = alpha or 1 - alpha likewise. logits, target: float (B, 1, H, W).
    Returns a float scalar.
    """
    logits, target = logits.float(), target.float()
    # -log(p_t) straight from the logits stays finite where sigmoid saturates to 0 or 1.
    nll = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p_t = torch.exp(-nll)
    alpha_t = alpha * target + (1 - alpha) * (1 - target)
    return (alpha_t * (1 - p_t).pow(gamma) * nll).mean()


def prn_loss(logits: Tensor, mask: Tensor, cfg: TrainingConfig) -> tuple[Tensor, dict[str, Tensor]]:
    """Eq. 5 with ``cfg``'s focal settings. logits: float (B, 1, S, S) from the training forward;
    mask: float (B, 1, S, S) in {0, 1}.

    Returns (total scalar with grad, {"smooth_l1": detached scalar, "focal": detached scalar}).
    """
    if logits.shape != mask.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and mask {tuple(mask.shape)} differ in shape")
    # float32 even under autocast: the per-pixel terms are tiny and bfloat16 would round them.
    logits, mask = logits.float(), mask.float()
    smooth_l1 = F.smooth_l1_loss(torch.sigmoid(logits), mask)
    focal = focal_loss(logits, mask, cfg.focal_alpha, cfg.focal_gamma)
    total = smooth_l1 + cfg.focal_weight * focal
    return total, {"smooth_l1": smooth_l1.detach(), "focal": focal.detach()}
