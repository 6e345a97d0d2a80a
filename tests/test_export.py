"""`prn export`: the exported files (ONNX through onnxruntime, TorchScript) against prn itself.

Tiny random-weight models (ResNet-18 body, 32 x 64 input, one attention block) keep each
export to seconds; every exported file is made once per module and shared by the tests.
"""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from prn.checkpoint import save_checkpoint
from prn.config import PRNConfig
from prn.data.sample import Sample
from prn.deploy.export import build_graph, check_parity, export, read_metadata, run_exported
from prn.deploy.loading import load_model
from prn.pipeline import InferencePipeline
from prn.postprocess import Postprocess, float32_threshold
from prn.registry import build
from prn.errors import PRNError
from prn.infer import predict_samples
from prn.model.defect_memory import remember

pytest.importorskip("onnxruntime")

REPO = Path(__file__).resolve().parents[1]
HW = (32, 64)
TOL = 1e-4


def tiny_config(**kw) -> PRNConfig:
    base = dict(image_hw=HW, backbone="resnet18", backbone_weights="random", attention_dim=8,
                attention_layers=1, attention_patch_divisors=(1, 2), decoder_channels=(8, 8, 8, 8),
                top_k=10, map_sigma=1.0,
                prototype_ratio=0.5, kmeans_max_iter=10, device="cpu", category="demo")
    base.update(kw)
    return PRNConfig(**base)


def uint8_images(n: int, hw=HW, seed: int = 0) -> torch.Tensor:
    """Smooth random pictures (noise blown up), so that images differ as parts would."""
    g = torch.Generator().manual_seed(seed)
    small = torch.rand(n, 3, max(2, hw[0] // 8), max(2, hw[1] // 8), generator=g)
    x = torch.nn.functional.interpolate(small, size=hw, mode="bilinear", align_corners=False)
    x = x + 0.1 * torch.rand(n, 3, *hw, generator=g)
    return (x.clamp(0, 1) * 255).round().to(torch.uint8)


BATCH7 = uint8_images(7, seed=1)
BATCH1 = uint8_images(1, seed=2)


def calibration_between(scores: np.ndarray) -> dict:
    """A calibration whose threshold lies in the widest gap between the middle scores, so batch
    7 holds parts on both sides of it, far from float32 rounding."""
    s = np.sort(scores.astype(np.float64))
    i = 1 + int(np.argmax(np.diff(s)[1:-1]))  # gap between s[i] and s[i + 1], neither extreme
    t = (s[i] + s[i + 1]) / 2
    assert s[i + 1] - s[i] > 1e-4 * max(1.0, abs(s).max()), "scores too close to place a threshold"
    spread = s[-1] - s[0]
    return {"image_threshold": float(t), "pixel_threshold": 0.5, "target_fpr": 0.01,
            "pixel_target_fpr": 0.001, "score_min": float(s[0] - spread), "score_max": float(s[-1] + spread),
            "pixel_min": 0.0, "pixel_max": 1.0, "n_normal": 7, "n_anomalous": 0, "source": "test"}


def remember_some_defects(model) -> None:
    """A defect memory of three pictures with a marked square each, judged against three others."""
    seen = uint8_images(3, seed=5).float() / 255
    masks = torch.zeros(3, 1, *HW)
    masks[:, :, 8:16, 20:36] = 1
    goods = uint8_images(3, seed=6).float() / 255
    with torch.no_grad():
        scores = model(goods)["pred_score"]
    remember(model, seen, masks, goods, scores, mode="on", gate=0.9)
    assert model.defect_memory.built


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """{kind: checkpoint path} of calibrated tiny models, plus "prn-uncalibrated". PRN averages
    the maps of its input's four mirrored copies (``test_flips`` "all") and fuses its score with a
    memory of seen defects matched at 1/2 of the input (``defect_memory``, ``defect_memory_stride`` 2), and
    matches its prototypes position by position (``prototype_match``), so that one export holds the
    network, its mirrored pass, the memory's match and the per-position match (an export takes
    half a minute or more here; the graph without either is exported from the shared tiled run,
    conftest.tiled_run_onnx)."""
    folder = tmp_path_factory.mktemp("export")
    normals = uint8_images(6, seed=0).float() / 255
    out = {}
    for name, kind, changes in (("prn", "prn", {"test_flips": "all", "defect_memory_stride": 2,
                                                "resize_detail": "dark", "detail_width": 3,
                                                "prototype_match": "position"}),
                                ("prototypes", "prototypes", {}),
                                ("patchcore", "patchcore", {})):
        torch.manual_seed(0)
        cfg = tiny_config(**changes)
        model = build(kind, cfg).eval()
        model.fit([normals]) if kind == "patchcore" else model.fit_prototypes([normals])
        if kind == "prn":
            remember_some_defects(model)
        with torch.no_grad():
            scores = InferencePipeline(model, HW, detail=cfg.model.detail)(BATCH7)["score"].numpy()
        path = folder / f"{name}.pt"
        save_checkpoint(path, model=kind, config=cfg.to_dict(), state_dict=model.state_dict(),
                        calibration=calibration_between(scores))
        out[name] = path
        if name == "prn":
            out["prn-uncalibrated"] = save_checkpoint(
                folder / "prn-uncalibrated.pt", model=kind, config=cfg.to_dict(),
                state_dict=model.state_dict())
    return out


@pytest.fixture(scope="module")
def exported(checkpoints, tmp_path_factory):
    """exported(kind, fmt) -> path, exported once per module."""
    folder = tmp_path_factory.mktemp("exported")
    cache = {}

    def get(kind: str, fmt: str) -> Path:
        if (kind, fmt) not in cache:
            cache[kind, fmt] = export(checkpoints[kind], fmt, folder / f"{kind}.{fmt}")
        return cache[kind, fmt]
    return get


def torch_outputs(checkpoint, images: torch.Tensor) -> dict[str, np.ndarray]:
    graph = build_graph(load_model(checkpoint, device="cpu"))
    with torch.no_grad():
        return {n: v.numpy() for n, v in graph(images).items()}


def assert_parity(got: dict, want: dict, checkpoint) -> None:
    """Maps and scores within TOL of the map's scale (1 for PRN's probabilities), normalised
    scores within that over the calibration's span (the normalisation divides by it), the same
    decisions."""
    scale = max(1.0, float(np.abs(want["anomaly_map"]).max()))
    cal = torch.load(checkpoint, weights_only=True)["calibration"]
    limits = {"anomaly_map": TOL * scale, "score": TOL * scale,
              "normalized_score": TOL * scale / (cal["score_max"] - cal["score_min"])}
    assert set(got) == set(want)
    for name, limit in limits.items():
        assert got[name].shape == want[name].shape, name
        assert got[name].dtype == np.float32, name
        np.testing.assert_allclose(got[name], want[name], rtol=0, atol=limit, err_msg=name)
    assert got["prediction"].dtype == np.bool_
    assert np.array_equal(got["prediction"], want["prediction"])


# Every kind in both formats. An ONNX export takes 30-50 s of CPU here (torch's exporter), so
# the fast set exports PRN only; the kinds that train nothing are in the slow set.
CASES = [("prn", "onnx"), ("prn", "torchscript")] + [
    pytest.param(kind, fmt, marks=pytest.mark.slow)
    for kind in ("prototypes", "patchcore") for fmt in ("onnx", "torchscript")]


@pytest.mark.parametrize("kind, fmt", CASES)
def test_exported_model_matches_torch_on_batches_of_1_and_7(kind, fmt, checkpoints, exported):
    path = exported(kind, fmt)
    for images in (BATCH1, BATCH7):
        want = torch_outputs(checkpoints[kind], images)
        got = run_exported(path, images)
        assert got["anomaly_map"].shape == (len(images), 1, *HW)
        assert_parity(got, want, checkpoints[kind])
    # the threshold splits batch 7, so "same pass/fail" compares both decisions
    assert 0 < want["prediction"].sum() < 7
    # frames of other sizes: the resize in the file, each order of its passes
    for hw in [(45, 150), (90, 70)]:
        frames = uint8_images(3, hw=hw, seed=hw[0])
        want = torch_outputs(checkpoints[kind], frames)
        assert_parity(run_exported(path, frames), want, checkpoints[kind])


def test_exported_graph_is_prns_own_pipeline_on_images_of_the_models_size(checkpoints, exported, tmp_path):
    # prn predicts from files (Pillow decode, resize, [0, 1] scaling); the graph from uint8 arrays.
    samples = []
    for i, image in enumerate(BATCH7):
        path = tmp_path / f"{i}.png"
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(path)
        samples.append(Sample(path, None, 0, "unknown"))
    loaded = load_model(checkpoints["prn"], device="cpu")
    prn = predict_samples(loaded.model, samples, HW, batch_size=4, detail=loaded.cfg.model.detail)
    got = run_exported(exported("prn", "onnx"), BATCH7)
    np.testing.assert_allclose(got["anomaly_map"][:, 0], prn.maps, rtol=0, atol=TOL)
    np.testing.assert_allclose(got["score"], prn.scores, rtol=0, atol=TOL)


def test_raw_frames_give_prns_scores_on_the_same_files(checkpoints, exported, tmp_path):
    # Images of another size than the model's, resized in the graph, against prn reading files.
    frames = [uint8_images(2, hw=hw, seed=20 + i) for i, hw in enumerate([(96, 200), (150, 70)])]
    loaded = load_model(checkpoints["prn"], device="cpu")
    for i, batch in enumerate(frames):
        paths = []
        for j, image in enumerate(batch):
            paths.append(tmp_path / f"{i}_{j}.png")
            Image.fromarray(image.permute(1, 2, 0).numpy()).save(paths[-1])
        prn = predict_samples(loaded.model, [Sample(p, None, 0, "unknown") for p in paths], HW,
                              detail=loaded.cfg.model.detail)
        got = run_exported(exported("prn", "onnx"), batch)
        # the graph resizes as prn does, bit for bit: only the engines' float rounding remains
        np.testing.assert_allclose(got["score"], prn.scores, rtol=0, atol=TOL)
        np.testing.assert_allclose(got["anomaly_map"][:, 0], prn.maps, rtol=0, atol=TOL)


def test_onnx_file_holds_the_metadata_and_a_dynamic_uint8_input(checkpoints, exported):
    import onnx
    path = exported("prn", "onnx")
    model = onnx.load_model(str(path))
    props = {p.key: p.value for p in model.metadata_props}
    calibration = torch.load(checkpoints["prn"], weights_only=True)["calibration"]
    assert props["model_kind"] == "prn" and props["backbone"] == "resnet18"
    assert (int(props["input_height"]), int(props["input_width"])) == HW
    assert props["prn_version"] == __import__("prn").__version__ and props["tiles"] == "1"
    assert float(props["image_threshold"]) == calibration["image_threshold"]
    assert json.loads(props["calibration"]) == calibration
    assert props == read_metadata(path)
    (inp,) = model.graph.input
    assert inp.name == "images" and inp.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    dims = inp.type.tensor_type.shape.dim
    assert [d.dim_value for d in dims][1] == 3
    assert all(d.dim_param for i, d in enumerate(dims) if i != 1)  # batch, height, width symbolic
    assert [o.name for o in model.graph.output] == ["anomaly_map", "score", "normalized_score", "prediction"]


def test_torchscript_file_holds_the_same_metadata(exported):
    onnx_meta = read_metadata(exported("prn", "onnx"))
    ts_meta = read_metadata(exported("prn", "torchscript"))
    assert ts_meta.pop("format") == "torchscript" and onnx_meta.pop("format") == "onnx"
    assert ts_meta == onnx_meta


@pytest.fixture(scope="module")
def openvino_file(checkpoints, tmp_path_factory):
    """The PRN checkpoint exported to OpenVINO's IR by the command, as a user runs it: under the
    machine's allocator choice (tcmalloc where it is installed, which OpenVINO aborts under, so
    the command must not preload it for export)."""
    pytest.importorskip("openvino", reason="OpenVINO is in the dev extra")
    out = tmp_path_factory.mktemp("openvino") / "prn.xml"
    env = {k: v for k, v in os.environ.items() if k not in ("PRN_ALLOCATOR", "LD_PRELOAD")}
    done = subprocess.run([sys.executable, "-m", "prn", "export", str(checkpoints["prn"]), "--format", "openvino",
                           "--out", str(out)], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"openvino: {out}" in done.stdout and "32 x 64 exactly" in done.stdout and "prn.bin" in done.stdout
    return out


def test_openvino_ir_gives_prns_outputs_at_the_models_input_size(checkpoints, openvino_file):
    assert sorted(p.name for p in openvino_file.parent.iterdir()) == ["prn.bin", "prn.xml"]  # nothing left over
    for images in (BATCH1, BATCH7):
        assert_parity(run_exported(openvino_file, images), torch_outputs(checkpoints["prn"], images), checkpoints["prn"])
    import openvino as ov
    model = ov.Core().read_model(str(openvino_file))
    assert str(model.input(0).partial_shape) == "[?,3,32,64]"  # the batch open, the image size fixed
    constants = {op.get_element_type().get_type_name() for op in model.get_ops() if op.get_type_name() == "Constant"}
    assert "f32" in constants and "f16" not in constants  # the weights kept in float32


def test_openvino_ir_holds_the_metadata_with_its_own_input(openvino_file, exported):
    meta, onnx_meta = read_metadata(openvino_file), read_metadata(exported("prn", "onnx"))
    assert meta.pop("format") == "openvino" and onnx_meta.pop("format") == "onnx"
    assert "resized by the caller" in meta.pop("input") and "resized inside" in onnx_meta.pop("input")
    assert meta == onnx_meta


def test_openvino_export_refuses_another_suffix_and_a_tcmalloc_process(checkpoints, tmp_path, monkeypatch):
    with pytest.raises(PRNError, match="OpenVINO's IR is a .xml file"):
        export(checkpoints["prn"], "openvino", tmp_path / "model.onnx")
    import prn.allocator
    monkeypatch.setattr(prn.allocator, "in_use", lambda: "tcmalloc")
    with pytest.raises(PRNError, match="tcmalloc"):
        export(checkpoints["prn"], "openvino", tmp_path / "model.xml")
    assert not any(tmp_path.iterdir())


def test_export_refuses_a_file_that_disagrees_with_prn(checkpoints, exported):
    path = exported("prn", "torchscript")
    graph = build_graph(load_model(checkpoints["prn"], device="cpu"))
    with torch.no_grad():
        graph.model.decoder.head.bias += 0.5  # prn now differs from the file
    with pytest.raises(PRNError, match="disagrees"):
        check_parity(graph, path, BATCH7)


def test_export_refuses_unknown_formats_and_missing_checkpoints(checkpoints, tmp_path):
    with pytest.raises(PRNError, match="tflite"):
        export(checkpoints["prn"], "tflite")
    with pytest.raises(PRNError, match="absent"):
        export(tmp_path / "absent.pt", "onnx")
    with pytest.raises(PRNError, match="is a folder; --out takes the file"):
        export(checkpoints["prn"], "onnx", tmp_path)
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(PRNError, match=r"a_file: the folder of --out is a file"):
        export(checkpoints["prn"], "onnx", tmp_path / "a_file" / "model.onnx")
    assert (tmp_path / "a_file").read_text() == "x"


def test_float32_threshold_decides_float32_scores_as_the_float64_threshold_does():
    rng = np.random.default_rng(0)
    for t in np.concatenate([rng.random(200), [0.5, 1.0, 1e-8, 123.456789]]):
        t32 = np.float32(float32_threshold(t))
        near = np.nextafter(np.float32(t), np.float32([-np.inf, 0, np.inf])).astype(np.float32)
        for s in np.concatenate([near, [np.float32(t)]]):
            assert (s >= t32) == (float(s) >= t)


@pytest.mark.parametrize("engine", ["onnxruntime", "openvino", "openvino-ir"])
def test_docs_script_scores_a_folder_as_prn_does_without_importing_prn(engine, checkpoints, exported, tmp_path,
                                                                       request):
    if engine.startswith("openvino"):
        pytest.importorskip("openvino", reason="OpenVINO is in the dev extra")
    # the ONNX file in onnxruntime or OpenVINO, or the OpenVINO form of prn export in OpenVINO
    model = request.getfixturevalue("openvino_file") if engine == "openvino-ir" else exported("prn", "onnx")
    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    pictures = [uint8_images(1, hw=hw, seed=10 + i)[0] for i, hw in enumerate([HW, (50, 120), (90, 70)])]
    pictures += list(BATCH7[:3])
    paths = []
    for i, image in enumerate(pictures):
        path = folder / ("sub" if i % 2 else "") / f"part{i}.png"
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(path)
        paths.append(path)
    script = REPO / "docs" / "examples" / "score_folder.py"
    # prn made unimportable in the subprocess: the script must run on onnxruntime, numpy, Pillow
    runner = ("import runpy, sys; sys.modules['prn'] = None; "
              "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')")
    flags = ["--openvino"] if engine.startswith("openvino") else []
    run = subprocess.run([sys.executable, "-c", runner, str(script), str(model), str(folder), *flags],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    rows = {r["path"]: r for r in csv.DictReader(run.stdout.splitlines())}
    loaded = load_model(checkpoints["prn"], device="cpu")
    prn = predict_samples(loaded.model, [Sample(p, None, 0, "unknown") for p in paths], HW,
                          detail=loaded.cfg.model.detail)
    normalized, decisions = Postprocess(loaded.calibration).judge(prn.scores)
    assert len(rows) == len(paths)
    for path, score, norm, decision in zip(paths, prn.scores, normalized, decisions):
        row = rows[str(path.relative_to(folder))]
        assert abs(float(row["score"]) - score) <= TOL
        assert abs(float(row["normalized_score"]) - norm) <= TOL * 10
        assert int(row["prediction"]) == decision


def test_cli_export_of_an_uncalibrated_run_writes_map_and_score_into_the_run(checkpoints, tmp_path, capsys):
    from prn.cli import main
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "model.pt").write_bytes(checkpoints["prn-uncalibrated"].read_bytes())
    assert main(["export", str(run), "--format", "torchscript"]) == 0
    path = run / "export" / "model.torchscript.pt"
    printed = capsys.readouterr().out
    assert str(path) in printed and "32 x 64" in printed and "no calibration" in printed
    meta = read_metadata(path)
    assert meta["calibrated"] == "false" and "image_threshold" not in meta
    got = run_exported(path, BATCH7)
    assert list(got) == ["anomaly_map", "score"]
    want = torch_outputs(checkpoints["prn"], BATCH7)  # the same weights, calibrated
    for name in ("anomaly_map", "score"):
        np.testing.assert_allclose(got[name], want[name], rtol=0, atol=TOL)


def test_a_file_named_anything_is_read_by_its_content(exported, tmp_path):
    renamed = tmp_path / "model.bin"
    renamed.write_bytes(exported("prn", "onnx").read_bytes())
    assert read_metadata(renamed)["format"] == "onnx"
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    with pytest.raises(PRNError, match="junk.onnx"):
        read_metadata(tmp_path / "junk.onnx")


def test_cli_export_of_a_missing_checkpoint_is_a_model_error(tmp_path, capsys):
    from prn.cli import main
    from prn.errors import ExitStatus
    assert main(["export", str(tmp_path / "absent.pt")]) == ExitStatus.MODEL
    err = capsys.readouterr().err
    assert "absent.pt" in err and "Traceback" not in err


def test_docs_page_shows_the_script_the_tests_run():
    page = (REPO / "docs" / "deploy.md").read_text()
    script = (REPO / "docs" / "examples" / "score_folder.py").read_text()
    blocks = [b.split("\n", 1)[1] for b in page.split("```python")[1:]]
    assert any(b.split("```")[0] == script for b in blocks)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["prototypes", "patchcore"])
def test_the_models_that_train_nothing_export_to_openvino_too(kind, checkpoints, tmp_path):
    pytest.importorskip("openvino", reason="OpenVINO is in the dev extra")
    path = export(checkpoints[kind], "openvino", tmp_path / f"{kind}.xml")  # checked against prn inside
    assert read_metadata(path)["model_kind"] == kind
    assert_parity(run_exported(path, BATCH7), torch_outputs(checkpoints[kind], BATCH7), checkpoints[kind])
