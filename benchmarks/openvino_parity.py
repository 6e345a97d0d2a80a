"""OpenVINO on a run's exported ONNX graph, beside onnxruntime: scores, decisions and speed on the
run's test images, as OpenVINO reads the file and with the settings docs/deploy.md gives.

    python benchmarks/openvino_parity.py RUN [RUN ...] [--batch 8] [--repeats 3] [--json OUT]

Each RUN needs ``RUN/export/model.onnx`` (``prn export RUN``; made here when missing). The test
images of ``RUN/split.json`` are read and resized as ``docs/examples/score_folder.py`` does
(Pillow, after the model's filter: ``prn.preprocess.resize_image``), stacked in batches of
``--batch``, and scored by:

- torch, as ``prn predict`` runs the model (``Predictor``'s engine, batch norms folded);
- onnxruntime (CPU), the reference: the export's own check holds it to prn within 1e-4;
- OpenVINO's CPU plugin four ways: the shapes as the file has them (batch, height and width all
  dynamic) or the image size fixed at the model's input size (``model.reshape``), each at the
  plugin's default inference precision (bfloat16 on CPUs that have it) and at float32.

For each: the largest score difference from onnxruntime's, the decisions at the file's threshold
that differ from onnxruntime's, defective parts stopped and good parts rejected, milliseconds an
image (the best of ``--repeats`` passes over all batches, the engines taking turns) and the
compile time. Threads: ``--threads`` (default: torch's count) for every engine. Prints a markdown
table a run; ``--json`` writes the figures.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from prn.data.io import read_image
from prn.deploy.export import export, read_metadata
from prn.deploy.predict import Predictor
from prn.preprocess import Detail, resize_image

VARIANTS = {  # name: (image size fixed, OpenVINO config)
    "openvino, shapes as read, default precision": (False, {}),
    "openvino, shapes as read, f32": (False, {"INFERENCE_PRECISION_HINT": "f32"}),
    "openvino, image size fixed, default precision": (True, {}),
    "openvino, image size fixed, f32": (True, {"INFERENCE_PRECISION_HINT": "f32"}),
}


def test_batches(run: Path, meta: dict[str, str], batch: int) -> tuple[list[np.ndarray], np.ndarray]:
    """The run's test images at the model's input size, uint8 (B, 3, H, W) batches, and labels."""
    hw = int(meta["input_height"]), int(meta["input_width"])
    detail = Detail(meta.get("resize_detail", "off"), int(meta.get("detail_width", "0")))
    test = json.loads((run / "split.json").read_text())["test"]
    images = np.stack([resize_image(read_image(t["image"]), hw, detail).transpose(2, 0, 1) for t in test])
    labels = np.array([int(t["label"]) for t in test])
    return [images[i:i + batch] for i in range(0, len(images), batch)], labels


def engines(run: Path, path: Path, hw: tuple[int, int], threads: int) -> dict:
    """{name: (function of a batch -> scores, compile seconds, inference precision)}."""
    import onnxruntime as ort
    import openvino as ov
    torch.set_num_threads(threads)
    predictor = Predictor(run, device="cpu")  # prn predict's torch engine: uint8 (B, H, W, 3) in
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    out = {"torch (prn predict)": (lambda b: predictor.engine(torch.from_numpy(b).permute(0, 2, 3, 1))[0], 0.0,
                                   {"32": "float32"}.get(predictor.cfg.training.precision, predictor.cfg.training.precision)),
           "onnxruntime": (lambda b: session.run(["score"], {"images": b})[0], 0.0, "float32")}
    core = ov.Core()
    for name, (fixed, config) in VARIANTS.items():
        model = core.read_model(str(path))
        if fixed:
            model.reshape({"images": [-1, 3, *hw]})
        t = time.perf_counter()
        compiled = core.compile_model(model, "CPU", {"INFERENCE_NUM_THREADS": threads, **config})
        seconds = time.perf_counter() - t
        precision = str(compiled.get_property("INFERENCE_PRECISION_HINT")).split("'")[1]
        out[name] = ((lambda b, c=compiled: c(b)[c.output("score")]), seconds, precision)
    return out


def study(run: Path, batch: int, repeats: int, threads: int) -> dict:
    path = run / "export" / "model.onnx"
    if not path.is_file():
        export(run, "onnx", path)
    meta = read_metadata(path)
    hw = int(meta["input_height"]), int(meta["input_width"])
    if "image_threshold" not in meta:
        raise SystemExit(f"{path}: the model has no calibration to decide by (prn calibrate {run})")
    threshold = float(meta["image_threshold"])
    batches, labels = test_batches(run, meta, batch)
    runners = engines(run, path, hw, threads)
    rows = {name: {"scores": np.concatenate([fn(b) for b in batches]).astype(np.float64), "precision": precision,
                   "compile_s": compile_s, "times": []} for name, (fn, compile_s, precision) in runners.items()}
    for _ in range(repeats):  # the engines take turns, so that each sees the same load
        for name, (fn, _, _) in runners.items():
            t = time.perf_counter()
            for b in batches:
                fn(b)
            rows[name]["times"].append(time.perf_counter() - t)
    for row in rows.values():
        row["ms_per_image"] = 1000 * min(row.pop("times")) / len(labels)
    reference = rows["onnxruntime"]["scores"] >= threshold
    for row in rows.values():
        decided = row["scores"] >= threshold
        row.update(max_score_diff=float(np.abs(row["scores"] - rows["onnxruntime"]["scores"]).max()),
                   decisions_unlike_onnxruntime=int((decided != reference).sum()),
                   defects_stopped=int(decided[labels == 1].sum()), goods_rejected=int(decided[labels == 0].sum()))
        row["scores"] = row["scores"].tolist()
    return {"run": str(run), "input_hw": hw, "threshold": threshold, "batch": batch, "images": len(labels),
            "defective": int(labels.sum()), "rows": rows}


def table(result: dict) -> str:
    n, bad = result["images"], result["defective"]
    lines = [f"{Path(result['run']).name}: {n} test images ({bad} defective), input {result['input_hw'][0]} x "
             f"{result['input_hw'][1]}, threshold {result['threshold']:.4f}, batch {result['batch']}",
             "| engine | precision | largest score difference | decisions unlike onnxruntime's | defects stopped "
             "| good parts rejected | ms an image | compile s |", "|---|---|---|---|---|---|---|---|"]
    for name, r in result["rows"].items():
        lines.append(f"| {name} | {r['precision']} | {r['max_score_diff']:.2g} | {r['decisions_unlike_onnxruntime']} "
                     f"| {r['defects_stopped']} of {bad} | {r['goods_rejected']} of {n - bad} "
                     f"| {r['ms_per_image']:.1f} | {r['compile_s']:.1f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    results = [study(run, args.batch, args.repeats, args.threads) for run in args.runs]
    for result in results:
        print(table(result) + "\n")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
