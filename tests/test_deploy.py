"""Calibrated decisions (prn.deploy.calibrate) and prediction at scale (prn.deploy.predict)."""

import csv
import json
import shutil
import time

import numpy as np
import pytest
import torch
from PIL import Image

from prn import api
from prn.checkpoint import load_checkpoint
from prn.cli import main
from prn.config import PRNConfig, RuntimeConfig
from prn.data.split import Split
from prn.deploy.calibrate import calibrate, image_threshold, pixel_threshold, rates_at
from prn.deploy.predict import Predictor, predict_folder
from prn.errors import PRNError, UsageError
from prn.infer import predict_samples
from prn.postprocess import Postprocess, float32_threshold

# ----------------------------------------------------------------------------- calibration rules


def test_with_many_good_parts_the_threshold_rejects_at_most_the_target_share():
    scores = np.random.default_rng(0).normal(size=5000)
    t, method = image_threshold(scores, 0.01)
    rejected = np.mean(scores >= t)
    assert method == "empirical quantile"
    assert 0.008 <= rejected <= 0.01


FEW = np.array([0.10, 0.12, 0.11, 0.13, 0.09, 0.10, 0.12, 0.11])


def test_with_few_good_parts_the_threshold_extrapolates_a_gumbel_tail_above_all_of_them():
    from scipy.stats import gumbel_r
    t, method = image_threshold(FEW, 0.01)
    assert t > FEW.max()
    assert t == pytest.approx(gumbel_r.ppf(0.99, *gumbel_r.fit(FEW)), rel=1e-9)
    assert "gumbel tail" in method


def test_the_normal_tail_is_mean_plus_z_standard_deviations():
    t, method = image_threshold(FEW, 0.01, tail="normal")
    assert t == pytest.approx(FEW.mean() + 2.3263 * FEW.std(ddof=1), rel=1e-4)
    assert "normal tail" in method
    with pytest.raises(PRNError, match="tail"):
        image_threshold(FEW, 0.01, tail="cauchy")


def test_the_gumbel_tail_lies_further_out_than_the_normal_on_skewed_scores():
    scores = np.random.default_rng(3).gumbel(0.2, 0.02, size=30)
    assert image_threshold(scores, 0.001)[0] > image_threshold(scores, 0.001, tail="normal")[0] > scores.max()


def test_a_tail_fitted_past_the_largest_score_a_model_can_give_falls_back_to_the_held_out_maximum():
    # the held-out scores of a run trained on boxes alone: crowded just under PRN's bound of 1
    crowded = np.array([0.672, 0.80, 0.91, 0.95, 0.972, 0.981, 0.985, 0.989, 0.9995])
    unbounded, _ = image_threshold(crowded, 0.01)
    assert unbounded > 1.0  # would reject nothing a PRN model can score
    t, method = image_threshold(crowded, 0.01, score_bound=1.0)
    assert crowded.max() < t < 1.0 and t == pytest.approx(crowded.max()) and "past the largest score" in method
    assert image_threshold(FEW, 0.01, score_bound=1.0) == image_threshold(FEW, 0.01)  # a bound far away: no change


def test_the_logit_gumbel_tail_is_a_gumbel_fitted_to_the_logits_and_only_for_probabilities():
    from scipy.stats import gumbel_r
    scores = 1 / (1 + np.exp(-np.random.default_rng(5).gumbel(-2.5, 0.6, size=28)))
    t, method = image_threshold(scores, 0.01, tail="gumbel_logit", score_bound=1.0)
    logits = np.log(scores / (1 - scores))
    assert t == pytest.approx(1 / (1 + np.exp(-gumbel_r.ppf(0.99, *gumbel_r.fit(logits)))), rel=1e-6)
    assert scores.max() < t < 1.0 and "gumbel_logit tail" in method
    for bound, values in ((None, scores), (1.0, scores * 3)):  # a distance, or scores past 1
        with pytest.raises(PRNError, match="probabilities"):
            image_threshold(values, 0.01, tail="gumbel_logit", score_bound=bound)


def test_on_scores_whose_logits_are_gumbel_the_logit_fit_keeps_near_its_target_and_the_plain_fit_does_not():
    # good parts' PRN scores pile up near 0 with a long right tail; 28 held out, as on KolektorSDD
    rng = np.random.default_rng(0)
    population = 1 / (1 + np.exp(-rng.gumbel(-2.5, 0.6, size=50_000)))
    realised = {"gumbel": [], "gumbel_logit": []}
    for _ in range(100):
        held_out = 1 / (1 + np.exp(-rng.gumbel(-2.5, 0.6, size=28)))
        for tail, rates in realised.items():
            rates.append(np.mean(population >= image_threshold(held_out, 0.01, tail, score_bound=1.0)[0]))
    assert np.mean(realised["gumbel_logit"]) < 0.015 < 0.02 < np.mean(realised["gumbel"])


def test_a_threshold_never_rejects_the_held_out_maximum_even_with_identical_scores():
    t, method = image_threshold(np.full(8, 0.3), 0.01)
    assert t > 0.3 and t == pytest.approx(0.3) and "largest" in method


def test_pixel_threshold_is_the_pixel_quantile_of_good_maps():
    maps = np.random.default_rng(1).random((4, 50, 50)).astype(np.float32)
    t = pixel_threshold(maps, 0.01)
    assert np.mean(maps >= t) == pytest.approx(0.01, abs=5e-4)


def test_normalised_score_is_one_half_at_the_threshold_monotone_and_clipped():
    cal = calibrate([0.1, 0.2, 0.3] * 400, np.zeros((2, 4, 4)), [0.9], target_fpr=0.01)
    t = cal["image_threshold"]
    post = Postprocess(cal)
    assert post.judge([t])[0][0] == pytest.approx(0.5)
    values, decisions = post.judge(np.linspace(-5, 5, 101))
    assert np.all(np.diff(values) >= 0) and values.min() == 0.0 and values.max() == 1.0
    assert np.array_equal(decisions, (np.linspace(-5, 5, 101) >= t).astype(int))
    assert Postprocess(cal, threshold=0.25).judge([0.25])[0][0] == pytest.approx(0.5)
    assert post.display_map(np.full((2, 2), cal["pixel_threshold"])) == pytest.approx(0.5)
    t32 = np.float32(cal["pixel_threshold"])  # maps are float32
    assert post.region(np.array([t32, np.nextafter(t32, np.float32(-1))])).tolist() == [True, False]


def test_calibration_reports_the_folds_false_rejects_and_misses():
    cal = calibrate(np.linspace(0, 1, 200), np.zeros((1, 2, 2)), [0.5, 2.0, 3.0], target_fpr=0.05)
    assert cal["fold_false_reject_rate"] <= 0.05
    assert cal["fold_miss_rate"] == pytest.approx(1 / 3)
    assert cal["n_normal"] == 200 and cal["n_anomalous"] == 3


def test_calibration_refuses_a_rate_outside_zero_one():
    with pytest.raises(PRNError, match="target_fpr"):
        calibrate([0.1, 0.2], np.zeros((1, 2, 2)), target_fpr=1.5)


def test_rates_at_count_false_rejects_and_misses():
    r = rates_at([0, 0, 0, 1, 1], [0.1, 0.6, 0.2, 0.7, 0.3], 0.5)
    assert (r["false_rejects"], r["misses"]) == (1, 1)
    assert r["false_reject_rate"] == pytest.approx(1 / 3) and r["miss_rate"] == pytest.approx(0.5)


# ----------------------------------------------------------------------------- a calibrated run


@pytest.fixture(scope="module")
def run(demo_root, tmp_path_factory):
    from conftest import make_tiny_config
    out = tmp_path_factory.mktemp("deploy_run")
    cfg = make_tiny_config(demo_root, out, epochs=1, steps_per_epoch=1, val_normal_min=3)
    return api.fit(cfg, run_dir=out / "run", progress=False)


@pytest.fixture(scope="module")
def images(demo_root, tmp_path_factory):
    folder = tmp_path_factory.mktemp("incoming")
    for i, path in enumerate(sorted((demo_root / "demo" / "test").rglob("*.png"))[:5]):
        (folder / f"{i}_{path.name}").write_bytes(path.read_bytes())
    Image.fromarray(np.full((40, 90, 3), 200, np.uint8)).save(folder / "wide.png")
    return folder


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_fit_calibrates_on_the_held_out_good_images_only(run):
    payload = load_checkpoint(run)
    cal = payload["calibration"]
    split = Split.load(run / "split.json")
    assert cal["n_normal"] == len(split.val_normal) >= 3
    model, cfg = api.load_model(run)
    preds = predict_samples(model, split.val_normal, cfg.model.input_hw, device="cpu")
    expected, _ = image_threshold(preds.scores, cfg.calibration.target_fpr, cfg.calibration.calibration_tail)
    # fit scored the fold with its trained modules, the loaded model has its batch norms folded
    # (prn.model.folding): the same to float32 rounding
    assert cal["image_threshold"] == pytest.approx(expected, rel=1e-5)
    assert cal["pixel_threshold"] == pytest.approx(pixel_threshold(preds.maps, cfg.calibration.pixel_target_fpr), rel=1e-6)
    # calibration.json holds what the checkpoint holds: numbers approximately, the fold's score
    # lists element by element, the rest exactly (pytest 9.2's approx refuses nested dicts)
    stored = json.loads((run / "calibration.json").read_text())
    assert stored.keys() == cal.keys()
    for key, value in cal.items():
        if isinstance(value, list):
            assert len(stored[key]) == len(value), key
            assert stored[key] == pytest.approx(value), key
        elif isinstance(value, float):
            assert stored[key] == pytest.approx(value), key
        else:
            assert stored[key] == value, key
    assert stored["normal_scores"] and isinstance(stored["normal_scores"][0], float)


def test_prn_test_reports_rates_at_the_calibrated_threshold(run, tmp_path):
    metrics = api.test(run, out_dir=tmp_path, overlays=0, progress=False)
    split = Split.load(run / "split.json")
    scores = {r["path"]: float(r["score"]) for r in _rows(tmp_path / "predictions" / "scores.csv")}
    t = load_checkpoint(run)["calibration"]["image_threshold"]
    good = [v for k, v in scores.items() if "/good/" in f"/{k}"]
    assert metrics["threshold"] == t
    assert metrics["false_rejects"] == sum(v >= t for v in good)
    assert metrics["false_rejects"] + metrics["misses"] <= len(split.test)
    assert "f1_max" in metrics
    md = (tmp_path / "results.md").read_text()
    assert "## Decisions" in md and "calibrated threshold" in md and "### Per defect kind" in md
    # per defect size: every test defect with a mask counted once, in the bin of its mask's share
    sized = {k: v for k, v in metrics.items() if k.startswith("size_n[")}
    assert sum(sized.values()) == sum(s.label == 1 and s.pixel_exact for s in split.test) and "### Per defect size" in md
    for key in sized:
        assert 0 <= metrics[key.replace("size_n", "size_recall")] <= 1
    # and again by the mask's pixels at the model's input, in the bins of the same defects
    pixels = {k: v for k, v in metrics.items() if k.startswith("pixels_n[")}
    assert sum(pixels.values()) == sum(sized.values()) and "### Per defect size at the model's input" in md
    assert all(0 <= metrics[k.replace("pixels_n", "pixels_recall")] <= 1 for k in pixels)
    assert metrics["recall"] == pytest.approx(1 - metrics["misses"] / metrics["n_test_anomalous"])
    assert {"image_ap", "recall_at_0.1%", "recall_at_1%", "recall_at_5%", "oracle_recall_at_frr"} <= set(metrics)
    assert metrics["image_auroc_low"] <= metrics["image_auroc"] <= metrics["image_auroc_high"]
    assert metrics["recall_low"] <= metrics["recall"] <= metrics["recall_high"]
    assert metrics["false_reject_rate_low"] <= metrics["false_reject_rate"] <= metrics["false_reject_rate_high"]


def test_predict_writes_score_normalised_score_prediction_and_error_columns(run, images, tmp_path):
    summary = api.predict(run, images, tmp_path, progress=False)
    rows = _rows(summary.csv)
    assert list(rows[0]) == ["path", "score", "normalized_score", "prediction", "review", "label", "error",
                            "regions"]
    cal = load_checkpoint(run)["calibration"]
    span = cal["score_max"] - cal["score_min"]
    for r in rows:
        score = float(r["score"])
        assert int(r["prediction"]) == int(score >= cal["image_threshold"]) and r["label"] == ""
        expected = min(1.0, max(0.0, (score - cal["image_threshold"]) / span + 0.5))
        assert float(r["normalized_score"]) == pytest.approx(expected, abs=1e-6)
        assert (float(r["normalized_score"]) >= 0.5) == bool(int(r["prediction"]))
    assert summary.n_defective == sum(int(r["prediction"]) for r in rows)


def test_a_bare_checkpoint_copied_elsewhere_decides_as_its_run_folder(run, images, tmp_path):
    bare = tmp_path / "elsewhere" / "model.pt"
    bare.parent.mkdir()
    shutil.copy(run / "checkpoints" / "model.pt", bare)
    a = _rows(api.predict(run, images, tmp_path / "a", progress=False, maps="none").csv)
    b = _rows(api.predict(bare, images, tmp_path / "b", progress=False, maps="none").csv)
    assert a == b


def test_predict_matches_the_models_own_output_batch_by_batch(run, images, tmp_path):
    predictor = Predictor(run, batch_size=4)
    rows = _rows(predict_folder(predictor, images, tmp_path, maps="npy", progress=False).csv)
    files = sorted(images.iterdir())
    direct = predictor.predict_arrays([np.array(Image.open(f).convert("RGB")) for f in files])
    assert [r["path"] for r in rows] == [f.name for f in files]
    for row, d, f in zip(rows, direct, files):
        assert float(row["score"]) == pytest.approx(d["score"], abs=1e-6)
        np.testing.assert_allclose(np.load(tmp_path / "maps" / f"{f.name}.npy"), d["map"], atol=1e-6)


def test_batch_size_flag_changes_the_batches_not_the_scores_and_refuses_zero(run, images, tmp_path, capsys,
                                                                             monkeypatch):
    seen, real = [], Predictor.__init__

    def spy(self, *a, **kw):
        real(self, *a, **kw)
        seen.append(self.batch_size)
    monkeypatch.setattr(Predictor, "__init__", spy)
    for name, extra in (("default", []), ("one", ["--batch-size", "1"])):
        assert main(["predict", str(run), str(images), "--out", str(tmp_path / name), "--maps", "none",
                     "--quiet", *extra]) == 0
    monkeypatch.undo()
    assert seen == [RuntimeConfig().eval_batch_size, 1]  # the runtime section's, then the flag's
    a, b = _rows(tmp_path / "default" / "scores.csv"), _rows(tmp_path / "one" / "scores.csv")
    assert [r["path"] for r in a] == [r["path"] for r in b] and len(a) > 1
    for ra, rb in zip(a, b):
        assert float(ra["score"]) == pytest.approx(float(rb["score"]), abs=1e-5)
        assert ra["prediction"] == rb["prediction"]
    with pytest.raises(SystemExit):
        main(["predict", str(run), str(images), "--batch-size", "0"])
    assert "--batch-size: expected a whole number >= 1, got '0'" in capsys.readouterr().err
    with pytest.raises(UsageError, match="batch_size must be >= 1"):
        Predictor(run, batch_size=0)


def test_masks_and_png_maps_follow_the_pixel_threshold(run, images, tmp_path):
    predict_folder(Predictor(run), images, tmp_path / "npy", maps="npy", progress=False)
    predict_folder(Predictor(run), images, tmp_path / "png", maps="png", masks=True, progress=False)
    t = load_checkpoint(run)["calibration"]["pixel_threshold"]
    for f in sorted(images.iterdir()):
        amap = np.load(tmp_path / "npy" / "maps" / f"{f.name}.npy")
        mask = np.array(Image.open(tmp_path / "png" / "masks" / f"{f.name}.png"))
        level = np.array(Image.open(tmp_path / "png" / "maps" / f"{f.name}.png"))
        assert mask.shape == amap.shape == level.shape
        np.testing.assert_array_equal(mask > 0, amap >= t)
        assert np.all(level[amap >= t] >= 127) and np.all(level[amap < t] <= 128)
    assert not list((tmp_path / "png" / "maps").glob("*.npy"))


def test_maps_none_writes_scores_only_and_overlays_counts_pictures(run, images, tmp_path):
    api.predict(run, images, tmp_path, maps="none", overlays=2, progress=False)
    assert not (tmp_path / "maps").exists()
    assert len(list((tmp_path / "images").glob("*.png"))) == 2
    api.predict(run, images, tmp_path / "all", maps="none", overlays=-1, progress=False)
    assert len(list((tmp_path / "all" / "images").glob("*.png"))) == len(list(images.iterdir()))


def test_threshold_flag_overrides_and_fail_on_defect_exits_3(run, images, tmp_path, capsys):
    args = ["predict", str(run), str(images), "--maps", "none", "--quiet", "--fail-on-defect"]
    assert main(args + ["--out", str(tmp_path / "low"), "--threshold=-1e9"]) == 3
    assert all(r["prediction"] == "1" for r in _rows(tmp_path / "low" / "scores.csv"))
    assert main(args + ["--out", str(tmp_path / "high"), "--threshold", "1e9"]) == 0
    assert all(r["prediction"] == "0" for r in _rows(tmp_path / "high" / "scores.csv"))


def test_a_corrupt_file_among_good_ones_is_reported_and_the_rest_predicted(run, images, tmp_path):
    folder = tmp_path / "mixed"
    shutil.copytree(images, folder)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    (folder / "empty.jpg").write_bytes(b"")
    summary = api.predict(run, folder, tmp_path / "out", progress=False, maps="none")
    rows = {r["path"]: r for r in _rows(summary.csv)}
    assert summary.n_errors == 2 and summary.n_images == len(rows)
    assert "broken.png" in rows["broken.png"]["error"] and "empty" in rows["empty.jpg"]["error"]
    assert all(r["score"] and not r["error"] for k, r in rows.items() if k not in ("broken.png", "empty.jpg"))
    with pytest.raises(PRNError, match="broken.png"):
        api.predict(run, folder, tmp_path / "strict", progress=False, maps="none", strict=True)


def test_an_uncalibrated_checkpoint_gives_scores_without_decisions(run, images, tmp_path):
    from prn.checkpoint import set_calibration
    bare = tmp_path / "model.pt"
    shutil.copy(run / "checkpoints" / "model.pt", bare)
    set_calibration(bare, None)
    summary = api.predict(bare, images, tmp_path / "out", progress=False, maps="none")
    rows = _rows(summary.csv)
    assert all(r["score"] and r["prediction"] == "" and r["normalized_score"] == "" for r in rows)
    assert not summary.decided and summary.n_defective == 0
    with pytest.raises(PRNError, match="calibrate"):
        api.predict(bare, images, tmp_path / "m", progress=False, masks=True)


def test_without_a_threshold_predict_says_no_decision_and_fail_on_defect_refuses(run, images, tmp_path, capsys):
    from prn.checkpoint import set_calibration
    from prn.errors import ExitStatus
    bare = tmp_path / "model.pt"
    shutil.copy(run / "checkpoints" / "model.pt", bare)
    set_calibration(bare, None)
    assert main(["predict", str(bare), str(images), "--out", str(tmp_path / "a"), "--quiet"]) == 0
    out, err = capsys.readouterr()
    assert "no decision made" in out and "judged defective" not in out and "no part was judged" in err
    # a line script asking for a pass/fail exit status would pass every part: refused before any work
    code = main(["predict", str(bare), str(images), "--out", str(tmp_path / "b"), "--fail-on-defect", "--quiet"])
    err = capsys.readouterr().err
    assert code == ExitStatus.USAGE == 2 and "prn calibrate" in err and "--threshold" in err
    assert not (tmp_path / "b" / "scores.csv").exists()
    # with a threshold given, it decides and the exit status follows the decisions
    code = main(["predict", str(bare), str(images), "--out", str(tmp_path / "c"), "--fail-on-defect",
                 "--threshold", "-1", "--quiet"])
    assert code == ExitStatus.DEFECT and "judged defective" in capsys.readouterr().out


def test_calibrate_verb_sets_a_new_target_rate_and_writes_it_back(run, tmp_path, capsys):
    work = tmp_path / "run"
    shutil.copytree(run, work)
    before = load_checkpoint(work)["calibration"]
    assert main(["calibrate", str(work), "--target-fpr", "0.3", "--tail", "normal", "--quiet"]) == 0
    after = load_checkpoint(work)["calibration"]
    assert after["target_fpr"] == 0.3 and after["image_threshold"] < before["image_threshold"]
    assert after["method"] != before["method"] or after["n_normal"] * 0.3 >= 1
    text = (work / "config.yaml").read_text()
    assert "target_fpr: 0.3" in text and "calibration_tail: normal" in text


def test_calibrate_sets_the_thresholds_on_the_fold_and_a_folder_of_more_good_parts(run, tmp_path):
    from prn.deploy.calibrate import calibrate_run
    work = tmp_path / "run"
    shutil.copytree(run, work)
    split = Split.load(work / "split.json")
    before = load_checkpoint(work)["calibration"]
    # good parts from "the line": the fold's good pictures mirrored (new files, good parts still),
    # and one of the fold's own pictures, which is in the calibration already and counts once
    line = tmp_path / "line"
    line.mkdir()
    for k, sample in enumerate(split.val_normal):
        Image.open(sample.image_path).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(line / f"{k}.png")
    (line / "again.png").write_bytes(split.val_normal[0].image_path.read_bytes())
    n = len(split.val_normal)
    assert main(["calibrate", str(work), "--good-images", str(line), "--quiet"]) == 0
    after = load_checkpoint(work)["calibration"]
    assert after["added_good"] == {"folder": str(line), "n": n, "left_out": 1}
    assert after["n_normal"] == before["n_normal"] + n and str(line) in after["source"]
    # the threshold is the rule's over the fold's scores and the new parts' scores together
    from prn.data.sample import Sample
    from prn.deploy.loading import load_model
    loaded = load_model(work)
    new = predict_samples(loaded.model, [Sample(p, None, 0, "good") for p in sorted(line.glob("[0-9]*.png"))],
                          loaded.cfg.model.input_hw, batch_size=4, device=torch.device("cpu")).scores
    assert np.allclose(after["normal_scores"], np.sort(np.concatenate([before["normal_scores"], new])), atol=1e-6)
    cal = loaded.cfg.calibration
    assert after["image_threshold"] == pytest.approx(
        image_threshold(np.array(after["normal_scores"]), cal.target_fpr, cal.calibration_tail, 1.0)[0], rel=1e-9)
    # refused, naming the file: a picture the run trained on, and one of its test split
    for source, why in ((split.train_normal[0], "which the run trained on"),
                        (split.test[0], "which is in the run's test split")):
        bad = tmp_path / f"bad_{why.split()[-1]}"
        shutil.copytree(line, bad)
        (bad / "copy.png").write_bytes(source.image_path.read_bytes())
        with pytest.raises(UsageError, match=f"copy.png: the same image as .*, {why}"):
            calibrate_run(work, good_images=bad)
    (tmp_path / "empty").mkdir()
    with pytest.raises(PRNError, match="holds no images"):
        calibrate_run(work, good_images=tmp_path / "empty")
    # a run without a held-out fold calibrates on the folder alone, and without it on nothing
    data = json.loads((work / "split.json").read_text())
    data["val_normal"], data["val_anomalous"] = [], []
    (work / "split.json").write_text(json.dumps(data))
    assert calibrate_run(work) is None
    alone = calibrate_run(work, good_images=line)  # the fold's picture in the folder now counts too
    assert alone["n_normal"] == n + 1 and alone["source"] == f"{n + 1} good images of {line}"
    assert alone["added_good"]["left_out"] == 0 and alone["n_anomalous"] == 0
    assert all(np.isclose(alone["normal_scores"], score, atol=1e-6).any() for score in new)


def test_calibrating_at_bf16_makes_every_inference_of_the_run_bf16(run, tmp_path, capsys):
    from prn.data.io import read_image
    from prn.deploy.loading import load_model
    from prn.deploy.predict import Predictor
    work = tmp_path / "run"
    shutil.copytree(run, work)
    assert load_checkpoint(work)["calibration"]["precision"] == "32"  # fit records its own
    split_images = [read_image(s.image_path) for s in Split.load(work / "split.json").test[:3]]
    before = Predictor(work).scores(split_images)
    assert main(["calibrate", str(work), "--precision", "bf16", "--quiet"]) == 0
    cal = load_checkpoint(work)["calibration"]
    assert cal["precision"] == "bf16" and load_model(work).cfg.training.precision == "bf16"
    assert PRNConfig.load(work / "config.yaml").training.precision == "32"  # the training's, kept
    predictor = Predictor(work)
    after = predictor.scores(split_images)
    # the same weights under bfloat16 autocast: close to float32, not equal, and what predict now gives
    batch = torch.stack([predictor.prepare(im) for im in split_images])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        want = predictor.model(batch)["pred_score"].double().numpy()
    assert not np.array_equal(before, after) and np.allclose(after, want, atol=1e-6)
    assert np.allclose(before, after, atol=0.1)


def test_calibrating_with_test_flips_makes_every_inference_average_the_mirrored_map(run, tmp_path, capsys):
    import dataclasses

    from prn.data.io import read_image
    from prn.deploy.calibrate import calibrate_run
    from prn.deploy.loading import load_model
    from prn.deploy.predict import Predictor
    from prn.errors import UsageError
    work = tmp_path / "run"
    shutil.copytree(run, work)
    before_cal = load_checkpoint(work)["calibration"]
    split_images = [read_image(s.image_path) for s in Split.load(work / "split.json").test[:3]]
    before = Predictor(work).scores(split_images)
    assert main(["calibrate", str(work), "--test-flips", "lr", "--quiet"]) == 0
    assert load_checkpoint(work)["config"]["model"]["test_flips"] == "lr"
    assert PRNConfig.load(work / "config.yaml").model.test_flips == "lr"
    predictor = Predictor(work)
    assert predictor.model.cfg.test_flips == "lr"
    after = predictor.scores(split_images)
    # what the run's weights give with the flips asked of them directly, and not what they gave before
    plain = load_model(run)
    plain.model.cfg = dataclasses.replace(plain.model.cfg, test_flips="lr")
    batch = torch.stack([predictor.prepare(im) for im in split_images])
    with torch.no_grad():
        want = plain.model(batch)["pred_score"].double().numpy()
    assert np.allclose(after, want, atol=1e-6) and not np.allclose(before, after, atol=1e-6)
    # the threshold was set again on the held-out goods scored with the flips
    cal = load_checkpoint(work)["calibration"]
    assert cal["n_normal"] == before_cal["n_normal"] and cal["normal_scores"] != before_cal["normal_scores"]
    with pytest.raises(UsageError, match="test_flips must be one of"):
        calibrate_run(work, test_flips="sideways")


def test_patchcore_and_prototype_runs_are_calibrated_too(demo_root, tiny_config, tmp_path):
    for kind in ("patchcore", "prototypes"):
        cfg = tiny_config(demo_root, tmp_path / kind, val_normal_min=3)
        run = api.fit(cfg, run_dir=tmp_path / kind / "run", progress=False, model=kind)
        cal = load_checkpoint(run)["calibration"]
        assert cal is not None and cal["n_normal"] >= 3 and np.isfinite(cal["image_threshold"])
        rows = _rows(api.predict(run, demo_root / "demo" / "test" / "good", tmp_path / kind / "p",
                                 progress=False, maps="none").csv)
        assert all(r["prediction"] in ("0", "1") for r in rows)


def test_conformal_threshold_bounds_the_expected_false_reject_rate_and_says_when_it_cannot():
    rng = np.random.default_rng(3)
    t, method = image_threshold(np.arange(199, dtype=float), 0.01, "conformal")
    assert method.startswith("conformal") and 197 < t <= np.nextafter(197.0, np.inf)  # above the 198th
    # over many folds of 199 from one distribution, new parts are rejected <= 1 % on average
    rates = []
    for _ in range(300):
        fold, new = rng.normal(size=199), rng.normal(size=2000)
        rates.append(np.mean(new >= image_threshold(fold, 0.01, "conformal")[0]))
    assert 0.0085 < np.mean(rates) < 0.0115  # exactly 1 - 198/200 = 1 % in expectation (+- 3.5 sd here)
    t, method = image_threshold(np.arange(50, dtype=float), 0.01, "conformal")
    assert t > 49 and "too few" in method and "1/51" in method
    cal = calibrate(np.arange(50, dtype=float), np.zeros((1, 2, 2)), tail="conformal")
    assert cal["frr_bound"] == pytest.approx(1 / 51)


def test_read_ahead_keeps_the_order_makes_items_in_its_thread_and_raises_at_the_bad_item():
    import threading
    from prn.runtime import read_ahead
    made_in = []

    def items():
        for i in range(5):
            made_in.append(threading.current_thread().name)
            if i == 3:
                raise ValueError("item 3 is broken")
            yield i

    got = []
    with pytest.raises(ValueError, match="item 3"):
        for item in read_ahead(items()):
            got.append(item)
    assert got == [0, 1, 2]
    assert made_in and all(name.startswith("read-ahead") for name in made_in)
    assert list(read_ahead(range(7), depth=3)) == list(range(7)) and list(read_ahead([])) == []


def test_the_model_thread_runs_every_call_in_one_thread_of_its_own_and_raises_there_errors_here():
    import threading
    from concurrent.futures import ThreadPoolExecutor
    from prn.runtime import ModelThread
    before = torch.get_num_threads()
    threads = max(2, before)
    torch.set_num_threads(threads)  # so that one thread differs from the default even on one core
    mt = ModelThread(torch_threads=1)
    try:
        names = {mt.run(lambda: threading.current_thread().name) for _ in range(3)}
        assert len(names) == 1 and next(iter(names)).startswith("prn-model")
        assert mt.run(lambda a, b=0: a + b, 2, b=3) == 5
        assert mt.run(torch.get_num_threads) == 1  # torch's threads set in that thread alone:
        assert torch.get_num_threads() == threads  # not in this one,
        with ThreadPoolExecutor(1) as later:  # nor in threads started later
            assert later.submit(torch.get_num_threads).result() == threads
        with pytest.raises(ValueError, match="broken"):
            mt.run(lambda: (_ for _ in ()).throw(ValueError("broken")))
        assert mt.run(lambda: 7) == 7  # still serving after an error
    finally:
        mt.close()
        torch.set_num_threads(before)


def test_jobs_waiting_for_the_model_thread_go_through_it_together_up_to_a_batch():
    import threading
    from concurrent.futures import ThreadPoolExecutor
    from prn.runtime import JoinedCalls, ModelThread
    mt, calls, gate = ModelThread(), [], threading.Event()

    def fn(jobs):  # the first call holds the thread until the others are queued behind it
        calls.append(list(jobs))
        gate.wait(5)
        if "boom" in jobs:
            raise ValueError("boom in this pass")
        return [job * 10 for job in jobs]

    joined = JoinedCalls(mt, fn, max_items=4)
    try:
        assert joined(1) == 10 and calls == [[1]]  # a lone job runs at once, alone (the gate aside)
        gate.clear()
        calls.clear()
        with ThreadPoolExecutor(8) as callers:
            first = callers.submit(joined, 0)
            while not calls:
                time.sleep(0.005)
            # sizes 1, 2, 1 fit one pass of 4 items; 3 more items do not, and go in the next
            rest = []
            for job, size in ((1, 1), (2, 2), (3, 1), (4, 3)):  # queued in this order behind the running pass
                rest.append(callers.submit(joined, job, size))
                while len(joined._pending) < len(rest):
                    time.sleep(0.005)
            gate.set()
            assert first.result() == 0 and [f.result() for f in rest] == [10, 20, 30, 40]
        assert calls == [[0], [1, 2, 3], [4]]
        gate.clear()
        calls.clear()
        with ThreadPoolExecutor(4) as callers:  # an error reaches every job of its pass, and only those
            first = callers.submit(joined, 5)
            while not calls:
                time.sleep(0.005)
            mates = [callers.submit(joined, job) for job in ("boom", 6)]
            while len(joined._pending) < 2:
                time.sleep(0.005)
            gate.set()
            assert first.result() == 50
            for f in mates:
                with pytest.raises(ValueError, match="boom in this pass"):
                    f.result()
    finally:
        mt.close()
    mt = ModelThread()
    try:  # a function that returns too few results fails its callers instead of leaving them waiting
        with pytest.raises(RuntimeError, match="1 jobs went in and 0 results came out"):
            JoinedCalls(mt, lambda jobs: [], max_items=2)(1)
        assert JoinedCalls(mt, lambda jobs: [j + 1 for j in jobs], max_items=2)(1) == 2  # the thread goes on
    finally:
        mt.close()


def test_the_review_band_passes_parts_under_the_threshold_to_a_person(tmp_path):
    post = Postprocess({"image_threshold": 0.5, "review_threshold": 0.3, "pixel_threshold": 0.5,
                        "score_min": 0.0, "score_max": 1.0, "pixel_min": 0.0, "pixel_max": 1.0})
    below = float(np.nextafter(np.float32(float32_threshold(0.3)), np.float32(0)))  # the float32 under 0.3
    scores = np.array([0.1, 0.3, 0.4, 0.5, 0.9, below])
    assert post.review(scores).tolist() == [0, 1, 1, 0, 0, 0]  # [0.3, 0.5): the band's edges exact
    assert post.judge(scores)[1].tolist() == [0, 0, 0, 1, 1, 0]  # the decision is the threshold's alone
    assert Postprocess({"image_threshold": 0.5, "score_min": 0.0, "score_max": 1.0, "pixel_min": 0.0,
                        "pixel_max": 1.0}).review(scores) is None  # no band: nothing to say
    assert Postprocess().review(scores) is None
    # a threshold given by hand moves the band's upper edge; under its lower edge the band is empty
    assert Postprocess(post.calibration, threshold=0.35).review(scores).tolist() == [0, 1, 0, 0, 0, 0]
    assert not Postprocess(post.calibration, threshold=0.2).review(scores).any()


def test_calibration_sets_the_review_band_at_its_rate_and_refuses_one_above_the_threshold():
    rng = np.random.default_rng(0)
    normal = rng.random(200)
    cal = calibrate(normal, np.zeros((200, 2, 2)), target_fpr=0.01, review_fpr=0.1)
    assert cal["review_threshold"] == image_threshold(normal, 0.1)[0] < cal["image_threshold"]
    assert cal["review_fpr"] == 0.1 and cal["review_method"] == "empirical quantile"
    assert cal["fold_review_rate"] == pytest.approx(np.mean((normal >= cal["review_threshold"])
                                                            & (normal < cal["image_threshold"])))
    assert "review_threshold" not in calibrate(normal, np.zeros((200, 2, 2)), target_fpr=0.01)
    with pytest.raises(UsageError, match="review_fpr must be 0 .* or between target_fpr"):
        calibrate(normal, np.zeros((200, 2, 2)), target_fpr=0.05, review_fpr=0.05)
    with pytest.raises(ValueError, match="review_fpr must be 0"):
        PRNConfig().replace(target_fpr=0.1, review_fpr=0.05)


def test_calibrate_opens_a_review_band_that_predict_test_and_the_summary_follow(run, images, tmp_path, capsys):
    work = tmp_path / "run"
    shutil.copytree(run, work)
    assert main(["calibrate", str(work), "--review-fpr", "0.6", "--quiet"]) == 0
    cal = load_checkpoint(work)["calibration"]
    low, high = cal["review_threshold"], cal["image_threshold"]
    assert cal["review_fpr"] == 0.6 and low < high
    assert "review_fpr: 0.6" in (work / "config.yaml").read_text()
    assert json.loads((work / "calibration.json").read_text())["review_threshold"] == low
    capsys.readouterr()
    assert main(["predict", str(work), str(images), "--out", str(tmp_path / "p"), "--maps", "none",
                 "--quiet"]) in (0, None)
    out = capsys.readouterr().out
    rows = [r for r in _rows(tmp_path / "p" / "scores.csv") if not r["error"]]
    band = [int(np.float32(low) <= np.float32(float(r["score"])) < np.float32(high)) for r in rows]
    assert [int(r["review"]) for r in rows] == band and sum(band) > 0
    assert not any(r["review"] == "1" and r["prediction"] == "1" for r in rows)
    assert f"{sum(band)} passed to review" in out
    metrics = api.test(work, out_dir=tmp_path / "t", overlays=0, progress=False)
    tested = _rows(tmp_path / "t" / "predictions" / "scores.csv")
    good = [r for r in tested if r["label"] == "0"]
    bad = [r for r in tested if r["label"] == "1"]
    assert metrics["good_reviewed"] == sum(r["review"] == "1" for r in good)
    assert metrics["review_rate"] == pytest.approx(metrics["good_reviewed"] / len(good))
    assert metrics["recall_with_review"] == pytest.approx(
        sum(r["review"] == "1" or r["prediction"] == "1" for r in bad) / len(bad))
    assert metrics["recall_with_review"] >= metrics["recall"] and metrics["review_target_fpr"] == 0.6
    from prn.deploy.calibrate import decision_summary
    assert f"its review band (from {low:.4g}) passes {metrics['good_reviewed']} good" in decision_summary(metrics)
    # 0 closes the band again: the column stays, empty
    assert main(["calibrate", str(work), "--review-fpr", "0", "--quiet"]) == 0
    assert "review_threshold" not in load_checkpoint(work)["calibration"]
    main(["predict", str(work), str(images), "--out", str(tmp_path / "q"), "--maps", "none", "--quiet"])
    assert {r["review"] for r in _rows(tmp_path / "q" / "scores.csv")} == {""}
    assert "passed to review" not in capsys.readouterr().out
