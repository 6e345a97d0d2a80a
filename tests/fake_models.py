"""A model whose anomaly map is known: the brightness of its input. Images of white rectangles
on black then have their defects exactly where they were drawn, so tests can pin region boxes
in the original image's pixels through the real pre-process, resize and post-process."""

import shutil

import numpy as np
import torch
from torch import nn

from prn.checkpoint import load_checkpoint, set_calibration
from prn.deploy.predict import Predictor
from prn.postprocess import Postprocess

# thresholds of a made-up calibration: a pixel is defective at half brightness and above
CALIBRATION = {"image_threshold": 0.5, "pixel_threshold": 0.5, "score_min": 0.0, "score_max": 1.0,
               "pixel_min": 0.0, "pixel_max": 1.0}


class Brightness(nn.Module):
    """map = the input's channel mean (B, 1, H, W) in [0, 1]; score = the map's maximum."""

    def forward(self, x):
        amap = x.float().mean(1, keepdim=True)
        return {"anomaly_map": amap, "pred_score": amap.flatten(1).amax(1)}


def brightness_predictor(run, calibration=CALIBRATION) -> Predictor:
    """A real Predictor (pre-process, batching, resize) around ``Brightness``, deciding with
    ``calibration`` (None: uncalibrated)."""
    predictor = Predictor(run, device="cpu")
    predictor.model = predictor.pipeline.model = Brightness()
    post = Postprocess(calibration)
    predictor.pipeline.postprocess = predictor.postprocess = post
    predictor.calibration = calibration
    predictor.threshold, predictor.pixel_threshold = post.threshold, post.pixel_threshold
    return predictor


def drawn(hw, boxes) -> np.ndarray:
    """uint8 (H, W, 3): black with a white rectangle per (x, y, width, height)."""
    image = np.zeros((*hw, 3), np.uint8)
    for x, y, w, h in boxes:
        image[y:y + h, x:x + w] = 255
    return image


def region_boxes(regions) -> list[tuple[int, int, int, int]]:
    return sorted((r["x"], r["y"], r["width"], r["height"]) for r in regions)


def named_calibration_model(calibrated_run, demo_root, folder):
    """A copy of the calibrated run's checkpoint in ``folder``/checkpoints whose calibration names
    a suspect held-out image, the one whose score is the threshold, and one whose file is gone,
    as fit records them; returns (model path, the two readable images' paths)."""
    model = folder / "checkpoints" / "model.pt"
    model.parent.mkdir(parents=True)
    shutil.copy(calibrated_run / "checkpoints" / "model.pt", model)
    cal = load_checkpoint(model)["calibration"]
    goods = sorted((demo_root / "demo" / "train" / "good").iterdir())[:2]
    t = cal["image_threshold"]
    cal = {**cal, "n_normal": 4,
           "suspect_normals": [{"index": 3, "score": t + 0.5, "p": 1e-4, "path": str(goods[0])},
                               {"index": 2, "score": t + 0.4, "p": 1e-3, "path": str(folder / "gone.png")}],
           "threshold_image": {"index": 1, "score": t, "next_score": t - 0.1, "path": str(goods[1])}}
    set_calibration(model, cal)
    return model, goods


__all__ = ["Brightness", "CALIBRATION", "brightness_predictor", "drawn", "named_calibration_model", "region_boxes", "torch"]
