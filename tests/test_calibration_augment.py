"""benchmarks/calibration_augment.py: thresholds from held-out good images and views of them."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import load_script

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "calibration_augment.py"


def test_the_plain_rule_is_the_fits_threshold_and_the_views_are_seeded(calibrated_run, tmp_path, monkeypatch):
    out = tmp_path / "rules.json"
    subprocess.run([sys.executable, str(SCRIPT), str(calibrated_run), "--views", "3", "--json", str(out)],
                   check=True, capture_output=True, text=True)
    rules = {r["rule"]: r for r in json.loads(out.read_text())}
    assert set(rules) == {"plain", "pooled", "worst view"}
    calibration = json.loads((calibrated_run / "calibration.json").read_text())
    assert rules["plain"]["threshold"] == pytest.approx(calibration["image_threshold"], rel=1e-5)
    assert all(0 <= r["frr"] <= 1 and 0 <= r["recall"] <= 1 for r in rules.values())

    study = load_script(SCRIPT, monkeypatch)
    plain, viewed, _ = study.held_out_scores(calibrated_run, 3, seed=0)
    np.testing.assert_allclose(np.sort(plain), np.sort(calibration["normal_scores"]), rtol=1e-5)
    assert viewed.shape == (len(plain), 3) and not np.allclose(viewed, plain[:, None])  # the views differ
    np.testing.assert_array_equal(study.held_out_scores(calibrated_run, 3, seed=0)[1], viewed)


def test_the_held_out_images_pass_the_runs_filter_before_the_resize(demo_root, tiny_config, tmp_path, monkeypatch):
    # A run whose pre-process filters the photo before the resize (resize_detail): the views are
    # of the images as the fit scored them, so the plain scores are the calibration's.
    from prn import api
    cfg = tiny_config(demo_root, tmp_path, image_size=32, resize_detail="dark", epochs=1,
                      steps_per_epoch=1, val_normal_min=4)
    run = api.fit(cfg, run_dir=tmp_path / "run", progress=False)
    calibration = json.loads((run / "calibration.json").read_text())
    study = load_script(SCRIPT, monkeypatch)
    plain, _, _ = study.held_out_scores(run, 1, seed=0)
    np.testing.assert_allclose(np.sort(plain), np.sort(calibration["normal_scores"]), rtol=1e-5)
