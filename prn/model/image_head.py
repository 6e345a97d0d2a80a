"""The image-level decision head (ours): the decoder's features and the anomaly map -> one logit
per image, trained on the image labels of the training batches beside the pixel loss.

It follows the decision head of mixed-supervision surface-defect networks (Božič et al., 2021):
features at 1/4 of the input (the decoder's stage there) concatenated with the map max-pooled to
that size, two 3x3 convolutions with a 2x down-sampling between them, global max and mean pooling,
and, beside them, three statistics of the map (its maximum, the mean of its top pixels, its mean),
into one linear layer. The head's inputs are detached: its loss trains the head alone, so the
pixel map (and the pixel metrics) are those of PRN without it; what it adds is a decision that
can weigh where and how the map responds, not only how high its top pixels are.

    >>> head = ImageHead(64, top_k=100)
    >>> logit = head(features_quarter, probability_map)      # (B,)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from prn.model.decoder import conv_bn_relu


class ImageHead(nn.Module):
    """forward(features (B, c, H/r, W/r), prob_map (B, 1, H, W) in [0, 1]) -> logits (B,)."""

    def __init__(self, channels: int, top_k: int = 100, width: int = 32):
        super().__init__()
        self.top_k = top_k
        self.convs = nn.Sequential(conv_bn_relu(channels + 1, width), nn.MaxPool2d(2),
                                   conv_bn_relu(width, width))
        self.fc = nn.Linear(2 * width + 3, 1)

    def forward(self, features: Tensor, prob_map: Tensor) -> Tensor:
        features, prob_map = features.detach(), prob_map.detach().float()
        r = prob_map.shape[-1] // features.shape[-1]
        pooled_map = F.max_pool2d(prob_map, r) if r > 1 else prob_map
        pooled_map = pooled_map[..., :features.shape[-2], :features.shape[-1]]
        x = self.convs(torch.cat([features.float(), pooled_map], dim=1))
        flat = prob_map.flatten(1)
        k = min(self.top_k, flat.shape[1])
        stats = torch.stack([flat.amax(1), flat.topk(k, dim=1).values.mean(1), flat.mean(1)], dim=1)
        return self.fc(torch.cat([x.amax(dim=(2, 3)), x.mean(dim=(2, 3)), stats], dim=1))[:, 0]
