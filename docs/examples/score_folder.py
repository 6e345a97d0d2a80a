"""Score a folder of images with a model from `prn export --format onnx`, without prn.

Needs onnxruntime (or OpenVINO, with --openvino), numpy and Pillow. Writes one CSV row per image
to stdout:
    python score_folder.py model.onnx images/ > scores.csv
    python score_folder.py model.onnx images/ --openvino > scores.csv
"""
import argparse
import csv
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

parser = argparse.ArgumentParser()
parser.add_argument("model")
parser.add_argument("folder", type=Path)
parser.add_argument("--openvino", action="store_true", help="run the graph in OpenVINO instead of onnxruntime")
args = parser.parse_args()
model, folder = args.model, args.folder
if args.openvino:
    import openvino as ov
    core = ov.Core()
    graph = core.read_model(model)
    meta = {key: value.value for key, value in graph.get_rt_info()["framework"].items()}
    # Two settings keep OpenVINO's outputs prn's: the image size fixed at the model's input size
    # (with the batch and the image size both left open, OpenVINO 2026.4 computed other maps and
    # scores than prn's), and float32, which its CPU plugin replaces by bfloat16 where the CPU has
    # it, while the file's thresholds were set on float32 scores.
    graph.reshape({"images": [-1, 3, int(meta["input_height"]), int(meta["input_width"])]})
    compiled = core.compile_model(graph, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    names = [o.get_any_name() for o in compiled.outputs]
    def run(batch):
        result = compiled(batch)
        return [result[o] for o in compiled.outputs]
else:
    import onnxruntime as ort
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    meta = session.get_modelmeta().custom_metadata_map
    names = [o.name for o in session.get_outputs()]
    def run(batch):
        return session.run(None, {"images": batch})
height, width = int(meta["input_height"]), int(meta["input_width"])
threshold = float(meta["image_threshold"]) if "image_threshold" in meta else None
# The model's filter before the resize, if it has one (resize_detail: each pixel the darkest or the
# brightest of its window), which a frame resized here must have had first.
rank = {"dark": ImageFilter.MinFilter, "bright": ImageFilter.MaxFilter}.get(meta.get("resize_detail", "off"))
width_of_filter = int(meta.get("detail_width", "0"))
out = csv.writer(sys.stdout)
out.writerow(["path", "score", "normalized_score", "prediction"])
for path in sorted(p for p in folder.rglob("*") if p.suffix.lower() in {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}):
    # Pillow's bilinear resize, which is prn's own: the graph takes any size too and resizes
    # it the same way, bit for bit, so either gives prn's scores (OpenVINO's graph above takes
    # the input size only).
    image = Image.open(path).convert("RGB")
    if rank is not None and image.size != (width, height):
        image = image.filter(rank(width_of_filter))
    image = image.resize((width, height), Image.Resampling.BILINEAR)
    batch = np.asarray(image, dtype=np.uint8).transpose(2, 0, 1)[None]  # (1, 3, H, W) uint8 RGB
    result = dict(zip(names, run(batch)))
    score = float(result["score"][0])
    normalized = f"{float(result['normalized_score'][0]):.6f}" if "normalized_score" in result else ""
    prediction = "" if threshold is None else int(score >= threshold)  # 1: defective
    out.writerow([path.relative_to(folder), f"{score:.9g}", normalized, prediction])
