"""One path from an image to a decision: validation, test, predict, serve and the exported graph
give the same score, map and decision for the same image (prn.pipeline)."""

import csv
import io

import numpy as np
import pytest
import torch
from PIL import Image

from prn.data.datasets import load_validation
from prn.data.sample import Sample
from prn.data.split import Split
from prn.deploy.predict import Predictor, predict_folder
from prn.infer import predict_samples, validate
from prn.pipeline import InferencePipeline

TOL = 1e-5


@pytest.fixture(scope="module")
def frames(tmp_path_factory):
    """Three images of other sizes and aspects than the model's (64 x 64), as files."""
    folder = tmp_path_factory.mktemp("frames")
    rng = np.random.default_rng(0)
    paths = []
    for i, hw in enumerate([(50, 130), (131, 77), (64, 64)]):
        small = rng.integers(60, 200, (hw[0] // 8 + 1, hw[1] // 8 + 1, 3), dtype=np.uint8)
        image = np.asarray(Image.fromarray(small).resize(hw[::-1], Image.Resampling.BICUBIC))
        paths.append(folder / f"part{i}.png")
        Image.fromarray(image).save(paths[-1])
    return paths


def test_every_caller_gives_the_same_score_map_and_decision(calibrated_run, frames, tmp_path):
    predictor = Predictor(calibrated_run, device="cpu")
    cfg, model, device = predictor.cfg, predictor.model, predictor.loaded.device
    samples = [Sample(p, None, 0, "good") for p in frames]
    images = [np.asarray(Image.open(p).convert("RGB")) for p in frames]

    # validation (in memory, every epoch; calibration at the end of fit)
    fold = load_validation(cfg, Split(train_normal=[], train_anomalous=[], test=[], dataset="demo",
                                      category="demo", k=0, seed=0, val_normal=samples))
    _, val = validate(model, fold, device, 2, cfg.training.precision)
    # test and calibrate (files through a DataLoader)
    test = predict_samples(model, samples, cfg.model.input_hw, batch_size=2, device=device)
    # predict (files streamed), and the arrays the service uses
    summary = predict_folder(predictor, frames[0].parent, tmp_path / "out", maps="npy", progress=False)
    rows = {r["path"]: r for r in csv.DictReader(summary.csv.open())}
    arrays = predictor.predict_arrays(images)

    np.testing.assert_allclose(val.scores, test.scores, rtol=0, atol=TOL)
    np.testing.assert_allclose(val.maps, test.maps, rtol=0, atol=TOL)
    normalized, decisions = predictor.judge(test.scores)
    for i, path in enumerate(frames):
        row = rows[path.name]
        assert abs(float(row["score"]) - test.scores[i]) <= TOL
        assert abs(arrays[i]["score"] - test.scores[i]) <= TOL
        assert int(row["prediction"]) == arrays[i]["prediction"] == decisions[i]
        assert abs(float(row["normalized_score"]) - normalized[i]) <= TOL
        full = np.load(tmp_path / "out" / "maps" / f"{path.name}.npy")
        assert full.shape == images[i].shape[:2]
        np.testing.assert_allclose(arrays[i]["map"], full, rtol=0, atol=TOL)

    # serve: the uploaded bytes, decoded by the service
    pytest.importorskip("fastapi")
    from prn.serve.service import InspectionService, Upload
    uploads = []
    for path in frames:
        buf = io.BytesIO()
        Image.open(path).save(buf, format="PNG")
        uploads.append(Upload(path.name, buf.getvalue()))
    served = InspectionService(predictor).inspect(uploads)
    for i, result in enumerate(served):
        assert abs(result["score"] - test.scores[i]) <= TOL and result["prediction"] == decisions[i]
    # regions as prn predict finds them on the map at the image's size (serve skips resizing a map
    # none of whose pixels reaches the pixel threshold): at the calibrated threshold, and at one
    # that the first image's map crosses
    found = []
    for cut in (None, float(np.median(arrays[0]["map"]))):
        if cut is not None:
            predictor.postprocess.map_threshold.fill_(cut)
        served = InspectionService(predictor).inspect(uploads)
        for i, result in enumerate(served):
            boxes = [(r.x, r.y, r.width, r.height, r.area) for r in predictor.regions(arrays[i]["map"])]
            assert [(r["x"], r["y"], r["width"], r["height"], r["area"]) for r in result["regions"]] == boxes
            found.append(len(boxes))
    assert 0 in found and max(found) > 0  # both maps without regions and with

    # the pipeline module that is exported, fed each original frame
    pipeline = InferencePipeline(model, cfg.model.input_hw, predictor.calibration).eval()
    for i, image in enumerate(images):
        with torch.no_grad():
            out = pipeline(torch.from_numpy(image.copy()).permute(2, 0, 1)[None])
        assert abs(float(out["score"][0]) - test.scores[i]) <= TOL
        np.testing.assert_allclose(out["anomaly_map"][0, 0].numpy(), test.maps[i], rtol=0, atol=TOL)
        assert bool(out["prediction"][0]) == bool(decisions[i])


def test_the_exported_graph_gives_the_same_scores_and_maps_as_prn(tiled_run, tiled_run_onnx, frames):
    # the shared tiled run: the suite exports as few graphs as it can (conftest.tiled_run_onnx)
    from prn.deploy.export import run_exported
    predictor = Predictor(tiled_run, device="cpu")
    path = tiled_run_onnx
    test = predict_samples(predictor.model, [Sample(p, None, 0, "good") for p in frames],
                           predictor.cfg.model.input_hw, device="cpu")
    normalized, decisions = predictor.judge(test.scores)
    for i, frame in enumerate(frames):
        image = np.asarray(Image.open(frame).convert("RGB")).transpose(2, 0, 1)[None].copy()
        got = run_exported(path, image)
        assert abs(float(got["score"][0]) - test.scores[i]) <= TOL
        np.testing.assert_allclose(got["anomaly_map"][0, 0], test.maps[i], rtol=0, atol=TOL)
        assert bool(got["prediction"][0]) == bool(decisions[i])
        assert abs(float(got["normalized_score"][0]) - normalized[i]) <= TOL


def test_a_run_with_the_detail_filter_filters_in_every_caller(demo_root, tiny_config, tmp_path):
    # The filter before the resize (resize_detail) is a property of the run: fit resolves its width
    # from the training images' step, and test, calibration, predict, serve and the exported graph
    # all filter; a caller that did not would score other pixels (checked last).
    from prn import api
    from prn.config import PRNConfig
    from prn.data.demo import make_demo_dataset
    from prn.deploy.export import build_graph
    from prn.preprocess import Detail
    root = tmp_path / "data"
    make_demo_dataset(root, seed=1, n_train=12, n_test_good=2, n_test_defect=2, size=192)
    cfg = tiny_config(root, tmp_path / "out", epochs=1, steps_per_epoch=1, val_normal_min=4, resize_detail="dark")
    run = api.fit(cfg, run_dir=tmp_path / "run", progress=False)
    written = PRNConfig.load(run / "config.yaml").model
    assert (written.resize_detail, written.detail_width, written.detail) == ("dark", 3, Detail("dark", 3))

    predictor = Predictor(run, device="cpu")
    split = Split.load(run / "split.json")
    files = [s.image_path for s in split.test]
    test = predict_samples(predictor.model, split.test, predictor.input_hw, detail=predictor.cfg.model.detail)
    fold = load_validation(predictor.cfg, Split(train_normal=[], train_anomalous=[], test=[], dataset="demo",
                                                category="demo", k=0, seed=0, val_normal=split.test))
    _, val = validate(predictor.model, fold, predictor.loaded.device, 2, predictor.cfg.training.precision)
    np.testing.assert_allclose(val.scores, test.scores, rtol=0, atol=TOL)
    images = [np.asarray(Image.open(f).convert("RGB")) for f in files]
    arrays = predictor.predict_arrays(images)
    graph = build_graph(predictor.loaded)
    for i, image in enumerate(images):
        assert abs(arrays[i]["score"] - test.scores[i]) <= TOL
        with torch.no_grad():
            out = graph(torch.from_numpy(image.copy()).permute(2, 0, 1)[None])
        assert abs(float(out["score"][0]) - test.scores[i]) <= TOL
    folder = tmp_path / "frames"
    folder.mkdir()
    for f in files:
        (folder / f"{f.parent.name}_{f.name}").write_bytes(f.read_bytes())
    summary = predict_folder(predictor, folder, tmp_path / "pred", maps="none", progress=False)
    rows = {r["path"]: float(r["score"]) for r in csv.DictReader(summary.csv.open())}
    for i, f in enumerate(files):
        assert abs(rows[f"{f.parent.name}_{f.name}"] - test.scores[i]) <= TOL
    unfiltered = predict_samples(predictor.model, split.test, predictor.input_hw)
    assert np.abs(unfiltered.scores - test.scores).max() > 100 * TOL
