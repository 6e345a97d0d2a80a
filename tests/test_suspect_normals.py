"""Held-out good images that the others make unlikely are named, never left out
(prn.deploy.calibrate.suspect_normals): one "good" image with a defect sets the threshold."""

from pathlib import Path

import numpy as np
import pytest
from scipy.stats import gumbel_r

from prn.cli import _print_metrics
from prn.config import CalibrationConfig
from prn.data.sample import Sample
from prn.deploy import calibrate as cal_module
from prn.deploy.calibrate import calibrate, calibrate_predictions, suspect_normals, suspect_warning
from prn.infer import Predictions


def _goods(n=40, seed=0):
    return gumbel_r.rvs(loc=0.2, scale=0.03, size=n, random_state=seed)


def test_scores_from_one_tail_have_no_suspects_and_a_score_far_above_them_is_named_first():
    goods = _goods()
    assert suspect_normals(goods) == []
    with_two = np.concatenate([goods[:20], [0.9], goods[20:], [0.7]])
    found = suspect_normals(with_two)
    assert [s["index"] for s in found] == [20, 41]          # the largest first, then the next
    assert [s["score"] for s in found] == [0.9, 0.7] and all(s["p"] < 1e-3 for s in found)
    # too few scores below the largest to fit a tail, or all of them equal: nothing is said
    assert suspect_normals(np.concatenate([goods[:7], [0.9]])) == []
    assert suspect_normals(np.concatenate([np.full(20, 0.1), [0.9]])) == []


def test_the_threshold_is_not_changed_by_naming_a_suspect():
    goods = np.concatenate([_goods(), [0.9]])
    cal = calibrate(goods, np.zeros((1, 2, 2)))
    assert cal["suspect_normals"][0]["score"] == 0.9
    assert cal["image_threshold"] >= 0.9  # still above every held-out score, as without the check


def test_calibrating_on_a_fold_names_the_suspect_file_and_the_warning_says_what_to_do(tmp_path, capsys):
    goods = np.concatenate([_goods(30), [0.95]])
    samples = [Sample(tmp_path / f"good_{i:02d}.png", None, 0, "good") for i in range(len(goods))]
    samples.append(Sample(tmp_path / "defect.png", tmp_path / "defect_mask.png", 1, "defect"))
    scores = np.concatenate([goods, [0.99]])
    n = len(scores)
    preds = Predictions(samples, scores, np.zeros((n, 4, 4), np.float32), np.zeros((n, 4, 4), bool),
                        np.array([0] * len(goods) + [1]), 0.0)
    cal = calibrate_predictions(preds, CalibrationConfig(), score_bound=1.0)
    suspect = cal["suspect_normals"][0]
    assert Path(suspect["path"]) == tmp_path / "good_30.png" and suspect["score"] == 0.95
    warning = suspect_warning(cal)
    assert "good_30.png" in warning and "prn calibrate RUN" in warning and "30" in warning
    _print_metrics(cal, "calibrate")
    assert "prn calibrate: warning: 1 held-out good image(s) score far above" in capsys.readouterr().err
    assert suspect_warning({**cal, "suspect_normals": []}) is None and suspect_warning(None) is None


def test_fit_warns_with_the_suspect_held_out_file(demo_root, tiny_config, tmp_path, monkeypatch, capsys):
    from prn import api
    from prn.data.split import Split
    # the demo's fold has no such image: the check is made to name its first one
    monkeypatch.setattr(cal_module, "suspect_normals", lambda scores: [{"index": 0, "score": float(scores[0]), "p": 1e-5}])
    run = api.fit(tiny_config(demo_root, tmp_path, epochs=1, steps_per_epoch=1, val_normal_min=4),
                  run_dir=tmp_path / "run", progress=False)
    err = capsys.readouterr().err
    first = Split.load(run / "split.json").val_normal[0].image_path
    assert "prn fit: warning: 1 held-out good image(s) score far above the other" in err
    assert str(first) in err
    assert (run / "calibration.json").read_text().count(str(first)) == 1


@pytest.mark.parametrize("n_rest", [8, 30])
def test_at_least_eight_scores_below_are_needed_and_enough(n_rest):
    found = suspect_normals(np.concatenate([_goods(n_rest, seed=3), [5.0]]))
    assert [s["index"] for s in found] == [n_rest]
