"""``prn export``: a trained model as one self-contained file (ONNX, TorchScript, or OpenVINO's IR)
that runs without prn, holding the whole inference path and the decision that travels with the model.

The file is ``prn.pipeline.InferencePipeline``, the very modules ``prn test``, ``prn predict`` and
``prn serve`` run, for a batch of images:

    uint8 RGB (B, 3, H, W), any H x W
      -> Preprocess: resize to the model's input size (Pillow's bilinear resize, bit for bit, as
         in training) and [0, 1] scaling (the encoder normalises by its own mean and std inside)
      -> the model: encoder -> prototypes and residuals -> head (PRN), or the residual map
         ("prototypes"), or the memory-bank distances (PatchCore) -> anomaly map -> image score
      -> Postprocess, when the checkpoint holds a calibration: normalised score (0.5 = threshold)
         and the decision (score >= image threshold)

Outputs, by name: ``anomaly_map`` float32 (B, 1, h, w) at the input size h x w of the model;
``score`` float32 (B,); with a calibration also ``normalized_score`` float32 (B,) and
``prediction`` bool (B,). The batch size and H x W are dynamic (the OpenVINO form: the batch
only). Metadata (input size, model
kind, backbone, prn version, thresholds and the whole calibration) is stored in the file:
ONNX ``metadata_props``; TorchScript the extra file ``prn.json``; OpenVINO's IR its ``rt_info``
(section ``framework``, as OpenVINO reads an ONNX file's). ``read_metadata`` reads all three.

The OpenVINO form (``model.xml`` and its weights ``model.bin``) is the ONNX graph read by OpenVINO
with two settings that keep its outputs prn's (BENCHMARKS.md, "OpenVINO on the exported graph"):
the image size fixed at the model's input size, since with the batch and the image size both open
OpenVINO 2026.4's CPU plugin computed other scores than prn's, so its callers resize the images
first (as ``docs/examples/score_folder.py`` does); and float32 weights (not compressed to float16).
Its callers should also ask for float32 inference (``INFERENCE_PRECISION_HINT``): on CPUs with
bfloat16 OpenVINO computes in it unless told, and the thresholds were set on float32 scores.

    >>> path = export("runs/mvtec/bottle/<time>", "onnx")      # runs/.../export/model.onnx
    >>> read_metadata(path)["input_height"]

Parity with ``prn predict``: the graph's resize is prn's own, so fed the original images it
gives prn's maps and scores up to the float rounding of the engine (tested to 1e-4 of the map's
scale on random batches of several sizes, and to 1e-5 on real images).

Defect regions (``Postprocess.regions``: boxes in the image's pixels) are not in the graph, whose
operators cannot label connected components: a caller resizes ``anomaly_map`` to the image,
keeps the pixels >= the metadata's ``pixel_threshold`` and labels them, as
``docs/examples/regions.py`` does with numpy and scipy (docs/deploy.md).
"""

from __future__ import annotations

import json
import math
import warnings
import zipfile
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from prn import __version__
from prn.errors import CheckpointError, PRNError, UsageError
from prn.pipeline import InferencePipeline
from prn.preprocess import scale
from prn.report import check_out_folder

FORMATS = ("onnx", "torchscript", "openvino")
INPUT_NAME = "images"
OUTPUT_NAMES = ("anomaly_map", "score", "normalized_score", "prediction")
SUFFIXES = {"onnx": ".onnx", "torchscript": ".torchscript.pt", "openvino": ".xml"}  # IR: .xml and .bin
METADATA_FILE = "prn.json"  # the TorchScript extra file holding the metadata
INPUT_CONTRACT = ("uint8 RGB images, NCHW (batch, 3, height, width), any height and width; "
                  "resized inside to input_height x input_width")
FIXED_SIZE_CONTRACT = ("uint8 RGB images, NCHW (batch, 3, input_height, input_width): resized by the caller "
                       "as prn does (Pillow's bilinear resize, after the resize_detail filter where there is one)")
OPENVINO_F32 = {"INFERENCE_PRECISION_HINT": "f32"}  # the precision the thresholds were set in
ONNX_OPSET = 18


class _Outputs(nn.Module):
    """The pipeline with its outputs as a tuple in OUTPUT_NAMES order (2 or 4 of them), the form
    exporters and tracing take."""

    def __init__(self, pipeline: InferencePipeline):
        super().__init__()
        self.pipeline = pipeline

    def forward(self, images: Tensor) -> tuple[Tensor, ...]:
        out = self.pipeline(images)
        return tuple(out[name] for name in OUTPUT_NAMES if name in out)


class _AfterResize(nn.Module):
    """Everything after the resize (scaling, model, post-process), for tracing at a fixed size."""

    def __init__(self, pipeline: InferencePipeline):
        super().__init__()
        self.pipeline = pipeline

    def forward(self, resized: Tensor) -> tuple[Tensor, ...]:
        p = self.pipeline
        out = p.model(scale(resized))
        amap, score = out["anomaly_map"], out["pred_score"]
        return (amap, score, *p.postprocess(amap, score).values())


class _ScriptedGraph(nn.Module):
    """The TorchScript form: the scripted resize (its taps and pass order depend on the input
    size, which tracing would freeze) before the traced rest."""

    def __init__(self, resize: nn.Module, rest: nn.Module):
        super().__init__()
        self.resize = resize
        self.rest = rest

    def forward(self, images: Tensor):  # the rest's tuple of 2 or 4 tensors, types inferred
        return self.rest(self.resize(images))


def build_graph(loaded) -> InferencePipeline:
    """The ``InferencePipeline`` of a ``prn.deploy.loading.LoadedModel`` (on the CPU, eval mode)."""
    return InferencePipeline(loaded.model, loaded.cfg.model.input_hw, loaded.calibration,
                             detail=loaded.cfg.model.detail).eval().cpu()


def metadata(loaded, fmt: str) -> dict[str, str]:
    """What the exported file says about itself: every value a string (ONNX metadata_props)."""
    cfg, cal = loaded.cfg, loaded.calibration
    h, w = cfg.model.input_hw
    detail = cfg.model.detail
    meta = {
        "format": fmt, "prn_version": __version__, "model_kind": loaded.kind,
        "backbone": cfg.model.backbone, "input_height": str(h), "input_width": str(w),
        "input": FIXED_SIZE_CONTRACT if fmt == "openvino" else INPUT_CONTRACT,
        "outputs": ",".join(OUTPUT_NAMES if cal is not None else OUTPUT_NAMES[:2]),
        "map": "PRN: probability per pixel in [0, 1]; prototypes, patchcore: distance >= 0",
        "map_sigma": repr(float(cfg.model.map_sigma)), "top_k": str(cfg.model.top_k),
        "score_smoothed": "true" if cfg.model.score_smoothed else "false",
        "tiles": str(cfg.model.tiles),  # the graph cuts its input into tiles x tiles itself
        # the filter before the resize, in the graph too; a caller that resizes first applies it
        "resize_detail": detail.mode if detail.active else "off",
        "detail_width": str(detail.width if detail.active else 0),
        "dataset": cfg.data.dataset, "category": str(cfg.data.category),
        "checkpoint": loaded.path.name,
        "calibrated": "true" if cal is not None else "false",
    }
    if cal is not None:
        meta["image_threshold"] = repr(float(cal["image_threshold"]))
        meta["pixel_threshold"] = repr(float(cal["pixel_threshold"]))
        meta["calibration"] = json.dumps(cal, sort_keys=True)
    return meta


def default_out(checkpoint: str | Path, fmt: str) -> Path:
    """``RUN/export/model.onnx`` for a run folder; beside the file for a checkpoint file."""
    path = Path(checkpoint)
    if path.is_dir():
        return path / "export" / ("model" + SUFFIXES[fmt])
    return path.with_name(path.stem + SUFFIXES[fmt])


def export(checkpoint: str | Path, fmt: str = "onnx", out: str | Path | None = None, *,
           verify: bool = True) -> Path:
    """Export a run folder's model (or a checkpoint file) to ``out``; returns the file written.

    fmt: "onnx", "torchscript" or "openvino" (``out`` the .xml; its .bin is written beside it).
    verify: run the written file and prn on random batches of other sizes than the one exported
    with (``check_parity``: at the model's input size, maps and scores within 1e-4 of the map's
    scale and the same decisions), so a file with a batch size, input size or branch baked in is
    reported, not left behind silently; the OpenVINO form takes the input size only.
    """
    from prn.deploy.loading import load_model

    if fmt not in FORMATS:
        raise UsageError(f"unknown export format {fmt!r}; choose {' or '.join(FORMATS)}")
    out = Path(out) if out is not None else default_out(checkpoint, fmt)
    if out.is_dir():
        raise UsageError(f"{out}: is a folder; --out takes the file to write")
    if fmt == "openvino" and out.suffix != ".xml":
        raise UsageError(f"{out}: OpenVINO's IR is a .xml file (its weights go beside it, .bin)")
    check_out_folder(out.parent, "the folder of --out")
    loaded = load_model(checkpoint, device="cpu")
    graph = build_graph(loaded)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = metadata(loaded, fmt)
    h, w = loaded.cfg.model.input_hw
    # Exported at another size than the model's and another batch than 1, so that neither the
    # input size nor the batch is baked in as a constant.
    example = torch.randint(0, 256, (2, 3, h + 3, w + 5), dtype=torch.uint8,
                            generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        if fmt == "onnx":
            _export_onnx(graph, example, out, meta)
        elif fmt == "openvino":
            _export_openvino(graph, example, out, meta)
        else:
            _export_torchscript(graph, example, out, meta)
    if verify:
        g = torch.Generator().manual_seed(0)
        check_parity(graph, out, torch.randint(0, 256, (3, 3, h, w), dtype=torch.uint8, generator=g))
        # Other sizes, one for each order of the resize's passes: a size or branch baked in
        # would be far off; the resize is exact in both, so the same tolerance holds. The
        # OpenVINO form takes one image size; another batch size instead.
        others = [(2, 3, h + 7, w + 2), (1, 3, h // 2 + 1, 2 * w + 1)] if fmt != "openvino" else [(1, 3, h, w)]
        for shape in others:
            probe = torch.randint(0, 256, shape, dtype=torch.uint8, generator=g)
            check_parity(graph, out, probe)
    return out


def _dynamic_shapes():
    batch = torch.export.Dim("batch", min=1, max=4096)
    height = torch.export.Dim("height", min=2, max=65536)
    width = torch.export.Dim("width", min=2, max=65536)
    return {"images": {0: batch, 2: height, 3: width}}


def _export_onnx(graph: InferencePipeline, example: Tensor, out: Path, meta: dict[str, str]) -> None:
    try:
        import onnx
        import onnxruntime  # noqa: F401  (the written file is checked against prn with it)
        import onnxscript  # noqa: F401  (torch's exporter translates with it)
    except ImportError as exc:
        raise PRNError(f"ONNX export needs the packages onnx, onnxscript and onnxruntime, "
                       f"{exc.name} is missing (pip install 'prn[export]')") from exc
    names = list(OUTPUT_NAMES if graph.calibrated else OUTPUT_NAMES[:2])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's own deprecation notes, not the user's concern
        try:
            program = torch.onnx.export(_Outputs(graph), (example,), input_names=[INPUT_NAME], output_names=names,
                                        dynamic_shapes=_dynamic_shapes(), opset_version=ONNX_OPSET,
                                        dynamo=True, verbose=False)
        except Exception as exc:  # the exporter raises many kinds; all mean "not exportable"
            raise PRNError(f"{out}: torch's ONNX exporter failed on this model "
                           f"({type(exc).__name__}: {str(exc).strip().splitlines()[0]}); "
                           f"--format torchscript may still work") from exc
    model = program.model_proto
    model.doc_string = f"prn {meta['model_kind']} model: {INPUT_CONTRACT}"
    del model.metadata_props[:]
    for key, value in meta.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    tmp = out.with_name(out.name + ".tmp")
    onnx.save_model(model, tmp)  # one file: the weights of prn's models stay far below 2 GB
    tmp.replace(out)


def _export_openvino(graph: InferencePipeline, example: Tensor, out: Path, meta: dict[str, str]) -> None:
    from prn.allocator import in_use
    if in_use() == "tcmalloc":  # measured: OpenVINO 2026.4 frees memory tcmalloc gave, and aborts
        raise PRNError("OpenVINO aborts in a process preloaded with tcmalloc (LD_PRELOAD); export "
                       "to OpenVINO from a process without it (the prn command does not preload it "
                       "for export)")
    try:
        import openvino as ov
    except ImportError as exc:
        raise PRNError("OpenVINO export needs the package openvino (pip install 'prn[export,openvino]')") from exc
    h, w = int(meta["input_height"]), int(meta["input_width"])
    onnx_file = out.with_name(out.stem + ".tmp.onnx")
    staging = out.with_name(out.stem + ".tmp" + out.suffix)  # its weights: .tmp.bin beside it
    try:
        _export_onnx(graph, example, onnx_file, meta)  # the metadata goes to rt_info["framework"]
        model = ov.Core().read_model(str(onnx_file))
        model.reshape({INPUT_NAME: [-1, 3, h, w]})  # the batch stays open, the image size is fixed
        ov.save_model(model, str(staging), compress_to_fp16=False)
        staging.with_suffix(".bin").replace(out.with_suffix(".bin"))
        staging.replace(out)
    finally:
        for leftover in (onnx_file, staging, staging.with_suffix(".bin")):
            leftover.unlink(missing_ok=True)


def _export_torchscript(graph: InferencePipeline, example: Tensor, out: Path, meta: dict[str, str]) -> None:
    with warnings.catch_warnings():
        # Tracing warns at every Python int taken from a shape; the head's input has a fixed
        # size, so those are constants of the model. The batch size stays symbolic, and
        # check_parity proves it on other batch and input sizes.
        warnings.simplefilter("ignore")
        rest = torch.jit.trace(_AfterResize(graph), graph.preprocess.resize(example), check_trace=False)
        scripted = torch.jit.script(_ScriptedGraph(graph.preprocess.resize, rest))
    tmp = out.with_name(out.name + ".tmp")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit's deprecation notice
        torch.jit.save(scripted, str(tmp), _extra_files={METADATA_FILE: json.dumps(meta)})
    tmp.replace(out)


def run_exported(path: str | Path, images: np.ndarray | Tensor) -> dict[str, np.ndarray]:
    """Run an exported file on uint8 (B, 3, H, W) images: {output name: numpy array}."""
    path = Path(path)
    batch = images.numpy() if isinstance(images, Tensor) else np.asarray(images)
    meta = read_metadata(path)
    names = meta["outputs"].split(",")
    if meta["format"] == "onnx":
        import onnxruntime as ort
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        values = session.run(None, {INPUT_NAME: batch})
    elif meta["format"] == "openvino":
        import openvino as ov
        compiled = ov.Core().compile_model(str(path), "CPU", OPENVINO_F32)
        result = compiled(batch)
        values = [result[compiled.output(name)] for name in names]
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit's deprecation notice
            module = torch.jit.load(str(path), map_location="cpu")
        with torch.no_grad():
            values = [v.numpy() for v in module(torch.from_numpy(batch))]
    return dict(zip(names, values))


def check_parity(graph: InferencePipeline, path: Path, images: Tensor, tol: float = 1e-4,
                 decisions: bool = True) -> dict[str, float]:
    """Largest differences between the exported file and prn on ``images`` (uint8 (B, 3, H, W)).

    Maps and scores must agree within ``tol`` times the map's scale (1 for PRN's probabilities,
    the largest value for distance maps), normalised scores within that over the calibration's
    score span (the normalisation divides by it), decisions exactly (unless ``decisions`` is
    False); else PRNError."""
    with torch.no_grad():
        expected = [v.numpy() for v in _Outputs(graph)(images)]
    got = run_exported(path, images)
    names = list(got)
    scale = max(1.0, float(np.abs(expected[0]).max()))
    limits = {"anomaly_map": tol * scale, "score": tol * scale,
              "prediction": 0.0 if decisions else math.inf}
    if graph.calibrated:
        limits["normalized_score"] = tol * scale / float(graph.postprocess.norm_span)
    diffs = {}
    for name, want in zip(names, expected):
        have = got[name]
        if have.shape != want.shape:
            raise PRNError(f"{path}: output {name} has shape {have.shape}, prn gives {want.shape}")
        if name == "prediction":
            diffs[name] = float((have != want).sum())
        else:
            diffs[name] = float(np.abs(have.astype(np.float64) - want.astype(np.float64)).max())
    bad = {k: v for k, v in diffs.items() if v > limits[k]}
    if bad or not all(math.isfinite(v) for v in diffs.values()):
        raise PRNError(f"{path}: the exported model disagrees with prn on a test batch "
                       f"(largest differences {diffs}, map scale {scale:g}); the file is kept for "
                       f"inspection but should not be used")
    return diffs


def read_metadata(path: str | Path) -> dict[str, str]:
    """The metadata of a file written by ``export`` (ONNX, TorchScript or OpenVINO's .xml)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: exported model not found")
    with open(path, "rb") as fh:
        head = fh.read(5)
    is_zip = head[:4] == b"PK\x03\x04"  # TorchScript files are zip archives, ONNX protobuf
    if head in (b"<?xml", b"<net "):  # OpenVINO's IR: the metadata in <rt_info><framework>
        meta = _ir_metadata(path)
    elif not is_zip:
        import onnx
        try:
            model = onnx.load_model(str(path), load_external_data=False)
        except Exception as exc:  # protobuf's DecodeError and friends
            raise CheckpointError(f"{path}: not a readable ONNX file ({type(exc).__name__}: {exc})") from exc
        meta = {p.key: p.value for p in model.metadata_props}
    else:
        # A TorchScript file is a zip archive; its extra files are read without loading the model.
        try:
            with zipfile.ZipFile(path) as archive:
                names = [n for n in archive.namelist() if n.endswith("/extra/" + METADATA_FILE)]
                meta = json.loads(archive.read(names[0])) if names else {}
        except (zipfile.BadZipFile, json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{path}: not a readable TorchScript file ({type(exc).__name__}: {exc})") from exc
    if "prn_version" not in meta:
        raise CheckpointError(f"{path}: holds no prn metadata; was it written by prn export?")
    return meta


def _ir_metadata(path: Path) -> dict[str, str]:
    """OpenVINO IR's ``<rt_info><framework><key value=...>`` entries, read without openvino."""
    from xml.etree import ElementTree
    try:
        root = ElementTree.parse(path).getroot()
    except ElementTree.ParseError as exc:
        raise CheckpointError(f"{path}: not a readable OpenVINO IR file ({exc})") from exc
    section = root.find("rt_info/framework")
    return {} if section is None else {e.tag: e.get("value", "") for e in section}
