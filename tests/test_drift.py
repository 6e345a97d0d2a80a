"""Whether the photos a run scores still look like its calibration's good images
(prn.deploy.drift): the two numbers, the comparison, and where predict, the CLI and serve say it."""

import io
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from prn import api
from prn.cli import main
from prn.config import CalibrationConfig, PRNConfig
from prn.deploy.drift import appearance, appearance_reference, compare_appearance
from prn.deploy.predict import APPEARANCE_FILE, Predictor, predict_folder
from prn.preprocess import read_resized, scale


def _texture(seed=0, hw=(48, 64)):
    g = np.random.default_rng(seed)
    base = g.integers(60, 160, (*hw, 3), dtype=np.uint8)
    return torch.from_numpy(base)[None]  # uint8 (1, H, W, 3)


def test_the_uint8_batch_and_the_model_input_give_the_same_numbers():
    batch = torch.cat([_texture(0), _texture(1)])
    as_input = scale(batch.permute(0, 3, 1, 2).contiguous())
    np.testing.assert_allclose(appearance(batch), appearance(as_input), rtol=1e-5)


def test_light_moves_the_brightness_and_not_the_detail_a_blur_the_detail_and_not_the_brightness():
    image = _texture(2)[0].numpy()
    dimmer = torch.from_numpy((image * 0.5).round().astype(np.uint8))[None]
    blurred = torch.from_numpy(np.array(Image.fromarray(image).filter(ImageFilter.GaussianBlur(1.5))))[None]
    (b0, d0), (b1, d1), (b2, d2) = appearance(torch.from_numpy(image)[None])[0], appearance(dimmer)[0], \
        appearance(blurred)[0]
    assert b1 / b0 == pytest.approx(0.5, abs=0.01) and d1 / d0 == pytest.approx(1.0, abs=0.02)
    assert b2 / b0 == pytest.approx(1.0, abs=0.01) and d2 / d0 < 0.6


def test_a_change_past_the_tolerance_is_named_and_a_small_one_or_a_few_images_are_not():
    reference = appearance_reference(np.array([[100.0, 0.2]] * 30))
    assert reference["images"] == 30 and reference["brightness"] == 100.0
    cfg = CalibrationConfig(drift_brightness=0.1, drift_detail=0.1, drift_min_images=20)
    same = compare_appearance(reference, np.array([[105.0, 0.19]] * 25), cfg)
    assert not same["drifted"] and same["message"] is None and same["brightness_change"] == pytest.approx(0.05)
    darker = compare_appearance(reference, np.array([[80.0, 0.2]] * 25), cfg)
    assert darker["drifted"] and "20 % darker" in darker["message"] and "sharper" not in darker["message"]
    assert "prn calibrate RUN --good-images" in darker["message"]
    soft = compare_appearance(reference, np.array([[100.0, 0.15]] * 25), cfg)
    assert soft["drifted"] and "25 % softer" in soft["message"]
    assert compare_appearance(reference, np.array([[50.0, 0.1]] * 19), cfg) is None  # too few to say
    assert compare_appearance(None, np.array([[50.0, 0.1]] * 25), cfg) is None      # calibrated before the check


def test_a_few_defective_parts_among_good_ones_do_not_move_the_medians():
    reference = appearance_reference(np.array([[100.0, 0.2]] * 30))
    looks = np.array([[100.0, 0.2]] * 22 + [[30.0, 0.9]] * 3)  # three dark, busy parts
    assert not compare_appearance(reference, looks, CalibrationConfig())["drifted"]


@pytest.mark.parametrize("bad", [dict(drift_brightness=0), dict(drift_detail=-0.1), dict(drift_min_images=0)])
def test_the_tolerances_are_checked(bad):
    with pytest.raises(ValueError, match="drift_"):
        CalibrationConfig(**bad)


def test_calibration_keeps_the_medians_of_the_good_images_it_was_set_on(calibrated_run):
    cal = json.loads((calibrated_run / "calibration.json").read_text())
    reference = cal["appearance"]
    assert reference["images"] == cal["n_normal"]
    # the fit measured its fold in memory; the same files read as predict reads them agree
    cfg = PRNConfig.load(calibrated_run / "config.yaml")
    split = json.loads((calibrated_run / "split.json").read_text())
    files = [torch.from_numpy(read_resized(s["image"], cfg.model.input_hw, detail=cfg.model.detail)[0])
             for s in split["val_normal"]]
    again = appearance_reference(appearance(torch.stack(files)))
    assert again["brightness"] == pytest.approx(reference["brightness"], rel=1e-5)
    assert again["detail"] == pytest.approx(reference["detail"], rel=1e-5)


def _scaled(path, gain):
    """The image at ``path`` with each value times ``gain``, as a Pillow image."""
    image = np.asarray(Image.open(path).convert("RGB"), dtype=np.float64)
    return Image.fromarray(np.clip(image * gain, 0, 255).round().astype(np.uint8))


def _changed_copies(source, dest, gain=1.0, times=1):
    """The images of ``source`` saved into ``dest`` ``times`` over, each value times ``gain``."""
    dest.mkdir(parents=True)
    for k in range(times):
        for path in sorted(source.glob("*.png")):
            _scaled(path, gain).save(dest / f"{k}_{path.name}")
    return dest


def test_predict_says_when_the_photos_are_darker_than_the_calibrations(calibrated_run, demo_root, tmp_path):
    good = demo_root / "demo" / "train" / "good"
    predictor = Predictor(calibrated_run)
    predictor.cfg = predictor.cfg.replace(drift_min_images=5)
    same = predict_folder(predictor, _changed_copies(good, tmp_path / "same"), tmp_path / "out_same",
                          maps="none", progress=False)
    dark = predict_folder(predictor, _changed_copies(good, tmp_path / "dark", 0.6), tmp_path / "out_dark",
                          maps="none", progress=False)
    assert same.looks.shape == (same.n_images, 2)
    assert not same.appearance["drifted"] and abs(same.appearance["brightness_change"]) < 0.1
    assert dark.appearance["drifted"] and "darker" in dark.appearance["message"]
    assert dark.appearance["brightness_change"] == pytest.approx(-0.4, abs=0.08)
    written = json.loads((tmp_path / "out_dark" / APPEARANCE_FILE).read_text())
    assert written["drifted"] and written["reference"] == predictor.calibration["appearance"]


def test_the_cli_warns_on_stderr_and_still_predicts(calibrated_run, demo_root, tmp_path, capsys):
    good = demo_root / "demo" / "train" / "good"
    folder = _changed_copies(good, tmp_path / "bright", 1.5, times=2)  # 24 images: past the default 20
    assert main(["predict", str(calibrated_run), str(folder), "--out", str(tmp_path / "out"),
                 "--maps", "none", "--quiet"]) in (0, None)
    out, err = capsys.readouterr()
    assert "24 images" in out and "brighter than the" in err and "prn calibrate RUN --good-images" in err
    assert json.loads((tmp_path / "out" / APPEARANCE_FILE).read_text())["drifted"]


def test_a_run_calibrated_before_the_check_predicts_without_one(calibrated_run, demo_root, tmp_path):
    run = shutil.copytree(calibrated_run, tmp_path / "run")
    predictor = Predictor(run)
    predictor.calibration = {k: v for k, v in predictor.calibration.items() if k != "appearance"}
    summary = predict_folder(predictor, demo_root / "demo" / "train" / "good", tmp_path / "out",
                             maps="none", progress=False)
    assert summary.appearance is None and not (tmp_path / "out" / APPEARANCE_FILE).exists()


def test_a_prediction_api_summary_carries_the_check(calibrated_run, demo_root, tmp_path):
    folder = _changed_copies(demo_root / "demo" / "train" / "good", tmp_path / "in", 1.0, times=2)
    summary = api.predict(calibrated_run, folder, tmp_path / "out", maps="none", progress=False)
    assert summary.appearance is not None and summary.appearance["images"] == 24
    assert not summary.appearance["drifted"]


def test_serve_answers_each_request_with_the_recent_images_look(calibrated_run, demo_root):
    pytest.importorskip("fastapi", reason="prn serve needs the serve extra: pip install 'prn[serve]'")
    from fastapi.testclient import TestClient

    from prn.serve.app import create_app
    from prn.serve.service import InspectionService

    def upload(path, gain):
        buf = io.BytesIO()
        _scaled(path, gain).save(buf, format="PNG")
        return ("files", (path.name, buf.getvalue(), "image/png"))

    goods = sorted((demo_root / "demo" / "train" / "good").glob("*.png"))
    with TestClient(create_app(InspectionService(Predictor(calibrated_run)))) as client:
        first = client.post("/predict", files=[upload(p, 0.6) for p in goods])
        assert first.status_code == 200 and first.json()["appearance"] is None  # 12 images: too few to say
        second = client.post("/predict", files=[upload(p, 0.6) for p in goods])
        look = second.json()["appearance"]
        assert look["images"] == 24 and look["drifted"] and "the last 24 images scored are" in look["message"]
        model = client.get("/model").json()["appearance"]
        assert model["reference"]["images"] > 0 and model["recent"]["drifted"]
