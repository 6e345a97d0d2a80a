"""prn predict by value: maps come back at each image's own size and orientation, and they are
the model's maps, resized; scores.csv holds the model's scores.

The run is a tiny random-encoder PRN trained one step on the demo data (seconds); the images
are non-square and of other sizes than the model's 64 x 64.
"""

import csv

import numpy as np
import pytest
import torch
from PIL import Image

from prn import api
from prn.data.sample import Sample
from prn.infer import predict_samples
from prn.postprocess import resize_map

SIZES = {"wide.png": (40, 96), "tall.png": (100, 72), "small.png": (30, 50)}  # (H, W)


@pytest.fixture(scope="module")
def run(demo_root, tmp_path_factory):
    from conftest import make_tiny_config
    out = tmp_path_factory.mktemp("predict_run")
    cfg = make_tiny_config(demo_root, out, epochs=1, steps_per_epoch=1)
    return api.fit(cfg, run_dir=out / "run", progress=False)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("new_images")
    g = np.random.default_rng(0)
    for name, (h, w) in SIZES.items():
        image = g.integers(0, 256, (h, w, 3), dtype=np.uint8)
        image[h // 4:h // 2, w // 2:] = (250, 30, 30)       # a blob off-centre, so orientation matters
        Image.fromarray(image).save(folder / name)
    return folder


@pytest.fixture(scope="module")
def predicted(run, images, tmp_path_factory):
    out = tmp_path_factory.mktemp("pred")
    api.predict(run, images, out, progress=False)
    return out


def test_predicted_maps_have_each_images_original_height_and_width(predicted):
    for name, hw in SIZES.items():
        amap = np.load(predicted / "maps" / f"{name}.npy")
        assert amap.shape == hw and amap.dtype == np.float32, name


def test_predicted_maps_are_the_models_maps_resized_to_the_image(run, images, predicted):
    model, cfg = api.load_model(run)
    samples = [Sample(images / name, None, 0, "unknown") for name in SIZES]
    preds = predict_samples(model, samples, cfg.model.input_hw)
    for i, (name, hw) in enumerate(SIZES.items()):
        amap = np.load(predicted / "maps" / f"{name}.npy")
        np.testing.assert_allclose(amap, resize_map(preds.maps[i], hw), rtol=0, atol=1e-6)
        assert amap.std() > 0, name                      # a real map, not a constant


def test_predicted_scores_are_the_models_image_scores(run, images, predicted):
    model, cfg = api.load_model(run)
    samples = [Sample(images / name, None, 0, "unknown") for name in SIZES]
    want = dict(zip(SIZES, predict_samples(model, samples, cfg.model.input_hw).scores))
    rows = {r["path"]: float(r["score"]) for r in csv.DictReader(open(predicted / "scores.csv"))}
    assert rows.keys() == want.keys()
    for name in SIZES:
        assert abs(rows[name] - want[name]) < 1e-6, name
    assert len(set(rows.values())) == len(rows)          # different images, different scores


def test_predict_samples_returns_the_models_outputs_in_sample_order(run, images):
    model, cfg = api.load_model(run)
    names = list(SIZES)
    samples = [Sample(images / n, None, 0, "unknown") for n in names]
    preds = predict_samples(model, samples, cfg.model.input_hw, batch_size=2)
    for i, n in enumerate(names):
        x = np.array(Image.open(images / n).convert("RGB").resize(cfg.model.input_hw[::-1], Image.Resampling.BILINEAR))
        x = torch.from_numpy(x).permute(2, 0, 1)[None].float() / 255
        with torch.no_grad():
            out = model(x)
        np.testing.assert_allclose(preds.maps[i], out["anomaly_map"][0, 0].numpy(), atol=1e-5)
        assert abs(preds.scores[i] - float(out["pred_score"][0])) < 1e-5
    assert preds.labels.tolist() == [0, 0, 0] and not preds.masks.any()
    assert preds.seconds_per_image > 0


# ---------------------------------------------------------------- resize_map

def test_resize_map_keeps_rows_as_rows_and_columns_as_columns():
    amap = np.zeros((8, 8), np.float32)
    amap[:, :4] = 1.0                                  # left half hot
    wide = resize_map(amap, (4, 20))
    assert wide.shape == (4, 20)
    assert (wide[:, :8] > 0.99).all() and (wide[:, 12:] < 0.01).all()
    tall = resize_map(amap.T.copy(), (20, 4))          # top half hot
    assert (tall[:8] > 0.99).all() and (tall[12:] < 0.01).all()


def test_resize_map_interpolates_between_pixels():
    amap = np.array([[0.0, 1.0]], np.float32)
    row = resize_map(amap, (1, 4))[0]
    np.testing.assert_allclose(row, [0.0, 0.25, 0.75, 1.0])   # bilinear, half-pixel centres


def test_resize_map_to_its_own_size_is_the_identity():
    amap = np.random.default_rng(0).random((6, 9)).astype(np.float32)
    np.testing.assert_array_equal(resize_map(amap, (6, 9)), amap)


def test_resize_map_returns_float32_whatever_it_is_given():
    amap = np.random.default_rng(1).random((6, 9))           # float64
    out = resize_map(amap, (12, 18))
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, resize_map(amap.astype(np.float32), (12, 18)), rtol=0, atol=1e-7)
