"""Defect regions from an exported model's outputs, as `prn predict` writes them, without prn.

Needs numpy and scipy. The graph gives `anomaly_map` at the model's input size; prn resizes it
to the image (bilinear, half-pixel centres, as torch's F.interpolate(align_corners=False)),
keeps the pixels >= the metadata's `pixel_threshold` and lists their 8-connected regions:
    boxes = regions(result["anomaly_map"][0, 0], (height, width), float(meta["pixel_threshold"]))
"""
import numpy as np
from scipy import ndimage


def resize_map(amap, height, width):
    """float32 (h, w) -> (height, width), bilinear with half-pixel centres."""
    def taps(n_out, n_in):
        x = np.maximum((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0.0)
        lo = np.minimum(np.floor(x).astype(int), n_in - 1)
        return lo, np.minimum(lo + 1, n_in - 1), (x - lo).astype(np.float32)
    y0, y1, fy = taps(height, amap.shape[0])
    x0, x1, fx = taps(width, amap.shape[1])
    rows = amap[y0] * (1 - fy)[:, None] + amap[y1] * fy[:, None]
    return (rows[:, x0] * (1 - fx) + rows[:, x1] * fx).astype(np.float32)


def regions(amap, image_hw, pixel_threshold, min_area=1):
    """[{x, y, width, height, area, peak, mean}] in the image's pixels, highest peak first."""
    full = resize_map(np.asarray(amap, dtype=np.float32), *image_hw)
    labels, n = ndimage.label(full >= np.float32(pixel_threshold), structure=np.ones((3, 3), bool))
    found = []
    for k, (rows, cols) in enumerate(ndimage.find_objects(labels), start=1):
        values = full[rows, cols][labels[rows, cols] == k]
        if values.size >= min_area:
            found.append({"x": cols.start, "y": rows.start, "width": cols.stop - cols.start,
                          "height": rows.stop - rows.start, "area": int(values.size),
                          "peak": float(values.max()), "mean": float(values.astype(np.float64).mean())})
    return sorted(found, key=lambda r: (-r["peak"], r["y"], r["x"]))
