"""Held-out good images that the others make unlikely are named, never left out
(prn.deploy.calibrate.suspect_normals): one "good" image with a defect sets the threshold."""

import json
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


def test_when_the_largest_held_out_score_is_the_threshold_the_method_and_calibration_say_so():
    goods = _goods(53, seed=1)
    fitted = float(gumbel_r.ppf(0.99, *gumbel_r.fit(goods)))
    # a fold whose largest score is above its own tail fit: that score decides
    top = np.concatenate([goods, [fitted + 0.05]])
    threshold, method = cal_module.image_threshold(top, 0.01)
    assert threshold == np.nextafter(fitted + 0.05, np.inf)
    assert method.startswith("largest held-out score (the gumbel tail fit") and "is below it" in method
    cal = calibrate(top, np.zeros((1, 2, 2)))
    assert cal["threshold_image"] == {"index": 53, "score": fitted + 0.05, "next_score": float(goods.max())}
    # the fit above every held-out score: it decides, the method says so, no image is named
    threshold, method = cal_module.image_threshold(goods, 0.01)
    assert threshold == pytest.approx(float(gumbel_r.ppf(0.99, *gumbel_r.fit(goods))))
    assert threshold > goods.max() and method.startswith("gumbel tail fit")
    assert calibrate(goods, np.zeros((1, 2, 2)))["threshold_image"] is None
    # an empirical quantile (enough images for the rate) is not one image's score pinned above all
    assert calibrate(_goods(200, seed=2), np.zeros((1, 2, 2)))["threshold_image"] is None
    # a single held-out image: its score, and nothing below it
    assert calibrate(np.array([0.3]), np.zeros((1, 2, 2)))["threshold_image"] == {
        "index": 0, "score": 0.3, "next_score": None}


def test_the_image_that_sets_the_threshold_is_named_with_its_file_unless_named_as_a_suspect(tmp_path, capsys):
    rest = _goods(30, seed=1)
    # a score that is above the tail fitted with it, yet not unlikely enough to be a suspect
    for x in np.linspace(rest.max(), rest.max() + 0.3, 301):
        goods = np.concatenate([rest[:10], [x], rest[10:]])
        if cal_module.image_threshold(goods, 0.01)[1].startswith("largest") and not suspect_normals(goods):
            break
    else:
        pytest.fail("no such score")
    samples = [Sample(tmp_path / f"good_{i:02d}.png", None, 0, "good") for i in range(len(goods))]
    preds = Predictions(samples, goods, np.zeros((len(goods), 4, 4), np.float32),
                        np.zeros((len(goods), 4, 4), bool), np.zeros(len(goods), int), 0.0)
    cal = calibrate_predictions(preds, CalibrationConfig(), score_bound=1.0)
    assert cal["suspect_normals"] == []
    assert Path(cal["threshold_image"]["path"]) == tmp_path / "good_10.png"
    note = cal_module.threshold_image_note(cal)
    assert str(tmp_path / "good_10.png") in note and f"{cal['image_threshold']:.4g}" in note
    assert f"{goods[np.arange(len(goods)) != 10].max():.4g}" in note and "prn calibrate RUN" in note
    _print_metrics(cal, "calibrate")
    assert "prn calibrate: note: the image threshold" in capsys.readouterr().err
    # named as a suspect already: the warning says it, the note does not repeat it
    as_suspect = {**cal, "suspect_normals": [{"index": 10, "score": cal["threshold_image"]["score"], "p": 1e-4}]}
    assert cal_module.threshold_image_note(as_suspect) is None
    assert cal_module.threshold_image_note({**cal, "threshold_image": None}) is None
    assert cal_module.threshold_image_note(None) is None
    # without a file (a calibration made from scores alone) it is named by its place in the fold
    bare = calibrate(goods, np.zeros((1, 2, 2)))
    assert "number 10 of the fold" in cal_module.threshold_image_note(bare)


def test_fit_notes_the_held_out_file_whose_score_is_the_threshold(demo_root, tiny_config, tmp_path, monkeypatch,
                                                                   capsys):
    from prn import api
    from prn.data.split import Split
    # the demo's fold is set by its tail fit: the first image is made the one whose score decides
    monkeypatch.setattr(cal_module, "threshold_image",
                        lambda scores, threshold: {"index": 0, "score": float(scores[0]), "next_score": 0.0})
    run = api.fit(tiny_config(demo_root, tmp_path, epochs=1, steps_per_epoch=1, val_normal_min=4),
                  run_dir=tmp_path / "run", progress=False)
    err = capsys.readouterr().err
    first = str(Split.load(run / "split.json").val_normal[0].image_path)
    assert "prn fit: note: the image threshold (" in err and first in err
    assert json.loads((run / "calibration.json").read_text())["threshold_image"]["path"] == first
    # and a test of the run says so in its results (the figure, and a line of results.md)
    metrics = api.test(run, overlays=0, progress=False)
    assert metrics["threshold_from_one_image"] == 1.0 and metrics["threshold_image_next_score"] == 0.0
    assert "the threshold is the score of one held-out good image" in (run / "results.md").read_text()
    # a calibration made before the field existed says nothing either way
    from prn.checkpoint import checkpoint_file, load_checkpoint, set_calibration
    cal = load_checkpoint(checkpoint_file(run))["calibration"]
    set_calibration(run, {k: v for k, v in cal.items() if k != "threshold_image"})
    metrics = api.test(run, overlays=0, progress=False)
    assert "threshold_from_one_image" not in metrics and "threshold_image_next_score" not in metrics
    assert "one held-out good image" not in (run / "results.md").read_text()
    set_calibration(run, {**cal, "threshold_image": None})  # a fit set it: said as such
    assert api.test(run, overlays=0, progress=False)["threshold_from_one_image"] == 0.0


def test_a_held_out_image_judged_not_good_leaves_the_thresholds_until_put_back(calibrated_run, tmp_path, capsys):
    import shutil

    import torch

    from prn.checkpoint import load_checkpoint
    from prn.cli import main
    from prn.data.split import Split
    from prn.deploy.calibrate import calibrate_run, image_threshold
    from prn.deploy.loading import load_model
    from prn.errors import DataError, UsageError
    from prn.infer import predict_samples

    run = tmp_path / "run"
    shutil.copytree(calibrated_run, run)
    split = Split.load(run / "split.json")
    before = load_checkpoint(run)["calibration"]
    judged = split.val_normal[1]
    loaded = load_model(run)
    own = predict_samples(loaded.model, [judged], loaded.cfg.model.input_hw, batch_size=1,
                          device=torch.device("cpu")).scores[0]
    rest = list(before["normal_scores"])
    rest.pop(int(np.argmin(np.abs(np.array(rest) - own))))
    # named as the dataset's folders name it (relative to its root), from the command line
    relative = judged.image_path.relative_to(split.root)
    assert main(["calibrate", str(run), "--not-good", str(relative), "--quiet"]) == 0
    after = load_checkpoint(run)["calibration"]
    assert after["n_normal"] == before["n_normal"] - 1 and after["not_good"] == [str(judged.image_path)]
    assert np.allclose(after["normal_scores"], rest, atol=1e-6)
    cfg = loaded.cfg.calibration
    assert after["image_threshold"] == pytest.approx(
        image_threshold(np.array(after["normal_scores"]), cfg.target_fpr, cfg.calibration_tail, 1.0)[0], rel=1e-9)
    kept = Split.load(run / "split.json")
    assert judged not in kept.val_normal and kept.not_good == [judged] and len(kept.val_normal) == len(split.val_normal) - 1
    assert json.loads((run / "calibration.json").read_text())["not_good"] == [str(judged.image_path)]
    # named again, or a plain calibration later: it stays out
    assert calibrate_run(run, not_good=[judged.image_path])["n_normal"] == before["n_normal"] - 1
    assert calibrate_run(run)["n_normal"] == before["n_normal"] - 1
    # only held-out good images can be judged so, and not all of them
    for other in (split.train_normal[0].image_path, tmp_path / "nowhere.png"):
        with pytest.raises(UsageError, match=f"{other}: not one of the run's {len(kept.val_normal)} held-out good"):
            calibrate_run(run, not_good=[other])
    with pytest.raises(UsageError, match="leaves none of its"):
        calibrate_run(run, not_good=[s.image_path for s in kept.val_normal])
    with pytest.raises(UsageError, match="not one of the run's held-out images judged not good"):
        calibrate_run(run, good_again=[split.train_normal[0].image_path])
    assert Split.load(run / "split.json") == kept  # refusals change nothing
    assert calibrate_run(run, good_again=[split.val_normal[0].image_path])["n_normal"] == before["n_normal"] - 1
    # put back: the calibration of before, and no list
    back = calibrate_run(run, good_again=[judged.image_path])
    assert back["n_normal"] == before["n_normal"] and "not_good" not in back
    assert np.allclose(back["normal_scores"], before["normal_scores"], atol=1e-6)
    assert Split.load(run / "split.json").not_good == []
    # a fold image whose file is gone: refused with what to do, which then works
    data = json.loads((run / "split.json").read_text())
    gone = str(tmp_path / "moved_away.png")
    data["val_normal"][0]["image"] = gone
    (run / "split.json").write_text(json.dumps(data))
    with pytest.raises(DataError, match=f"{gone}: not found; it is one of the run's held-out good images.*"
                                        f"prn calibrate {run} --not-good {gone}"):
        calibrate_run(run)
    assert calibrate_run(run, not_good=[gone])["n_normal"] == before["n_normal"] - 1


def test_the_warnings_say_the_command_that_leaves_an_image_out():
    goods = np.concatenate([_goods(30), [0.95]])
    cal = calibrate(goods, np.zeros((1, 2, 2)))
    assert "prn calibrate RUN --not-good IMAGE" in suspect_warning(cal)
    # with the files and the run known, the command to paste
    named = {**cal, "suspect_normals": [{**cal["suspect_normals"][0], "path": "/data/train/good/7.png"}]}
    assert "prn calibrate runs/x --not-good /data/train/good/7.png (and" in suspect_warning(named, "runs/x")
    top = {**cal, "suspect_normals": [], "threshold_image": {"index": 30, "score": 0.95, "next_score": 0.3,
                                                             "path": "/data/train/good/7.png"}}
    note = cal_module.threshold_image_note(top, "runs/x")
    assert "prn predict runs/x /data/train/good/7.png --out DIR" in note
    assert "prn calibrate runs/x --not-good /data/train/good/7.png (and" in note
    assert [kind for kind, _ in cal_module.calibration_messages(named, "runs/x")] == ["warning"]
    # a path with a space is quoted, so that the command can be pasted as it is
    assert "prn calibrate 'my runs/x' --not-good '/data/good parts/7.png' (and" in \
        cal_module.not_good_advice(["/data/good parts/7.png"], "my runs/x")
