import csv
import json
import math

import numpy as np
import pytest
from PIL import Image

from prn import report
from prn.errors import DataError
from prn.postprocess import Postprocess

RESULTS = {
    "bottle": {"image_auroc": 0.99412, "pixel_auroc": 0.98951, "pro": 0.96149, "pixel_ap": 0.78555,
               "f1_max": 0.9666, "f1_threshold": 0.51, "seconds_per_image": 0.06449},
    "cable": {"image_auroc": 0.97, "pixel_auroc": 0.985, "pro": float("nan"), "pixel_ap": 0.70,
              "f1_max": 0.9, "f1_threshold": 0.4, "seconds_per_image": 0.07},
}


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.reader(f))


def test_markdown_table_has_paper_columns_scaled_and_rounded():
    lines = report.markdown_table(RESULTS).splitlines()
    assert lines[0] == "| Category | I | P | O | A | F1 | T |"
    assert lines[2] == "| bottle | 99.4 | 99.0 | 96.1 | 78.6 | 96.7 | 0.064 |"
    assert lines[3] == "| cable | 97.0 | 98.5 | - | 70.0 | 90.0 | 0.070 |"
    # Mean by hand: I (99.412 + 97) / 2 = 98.206; O skips cable's nan: 96.149; T .067245.
    assert lines[4] == "| mean | 98.2 | 98.7 | 96.1 | 74.3 | 93.3 | 0.067 |"


def test_write_results_writes_json_markdown_and_csv(tmp_path):
    paths = report.write_results(tmp_path / "run", RESULTS, title="PRN on MVTec AD")
    data = json.loads((tmp_path / "run" / "results.json").read_text())
    assert data["title"] == "PRN on MVTec AD"
    assert data["categories"]["bottle"]["pro"] == pytest.approx(0.96149)
    assert data["categories"]["cable"]["pro"] is None  # nan is not valid JSON
    assert data["mean"]["image_auroc"] == pytest.approx((0.99412 + 0.97) / 2)
    md = paths["md"].read_text()
    assert md.startswith("# PRN on MVTec AD\n")
    assert "| bottle | 99.4 | 99.0 | 96.1 | 78.6 | 96.7 | 0.064 |" in md
    rows = read_csv(paths["csv"])
    assert rows[0] == ["Category", "I", "P", "O", "A", "F1", "T"]
    assert rows[1] == ["bottle", "99.4", "99.0", "96.1", "78.6", "96.7", "0.064"]
    assert rows[-1][0] == "mean"


def test_write_csv_writes_the_same_cells_as_the_markdown_table(tmp_path):
    rows = read_csv(report.write_csv(tmp_path / "t.csv", RESULTS))
    md_rows = [[c.strip() for c in line.strip("|").split("|")]
               for line in report.markdown_table(RESULTS).splitlines() if "---" not in line]
    assert rows == md_rows


def write_results_of(out, root, records, post=None, **options):
    """records: (path, score, normalized, prediction, map or None, label) -> scores.csv rows."""
    with report.ResultWriter(out, root, post or Postprocess(), **options) as writer:
        for path, score, normalized, prediction, amap, label in records:
            hw = None if amap is None else amap.shape
            writer.add(path, score, normalized, prediction, amap, hw, label=label)
    return read_csv(out / "scores.csv")


def test_result_writer_mirrors_the_input_tree_and_writes_one_set_of_columns(tmp_path):
    root = tmp_path / "data" / "bottle"
    maps = [np.full((3, 4), v, np.float32) for v in (0.1, 0.7, 0.9)]
    records = [
        (root / "test" / "good" / "000.png", 0.1, 0.25, 0, maps[0], 0),
        (root / "test" / "broken" / "001.png", 0.7, 0.75, 1, maps[1], 1),
        (tmp_path / "elsewhere" / "x.jpg", 0.9, None, None, maps[2], None),
    ]
    rows = write_results_of(tmp_path / "out", root, records, maps="npy")
    assert rows[0] == list(report.SCORE_COLUMNS) == ["path", "score", "normalized_score", "prediction",
                                                     "review", "label", "error"]
    assert rows[1] == ["test/good/000.png", "0.1", "0.25", "0", "", "0", ""]  # no review band: empty
    assert rows[2] == ["test/broken/001.png", "0.7", "0.75", "1", "", "1", ""]
    assert rows[3][1:] == ["0.9", "", "", "", "", ""] and rows[3][0].endswith("x.jpg")
    for rel, expected in [("test/good/000.png.npy", maps[0]), ("test/broken/001.png.npy", maps[1]),
                          ("_external/x.jpg.npy", maps[2])]:
        saved = np.load(tmp_path / "out" / "maps" / rel)
        assert saved.dtype == np.float32 and np.array_equal(saved, expected)


def test_result_writer_resizes_maps_to_each_images_size_and_writes_masks_and_pngs(tmp_path):
    cal = {"image_threshold": 0.5, "pixel_threshold": 0.5, "score_min": 0.0, "score_max": 1.0,
           "pixel_min": 0.0, "pixel_max": 1.0}
    amap = np.zeros((4, 4), np.float32)
    amap[:2] = 1.0
    with report.ResultWriter(tmp_path / "out", tmp_path, Postprocess(cal), maps="png", masks=True) as w:
        w.add(tmp_path / "a.png", 0.9, 0.9, 1, amap, (8, 12))
    level = np.asarray(Image.open(tmp_path / "out" / "maps" / "a.png.png"))
    mask = np.asarray(Image.open(tmp_path / "out" / "masks" / "a.png.png"))
    assert level.shape == mask.shape == (8, 12)
    assert level[0, 0] == 255 and level[-1, -1] == 0 and set(np.unique(mask)) == {0, 255}
    assert mask[:3].all() and not mask[5:].any()


def test_result_writer_writes_scores_without_maps_and_errors_in_their_column(tmp_path):
    with report.ResultWriter(tmp_path / "out", tmp_path, Postprocess()) as w:
        w.add(tmp_path / "a.png", 0.25, None, None, np.zeros((2, 2), np.float32), (2, 2), label=1)
        w.error(tmp_path / "b.png", "b.png: not an image")
    rows = read_csv(tmp_path / "out" / "scores.csv")
    assert rows[1:] == [["a.png", "0.25", "", "", "", "1", ""], ["b.png", "", "", "", "", "", "b.png: not an image"]]
    assert not (tmp_path / "out" / "maps").exists()


def test_result_writer_with_regions_adds_their_count_column_and_regions_jsonl(tmp_path):
    cal = {"image_threshold": 0.5, "pixel_threshold": 0.5, "score_min": 0.0, "score_max": 1.0,
           "pixel_min": 0.0, "pixel_max": 1.0}
    amap = np.zeros((4, 8), np.float32)
    amap[0, 0:2], amap[3, 6:8] = 1.0, 0.8       # two corner blocks of 1 x 2 map pixels
    with report.ResultWriter(tmp_path / "out", tmp_path, Postprocess(cal), regions=True) as w:
        w.add(tmp_path / "a.png", 0.9, 0.9, 1, amap, (8, 16))      # the image: twice the map's size
        w.error(tmp_path / "b.png", "b.png: not an image")
    rows = read_csv(tmp_path / "out" / "scores.csv")
    assert rows[0] == list(report.SCORE_COLUMNS) + ["regions"]
    assert rows[1][-1] == "2" and rows[2] == ["b.png", "", "", "", "", "", "b.png: not an image", ""]
    (line,) = [json.loads(x) for x in (tmp_path / "out" / "regions.jsonl").read_text().splitlines()]
    assert (line["path"], line["width"], line["height"]) == ("a.png", 16, 8)
    # half-way between map pixels: the top-left block covers columns 0-3 and rows 0-1 of the image
    assert [(r["x"], r["y"], r["width"], r["height"]) for r in line["regions"]] == [(0, 0, 4, 2), (12, 6, 4, 2)]
    assert [r["peak"] for r in line["regions"]] == [1.0, pytest.approx(0.8)]
    # uncalibrated: the column is there, empty, and there is no regions.jsonl to misread
    with report.ResultWriter(tmp_path / "raw", tmp_path, Postprocess(), regions=True) as w:
        w.add(tmp_path / "a.png", 0.9, None, None, amap, (8, 16))
        assert w.regions_path is None
    assert read_csv(tmp_path / "raw" / "scores.csv")[1][-1] == ""
    assert not (tmp_path / "raw" / "regions.jsonl").exists()


def test_result_writer_never_writes_outside_its_folder(tmp_path):
    root = tmp_path / "data"
    sneaky = root / ".." / ".." / "escape.png"  # lexically outside root
    out = tmp_path / "out"
    write_results_of(out, root, [(sneaky, 0.5, None, None, np.zeros((2, 2), np.float32), None)], maps="npy")
    written = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file())
    assert written == ["out/maps/_external/escape.png.npy", "out/scores.csv"]


def test_result_writer_refuses_two_external_images_with_one_name(tmp_path):
    records = [(tmp_path / "a" / "x.png", 0.1, None, None, np.zeros((2, 2), np.float32), None),
               (tmp_path / "b" / "x.png", 0.2, None, None, np.zeros((2, 2), np.float32), None)]
    with pytest.raises(DataError, match=r"^.*b[/\\]x\.png: another image"):
        write_results_of(tmp_path / "out", tmp_path / "root", records, maps="npy")


def test_result_writer_refuses_maps_that_are_not_2d(tmp_path):
    bad = tmp_path / "img.png"
    with pytest.raises(DataError, match="^" + str(bad).replace("\\", "\\\\")):
        with report.ResultWriter(tmp_path / "out", tmp_path, Postprocess(), maps="npy") as w:
            w.add(bad, 0.1, None, None, np.zeros((1, 2, 2), np.float32), (2, 2))


def test_mean_metrics_skips_nan_and_missing_values():
    mean = report.mean_metrics({"a": {"pro": 0.5, "x": float("nan")}, "b": {"pro": 0.7}})
    assert mean["pro"] == pytest.approx(0.6)
    assert math.isnan(mean["x"])


def test_decisions_carry_95_percent_intervals_per_category_and_none_in_the_mean(tmp_path):
    from prn.deploy.calibrate import rates_at
    labels, scores = np.r_[np.zeros(20), np.ones(10)], np.r_[np.linspace(0, 0.6, 20), np.linspace(0.4, 1, 10)]
    one = {**rates_at(labels, scores, 0.5), "image_ap": 0.9, "image_auroc": 0.95,
           "image_auroc_low": 0.88, "image_auroc_high": 0.99}
    assert one["recall_low"] <= one["recall"] <= one["recall_high"]
    assert one["false_reject_rate_low"] <= one["false_reject_rate"] <= one["false_reject_rate_high"]
    md = report.write_results(tmp_path, {"a": one, "b": one}, title="t")["md"].read_text()
    assert "| I 95 % | FRR 95 % | recall 95 % |" in md
    rows = [line for line in md.splitlines() if line.startswith("| a |")]
    assert rows[-1].endswith(f"| 88.0-99.0 | {100 * one['false_reject_rate_low']:.1f}-"
                             f"{100 * one['false_reject_rate_high']:.1f} | {100 * one['recall_low']:.1f}-"
                             f"{100 * one['recall_high']:.1f} |")
    assert [line for line in md.splitlines() if line.startswith("| mean |")][-1].endswith("| - | - | - |")
    mean = json.loads((tmp_path / "results.json").read_text())["mean"]
    assert "recall" in mean and "recall_low" not in mean and "image_auroc_high" not in mean


def test_per_kind_and_per_size_recalls_carry_their_count_and_interval(tmp_path):
    m = {"image_ap": 0.9, "n[pit]": 4.0, "auroc[pit]": 0.8, "recall[pit]": 0.5,
         "pixels_n[< 16 px]": 10.0, "pixels_auroc[< 16 px]": 0.7, "pixels_recall[< 16 px]": 0.2}
    md = report.write_results(tmp_path, {"a": m}, title="t")["md"].read_text()
    # 2 of 4 and 2 of 10, exact binomial: 6.8-93.2 % and 2.5-55.6 %
    assert "| a | pit | 4 | 80.0 | 50.0 | 6.8-93.2 |" in md
    assert "| a | < 16 px | 10 | 70.0 | 20.0 | 2.5-55.6 |" in md


def test_a_threshold_that_rejected_more_than_twice_its_target_is_said_in_results_and_on_stderr(tmp_path, capsys):
    from prn.cli import _print_metrics
    from prn.deploy.calibrate import rates_at, threshold_warning
    goods = np.linspace(0, 0.5, 69)
    labels, scores = np.r_[np.zeros(69), np.ones(5)], np.r_[goods, np.full(5, 0.9)]
    between = lambda i: (goods[-i - 1] + goods[-i]) / 2  # noqa: E731 (i goods at or above it)
    held = {**rates_at(labels, scores, between(2)), "target_fpr": 0.01, "image_ap": 1.0}  # 2 of 69: 2.9 %
    kept = {**rates_at(labels, scores, between(1)), "target_fpr": 0.01, "image_ap": 1.0}  # 1 of 69: 1.4 %
    assert held["false_rejects"] == 2 and kept["false_rejects"] == 1
    assert "2.9 % of these good parts (2), more than twice its 1 % target" in threshold_warning(held)
    assert threshold_warning(kept) is None
    assert threshold_warning({"false_reject_rate": 0.5}) is None  # no target known: nothing to compare
    md = report.write_results(tmp_path / "a", {"parts": held}, title="t")["md"].read_text()
    assert "**parts**: the calibrated threshold rejected 2.9 %" in md
    assert "more than twice" not in report.write_results(tmp_path / "b", {"parts": kept}, title="t")["md"].read_text()
    _print_metrics(held, "test")
    assert "prn test: warning: the calibrated threshold rejected 2.9 %" in capsys.readouterr().err
    _print_metrics(held, "fit")  # `prn fit --test` names its own verb
    assert "prn fit: warning: the calibrated threshold rejected 2.9 %" in capsys.readouterr().err
    _print_metrics(kept, "test")
    assert "warning" not in capsys.readouterr().err


def test_a_test_says_on_stderr_what_the_line_would_have_done_and_keeps_stdout_json(capsys):
    from prn.cli import _print_metrics
    from prn.deploy.calibrate import decision_summary, rates_at
    labels = np.r_[np.zeros(8), np.ones(4)]
    scores = np.r_[np.linspace(0, 0.4, 7), 0.8, 0.9, 0.7, 0.2, 0.1]  # one good part and 2 of 4 defects over 0.5
    metrics = {**rates_at(labels, scores, 0.5), "n_test": 12, "n_test_anomalous": 4, "image_auroc": 0.8}
    line = decision_summary(metrics)
    # exact binomial intervals: 2 of 4 is 6.8-93.2 %; 1 of 8 is 0.3-52.7 %
    assert line == ("at the calibrated threshold 0.5 the model stops 2 of 4 defective parts (50.0 %, 95 % "
                    "interval 6.8-93.2 %) and rejects 1 of 8 good parts (12.5 %, 95 % interval 0.3-52.7 %)")
    _print_metrics(metrics, "test")
    out, err = capsys.readouterr()
    assert json.loads(out)["misses"] == 2  # stdout is still the figures alone, for a pipe
    assert f"prn test: {line}" in err
    _print_metrics(metrics, "fit")
    assert f"prn fit: {line}" in capsys.readouterr().err
    _print_metrics(metrics, "calibrate")  # calibrate judges no test set
    assert "stops" not in capsys.readouterr().err
    uncalibrated = {k: v for k, v in metrics.items() if k not in ("threshold", "misses", "false_rejects")}
    assert decision_summary(uncalibrated) is None
    assert decision_summary({**metrics, "n_test": 11.5}) is None  # a mean over categories: no counts


@pytest.mark.parametrize("hw, side", [((384, 154), 384), ((100, 40), 256), ((1024, 410), 512)])
def test_result_pictures_show_the_models_input_at_its_own_size_within_limits(tmp_path, hw, side):
    from prn import viz
    image = np.zeros((*hw, 3), np.uint8)
    path = report.result_picture(tmp_path / "p.png", image, np.zeros(hw, np.float32), Postprocess())
    assert Image.open(path).size[1] == viz.LABEL_HEIGHT + side + 2 * viz.GAP


def test_result_pictures_name_the_pixel_threshold_their_region_is_cut_at(tmp_path, monkeypatch):
    from prn import viz
    seen = {}
    real = viz.save_overlay

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(viz, "save_overlay", spy)
    amap = np.zeros((64, 64), np.float32)
    amap[10:20, 10:20] = 0.2  # above the pixel threshold, far below a probability of 0.5
    cal = {"image_threshold": 0.3, "pixel_threshold": 0.0924, "score_min": 0.0, "score_max": 1.0,
           "pixel_min": 0.0, "pixel_max": 1.0}
    report.result_picture(tmp_path / "c.png", np.zeros((64, 64, 3), np.uint8), amap, Postprocess(cal))
    assert "0.0924" in seen["region_label"] and "0.5" not in seen["region_label"]
    picture = np.asarray(Image.open(tmp_path / "c.png").convert("RGB"))
    assert (picture == viz.CONTOUR_COLOR).all(axis=2).any()  # the 0.2 square is outlined
    report.result_picture(tmp_path / "u.png", np.zeros((64, 64, 3), np.uint8), amap, Postprocess())
    assert seen["region_label"] is None  # uncalibrated: the map itself, cut at 0.5


def test_results_say_when_one_held_out_image_set_the_threshold(tmp_path):
    from prn.deploy.calibrate import rates_at
    labels, scores = np.r_[np.zeros(10), np.ones(4)], np.r_[np.linspace(0, 0.3, 10), [0.4, 0.5, 0.6, 0.7]]
    base = {**rates_at(labels, scores, 0.45), "target_fpr": 0.01, "image_ap": 1.0}
    one = {**base, "threshold_from_one_image": 1.0, "threshold_image_next_score": 0.3311}
    md = report.write_results(tmp_path / "a", {"parts": one}, title="t")["md"].read_text()
    assert ("**parts**: the threshold is the score of one held-out good image (`threshold_image` in "
            "calibration.json names it; the next held-out good part scores 0.3311)") in md
    assert "prn calibrate RUN --not-good IMAGE" in md
    for other in ({**base, "threshold_from_one_image": 0.0}, base):  # set by a fit, or a run from before
        assert "one held-out good image" not in report.write_results(tmp_path / "b", {"parts": other},
                                                                     title="t")["md"].read_text()
