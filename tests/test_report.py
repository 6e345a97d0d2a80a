import csv
import json
import math

import numpy as np
import pytest

from prn import report
from prn.errors import DataError

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


def test_write_predictions_mirrors_the_input_tree_and_writes_scores(tmp_path):
    root = tmp_path / "data" / "bottle"
    maps = [np.full((3, 4), v, np.float64) for v in (0.1, 0.7, 0.9)]
    records = [
        (root / "test" / "good" / "000.png", 0.1, maps[0], 0),
        (root / "test" / "broken" / "001.png", 0.7, maps[1], 1),
        (tmp_path / "elsewhere" / "x.jpg", 0.9, maps[2], None),
    ]
    scores = report.write_predictions(tmp_path / "out", records, root, threshold=0.5)
    rows = read_csv(scores)
    assert rows[0] == ["path", "score", "label", "prediction"]
    assert rows[1] == ["test/good/000.png", "0.1", "0", "0"]
    assert rows[2] == ["test/broken/001.png", "0.7", "1", "1"]
    assert rows[3][1:] == ["0.9", "", "1"] and rows[3][0].endswith("x.jpg")
    for rel, expected in [("test/good/000.png.npy", maps[0]), ("test/broken/001.png.npy", maps[1]),
                          ("_external/x.jpg.npy", maps[2])]:
        saved = np.load(tmp_path / "out" / "maps" / rel)
        assert saved.dtype == np.float32 and np.array_equal(saved, expected.astype(np.float32))


def test_write_predictions_without_labels_or_threshold_has_two_columns(tmp_path):
    records = [(tmp_path / "a.png", 0.25, np.zeros((2, 2), np.float32))]
    rows = read_csv(report.write_predictions(tmp_path / "out", records, tmp_path))
    assert rows == [["path", "score"], ["a.png", "0.25"]]


def test_write_predictions_can_write_scores_without_maps(tmp_path):
    records = [(tmp_path / "a.png", 0.25, None, 1), (tmp_path / "b.png", 0.75, None, 0)]
    rows = read_csv(report.write_predictions(tmp_path / "out", records, tmp_path, threshold=float("nan")))
    assert rows == [["path", "score", "label"], ["a.png", "0.25", "1"], ["b.png", "0.75", "0"]]
    assert not (tmp_path / "out" / "maps").exists()


def test_write_predictions_never_writes_outside_its_folder(tmp_path):
    root = tmp_path / "data"
    sneaky = root / ".." / ".." / "escape.png"  # lexically outside root
    out = tmp_path / "out"
    report.write_predictions(out, [(sneaky, 0.5, np.zeros((2, 2)))], root)
    written = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file())
    assert written == ["out/maps/_external/escape.png.npy", "out/scores.csv"]


def test_write_predictions_refuses_two_external_images_with_one_name(tmp_path):
    records = [(tmp_path / "a" / "x.png", 0.1, np.zeros((2, 2))),
               (tmp_path / "b" / "x.png", 0.2, np.zeros((2, 2)))]
    with pytest.raises(DataError, match=r"^.*b[/\\]x\.png: another image"):
        report.write_predictions(tmp_path / "out", records, tmp_path / "root")


def test_write_predictions_refuses_maps_that_are_not_2d(tmp_path):
    bad = tmp_path / "img.png"
    with pytest.raises(DataError, match="^" + str(bad).replace("\\", "\\\\")):
        report.write_predictions(tmp_path / "out", [(bad, 0.1, np.zeros((1, 2, 2)))], tmp_path)


def test_mean_metrics_skips_nan_and_missing_values():
    mean = report.mean_metrics({"a": {"pro": 0.5, "x": float("nan")}, "b": {"pro": 0.7}})
    assert mean["pro"] == pytest.approx(0.6)
    assert math.isnan(mean["x"])
