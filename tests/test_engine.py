"""prn predict --engine onnx: onnxruntime on the run's exported graph, against the torch engine."""

import csv
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import load_script

pytest.importorskip("onnxruntime")

from prn import api  # noqa: E402
from prn.cli import main  # noqa: E402
from prn.deploy.engine import ensure_exported, make_engine, onnx_file  # noqa: E402
from prn.deploy.predict import Predictor  # noqa: E402
from prn.errors import UsageError  # noqa: E402


@pytest.fixture(scope="module")
def run(tiled_run, tiled_run_onnx, tmp_path_factory):
    """A copy of the shared tiled run (the export written into it stays out of the shared run)
    holding the shared run's export where prn export puts it, newer than the checkpoint, so the
    engine reuses it (an export takes about a minute; making one on first use is tested below).
    Tiled, so that the engine is held against torch on the graph that does the most (cutting
    tiles and putting their maps back); the untiled graph is held against prn in test_export."""
    run = shutil.copytree(tiled_run, tmp_path_factory.mktemp("engine") / "run")
    (run / "export").mkdir(exist_ok=True)
    shutil.copy(tiled_run_onnx, onnx_file(Predictor(run, device="cpu")))
    return run


def _rows(csv_path):
    with open(csv_path, newline="") as f:
        return {r["path"]: r for r in csv.DictReader(f)}


def test_the_onnx_engine_gives_the_torch_engines_scores_maps_and_decisions(run, demo_root, tmp_path):
    images = demo_root / "demo" / "test"
    a = api.predict(run, images, tmp_path / "torch", progress=False)
    b = api.predict(run, images, tmp_path / "onnx", progress=False, engine="onnx")
    assert (run / "export" / "model.onnx").is_file()  # made on first use, where prn export puts it
    ra, rb = _rows(a.csv), _rows(b.csv)
    assert ra.keys() == rb.keys() and len(ra) == a.n_images > 0
    span = np.ptp([float(r["score"]) for r in ra.values()]) or 1.0
    for path, row in ra.items():
        assert abs(float(row["score"]) - float(rb[path]["score"])) <= 1e-4 * span, path
        assert row["prediction"] == rb[path]["prediction"] and row["regions"] == rb[path]["regions"]
        ma = np.load(tmp_path / "torch" / "maps" / (path + ".npy"))
        mb = np.load(tmp_path / "onnx" / "maps" / (path + ".npy"))
        assert ma.shape == mb.shape and np.abs(ma - mb).max() <= 1e-4 * max(np.ptp(ma), 1e-6), path


def test_the_export_is_reused_and_made_again_when_the_checkpoint_is_newer(run, monkeypatch):
    import prn.deploy.export
    predictor = Predictor(run, device="cpu")
    path = onnx_file(predictor)
    assert path == run / "export" / "model.onnx" and path.is_file()
    made = []
    monkeypatch.setattr(prn.deploy.export, "export", lambda ckpt, fmt, out: made.append((ckpt, fmt, out)) or out)
    assert ensure_exported(predictor) == path and made == []  # reused
    ckpt, before = predictor.loaded.path, predictor.loaded.path.stat()
    later = path.stat().st_mtime + 10
    os.utime(ckpt, (later, later))  # e.g. prn calibrate rewrote it
    try:
        assert ensure_exported(predictor) == path and made == [(ckpt, "onnx", path)]
    finally:
        os.utime(ckpt, ns=(before.st_atime_ns, before.st_mtime_ns))


def test_an_unknown_engine_is_refused_and_the_cli_takes_onnx(run, demo_root, tmp_path, capsys):
    with pytest.raises(UsageError, match="unknown engine"):
        make_engine(Predictor(run, device="cpu"), "tensorrt")
    image = next((demo_root / "demo" / "test" / "good").iterdir())
    assert main(["predict", str(run), str(image), "--out", str(tmp_path / "out"), "--engine", "onnx",
                 "--quiet"]) in (0, None)
    assert "1 images" in capsys.readouterr().out


def test_serve_runs_the_onnx_engine_with_torchs_scores(run, demo_root):
    pytest.importorskip("fastapi", reason="prn serve needs the serve extra")
    from fastapi.testclient import TestClient

    from prn.serve import build_app
    image = next((demo_root / "demo" / "test" / "good").iterdir())
    scores = {}
    for engine in ("torch", "onnx"):
        client = TestClient(build_app(run, device="cpu", engine=engine, corrections=False))
        assert client.get("/model").json()["engine"] == engine
        r = client.post("/predict", files=[("files", (image.name, image.read_bytes(), "image/png"))])
        assert r.status_code == 200, r.text
        scores[engine] = r.json()["results"][0]
    assert scores["onnx"]["score"] == pytest.approx(scores["torch"]["score"], abs=1e-4)
    assert scores["onnx"]["prediction"] == scores["torch"]["prediction"]


def test_decoding_in_worker_processes_gives_the_same_rows(run, demo_root, tmp_path):
    images = demo_root / "demo" / "test"
    a = api.predict(run, images, tmp_path / "in_process", progress=False, maps="none")
    b = api.predict(run, images, tmp_path / "workers", progress=False, maps="none", num_workers=2,
                    engine="onnx")
    ra, rb = _rows(a.csv), _rows(b.csv)
    assert list(ra) == list(rb)  # the input order, whichever worker decoded which image
    for path in ra:
        assert abs(float(ra[path]["score"]) - float(rb[path]["score"])) <= 1e-4, path


def test_the_onnx_engine_warns_when_the_run_infers_below_float32(run, monkeypatch, capsys):
    import prn.deploy.engine as engine
    monkeypatch.setattr(engine, "OnnxEngine", lambda predictor, progress, threads: "session")  # no export needed
    predictor = Predictor(run)
    assert make_engine(predictor, "onnx") == "session" and "warning" not in capsys.readouterr().err
    predictor.cfg = predictor.cfg.replace(precision="bf16")  # as after prn calibrate --precision bf16
    make_engine(predictor, "onnx")
    err = capsys.readouterr().err
    assert "float32" in err and "bf16" in err and "prn calibrate RUN --precision 32" in err


def test_the_openvino_benchmark_scores_the_test_split_with_every_engine(run):
    pytest.importorskip("openvino", reason="OpenVINO is in the dev extra")
    bench = load_script(Path(__file__).resolve().parents[1] / "benchmarks" / "openvino_parity.py")
    result = bench.study(run, batch=4, repeats=1, threads=1)
    n = len(json.loads((run / "split.json").read_text())["test"])
    assert result["images"] == n and 0 < result["defective"] < n
    rows = result["rows"]
    assert list(rows) == ["torch (prn predict)", "onnxruntime", *bench.VARIANTS]
    for row in rows.values():
        assert len(row["scores"]) == n and row["ms_per_image"] > 0
        assert row["defects_stopped"] <= result["defective"] and row["goods_rejected"] <= n - result["defective"]
    # prn's torch engine and OpenVINO as docs/deploy.md sets it up give onnxruntime's scores
    span = np.ptp(rows["onnxruntime"]["scores"]) or 1.0
    for name in ("torch (prn predict)", "openvino, image size fixed, f32"):
        assert rows[name]["max_score_diff"] <= 1e-4 * span and rows[name]["decisions_unlike_onnxruntime"] == 0, name
    assert rows["openvino, image size fixed, f32"]["precision"] == "float32"
    table = bench.table(result)
    assert all(f"| {name} |" in table for name in rows)
