"""Score a folder of images with a model from `prn export --format onnx`, without prn.

Needs only onnxruntime, numpy and Pillow. Writes one CSV row per image to stdout:
    python score_folder.py model.onnx images/ > scores.csv
"""
import csv
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
from PIL import Image, ImageFilter

model, folder = sys.argv[1], Path(sys.argv[2])
session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
meta = session.get_modelmeta().custom_metadata_map
height, width = int(meta["input_height"]), int(meta["input_width"])
threshold = float(meta["image_threshold"]) if "image_threshold" in meta else None
# The model's filter before the resize, if it has one (resize_detail: each pixel the darkest or the
# brightest of its window), which a frame resized here must have had first.
rank = {"dark": ImageFilter.MinFilter, "bright": ImageFilter.MaxFilter}.get(meta.get("resize_detail", "off"))
width_of_filter = int(meta.get("detail_width", "0"))
names = [o.name for o in session.get_outputs()]
out = csv.writer(sys.stdout)
out.writerow(["path", "score", "normalized_score", "prediction"])
for path in sorted(p for p in folder.rglob("*") if p.suffix.lower() in {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}):
    # Pillow's bilinear resize, which is prn's own: the graph takes any size too and resizes
    # it the same way, bit for bit, so either gives prn's scores.
    image = Image.open(path).convert("RGB")
    if rank is not None and image.size != (width, height):
        image = image.filter(rank(width_of_filter))
    image = image.resize((width, height), Image.Resampling.BILINEAR)
    batch = np.asarray(image, dtype=np.uint8).transpose(2, 0, 1)[None]  # (1, 3, H, W) uint8 RGB
    result = dict(zip(names, session.run(None, {"images": batch})))
    score = float(result["score"][0])
    normalized = f"{float(result['normalized_score'][0]):.6f}" if "normalized_score" in result else ""
    prediction = "" if threshold is None else int(score >= threshold)  # 1: defective
    out.writerow([path.relative_to(folder), f"{score:.9g}", normalized, prediction])
