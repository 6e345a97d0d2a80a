"""Whether the photos a run scores still look like the good images its threshold was set on.

A threshold is set once, on the held-out good images. When the line's lamp, exposure or focus
changes, the false rejects can stay low while fewer defects are stopped: on the ``cpu`` preset's
runs, photos with 1.2 times the light or a blur of 1.5 photo pixels kept the false rejects at
0-1.4 % and stopped 5 to 8 points fewer defects (BENCHMARKS.md, "Whether the threshold holds when
the line's photos drift"), so the decisions alone never show the change. Two numbers of each
image at the model's input do:

- **brightness**: the mean gray level, 0-255;
- **detail**: the mean absolute difference between neighbouring pixels (down and across) over
  the brightness; a blur lowers it, a change of light alone mostly does not.

Calibration stores the medians of the held-out good images (``calibration.json``:
``appearance``); ``prn predict`` and ``prn serve`` compare the medians of the images they score
with them, once there are ``drift_min_images`` of them, and warn past a relative change of
``drift_brightness`` or ``drift_detail`` (``CalibrationConfig``). Medians, because a line's few
defective parts do not move them. Written by hand: two means of a batch, which no library names.

    >>> reference = appearance_reference(appearance(val_batch))
    >>> check = compare_appearance(reference, appearance(new_batch), calibration_cfg)
    >>> check["message"]      # None while the images look like the reference
"""

from __future__ import annotations

import numpy as np
import torch

MEASURED_AT = "the model's input, gray levels 0-255"


def appearance(images: torch.Tensor) -> np.ndarray:
    """float64 (B, 2): each image's (brightness, detail). ``images``: the pre-process's uint8
    (B, H, W, 3) batch at the input size, or the model's float (B, 3, H, W) input in [0, 1]
    (the same images give the same numbers either way, to float rounding)."""
    if images.dtype == torch.uint8:
        gray = images.float().mean(-1)
    else:
        gray = images.float().mean(1) * 255.0
    brightness = gray.mean((1, 2))
    steps = (gray[:, 1:] - gray[:, :-1]).abs().mean((1, 2)) + (gray[:, :, 1:] - gray[:, :, :-1]).abs().mean((1, 2))
    detail = steps / brightness.clamp_min(1.0)  # a black image has no detail to lose
    return torch.stack([brightness, detail], 1).double().cpu().numpy()


def appearance_reference(stats: np.ndarray) -> dict | None:
    """What calibration stores of the good images' ``appearance`` rows: their count and medians;
    None without a row."""
    stats = np.asarray(stats, dtype=np.float64).reshape(-1, 2)
    if not len(stats):
        return None
    brightness, detail = np.median(stats, 0)
    return {"images": len(stats), "brightness": float(brightness), "detail": float(detail),
            "measured_at": MEASURED_AT}


def compare_appearance(reference: dict | None, stats: np.ndarray, cfg, subject: str = "these {n} images") -> dict | None:
    """The scored images' medians against the calibration's ``reference``: {"images",
    "brightness", "detail", "brightness_change", "detail_change" (relative, e.g. 0.15 for 15 %
    brighter), "drifted", "message" (a warning naming what changed, or None)}. None where there
    is nothing to compare: no reference (a run calibrated before the check existed) or fewer
    than ``cfg.drift_min_images`` images. ``cfg``: the calibration section; ``subject``: what the
    message calls the images ({n}: their count)."""
    stats = np.asarray(stats, dtype=np.float64).reshape(-1, 2)
    if not reference or len(stats) < cfg.drift_min_images:
        return None
    brightness, detail = (float(v) for v in np.median(stats, 0))
    changes = {"brightness": brightness / reference["brightness"] - 1.0,
               "detail": detail / reference["detail"] - 1.0}
    limits = {"brightness": cfg.drift_brightness, "detail": cfg.drift_detail}
    past = [name for name in changes if abs(changes[name]) > limits[name]]
    words = {"brightness": ("brighter", "darker"), "detail": ("sharper", "softer (less detail)")}
    message = None
    if past:
        said = ", ".join(f"{100 * abs(changes[n]):.0f} % {words[n][changes[n] < 0]}" for n in past)
        message = (f"{subject.format(n=len(stats))} are {said} than the {reference['images']} good images the "
                   f"threshold was calibrated on (medians at the model's input); a changed lamp, exposure or "
                   f"focus can let more defects through while the false rejects stay low: calibrate again on "
                   f"good parts photographed now (prn calibrate RUN --good-images DIR)")
    return {"images": len(stats), "brightness": brightness, "detail": detail,
            "brightness_change": changes["brightness"], "detail_change": changes["detail"],
            "drifted": bool(past), "message": message}
