"""benchmarks/map_sigma_study.py: pixel metrics of a run's test maps smoothed after the fact."""

import dataclasses
import json
from pathlib import Path

import pytest
from conftest import load_script

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "map_sigma_study.py"


def test_the_study_smooths_the_raw_map_of_a_run_for_each_sigma(calibrated_run, tmp_path, monkeypatch, capsys):
    study = load_script(SCRIPT, monkeypatch)
    out = tmp_path / "rows.json"
    assert study.main([str(calibrated_run), "--sigmas", "0", "2", "--json", str(out), "--device", "cpu"]) == 0
    rows = json.loads(out.read_text())
    assert [r["sigma"] for r in rows] == [0, 2]
    raw, smooth = rows
    # with no smoothing the two image scores are one; the score before smoothing never moves
    assert raw["image_auroc_smoothed_score"] == pytest.approx(raw["image_auroc"])
    assert smooth["image_auroc"] == raw["image_auroc"]
    tested = json.loads((calibrated_run / "results.json").read_text())["mean"]  # the run's own test, unsmoothed
    assert raw["pixel_auroc"] == pytest.approx(tested["pixel_auroc"], abs=1e-6)
    assert smooth["pixel_auroc"] != pytest.approx(raw["pixel_auroc"], abs=1e-6)
    assert "| 2 |" in capsys.readouterr().out


def test_the_study_refuses_what_is_not_a_run(tmp_path, monkeypatch):
    study = load_script(SCRIPT, monkeypatch)
    with pytest.raises(SystemExit):
        study.main([str(tmp_path)])
    with pytest.raises(SystemExit):
        study.main([str(tmp_path), "--sigmas", "-1"])


def test_the_study_names_a_run_whose_model_does_not_smooth_its_own_map(calibrated_run, monkeypatch):
    study = load_script(SCRIPT, monkeypatch)
    real = study.load_model
    monkeypatch.setattr(study, "load_model", lambda run, device=None: dataclasses.replace(
        real(run, device=device), kind="patchcore"))
    with pytest.raises(SystemExit, match="a patchcore run; the study needs a PRN or prototype-map run"):
        study.main([str(calibrated_run), "--device", "cpu"])
