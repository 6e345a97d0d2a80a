"""The path of an image to a decision, in one place: pre-process -> model -> post-process.

``InferencePipeline`` is what ``prn export`` writes to a file, and its parts are what every other
caller uses: the DataLoaders of validation, test and calibration, ``prn predict`` and ``prn serve``
turn images into model inputs with its ``Preprocess``, run the model through ``forward_model`` and
decide with its ``Postprocess``. A model here is any ``nn.Module`` whose eval-mode
``forward(x float32 (B, 3, H, W) in [0, 1])`` returns ``{"anomaly_map": (B, 1, H, W),
"pred_score": (B,)}`` (PRN, the prototype map and PatchCore all do).

    >>> pipe = InferencePipeline(model, cfg.model.input_hw, calibration)
    >>> out = pipe(torch.randint(0, 256, (4, 3, 500, 1250), dtype=torch.uint8))
    >>> out["score"], out["anomaly_map"], out["prediction"]
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from prn.postprocess import Postprocess
from prn.precision import inference_autocast
from prn.preprocess import OFF, Detail, Preprocess


@torch.no_grad()
def forward_model(model: nn.Module, images: Tensor, device: torch.device, precision: str = "32"
                  ) -> tuple[np.ndarray, np.ndarray]:
    """The one forward pass at inference: float32 (B, 3, H, W) model inputs -> (scores float64
    (B,), maps float32 (B, H, W)), under the run's precision (prn.precision); maps and scores come
    out of the model in float32 whatever the precision."""
    with inference_autocast(device, precision):
        out = model(images.to(device, non_blocking=True))
    return out["pred_score"].double().cpu().numpy(), out["anomaly_map"][:, 0].float().cpu().numpy()


class InferencePipeline(nn.Module):
    """uint8 RGB (B, 3, H, W), any H x W -> {"anomaly_map" float32 (B, 1, h, w) at the model's
    input size, "score" float32 (B,)} and, when calibrated, "normalized_score" float32 (B,) and
    "prediction" bool (B,)."""

    def __init__(self, model: nn.Module, input_hw: tuple[int, int], calibration: dict | None = None,
                 threshold: float | None = None, detail: Detail = OFF):
        super().__init__()
        self.preprocess = Preprocess(input_hw, detail)
        self.model = model
        self.postprocess = Postprocess(calibration, threshold)

    @property
    def calibrated(self) -> bool:
        return self.postprocess.calibrated

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        out = self.model(self.preprocess(images))
        amap, score = out["anomaly_map"], out["pred_score"]
        return {"anomaly_map": amap, "score": score, **self.postprocess(amap, score)}
