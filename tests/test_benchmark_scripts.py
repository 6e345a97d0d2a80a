"""The scripts in benchmarks/ still run against today's package.

They are not part of the package and nothing imported them, so a change of the package's API
could break them unnoticed (four had: a config read as if it were flat, a class renamed, a
calibration rule called without the model's largest score). Each
runs here on the smallest input it takes; the figures are not judged, only that the script gets
to its result and the result has the shape its docstring promises. Scripts that export a model,
start a server or train are in the slow set (`python -m pytest -m slow tests/test_benchmark_scripts.py`).
"""

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import load_script

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def script(name, monkeypatch, *argv):
    """The benchmark ``name`` loaded as a module, with ``argv`` as its command line."""
    monkeypatch.setattr(sys, "argv", [name + ".py", *map(str, argv)])
    return load_script(BENCH / f"{name}.py", monkeypatch)


@pytest.mark.parametrize("path", sorted(BENCH.glob("*.py")), ids=lambda p: p.stem)
def test_every_benchmark_imports_without_running(path, monkeypatch):
    load_script(path, monkeypatch)  # what the package no longer has fails here, at import


def test_speed_counts_the_encoder_and_prn_and_times_kmeans(monkeypatch, tmp_path):
    speed = script("speed", monkeypatch, "--backbones", "tf_efficientnet_lite0", "--size", 64, "--batch", 1,
                   "--repeats", 1, "--normals", 4, "--out", tmp_path / "speed.json")
    monkeypatch.setattr(speed, "in_fresh_process", lambda fn, *args: fn(*args))  # spawning costs seconds
    speed.main()
    row = json.loads((tmp_path / "speed.json").read_text())["results"][0]
    assert row["prn"]["gflops_per_image"] > row["encoder"]["gflops_per_image"] > 0
    assert row["kmeans"]["k"] == 1 and row["trainable_params_m"] > 0


def test_onnx_speed_builds_the_cpu_presets_graph(tmp_path):
    # The export itself (minutes) is in the slow test below; the graph torch times is built here.
    from prn.deploy.export import build_graph
    from prn.deploy.loading import load_model
    onnx_speed = load_script(BENCH / "onnx_speed.py")
    cfg = onnx_speed.build_checkpoint(tmp_path / "model.pt", (64, 96), prototypes=2)
    assert cfg.model.backbone == "tf_efficientnet_lite0" and cfg.model.input_hw == (64, 96)
    out = build_graph(load_model(tmp_path / "model.pt", device="cpu"))(torch.zeros(1, 3, 64, 96, dtype=torch.uint8))
    assert out["anomaly_map"].shape == (1, 1, 64, 96)


def test_anomaly_throughput_times_each_strategy(monkeypatch, capsys):
    script("anomaly_throughput", monkeypatch, "--size", 64, "--samples", 2, "--batch-size", 4, "--batches", 1,
           "--normals", 4).main()
    out = capsys.readouterr().out
    assert "extended" in out and "heterologous" in out and "homologous" in out and "samples/s" in out


def test_fold_speed_and_thread_forward_time_a_run(calibrated_run, demo_root, monkeypatch, capsys):
    folder = demo_root / "demo" / "test" / "good"
    script("fold_speed", monkeypatch, calibrated_run, folder, "--images", 2, "--rounds", 1).main()
    assert "largest difference" in capsys.readouterr().out
    script("thread_forward", monkeypatch, calibrated_run, "--calls", 1).main()
    assert capsys.readouterr().out.count("| a new thread") == 2


def test_memory_speed_times_a_run_with_and_without_its_memory(calibrated_run, monkeypatch, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(calibrated_run, run)  # given a memory: the shared run stays as it is
    from prn.deploy.calibrate import calibrate_run
    calibrate_run(run, defect_memory="on")
    script("memory_speed", monkeypatch, run, "--batch", 2, "--rounds", 2).main()
    out = capsys.readouterr().out
    assert "| with the memory |" in out and "| without |" in out
    with pytest.raises(SystemExit, match="holds no memory"):
        script("memory_speed", monkeypatch, calibrated_run, "--rounds", 1).main()


def test_calibration_study_and_inference_precision_judge_a_run(calibrated_run, monkeypatch, tmp_path, capsys):
    before = (calibrated_run / "calibration.json").read_bytes()
    script("calibration_study", monkeypatch, calibrated_run, "--work", tmp_path / "work").main()
    out = capsys.readouterr().out
    assert "| gumbel |" in out and "| gumbel_logit |" in out and "| largest |" in out
    assert (calibrated_run / "calibration.json").read_bytes() == before  # a copy was calibrated
    script("inference_precision", monkeypatch, calibrated_run, "--json", tmp_path / "precision.json").main()
    [row] = json.loads((tmp_path / "precision.json").read_text())
    assert {"32", "bf16"} <= set(row) and 0 <= row["max_score_change"] < 1
    assert 0 <= row["bf16"]["image_auroc"] <= 1 and 0 <= row["32"]["false_reject_rate"] <= 1


def test_threshold_rules_read_what_the_image_score_study_cached(calibrated_run, monkeypatch, tmp_path, capsys):
    run = shutil.copytree(calibrated_run, tmp_path / "run")  # the study caches its outputs in the run
    rules = load_script(BENCH / "threshold_rules.py", monkeypatch)
    with pytest.raises(SystemExit):
        rules.main([str(run)])
    assert "image_score_study.py" in capsys.readouterr().err  # says what to run first
    load_script(BENCH / "image_score_study.py", monkeypatch).main([str(run)])
    capsys.readouterr()
    rules.main([str(run)])
    out = capsys.readouterr().out
    assert "gumbel" in out and "conformal" in out


def test_added_goods_judges_the_fold_alone_and_with_test_goods_added(calibrated_run, tmp_path, capsys, monkeypatch):
    added = load_script(BENCH / "added_goods.py", monkeypatch)
    added.main([str(calibrated_run), "--draws", "3", "--shares", "0.5"])
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith(f"| {calibrated_run.name} | 50% |")]
    fold = len(json.loads((calibrated_run / "calibration.json").read_text())["normal_scores"])
    goods = sum(1 for line in (calibrated_run / "predictions" / "scores.csv").read_text().splitlines()[1:]
                if line.split(",")[5] == "0")
    counts = {line.split(" | ")[2]: int(line.split(" | ")[3]) for line in lines}  # good parts the rule saw
    assert counts == {"held-out fold alone": fold, "fold + added": fold + round(goods / 2)}
    bare = shutil.copytree(calibrated_run, tmp_path / "untested", ignore=shutil.ignore_patterns("predictions"))
    with pytest.raises(SystemExit):
        added.main([str(bare)])
    assert "prn test" in capsys.readouterr().err


@pytest.mark.slow
def test_onnx_speed_times_three_backends(monkeypatch, tmp_path, capsys):
    onnx_speed = script("onnx_speed", monkeypatch, "--height", 64, "--width", 64, "--batches", 1, "--repeats", 1,
                        "--prototypes", 2)
    monkeypatch.setattr(onnx_speed, "RESULTS", tmp_path / "onnx_speed.json")
    onnx_speed.main()
    row = json.loads((tmp_path / "onnx_speed.json").read_text())["rows"][0]
    assert row["max_map_diff_onnx_vs_torch"] < 1e-4


@pytest.mark.slow
def test_predict_memory_runs_prn_predict(monkeypatch, tmp_path):
    pm = script("predict_memory", monkeypatch, "--counts", 2, "--work", tmp_path / "work")
    monkeypatch.setattr(pm, "RESULTS", tmp_path / "predict_memory_{maps}.json")
    pm.main()
    assert json.loads((tmp_path / "predict_memory_none.json").read_text())["rows"][0]["rows"] == 2


@pytest.mark.slow
def test_profile_predict_and_serve_load_on_a_run(calibrated_run, demo_root, monkeypatch, tmp_path):
    run = shutil.copytree(calibrated_run, tmp_path / "run")  # the onnx engine's file is made in the run
    folder = demo_root / "demo" / "test" / "good"
    script("profile_predict", monkeypatch, run, folder, "--images", 2, "--repeat", 1, "--cases", "torch:none:0",
           "--out", tmp_path / "profile.json").main()
    assert "model onnx" in json.loads((tmp_path / "profile.json").read_text())["stages_seconds_per_image"]
    serve_load = script("serve_load", monkeypatch, run, folder, "--clients", 1, "--requests", 2, "--warmup", 1)
    monkeypatch.setattr(serve_load, "RESULTS", tmp_path / "serve_load.json")
    assert serve_load.main() == 0
    assert json.loads((tmp_path / "serve_load_c1.json").read_text())["errors"] == 0


@pytest.mark.slow
def test_precision_demo_trains_and_compares(tmp_path):
    rows = load_script(BENCH / "precision_demo.py").main(tmp_path)
    assert (tmp_path / "demo_precision.json").is_file() and rows


def test_review_band_from_stored_scores_equals_calibrate_and_test(calibrated_run, monkeypatch, tmp_path, capsys):
    from prn import api
    from prn.deploy.calibrate import calibrate_run
    band = script("review_band", monkeypatch, calibrated_run, "--rates", 0.5, "--json", tmp_path / "b.json")
    assert band.main() == 0
    offline = json.loads((tmp_path / "b.json").read_text())["0.5"][str(calibrated_run)]
    work = tmp_path / "run"  # the same band through prn calibrate and prn test
    shutil.copytree(calibrated_run, work)
    calibrate_run(work, review_fpr=0.5)
    tested = api.test(work, overlays=0, progress=False)
    for key in ("review_threshold", "good_reviewed", "defective_reviewed", "recall", "recall_with_review",
                "false_rejects", "review_rate"):
        assert offline[key] == pytest.approx(tested[key], rel=1e-9), key
    assert "| 50 % | pooled |" in capsys.readouterr().out


def _spotted_set(root):
    """A small MVTec tree: a flat good surface, three test images with a dark spot and masks."""
    from PIL import Image

    for folder in ("train/good", "test/crack", "ground_truth/crack"):
        (root / folder).mkdir(parents=True)
    surface = np.full((40, 50), 150, np.uint8)
    Image.fromarray(surface).save(root / "train/good/0.png")
    seen = []
    for i in range(3):
        image = surface.copy()
        image[10 + i:16 + i, 20:26] = 60  # a dark spot
        mask = np.zeros_like(image)
        mask[10 + i:16 + i, 20:26] = 255
        Image.fromarray(np.stack([image] * 3, axis=2)).save(root / f"test/crack/{i}.jpg", quality=98)
        Image.fromarray(mask).save(root / f"ground_truth/crack/{i}_mask.png")
        seen.append((f"test/crack/{i}.jpg", f"ground_truth/crack/{i}_mask.png"))
    (root / "README.md").write_text("provenance\n")
    return surface, seen


def test_transformed_set_inverted_turns_dark_defects_bright_and_keeps_masks_and_names(monkeypatch, tmp_path):
    from PIL import Image

    from prn.data.sample import Sample
    from prn.preprocess import defect_side

    src = tmp_path / "set"
    surface, seen = _spotted_set(src)
    transformed = script("transformed_set", monkeypatch)
    transformed.main([str(src), str(tmp_path / "inv"), "--invert"])
    dst = tmp_path / "inv"
    names = sorted(p.relative_to(src) for p in src.rglob("*"))
    assert names == sorted(p.relative_to(dst) for p in dst.rglob("*"))
    assert np.array_equal(np.asarray(Image.open(dst / "train/good/0.png")), 255 - surface)  # PNG: exact
    for _, mask in seen:
        assert (dst / mask).read_bytes() == (src / mask).read_bytes()
    assert (dst / "README.md").read_text() == "provenance\n"

    def side(root):
        return defect_side([Sample(root / img, root / mask, 1, "crack") for img, mask in seen])["mode"]
    assert (side(src), side(dst)) == ("dark", "bright")

    with pytest.raises(SystemExit, match="not empty"):
        transformed.main([str(src), str(dst), "--invert"])
    with pytest.raises(SystemExit, match="inside"):
        transformed.main([str(src), str(src / "inv"), "--invert"])
    with pytest.raises(SystemExit, match="nothing to do"):
        transformed.main([str(src), str(tmp_path / "same")])
    Image.new("CMYK", (4, 4)).save(src / "train/good/1.jpg")
    with pytest.raises(SystemExit, match="1.jpg: image mode CMYK"):
        transformed.main([str(src), str(tmp_path / "inv2"), "--invert"])


def test_transformed_set_scaled_enlarges_photos_and_masks_together(monkeypatch, tmp_path):
    from PIL import Image

    from prn.preprocess import detail_width

    src = tmp_path / "set"
    surface, seen = _spotted_set(src)
    transformed = script("transformed_set", monkeypatch)
    dst = tmp_path / "x2"
    transformed.main([str(src), str(dst), "--scale", "2"])
    assert sorted(p.relative_to(src) for p in src.rglob("*")) == sorted(p.relative_to(dst) for p in dst.rglob("*"))
    good = np.asarray(Image.open(dst / "train/good/0.png"))
    assert good.shape == (80, 100) and (good == 150).all()  # a flat surface stays flat
    for img, mask in seen:
        big = np.asarray(Image.open(dst / mask))
        small = np.asarray(Image.open(src / mask))
        assert big.shape == (80, 100) and set(np.unique(big)) == {0, 255}  # nearest: still binary
        assert np.array_equal(big, np.kron(small, np.ones((2, 2), np.uint8)))  # the same defect, twice the size
        photo = np.asarray(Image.open(dst / img).convert("L")).astype(int)
        assert photo[big > 0].mean() < 80 < 140 < photo[big == 0].mean()  # the spot is where its mask is
    assert (dst / "README.md").read_text() == "provenance\n"
    # the same input size is a resize twice as steep, so the width rule gives a wider filter
    assert detail_width((40, 50), (16, 20)) == 3 and detail_width((80, 100), (16, 20)) == 5
    with pytest.raises(SystemExit, match="--scale 9"):
        transformed.main([str(src), str(tmp_path / "x9"), "--scale", "9"])


@pytest.mark.parametrize("mirror,flip", [("lr", np.fliplr), ("ud", np.flipud), ("both", lambda a: a[::-1, ::-1])])
def test_transformed_set_mirrored_moves_masks_with_their_photos(monkeypatch, tmp_path, mirror, flip):
    from PIL import Image

    src = tmp_path / "set"
    _, seen = _spotted_set(src)
    transformed = script("transformed_set", monkeypatch)
    dst = tmp_path / mirror
    transformed.main([str(src), str(dst), "--mirror", mirror])
    for img, mask in seen:
        moved = np.asarray(Image.open(dst / mask))
        assert np.array_equal(moved, flip(np.asarray(Image.open(src / mask))))
        assert not np.array_equal(moved, np.asarray(Image.open(src / mask)))  # the spot is off-centre
        photo = np.asarray(Image.open(dst / img).convert("L")).astype(int)
        assert photo[moved > 0].mean() < 80 < 140 < photo[moved == 0].mean()


def test_transformed_set_changes_the_light_and_focus_of_photos_not_of_masks(monkeypatch, tmp_path):
    from PIL import Image

    src = tmp_path / "set"
    surface, seen = _spotted_set(src)
    transformed = script("transformed_set", monkeypatch)
    transformed.main([str(src), str(tmp_path / "dark"), "--brightness", "0.5"])
    assert (np.asarray(Image.open(tmp_path / "dark/train/good/0.png")) == 75).all()  # 150 x 0.5
    transformed.main([str(src), str(tmp_path / "soft"), "--blur", "2"])
    img, mask = seen[0]
    sharp = np.asarray(Image.open(src / img).convert("L")).astype(int)
    soft = np.asarray(Image.open(tmp_path / "soft" / img).convert("L")).astype(int)
    assert soft.min() > sharp.min() and np.abs(np.diff(soft, axis=1)).max() < np.abs(np.diff(sharp, axis=1)).max()
    for name in ("dark", "soft"):
        assert all((tmp_path / name / m).read_bytes() == (src / m).read_bytes() for _, m in seen)
    transformed.main([str(src), str(tmp_path / "same"), "--reencode"])  # PNG: the same pixels
    assert np.array_equal(np.asarray(Image.open(tmp_path / "same/train/good/0.png")), surface)
    with pytest.raises(SystemExit, match="brightness over 0"):
        transformed.main([str(src), str(tmp_path / "black"), "--brightness", "0"])


def test_line_drift_judges_the_runs_threshold_on_drifted_copies_of_its_test_split(calibrated_run, tmp_path,
                                                                                  monkeypatch, capsys):
    from PIL import Image

    from prn.config import PRNConfig

    drift = script("line_drift", monkeypatch)
    test_labels_and_scores = load_script(BENCH / "threshold_tails.py").test_labels_and_scores
    calibrated_run = shutil.copytree(calibrated_run, tmp_path / "run")  # 4 good test parts: the look
    PRNConfig.load(calibrated_run / "config.yaml").replace(drift_min_images=4).save(calibrated_run / "config.yaml")
    out = tmp_path / "drift.json"
    drift.main([str(calibrated_run), "--drift", "brightness 0.8", "--work", str(tmp_path / "copies"),
                "--json", str(out)])
    rows = {r["drift"]: r for r in json.loads(out.read_text())}
    assert set(rows) == {"re-encoded", "brightness 0.8"}
    # the demo set's photos are PNG: the re-encoded copy has the test's own pixels, so its row is
    # what prn test found with the run's threshold
    y, s = test_labels_and_scores(calibrated_run)
    t = json.loads((calibrated_run / "calibration.json").read_text())["image_threshold"]
    same = rows["re-encoded"]
    assert (same["n_good"], same["n_defective"]) == (int((y == 0).sum()), int((y == 1).sum()))
    assert same["false_reject_rate"] == pytest.approx(np.mean(s[y == 0] >= t))
    assert same["recall"] == pytest.approx(np.mean(s[y == 1] >= t))
    # and the held-out images, unchanged too, give the fit's threshold again
    assert same["recalibrated_threshold"] == pytest.approx(t, rel=1e-5)
    assert same["recalibrated_recall"] == pytest.approx(same["recall"])
    dark = rows["brightness 0.8"]
    assert 0 <= dark["false_reject_rate"] <= 1 and 0 <= dark["image_auroc"] <= 1
    root = Path(json.loads((calibrated_run / "split.json").read_text())["root"])
    photo = next(p for p in sorted((root / "test").rglob("*.png")))
    darker = tmp_path / "copies" / root.name / "brightness_0.8" / "test" / photo.relative_to(root / "test")
    before, after = (np.asarray(Image.open(p).convert("L")).astype(float) for p in (photo, darker))
    assert after.mean() == pytest.approx(0.8 * before.mean(), rel=0.02)
    printed = capsys.readouterr().out
    assert "| brightness 0.8 |" in printed and "| data | drift | runs |" in printed
    # the good parts' look: a fifth less light is a fifth less brightness, and predict warned of it
    assert (1 + dark["brightness_change"]) / (1 + same["brightness_change"]) == pytest.approx(0.8, rel=0.02)
    assert dark["warned"] and not same["warned"] and "| 1 of 1 |" in printed
