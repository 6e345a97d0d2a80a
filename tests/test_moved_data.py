"""A run whose data set moved since the fit: `prn test` and `prn calibrate` say so and take
`--root` (prn.data.split.Split.rerooted)."""

import json
import shutil
from pathlib import Path

import pytest

from prn.cli import main
from prn.data.sample import Sample
from prn.data.split import Split
from prn.errors import DataError, ExitStatus


def test_rerooting_moves_the_files_under_the_old_folder_and_keeps_the_others(tmp_path):
    old = "/data/old/bottle"
    split = Split(train_normal=[Sample(Path(old) / "train/good/1.png", None, 0, "good")],
                  train_anomalous=[Sample(Path("/elsewhere/added.png"), Path("/elsewhere/added_mask.png"), 1, "crack")],
                  test=[Sample(Path(old) / "test/crack/2.png", Path(old) / "ground_truth/crack/2_mask.png", 1, "crack")],
                  dataset="mvtec", category="bottle", k=1, seed=0, root=old)
    moved = split.rerooted(tmp_path)
    assert moved.root == str(tmp_path)
    assert moved.train_normal[0].image_path == tmp_path / "train/good/1.png" and moved.train_normal[0].mask_path is None
    assert moved.test[0].image_path == tmp_path / "test/crack/2.png"
    assert moved.test[0].mask_path == tmp_path / "ground_truth/crack/2_mask.png"
    assert moved.train_anomalous == split.train_anomalous  # not under the data set's folder: as it was
    assert (moved.test[0].label, moved.test[0].defect_type, moved.k, moved.seed) == (1, "crack", 1, 0)
    with pytest.raises(DataError, match="not a folder"):
        split.rerooted(tmp_path / "absent")
    with pytest.raises(DataError, match="records no data set folder"):
        Split(train_normal=[], train_anomalous=[], test=[], dataset="mvtec", category="bottle", k=0,
              seed=0).rerooted(tmp_path)


def test_a_run_whose_data_set_moved_is_tested_and_calibrated_with_root(calibrated_run, tmp_path, capsys):
    run = Path(shutil.copytree(calibrated_run, tmp_path / "run"))
    before = json.loads((calibrated_run / "results.json").read_text())["mean"]
    threshold = json.loads((calibrated_run / "calibration.json").read_text())["image_threshold"]
    root = Split.load(run / "split.json").root
    # the split as it reads once its data set has gone from where the fit found it
    (run / "split.json").write_text((run / "split.json").read_text().replace(root, "/gone/data"))

    assert main(["test", str(run), "--out", str(tmp_path / "t1"), "--quiet"]) == ExitStatus.DATA
    err = capsys.readouterr().err
    assert "/gone/data/test/" in err and "not found (and" in err and "--root NEW_FOLDER" in err
    assert main(["test", str(run), "--root", root, "--out", str(tmp_path / "t2"), "--overlays", "0",
                 "--quiet"]) in (0, None)
    after = json.loads((tmp_path / "t2" / "results.json").read_text())["mean"]
    for key in ("image_auroc", "pixel_auroc", "pro", "pixel_ap"):
        assert after[key] == pytest.approx(before[key], abs=1e-9), key

    assert main(["calibrate", str(run), "--quiet"]) == ExitStatus.DATA
    err = capsys.readouterr().err
    assert "/gone/data/train/" in err and "prn calibrate" in err and "--root NEW_FOLDER" in err
    assert main(["calibrate", str(run), "--root", root, "--quiet"]) in (0, None)
    again = json.loads((run / "calibration.json").read_text())["image_threshold"]
    assert again == pytest.approx(threshold, rel=1e-5)
    assert "/gone/data" in (run / "split.json").read_text()  # nothing judged: split.json as it was


def test_a_retrain_from_a_run_whose_data_set_moved_takes_root(calibrated_run, tmp_path, capsys):
    from prn.retrain import fit_from
    parent = Path(shutil.copytree(calibrated_run, tmp_path / "parent"))
    split = Split.load(parent / "split.json")
    (parent / "split.json").write_text((parent / "split.json").read_text().replace(split.root, "/gone/data"))
    good = next(s for s in split.test if s.label == 0)
    (tmp_path / "more" / "train" / "good").mkdir(parents=True)
    shutil.copy(good.image_path, tmp_path / "more" / "train" / "good" / "fix.png")

    with pytest.raises(DataError, match=r"/gone/data/train/.*not found.*--root NEW_FOLDER"):
        fit_from(parent, add_normals=tmp_path / "more", epochs=1, run_dir=tmp_path / "refused", progress=False)
    assert not (tmp_path / "refused").exists()
    assert main(["fit", "--from", str(parent), "--add-normals", str(tmp_path / "more"), "--root", split.root,
                 "--epochs", "1", "--run-dir", str(tmp_path / "new"), "--quiet"]) in (0, None)
    new = Split.load(tmp_path / "new" / "split.json")
    assert new.root == split.root and "/gone/data" not in (tmp_path / "new" / "split.json").read_text()
    assert new.train_normal[:len(split.train_normal)] == split.train_normal  # the parent's images, where they are
