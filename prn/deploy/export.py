"""``prn export``: a trained model as one self-contained file (ONNX or TorchScript) that runs
without prn, holding the whole inference path and the decision that travels with the model.

The graph (``InferenceGraph``), for a batch of images:

    uint8 RGB (B, 3, H, W), any H x W
      -> resize to the model's input size as Pillow does it (prn's own resize: bilinear,
         antialiased when shrinking, two passes each rounded to whole grey levels)
      -> [0, 1] scaling (the encoder normalises by its own mean and std inside)
      -> encoder -> nearest prototypes and residuals -> head (PRN), or the residual map
         ("prototypes"), or the memory-bank distances (PatchCore)
      -> anomaly map (PRN: sigmoid; every kind: smoothed by map_sigma when set)
      -> image score (PRN, prototypes: mean of the top-k pixels; PatchCore: its Eq. 7)
      -> when the checkpoint holds a calibration: normalised score (0.5 = threshold) and the
         decision (score >= image threshold)

Outputs, by name: ``anomaly_map`` float32 (B, 1, h, w) at the input size h x w of the model;
``score`` float32 (B,); with a calibration also ``normalized_score`` float32 (B,) and
``prediction`` bool (B,). The batch size and H x W are dynamic. Metadata (input size, model
kind, backbone, prn version, thresholds and the whole calibration) is stored in the file:
ONNX ``metadata_props``; TorchScript the extra file ``prn.json``. ``read_metadata`` reads both.

    >>> path = export("runs/mvtec/bottle/<time>", "onnx")      # runs/.../export/model.onnx
    >>> read_metadata(path)["input_height"]

Parity with ``prn predict``: fed images already resized to the model's input size with Pillow
(bilinear), the graph's resize is the identity and its outputs are prn's (tested to 1e-4).
Fed images of another size, the in-graph resize (``PillowResize``) equals Pillow's at more
than 99 % of the pixels and is one grey level off at the rest, so maps and scores differ from
prn's by that much (docs/deploy.md has measured figures).
"""

from __future__ import annotations

import json
import math
import warnings
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from prn import __version__
from prn.errors import CheckpointError, PRNError, UsageError

FORMATS = ("onnx", "torchscript")
INPUT_NAME = "images"
OUTPUT_NAMES = ("anomaly_map", "score", "normalized_score", "prediction")
SUFFIXES = {"onnx": ".onnx", "torchscript": ".torchscript.pt"}
METADATA_FILE = "prn.json"  # the TorchScript extra file holding the metadata
INPUT_CONTRACT = ("uint8 RGB images, NCHW (batch, 3, height, width), any height and width; "
                  "resized inside to input_height x input_width")
ONNX_OPSET = 18  # Resize with antialiasing (our in-graph resize) needs opset 18
ROUNDING_MARGIN = 1e-3  # PillowResize: halves round up even when float error puts them below
# The decomposition of Eq. 7 and the distances below cap each block of patch-to-bank distances
# at this many entries per image (64 MiB of float32), as prn.baselines.patchcore does.
_BLOCK = 1 << 24


class PatchCoreGraph(nn.Module):
    """PatchCore's ``predict`` in a form that exports with a dynamic batch.

    ``prn.baselines.patchcore.image_scores`` splits the B * P query rows into blocks, a count
    that depends on the batch size; here the blocks run over the P patches of one image (fixed
    by the input size) for the whole batch at once. Same arithmetic: the nearest bank entry by
    |q|^2 - 2 q.m + |m|^2 (``torch.cdist``'s matrix-product path), its distance recomputed
    directly (``exact_distances``), Eq. 7's reweighting by the b nearest neighbours of m*,
    bilinear up-sampling, Gaussian blur.
    """

    def __init__(self, patchcore: nn.Module):
        super().__init__()
        self.patchcore = patchcore

    @staticmethod
    def _sq_distances(q: Tensor, bank: Tensor, bank_sq: Tensor) -> Tensor:
        """(B, P, D), (M, D), (M,) -> squared Euclidean distances (B, P, M), >= 0."""
        d2 = q.square().sum(-1, keepdim=True) - 2.0 * (q @ bank.T) + bank_sq
        return d2.clamp_min(0.0)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        from prn.baselines.patchcore import exact_distances
        pc = self.patchcore
        patches = pc.embed(x)
        b, h, w, d = patches.shape
        q = patches.reshape(b, h * w, d)
        bank = pc.memory_bank
        bank_sq = bank.square().sum(-1)
        step = max(1, _BLOCK // max(1, bank.shape[0]))
        dists, nearest = [], []
        for start in range(0, h * w, step):
            chunk = q[:, start:start + step]
            idx = self._sq_distances(chunk, bank, bank_sq).argmin(dim=2, keepdim=True)
            dists.append(exact_distances(chunk, bank, idx)[..., 0])
            nearest.append(idx[..., 0])
        dist, nn_idx = torch.cat(dists, 1), torch.cat(nearest, 1)  # (B, P)
        worst = dist.argmax(1, keepdim=True)  # (B, 1)
        m_test = q.gather(1, worst[:, :, None].expand(-1, 1, d))[:, 0]  # (B, D)
        m_star = bank[nn_idx.gather(1, worst)[:, 0]]  # (B, D)
        k = min(pc.num_neighbors, bank.shape[0])
        d2_star = self._sq_distances(m_star[:, None], bank, bank_sq)[:, 0]  # (B, M)
        support = d2_star.topk(k, dim=1, largest=False).indices  # (B, k)
        d_support = torch.linalg.vector_norm(bank[support] - m_test[:, None], dim=-1)
        s_star = torch.linalg.vector_norm(m_test - m_star, dim=-1)
        score = (1 - torch.exp(s_star - torch.logsumexp(d_support, dim=1))) * s_star
        amap = F.interpolate(dist.view(b, 1, h, w), size=x.shape[-2:], mode="bilinear", align_corners=False)
        from torchvision.transforms.v2.functional import gaussian_blur
        radius = int(4 * pc.sigma + 0.5)
        amap = gaussian_blur(amap, [2 * radius + 1] * 2, [pc.sigma] * 2)
        return {"anomaly_map": amap, "pred_score": score}


def float32_threshold(threshold: float) -> float:
    """The smallest float32 >= ``threshold``: a float32 score s passes ``s >= t32`` in float32
    exactly when ``s >= threshold`` in float64, as prn decides it."""
    t = np.float32(threshold)
    if float(t) < threshold:
        t = np.nextafter(t, np.float32(np.inf))
    return float(t)


class PillowResize(nn.Module):
    """Pillow's bilinear resize of uint8 images (prn's), in torch: float (B, C, H, W) holding
    0..255 -> float (B, C, h, w) of whole grey levels.

    Pillow resizes in two 1-D passes, each rounded to uint8 (half up), and shrinks with a filter
    widened by the scale factor (torch's ``antialias=True`` is the same filter). Pillow 13 runs
    the vertical pass first when the height shrinks by more than twice what the width does
    (older Pillow always ran the horizontal pass first); the order changes the intermediate
    rounding, so it is followed here: ``torch.cond`` in exported graphs (an ONNX ``If``), a
    plain ``if`` in TorchScript. Equal to Pillow's result at most pixels, one grey level off at
    the rest (float against Pillow's 22-bit fixed-point weights).
    """

    def __init__(self, hw: tuple[int, int]):
        super().__init__()
        self.h, self.w = int(hw[0]), int(hw[1])
        # Pillow rounds halves up. Halves are common (weights of 1/2 on whole grey levels) and
        # come out of float arithmetic a hair above or below .5, differently in torch and in
        # onnxruntime; the margin rounds them all up, away from that noise (~1e-5 here).
        self.rounding = 0.5 + ROUNDING_MARGIN

    def horizontal_first(self, x: Tensor) -> Tensor:
        x = self._pass(x, [x.shape[-2], self.w])
        return self._pass(x, [self.h, self.w])

    def vertical_first(self, x: Tensor) -> Tensor:
        x = self._pass(x, [self.h, x.shape[-1]])
        return self._pass(x, [self.h, self.w])

    def _pass(self, x: Tensor, size: list[int]) -> Tensor:
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
        return torch.floor(x + self.rounding).clamp(0.0, 255.0)

    def forward(self, x: Tensor) -> Tensor:
        dh, dw = x.shape[-2] - self.h, x.shape[-1] - self.w
        if not torch.jit.is_scripting():
            return torch.cond((dh > 0) & (dh > 2 * dw), self.vertical_first, self.horizontal_first, (x,))
        if dh > 0 and dh > 2 * dw:
            return self.vertical_first(x)
        return self.horizontal_first(x)


class InferenceGraph(nn.Module):
    """uint8 (B, 3, H, W) RGB -> (anomaly_map, score[, normalized_score, prediction]); see the
    module docstring. ``model``: a prn model in eval mode with the eval API
    ``forward(x) -> {"anomaly_map", "pred_score"}`` (PatchCore wrapped in ``PatchCoreGraph``).
    ``resize`` turns the images into the model's input (``PillowResize``); ``head`` the rest."""

    def __init__(self, model: nn.Module, input_hw: tuple[int, int], calibration: dict | None = None):
        super().__init__()
        self.model = model
        self.input_hw = (int(input_hw[0]), int(input_hw[1]))
        self.resize = PillowResize(self.input_hw)
        self.calibrated = calibration is not None
        if calibration is not None:
            from prn.deploy.calibrate import _span
            t = float(calibration["image_threshold"])
            span = _span(float(calibration["score_min"]), float(calibration["score_max"]))
            self.register_buffer("threshold", torch.tensor(float32_threshold(t)))
            # normalised in float32 from the float64 constants: (s - t) / span + 0.5
            self.register_buffer("norm_threshold", torch.tensor(t, dtype=torch.float32))
            self.register_buffer("norm_span", torch.tensor(span, dtype=torch.float32))

    def head(self, x: Tensor) -> tuple[Tensor, ...]:
        """Resized images, float (B, 3, h, w) of whole grey levels -> the outputs."""
        out = self.model(x * (1.0 / 255.0))  # [0, 1] as torchvision's to_dtype(scale=True)
        amap, score = out["anomaly_map"], out["pred_score"]
        if not self.calibrated:
            return amap, score
        normalized = ((score - self.norm_threshold) / self.norm_span + 0.5).clamp(0.0, 1.0)
        return amap, score, normalized, score >= self.threshold

    def forward(self, images: Tensor) -> tuple[Tensor, ...]:
        return self.head(self.resize(images.to(torch.float32)))


class _Head(nn.Module):
    """``InferenceGraph.head`` as a module, for tracing."""

    def __init__(self, graph: InferenceGraph):
        super().__init__()
        self.graph = graph

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        return self.graph.head(x)


class _ScriptedGraph(nn.Module):
    """The TorchScript form: the scripted resize (its pass order is a branch on the input size,
    which tracing would freeze) before the traced head."""

    def __init__(self, resize: PillowResize, head: nn.Module):
        super().__init__()
        self.resize = resize
        self.head = head

    def forward(self, images: Tensor):  # the head's tuple of 2 or 4 tensors, types inferred
        return self.head(self.resize(images.to(torch.float32)))


def build_graph(loaded) -> InferenceGraph:
    """The ``InferenceGraph`` of a ``prn.deploy.loading.LoadedModel`` (on the CPU, eval mode)."""
    model = loaded.model
    if loaded.kind == "patchcore":
        model = PatchCoreGraph(model)
    elif loaded.kind not in ("prn", "prototypes"):
        raise CheckpointError(f"{loaded.path}: model kind {loaded.kind!r} cannot be exported "
                              f"(prn exports prn, prototypes and patchcore)")
    return InferenceGraph(model, loaded.cfg.input_hw, loaded.calibration).eval().cpu()


def metadata(loaded, fmt: str) -> dict[str, str]:
    """What the exported file says about itself: every value a string (ONNX metadata_props)."""
    cfg, cal = loaded.cfg, loaded.calibration
    h, w = cfg.input_hw
    meta = {
        "format": fmt, "prn_version": __version__, "model_kind": loaded.kind,
        "backbone": cfg.backbone, "input_height": str(h), "input_width": str(w),
        "input": INPUT_CONTRACT,
        "outputs": ",".join(OUTPUT_NAMES if cal is not None else OUTPUT_NAMES[:2]),
        "map": "PRN: probability per pixel in [0, 1]; prototypes, patchcore: distance >= 0",
        "map_sigma": repr(float(cfg.map_sigma)), "top_k": str(cfg.top_k),
        "dataset": cfg.dataset, "category": str(cfg.category),
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

    fmt: "onnx" or "torchscript". verify: run the written file and prn on random batches of
    other sizes than the one exported with (``check_parity``: at the model's input size, maps
    and scores within 1e-4 of the map's scale and the same decisions), so a file with a batch
    size, input size or branch baked in is reported, not left behind silently.
    """
    from prn.deploy.loading import load_model

    if fmt not in FORMATS:
        raise UsageError(f"unknown export format {fmt!r}; choose {' or '.join(FORMATS)}")
    out = Path(out) if out is not None else default_out(checkpoint, fmt)
    if out.is_dir():
        raise UsageError(f"{out}: is a folder; --out takes the file to write")
    loaded = load_model(checkpoint, device="cpu")
    graph = build_graph(loaded)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = metadata(loaded, fmt)
    h, w = loaded.cfg.input_hw
    # Exported at another size than the model's and another batch than 1, so that neither the
    # input size nor the batch is baked in as a constant.
    example = torch.randint(0, 256, (2, 3, h + 3, w + 5), dtype=torch.uint8,
                            generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        if fmt == "onnx":
            _export_onnx(graph, example, out, meta)
        else:
            _export_torchscript(graph, example, out, meta)
    if verify:
        g = torch.Generator().manual_seed(0)
        check_parity(graph, out, torch.randint(0, 256, (3, 3, h, w), dtype=torch.uint8, generator=g))
        # Other sizes, one for each order of the resize's passes: a size or branch baked in
        # would be far off. Rounding to grey levels can differ at a rare pixel between torch and
        # the exported resize, so these are held to 1e-2 of the map's scale, not 1e-4.
        for shape in [(2, 3, h + 7, w + 2), (1, 3, h // 2 + 1, 2 * w + 1)]:
            probe = torch.randint(0, 256, shape, dtype=torch.uint8, generator=g)
            check_parity(graph, out, probe, tol=1e-2, decisions=False)
    return out


def _dynamic_shapes():
    batch = torch.export.Dim("batch", min=1, max=4096)
    height = torch.export.Dim("height", min=2, max=65536)
    width = torch.export.Dim("width", min=2, max=65536)
    return {"images": {0: batch, 2: height, 3: width}}


def _export_onnx(graph: InferenceGraph, example: Tensor, out: Path, meta: dict[str, str]) -> None:
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
            program = torch.onnx.export(graph, (example,), input_names=[INPUT_NAME], output_names=names,
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


def _export_torchscript(graph: InferenceGraph, example: Tensor, out: Path, meta: dict[str, str]) -> None:
    with warnings.catch_warnings():
        # Tracing warns at every Python int taken from a shape; the head's input has a fixed
        # size, so those are constants of the model. The batch size stays symbolic, and
        # check_parity proves it on other batch and input sizes.
        warnings.simplefilter("ignore")
        head = torch.jit.trace(_Head(graph), graph.resize(example.to(torch.float32)), check_trace=False)
        scripted = torch.jit.script(_ScriptedGraph(graph.resize, head))
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
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit's deprecation notice
            module = torch.jit.load(str(path), map_location="cpu")
        with torch.no_grad():
            values = [v.numpy() for v in module(torch.from_numpy(batch))]
    return dict(zip(names, values))


def check_parity(graph: InferenceGraph, path: Path, images: Tensor, tol: float = 1e-4,
                 decisions: bool = True) -> dict[str, float]:
    """Largest differences between the exported file and prn on ``images`` (uint8 (B, 3, H, W)).

    Maps and scores must agree within ``tol`` times the map's scale (1 for PRN's probabilities,
    the largest value for distance maps), normalised scores within that over the calibration's
    score span (the normalisation divides by it), decisions exactly (unless ``decisions`` is
    False); else PRNError."""
    with torch.no_grad():
        expected = [v.numpy() for v in graph(images)]
    got = run_exported(path, images)
    names = list(got)
    scale = max(1.0, float(np.abs(expected[0]).max()))
    limits = {"anomaly_map": tol * scale, "score": tol * scale,
              "prediction": 0.0 if decisions else math.inf}
    if graph.calibrated:
        limits["normalized_score"] = tol * scale / float(graph.norm_span)
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
    """The metadata of a file written by ``export`` (ONNX or TorchScript)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: exported model not found")
    with open(path, "rb") as fh:
        is_zip = fh.read(4) == b"PK\x03\x04"  # TorchScript files are zip archives, ONNX protobuf
    if not is_zip:
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
