"""Defect regions: the connected pixels of a map at the image's own size that
reach the calibrated pixel threshold, with boxes in the original image's pixels. Pinned on maps
and on drawn defects whose place is known (tests/fake_models.py), at non-square sizes; written
by prn predict (regions.jsonl, the regions column); the same from the exported graph's outputs
with docs/examples/regions.py."""

import csv
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from prn.cli import main
from prn.deploy.predict import Predictor, predict_folder
from prn.postprocess import Postprocess, Region, find_regions, resize_map

sys.path.insert(0, str(Path(__file__).parent))
from conftest import load_script  # noqa: E402
from fake_models import CALIBRATION, brightness_predictor, drawn, region_boxes  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
# non-square images and the white rectangles (x, y, width, height) drawn on them
DRAWN = {"wide.png": ((128, 320), [(150, 20, 50, 20), (10, 100, 25, 16)]),
         "tall.png": ((250, 90), [(10, 40, 30, 60), (60, 200, 20, 20)]),
         "odd.png": ((90, 250), [(40, 10, 60, 30), (200, 60, 20, 20), (0, 70, 12, 12)])}


def _rows(path):
    return list(csv.DictReader(open(path, newline="")))


def _jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


# ----------------------------------------------------------------------------- the function

def test_regions_are_8_connected_components_with_box_area_peak_and_mean():
    amap = np.zeros((6, 10), np.float32)
    amap[1:3, 1:4] = 0.8                      # a 3 x 2 block ...
    amap[3, 4] = 0.9                          # ... joined by a diagonal neighbour: one region
    amap[4, 8], amap[5, 9] = 0.6, 0.7         # a diagonal pair: one region of two pixels
    regions = find_regions(amap, amap >= 0.5)
    assert regions == [
        Region(x=1, y=1, width=4, height=3, area=7, peak=pytest.approx(0.9), mean=pytest.approx((6 * 0.8 + 0.9) / 7)),
        Region(x=8, y=4, width=2, height=2, area=2, peak=pytest.approx(0.7), mean=pytest.approx(0.65)),
    ]
    assert find_regions(amap, amap >= 0.5, min_area=3) == regions[:1]    # the minimum area drops the pair
    assert find_regions(amap, amap >= 0.95) == []
    assert regions[0].as_dict() == {"x": 1, "y": 1, "width": 4, "height": 3, "area": 7,
                                    "peak": regions[0].peak, "mean": regions[0].mean}


@pytest.mark.parametrize("bad", [0, -3, 2.5, "4", True])
def test_a_minimum_area_that_is_not_a_whole_number_of_pixels_is_refused(bad):
    with pytest.raises(ValueError, match="minimum region area"):
        find_regions(np.zeros((2, 2)), np.zeros((2, 2), bool), bad)


def test_boxes_are_in_the_original_images_pixels_after_the_map_is_resized_to_it():
    small = np.zeros((64, 64), np.float32)
    small[10:20, 30:40] = 1.0                 # ten map cells square, at the model's input size
    post = Postprocess(CALIBRATION)           # pixel threshold 0.5: crossed half-way between cells
    # 128 x 320 is 2 x 5 model pixels per map cell: rows 20..39, columns 150..199
    (r,) = post.regions(resize_map(small, (128, 320)))
    assert (r.x, r.y, r.width, r.height) == (150, 20, 50, 20)
    # 100 x 250: rows from ceil(10 * 100/64 - 0.5) = 16 to floor(20 * 100/64 - 0.5) = 30, columns
    # from ceil(30 * 250/64 - 0.5) = 117 to floor(40 * 250/64 - 0.5) = 155
    (r,) = post.regions(resize_map(small, (100, 250)))
    assert (r.x, r.y, r.width, r.height) == (117, 16, 39, 15)
    assert r.peak == 1.0 and 0.5 <= r.mean < 1.0 and r.area <= 39 * 15


def test_without_a_calibrated_pixel_threshold_there_are_no_regions_rather_than_a_guess():
    amap = np.ones((8, 8), np.float32)
    assert Postprocess(None).regions(amap) is None
    assert Postprocess(None, threshold=0.3).regions(amap) is None   # an image threshold alone


# ----------------------------------------------------------------------------- drawn defects

@pytest.fixture(scope="module")
def fake(calibrated_run):
    return brightness_predictor(calibrated_run)


@pytest.fixture(scope="module")
def drawn_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("drawn")
    for name, (hw, boxes) in DRAWN.items():
        Image.fromarray(drawn(hw, boxes)).save(folder / name)
    return folder


@pytest.mark.parametrize("name", DRAWN)
def test_the_regions_of_drawn_defects_are_their_rectangles_at_non_square_sizes(fake, name):
    hw, boxes = DRAWN[name]
    result = fake.predict_arrays([drawn(hw, boxes)])[0]
    assert result["map"].shape == hw
    regions = [r.as_dict() for r in fake.regions(result["map"])]
    assert region_boxes(regions) == sorted(boxes)
    for r in regions:                          # bilinear corners may lose a few pixels, never gain
        assert 0.95 * r["width"] * r["height"] <= r["area"] <= r["width"] * r["height"]
        assert r["peak"] == 1.0


def test_predict_writes_regions_jsonl_beside_scores_csv_and_their_count(fake, drawn_folder, tmp_path):
    summary = predict_folder(fake, drawn_folder, tmp_path, maps="none", progress=False)
    assert summary.regions == tmp_path / "regions.jsonl"
    rows = _rows(summary.csv)
    assert list(rows[0]) == ["path", "score", "normalized_score", "prediction", "review", "label", "error",
                            "regions"]
    lines = _jsonl(summary.regions)
    assert [line["path"] for line in lines] == [r["path"] for r in rows] == sorted(DRAWN)
    for row, line in zip(rows, lines):
        hw, boxes = DRAWN[line["path"]]
        assert set(line) == {"path", "width", "height", "regions"}
        assert (line["height"], line["width"]) == hw
        assert region_boxes(line["regions"]) == sorted(boxes)
        assert int(row["regions"]) == len(boxes)
        for r in line["regions"]:
            assert set(r) == {"x", "y", "width", "height", "area", "peak", "mean"}
        assert [r["peak"] for r in line["regions"]] == sorted((r["peak"] for r in line["regions"]), reverse=True)


def test_the_minimum_area_drops_small_regions_in_predict_and_its_cli(fake, drawn_folder, tmp_path, monkeypatch):
    summary = predict_folder(fake, drawn_folder, tmp_path / "a", maps="none", progress=False,
                             min_region_area=500)
    kept = {line["path"]: region_boxes(line["regions"]) for line in _jsonl(summary.regions)}
    assert kept == {"wide.png": [(150, 20, 50, 20)], "tall.png": [(10, 40, 30, 60)],
                    "odd.png": [(40, 10, 60, 30)]}          # the 20 x 20 and smaller ones are gone
    assert [r["regions"] for r in _rows(summary.csv)] == ["1", "1", "1"]
    import prn.deploy.predict as predict_module
    monkeypatch.setattr(predict_module, "Predictor", lambda *a, **kw: fake)
    assert main(["predict", "run", str(drawn_folder), "--out", str(tmp_path / "b"), "--maps", "none",
                 "--min-region-area", "500", "--quiet"]) == 0
    assert (tmp_path / "b" / "regions.jsonl").read_text() == summary.regions.read_text()


@pytest.mark.parametrize("value", ["0", "-1", "ten", "2.5"])
def test_the_cli_refuses_a_minimum_area_below_one_pixel(value, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["predict", "run", "in", "--min-region-area", value])
    assert exit_.value.code == 2 and "whole number of pixels" in capsys.readouterr().err


def test_without_calibration_predict_writes_no_regions_and_says_why(calibrated_run, drawn_folder, tmp_path, capsys):
    from prn.checkpoint import set_calibration
    bare = tmp_path / "model.pt"
    shutil.copy(calibrated_run / "checkpoints" / "model.pt", bare)
    set_calibration(bare, None)
    assert main(["predict", str(bare), str(drawn_folder), "--out", str(tmp_path / "out"),
                 "--maps", "none", "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "no defect regions" in err and "pixel threshold" in err and "prn calibrate" in err
    assert not (tmp_path / "out" / "regions.jsonl").exists()
    assert all(r["regions"] == "" and r["score"] for r in _rows(tmp_path / "out" / "scores.csv"))


def test_predicts_regions_are_the_post_process_regions_of_its_maps(calibrated_run, demo_root, tmp_path):
    images = demo_root / "demo" / "test" / "hole"
    predictor = Predictor(calibrated_run)
    summary = predict_folder(predictor, images, tmp_path, maps="npy", progress=False)
    lines = _jsonl(summary.regions)
    assert len(lines) == len(list(images.iterdir()))
    for line in lines:
        amap = np.load(tmp_path / "maps" / f"{line['path']}.npy")
        assert line["regions"] == [r.as_dict() for r in predictor.postprocess.regions(amap)]


# ----------------------------------------------------------------------------- without prn

def _example():
    return load_script(REPO / "docs" / "examples" / "regions.py")


@pytest.mark.parametrize("hw", [(100, 250), (250, 90), (64, 64), (40, 30)])
def test_the_docs_example_gives_prns_regions_from_a_map_at_the_models_input_size(calibrated_run, hw):
    example = _example()
    small = np.zeros((64, 64), np.float32)
    small[10:20, 30:40], small[50:52, 5:9] = 1.0, 0.7
    post = Postprocess(CALIBRATION)
    np.testing.assert_allclose(example.resize_map(small, *hw), resize_map(small, hw), atol=1e-5)
    _same_regions(example.regions(small, hw, CALIBRATION["pixel_threshold"]),
                  post.regions(resize_map(small, hw)))
    assert example.regions(small, hw, 0.5, min_area=10**6) == []
    # and on a real model's map, at its calibrated pixel threshold
    predictor = Predictor(calibrated_run)
    image = np.random.default_rng(5).integers(0, 256, (*hw, 3), dtype=np.uint8)
    _, maps = predictor.forward(predictor.prepare(image)[None])
    _same_regions(example.regions(maps[0], hw, predictor.pixel_threshold),
                  predictor.regions(resize_map(maps[0], hw)))


def _same_regions(got, want):
    """Boxes and areas equal; peak and mean up to float rounding (numpy's resize is not torch's
    to the last bit)."""
    want = [r.as_dict() for r in want]
    assert [tuple(r[k] for k in ("x", "y", "width", "height", "area")) for r in got] == \
        [tuple(r[k] for k in ("x", "y", "width", "height", "area")) for r in want]
    for key in ("peak", "mean"):
        assert [r[key] for r in got] == pytest.approx([r[key] for r in want], abs=1e-5)


def test_docs_deploy_page_shows_the_regions_example_exactly():
    page = (REPO / "docs" / "deploy.md").read_text()
    script = (REPO / "docs" / "examples" / "regions.py").read_text()
    assert f"```python\n{script}```" in page


@pytest.mark.parametrize("peak", [0.4999, 0.49999999, 0.5, 0.6])
def test_a_map_below_the_pixel_threshold_skips_the_resize_and_writes_what_the_resize_would(peak, tmp_path):
    from prn.report import ResultWriter
    post = Postprocess(CALIBRATION)  # pixel threshold 0.5
    amap = np.full((8, 12), 0.1, dtype=np.float32)
    amap[3, 4] = peak
    assert post.no_region_possible(amap) == (peak < 0.4999 + 1e-6)  # a margin for float rounding
    lines = {}
    for maps in ("none", "npy"):  # "npy" always resizes: the reference
        with ResultWriter(tmp_path / maps, tmp_path, post, maps=maps, regions=True) as w:
            w.add(tmp_path / "a.png", 0.3, 0.4, 0, amap, (50, 75))
        lines[maps] = (tmp_path / maps / "regions.jsonl").read_text()
    assert lines["none"] == lines["npy"]
    found = json.loads(lines["none"])["regions"]
    assert (found == []) if peak < 0.5 else (peak < 0.6 or len(found) == 1)
