"""The one post-process: a model's anomaly map and image score -> what the line acts on.

``Postprocess`` holds a run's calibration (``prn.deploy.calibrate``: thresholds set on held-out good
training images, and the score ranges) as buffers, and turns the model's outputs into

- the normalised score, anomalib's ``clip((s - threshold) / (max - min) + 0.5, 0, 1)``: 0.5 is the
  threshold whatever the model's score scale (PRN's probabilities, PatchCore's distances);
- the decision, defective when ``score >= image threshold``; and, where the calibration has a
  review band, whether a part that passes goes to a person (``review threshold <= score <
  image threshold``);
- the defect region of a map (pixels ``>= pixel threshold``) and the map normalised the same way
  around the pixel threshold, for pictures;
- the defect regions as a list (``regions``): the region's connected components with their
  bounding boxes, area, peak and mean score, which ``prn predict`` writes to regions.jsonl and
  ``prn serve`` returns. They are computed on the map at the image's own size (``resize_map``),
  so boxes are in the original image's pixels.

The same module decides in ``prn test``, ``prn predict``, ``prn serve`` and inside the exported
graph. Without a calibration (and no threshold given) there is nothing to decide by: the score
and map come back alone and ``calibrated`` is False.

    >>> post = Postprocess(calibration)
    >>> out = post(anomaly_map, score)     # {"normalized_score": (B,), "prediction": bool (B,)}
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

SPAN_FLOOR = 1e-12  # a range narrower than this normalises by 1 instead
# the smallest region (pixels of the image at its own size) listed by default: every one. A map
# resized from the model's input is smooth, so specks are rare; predict and serve take
# --min-region-area to drop small ones where a line wants that
MIN_REGION_AREA = 1


def _span(lo: float, hi: float) -> float:
    return hi - lo if hi - lo > SPAN_FLOOR else 1.0


def float32_threshold(threshold: float) -> float:
    """The smallest float32 >= ``threshold``: a float32 score s passes ``s >= t32`` in float32
    exactly when ``s >= threshold`` in float64."""
    t = np.float32(threshold)
    if float(t) < threshold:
        t = np.nextafter(t, np.float32(np.inf))
    return float(t)


class Postprocess(nn.Module):
    """Decisions and normalisation from a calibration dict (None: uncalibrated). ``threshold``
    overrides the calibrated image threshold (``--threshold``); the ranges stay the calibration's.

    forward(anomaly_map (B, 1, H, W), score (B,)) -> {"normalized_score": float32 (B,),
    "prediction": bool (B,)}, empty when there is no threshold."""

    def __init__(self, calibration: dict | None = None, threshold: float | None = None):
        super().__init__()
        self.calibration = calibration
        cal = calibration or {}
        self.threshold = threshold if threshold is not None else cal.get("image_threshold")
        self.pixel_threshold = cal.get("pixel_threshold")
        self.calibrated = self.threshold is not None
        # the band's lower edge; its upper edge is the image threshold, given or calibrated
        self.review_threshold = cal.get("review_threshold") if self.calibrated else None
        t = self.threshold if self.threshold is not None else 0.0
        span = _span(cal["score_min"], cal["score_max"]) if calibration else 1.0
        pix = self.pixel_threshold if self.pixel_threshold is not None else 0.5
        pixel_span = _span(cal["pixel_min"], cal["pixel_max"]) if calibration else 1.0
        # float32 scores decide against the smallest float32 >= the threshold, exactly as float64
        # would; the normalised score is centred on the same value, so it is >= 0.5 when decided so
        self.register_buffer("image_threshold", torch.tensor(float32_threshold(t)))
        self.register_buffer("norm_span", torch.tensor(span, dtype=torch.float32))
        self.register_buffer("map_threshold", torch.tensor(pix, dtype=torch.float32))
        self.register_buffer("map_span", torch.tensor(pixel_span, dtype=torch.float32))

    def normalize(self, score: Tensor) -> Tensor:
        """float (B,) -> float32 (B,) in [0, 1], 0.5 at the image threshold."""
        return ((score.float() - self.image_threshold) / self.norm_span + 0.5).clamp(0.0, 1.0)

    def decide(self, score: Tensor) -> Tensor:
        """bool (B,): defective where score >= the image threshold."""
        return score.float() >= self.image_threshold

    def forward(self, anomaly_map: Tensor, score: Tensor) -> dict[str, Tensor]:
        if not self.calibrated:
            return {}
        return {"normalized_score": self.normalize(score), "prediction": self.decide(score)}

    def display_map(self, amap: np.ndarray) -> np.ndarray:
        """A map (any shape) in [0, 1] for pictures: normalised around the pixel threshold (0.5)
        when calibrated, else clipped (PRN's maps are probabilities already)."""
        amap = torch.as_tensor(np.asarray(amap, dtype=np.float32))
        if self.calibration is None:
            return amap.clamp(0.0, 1.0).numpy()
        return ((amap - self.map_threshold) / self.map_span + 0.5).clamp(0.0, 1.0).numpy()

    def region(self, amap: np.ndarray) -> np.ndarray:
        """bool: the pixels at or above the calibrated pixel threshold (0.5 of the display map
        without a calibration)."""
        return np.asarray(amap, dtype=np.float32) >= np.float32(self.map_threshold.item())

    def regions(self, amap: np.ndarray, min_area: int = MIN_REGION_AREA) -> list["Region"] | None:
        """The defect regions of a map at the image's own size (``resize_map`` first), largest
        peak first; None without a calibrated pixel threshold, since there is nothing to cut the
        map at (0.5 would be a guess for PRN's probabilities and meaningless for distances)."""
        if self.pixel_threshold is None:
            return None
        return find_regions(amap, self.region(amap), min_area)

    def no_region_possible(self, amap: np.ndarray) -> bool:
        """Whether no pixel of ``amap`` (at the model's size) can reach the pixel threshold once
        resized to an image: bilinear values are convex combinations of the map's own, so a map
        whose largest value is below the threshold (with a margin for float rounding) has no region
        at any size, and its resize can be skipped. False without a pixel threshold."""
        if self.pixel_threshold is None:
            return False
        t = float(self.map_threshold.item())
        return float(np.max(amap)) < t - 1e-5 * max(abs(t), 1.0)

    def map_for(self, amap: np.ndarray, hw: tuple[int, int], regions_only: bool) -> np.ndarray | None:
        """``amap`` (at the model's size) at the image's size (``resize_map``), or None when only
        its regions are wanted and none can exist (``no_region_possible``): then the resize, the
        costliest step of a map's post-process, is skipped. ``prn predict`` and ``prn serve`` alike."""
        if regions_only and self.no_region_possible(amap):
            return None
        return resize_map(amap, hw)

    def review(self, scores: np.ndarray) -> np.ndarray | None:
        """int64 0/1 (N,): 1 where a part passes the image threshold but scores in the review band;
        None without a band. Decided in float32 as ``decide`` is, so the band meets the threshold."""
        if self.review_threshold is None:
            return None
        s = torch.as_tensor(np.asarray(scores, dtype=np.float64)).float()
        low = torch.tensor(float32_threshold(self.review_threshold))
        return ((s >= low) & ~self.decide(s)).long().numpy()

    def judge(self, scores: np.ndarray) -> tuple[np.ndarray | None, np.ndarray | None]:
        """float (N,) scores -> (normalised scores float64 (N,), predictions int64 0/1 (N,)), each
        None when there is nothing to judge by."""
        if not self.calibrated:
            return None, None
        out = self(None, torch.as_tensor(np.asarray(scores, dtype=np.float64)))
        return out["normalized_score"].double().numpy(), out["prediction"].long().numpy()


def resize_maps(maps: Tensor, hw: tuple[int, int]) -> Tensor:
    """float (B, 1, h, w) -> (B, 1, H, W), bilinear with half-pixel centres: maps at each image's
    original size."""
    if tuple(maps.shape[-2:]) == tuple(hw):
        return maps
    return F.interpolate(maps, size=tuple(int(v) for v in hw), mode="bilinear", align_corners=False)


def resize_map(amap: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """float32 (h, w) -> float32 (H, W) (``resize_maps`` for one numpy map)."""
    t = torch.from_numpy(np.ascontiguousarray(amap, dtype=np.float32))[None, None]
    return resize_maps(t, hw)[0, 0].numpy()


@dataclass(frozen=True)
class Region:
    """One connected defect region (8-connectivity, as the PRO metric counts regions) of a map.

    x, y: the top-left pixel of its bounding box (column, row; 0-based) and width, height its size
    in pixels, so it covers columns x .. x + width - 1; area: the pixels in the region itself;
    peak, mean: the map's highest and mean value over those pixels (the model's raw scale)."""
    x: int
    y: int
    width: int
    height: int
    area: int
    peak: float
    mean: float

    def as_dict(self) -> dict:
        return asdict(self)


def check_min_area(min_area) -> int:
    """A minimum region area must be a whole number of pixels >= 1."""
    if isinstance(min_area, bool) or not isinstance(min_area, (int, np.integer)) or min_area < 1:
        raise ValueError(f"the minimum region area must be a whole number of pixels >= 1, got {min_area!r}")
    return int(min_area)


def find_regions(amap: np.ndarray, mask: np.ndarray, min_area: int = MIN_REGION_AREA) -> list[Region]:
    """The connected components of ``mask`` (bool (H, W)) with at least ``min_area`` pixels, each
    with its box and the peak and mean of ``amap`` (float (H, W), the same size) over it; sorted by
    peak, highest first (then top to bottom, left to right)."""
    from scipy import ndimage

    from prn.metrics import REGION_STRUCTURE
    min_area = check_min_area(min_area)
    amap, mask = np.asarray(amap, dtype=np.float32), np.asarray(mask, dtype=bool)
    if amap.ndim != 2 or amap.shape != mask.shape:
        raise ValueError(f"regions need a 2-D map and a mask of its shape, got {amap.shape} and {mask.shape}")
    # Components are found within the rows and columns the mask touches (a defect is a small part
    # of an image at its own size), and each one's peak and mean from its pixels alone:
    # ndimage.maximum / mean over the whole labelled map took 20+ ms per 500 x 1250 map.
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return []
    top, left = int(rows[0]), int(cols[0])
    crop = (slice(top, int(rows[-1]) + 1), slice(left, int(cols[-1]) + 1))
    labels, n = ndimage.label(mask[crop], structure=REGION_STRUCTURE)
    inside = labels > 0
    which, values = labels[inside] - 1, amap[crop][inside]
    areas = np.bincount(which, minlength=n)
    means = np.bincount(which, weights=values.astype(np.float64), minlength=n) / areas
    peaks = np.full(n, -np.inf, dtype=np.float32)
    np.maximum.at(peaks, which, values)
    regions = []
    for k, box in enumerate(ndimage.find_objects(labels)):
        if areas[k] < min_area:
            continue
        r, c = box
        regions.append(Region(x=left + int(c.start), y=top + int(r.start), width=int(c.stop - c.start),
                              height=int(r.stop - r.start), area=int(areas[k]),
                              peak=float(peaks[k]), mean=float(means[k])))
    return sorted(regions, key=lambda r: (-r.peak, r.y, r.x))
