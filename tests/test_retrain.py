"""A run from an old run and the images the line corrected (prn fit --from), and prn compare."""

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from prn import api
from prn.checkpoint import load_checkpoint
from prn.cli import main
from prn.data.split import Split
from prn.errors import DataError, UsageError
from prn.retrain import compare, compare_table, fit_from, labelled_folder


@pytest.fixture
def corrections(calibrated_run, tmp_path):
    """Two test defects of the run with their masks (a miss painted by the operator) and one test
    good image (a false reject), in the layout prn serve writes corrections in."""
    split = Split.load(calibrated_run / "split.json")
    folder = tmp_path / "corrections"
    defects = [s for s in split.test if s.label == 1][:2]
    for s in defects:
        (folder / "test" / s.defect_type).mkdir(parents=True, exist_ok=True)
        (folder / "ground_truth" / s.defect_type).mkdir(parents=True, exist_ok=True)
        shutil.copy(s.image_path, folder / "test" / s.defect_type / f"fix-{s.image_path.name}")
        shutil.copy(s.mask_path, folder / "ground_truth" / s.defect_type / f"fix-{s.image_path.stem}_mask.png")
    good = next(s for s in split.test if s.label == 0)
    (folder / "train" / "good").mkdir(parents=True)
    shutil.copy(good.image_path, folder / "train" / "good" / f"fix-{good.image_path.name}")
    return folder


def test_fit_from_adds_the_corrections_and_starts_from_the_old_weights(calibrated_run, corrections, tmp_path):
    run = fit_from(calibrated_run, add_anomalies=corrections, add_normals=corrections, epochs=1,
                   run_dir=tmp_path / "new", progress=False)
    old, new = Split.load(calibrated_run / "split.json"), Split.load(run / "split.json")
    assert len(new.train_anomalous) == len(old.train_anomalous) + 2
    assert len(new.train_normal) == len(old.train_normal) + 1
    # the corrections are copies of test images: known by their bytes, the originals leave the test
    # split (else the retrain's test figures would count the images it was trained on)
    copied = [s for s in old.test if s.label == 1][:2] + [next(s for s in old.test if s.label == 0)]
    copied = {s.image_path for s in copied}
    assert new.val_normal == old.val_normal
    assert new.test == [s for s in old.test if s.image_path not in copied] and len(new.test) == len(old.test) - 3
    parent = json.loads((run / "parent.json").read_text())
    assert parent["parent"] == str(calibrated_run.resolve()) and len(parent["added_anomalies"]) == 2
    assert parent["annotations"] == {"mask": 2, "box": 0, "label": 0}
    # the split says which images this retrain added, and they get their share of the seen slots
    assert [s.added for s in new.train_anomalous] == [False] * len(old.train_anomalous) + [True, True]
    assert [s.added for s in new.train_normal][-1] and not any(s.added for s in new.train_normal[:-1])
    payload = load_checkpoint(run)
    assert payload["history"][0]["event"] == "warm start" and payload["calibration"] is not None
    assert payload["config"]["training"]["epochs"] == 1
    # the retrain's recipe: its batches' anomaly slots all real defects, most of them the added ones
    assert payload["config"]["training"]["added_seen_share"] == 0.75 == parent["changes"]["added_seen_share"]
    assert payload["config"]["training"]["seen_fraction"] == 0.5 == parent["changes"]["seen_fraction"]
    # and its threshold fitted to the held-out good images' logits, which a retrain lowers less
    assert payload["config"]["calibration"]["calibration_tail"] == "gumbel_logit" == parent["changes"]["calibration_tail"]
    parent_lr = load_checkpoint(calibrated_run)["config"]["training"]["lr"]
    assert payload["config"]["training"]["lr"] == pytest.approx(parent_lr * 0.3) and parent["changes"]["lr"] == payload["config"]["training"]["lr"]
    # the prototypes are the old run's: warm-started, no k-means
    before = load_checkpoint(calibrated_run)["state_dict"]
    assert all(torch.equal(before[k], v) for k, v in payload["state_dict"].items() if k.startswith("prototypes."))
    assert "pixel_auroc" in api.test(run, progress=False, overlays=0)
    # how both models decide the very images the retrain was given, as prn compare would
    decided = json.loads((run / "added_decisions.json").read_text())
    assert [r["label"] for r in decided["images"]] == [1, 1, 0]
    assert [r["path"] for r in decided["images"]] == parent["added_anomalies"] + parent["added_normals"]
    again = compare(calibrated_run, run, corrections)
    by_path = {r["path"]: r for r in again["images"]}
    for row in decided["images"]:
        same = by_path[str(Path(row["path"]).relative_to(corrections.resolve()))]
        assert row["score_b"] == pytest.approx(same["score_b"]) and row["defective_b"] == same["defective_b"]
        assert row["score_a"] == pytest.approx(same["score_a"])
    assert decided["b"]["threshold"] == again["b"]["threshold"]


def test_the_retrains_summary_counts_the_added_images_it_stops_and_names_those_under(tmp_path):
    from prn.retrain import added_summary
    rows = [{"path": "/c/test/crack/a.png", "label": 1, "defective_a": 0, "defective_b": 1},
            {"path": "/c/test/crack/b.png", "label": 1, "defective_a": 0, "defective_b": 0},
            {"path": "/c/train/good/g.png", "label": 0, "defective_a": 1, "defective_b": 0}]
    line = added_summary({"images": rows, "b": {"threshold": 0.25}})
    assert "stops 1 of 2 added defects (its parent 0)" in line
    assert "rejects 0 of 1 added good images (its parent 1)" in line
    assert "still under it: b.png" in line and "--added-annotation label" in line
    labelled = added_summary({"images": rows, "b": {"threshold": 0.25}}, by_region=False)
    assert "still under it: b.png" in labelled and "--added-annotation" not in labelled
    rows[1]["defective_b"] = 1
    assert "still under" not in added_summary({"images": rows, "b": {"threshold": 0.25}})
    assert "no calibrated threshold" in added_summary(None)


def test_the_cli_says_how_the_retrain_decides_its_added_images(calibrated_run, corrections, tmp_path, capsys):
    assert main(["fit", "--from", str(calibrated_run), "--add-anomalies", str(corrections), "--epochs", "1",
                 "--run-dir", str(tmp_path / "new"), "--quiet"]) in (0, None)
    out = capsys.readouterr().out
    decided = json.loads((tmp_path / "new" / "added_decisions.json").read_text())
    caught = sum(r["defective_b"] for r in decided["images"])
    assert (f"prn fit --from: at its threshold {decided['b']['threshold']:.4g} the retrained model stops "
            f"{caught} of 2 added defects") in out


def test_a_correction_that_copies_a_training_image_is_not_added_again(calibrated_run, tmp_path):
    split = Split.load(calibrated_run / "split.json")
    folder = tmp_path / "again"
    (folder / "train" / "good").mkdir(parents=True)
    shutil.copy(split.train_normal[0].image_path, folder / "train" / "good" / "renamed.png")
    with pytest.raises(DataError, match="already in"):
        fit_from(calibrated_run, add_normals=folder, epochs=1, run_dir=tmp_path / "new", progress=False)


def test_the_datasets_own_folders_add_only_what_the_run_has_not_trained_or_held_out(calibrated_run, demo_root,
                                                                                     tmp_path):
    split = Split.load(calibrated_run / "split.json")
    assert split.val_normal  # else the test could not tell
    # its good training images are all trained on or held out (the fold calibrates: never trained)
    with pytest.raises(DataError, match="already in"):
        fit_from(calibrated_run, add_normals=demo_root / "demo", epochs=1, run_dir=tmp_path / "goods", progress=False)
    # its defects: the seen ones are known, the test ones are added and leave the test split
    run = fit_from(calibrated_run, add_anomalies=demo_root / "demo", epochs=1, run_dir=tmp_path / "new", progress=False)
    new = Split.load(run / "split.json")
    tested = [s for s in split.test if s.label == 1]
    assert [s.image_path for s in new.train_anomalous if s.added] == [s.image_path for s in tested]
    assert not any(s.label == 1 for s in new.test) and len(new.test) == len(split.test) - len(tested)


def test_a_parents_test_image_moved_away_does_not_stop_a_retrain(calibrated_run, corrections, tmp_path):
    parent = tmp_path / "parent"
    shutil.copytree(calibrated_run, parent)
    split = json.loads((parent / "split.json").read_text())
    split["test"][0]["image"] = str(tmp_path / "moved" / "away.png")
    (parent / "split.json").write_text(json.dumps(split))
    run = fit_from(parent, add_anomalies=corrections, epochs=1, run_dir=tmp_path / "new", progress=False)
    assert Split.load(run / "split.json").test[0].image_path == tmp_path / "moved" / "away.png"


def test_a_second_retrain_counts_only_its_own_images_as_added(calibrated_run, corrections, tmp_path):
    first = fit_from(calibrated_run, add_anomalies=corrections, epochs=1, run_dir=tmp_path / "first", progress=False)
    more = tmp_path / "more"
    (more / "train" / "good").mkdir(parents=True)
    shutil.copy(next(corrections.glob("train/good/*")), more / "train" / "good" / "again.png")
    second = fit_from(first, add_normals=more, epochs=1, run_dir=tmp_path / "second", progress=False,
                      changes={"added_seen_share": 0.0})
    split = Split.load(second / "split.json")
    assert not any(s.added for s in split.train_anomalous)
    assert [s.image_path.name for s in split.train_normal if s.added] == ["again.png"]
    assert load_checkpoint(second)["config"]["training"]["added_seen_share"] == 0.0
    # good images alone keep the parent's threshold rule (here the first retrain's)
    assert load_checkpoint(second)["config"]["calibration"]["calibration_tail"] == "gumbel_logit"
    assert "calibration_tail" not in json.loads((second / "parent.json").read_text())["changes"]


def test_a_retrain_adding_only_good_images_keeps_the_parents_batches(calibrated_run, corrections, tmp_path):
    goods = tmp_path / "goods"
    (goods / "train" / "good").mkdir(parents=True)
    shutil.copy(next(corrections.glob("train/good/*")), goods / "train" / "good" / "ok.png")
    # a parent whose fit ended on all-real epochs: the retrain's batches are the parent's main ones
    parent = tmp_path / "parent"
    shutil.copytree(calibrated_run, parent)
    config = yaml.safe_load((parent / "config.yaml").read_text())
    config["training"]["final_real_epochs"] = 2
    (parent / "config.yaml").write_text(yaml.safe_dump(config))
    run = fit_from(parent, add_normals=goods, epochs=1, run_dir=tmp_path / "new", progress=False)
    before = load_checkpoint(calibrated_run)["config"]["training"]["seen_fraction"]
    assert before < 0.5  # else the test could not tell
    assert load_checkpoint(run)["config"]["training"]["seen_fraction"] == before
    assert load_checkpoint(run)["config"]["training"]["final_real_epochs"] == 0
    assert "seen_fraction" not in json.loads((run / "parent.json").read_text())["changes"]


def test_a_retrain_trains_corrections_known_by_their_label_alone(calibrated_run, corrections, tmp_path):
    # the operator marked the verdict wrong but painted nothing: no mask beside the images
    for mask in (corrections / "ground_truth").rglob("*.png"):
        mask.unlink()
    run = fit_from(calibrated_run, add_anomalies=corrections, epochs=1, run_dir=tmp_path / "new", progress=False)
    parent = json.loads((run / "parent.json").read_text())
    assert parent["annotations"] == {"mask": 0, "box": 0, "label": 2}
    payload = load_checkpoint(run)
    assert payload["config"]["training"]["seen_fraction"] == 0.5  # every anomaly slot a real defect
    epoch = next(r for r in payload["history"] if "epoch" in r)
    assert epoch["weak"] > 0  # the label-only corrections were trained, by the weak loss


def test_added_annotation_label_trains_painted_corrections_by_their_label_alone(calibrated_run, corrections,
                                                                                tmp_path):
    run = fit_from(calibrated_run, add_anomalies=corrections, epochs=1, run_dir=tmp_path / "new", progress=False,
                   added_annotation="label")
    parent = json.loads((run / "parent.json").read_text())
    assert parent["annotations"] == {"mask": 0, "box": 0, "label": 2} and parent["added_annotation"] == "label"
    added = [s for s in Split.load(run / "split.json").train_anomalous if s.added]
    assert len(added) == 2 and all(s.annotation == "label" and s.mask_path is None for s in added)
    assert all(p.exists() for p in (corrections / "ground_truth").rglob("*.png"))  # the folder is not touched
    epoch = next(r for r in load_checkpoint(run)["history"] if "epoch" in r)
    assert epoch["weak"] > 0  # trained by the label's loss, as a correction saved without a mask is
    given = fit_from(calibrated_run, add_anomalies=corrections, epochs=1, run_dir=tmp_path / "given",
                     progress=False)
    assert json.loads((given / "parent.json").read_text())["annotations"]["mask"] == 2
    with pytest.raises(UsageError, match="--added-annotation must be"):
        fit_from(calibrated_run, add_anomalies=corrections, added_annotation="mask")


def test_added_annotation_box_trains_painted_corrections_as_the_boxes_around_them(calibrated_run, corrections,
                                                                                  tmp_path):
    from prn.config import PRNConfig
    from prn.data.datasets import boxes_of, load_training_arrays
    run = fit_from(calibrated_run, add_anomalies=corrections, epochs=1, run_dir=tmp_path / "new", progress=False,
                   added_annotation="box")
    assert json.loads((run / "parent.json").read_text())["annotations"] == {"mask": 0, "box": 2, "label": 0}
    split = Split.load(run / "split.json")
    added = [s for s in split.train_anomalous if s.added]
    assert all(s.annotation == "box" and s.mask_path.name.endswith("_mask.png") for s in added)
    _, seen = load_training_arrays(PRNConfig.load(run / "config.yaml"), split)
    as_drawn = dataclasses.replace(split, train_anomalous=[dataclasses.replace(s, annotation="mask")
                                                           for s in split.train_anomalous])
    painted = load_training_arrays(PRNConfig.load(calibrated_run / "config.yaml"), as_drawn)[1]
    for (_, mask, annotation), (_, drawn, _) in list(zip(seen, painted))[-2:]:
        assert annotation == "box" and np.array_equal(mask, boxes_of(drawn)) and mask.sum() > drawn.sum()
    epoch = next(r for r in load_checkpoint(run)["history"] if "epoch" in r)
    assert epoch["weak"] > 0  # the box's loss: the map's top pixels inside it towards 1


def test_fit_from_refuses_what_it_cannot_use(calibrated_run, tmp_path):
    with pytest.raises(UsageError, match="images to add"):
        fit_from(calibrated_run)
    with pytest.raises(UsageError, match="run folder"):
        fit_from(tmp_path, add_normals=tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no defective images to add"):
        fit_from(calibrated_run, add_anomalies=tmp_path / "empty")


def test_compare_puts_both_models_decisions_side_by_side(calibrated_run, demo_root, tmp_path, capsys):
    folder = demo_root / "demo" / "test"
    files, labels = labelled_folder(folder)
    assert labels.sum() == sum("good" not in f.parts for f in files) and 0 < labels.sum() < len(files)
    result = compare(calibrated_run, calibrated_run, folder, device="cpu")
    assert len(result["images"]) == len(files) and not any(r["changed"] for r in result["images"])
    assert result["a"]["recall"] == result["b"]["recall"]
    assert "0 of" in compare_table(result)
    assert main(["compare", str(calibrated_run), str(calibrated_run), "--data", str(folder)]) == 0
    assert "decisions differ" in capsys.readouterr().out


def test_a_corrections_folder_is_a_labelled_folder_without_its_masks(corrections, tmp_path):
    """prn compare OLD NEW --data RUN/corrections: the missed defects count as defective, the
    false rejects as good, and the painted masks beside them are not judged as images."""
    files, labels = labelled_folder(corrections)
    assert len(files) == 3 and not any(f.name.endswith("_mask.png") for f in files)
    assert labels.sum() == 2 and all(("good" in f.parts) == (y == 0) for f, y in zip(files, labels))
    # where the folder itself lives does not label its images: only the folders below it do
    inside_ok = tmp_path / "ok" / "labelled"
    shutil.copytree(corrections, inside_ok)
    assert labelled_folder(inside_ok)[1].tolist() == labels.tolist()
    masks_only = tmp_path / "masks_only"
    shutil.copytree(corrections / "ground_truth", masks_only / "ground_truth")
    with pytest.raises(DataError, match="only masks"):
        labelled_folder(masks_only)


def test_compare_says_which_rate_a_folder_cannot_give():
    """A folder of defects alone (the five corrections) has no false-reject rate: said, not nan."""
    row = {"path": "test/missed/a.png", "label": 1, "score_a": 0.2, "defective_a": 0, "score_b": 0.6,
           "defective_b": 1, "changed": True}
    rates = {"run": "r", "threshold": 0.5, "false_reject_rate": float("nan")}
    table = compare_table({"images": [row], "a": {**rates, "recall": 0.0}, "b": {**rates, "recall": 1.0}})
    assert "nan" not in table and table.count("false rejects - (no good images)") == 2
    assert "recall 0.0 %" in table and "recall 100.0 %" in table and "1 of 1 decisions differ" in table


def test_serve_reloads_its_model_from_where_it_started(calibrated_run, tmp_path):
    """POST /model/reload re-reads the served path: a moved link picks up the retrained run; a
    path that no longer loads leaves the old model serving and says so."""
    pytest.importorskip("fastapi", reason="prn serve needs the serve extra")
    from fastapi.testclient import TestClient

    from prn.checkpoint import set_calibration
    from prn.serve import build_app

    retrained = tmp_path / "retrained"
    shutil.copytree(calibrated_run, retrained, ignore=shutil.ignore_patterns("corrections"))
    calibration = dict(load_checkpoint(retrained)["calibration"], image_threshold=0.123)
    set_calibration(retrained, calibration)
    link = tmp_path / "served"
    link.symlink_to(calibrated_run)
    client = TestClient(build_app(link, device="cpu", corrections=tmp_path / "corrections"))
    before = client.get("/model").json()["image_threshold"]
    assert before != pytest.approx(0.123)

    link.unlink()
    link.symlink_to(retrained)
    assert client.get("/model").json()["image_threshold"] == before  # nothing changes until asked
    r = client.post("/model/reload")
    assert r.status_code == 200, r.text
    assert r.json()["checkpoint"].startswith(str(retrained.resolve()))
    assert client.get("/model").json()["image_threshold"] == pytest.approx(0.123)
    assert client.get("/health").json()["model_generation"] == 1  # what an open page polls for

    link.unlink()
    link.symlink_to(tmp_path / "gone")
    r = client.post("/model/reload")
    assert r.status_code == 409 and "keeps serving" in r.json()["error"]
    assert client.get("/model").json()["image_threshold"] == pytest.approx(0.123)
    assert client.get("/health").json()["model_generation"] == 1  # no swap, no new generation


def test_the_cli_refuses_added_images_without_a_run_and_settings_the_run_fixes(calibrated_run, tmp_path, capsys):
    assert main(["fit", "--add-anomalies", str(tmp_path)]) == 2
    assert "go with --from RUN" in capsys.readouterr().err
    assert main(["fit", "--from", str(calibrated_run), "--add-normals", str(tmp_path), "--preset", "cpu"]) == 2
    assert "--preset would be ignored" in capsys.readouterr().err
    assert main(["fit", "--from", str(calibrated_run), "--add-normals", str(tmp_path),
                 "--added-annotation", "label"]) == 2
    assert "--added-annotation goes with --add-anomalies" in capsys.readouterr().err


def test_a_retrain_may_change_the_schedule_and_thresholds_but_not_the_network(calibrated_run, corrections, tmp_path,
                                                                               capsys):
    with pytest.raises(UsageError, match="not image_size"):
        fit_from(calibrated_run, add_normals=corrections, changes={"image_size": 96})
    assert main(["fit", "--from", str(calibrated_run), "--add-normals", str(corrections),
                 "--set", "model.top_k=5"]) == 2
    assert "of the sections training, calibration" in capsys.readouterr().err


def test_a_held_out_good_image_sent_back_as_a_defect_leaves_the_fold_and_is_trained(calibrated_run, tmp_path, capsys):
    """The image a calibration named, looked at and saved as a defect (prn serve's corrections
    layout): the judgement `prn calibrate --not-good` records, so the retrain sets its thresholds
    without it and trains it as a defect, instead of dropping it as an image the run has."""
    split = Split.load(calibrated_run / "split.json")
    named = split.val_normal[1]
    folder = tmp_path / "corrections"
    (folder / "test" / "missed").mkdir(parents=True)
    (folder / "ground_truth" / "missed").mkdir(parents=True)
    shutil.copy(named.image_path, folder / "test" / "missed" / "held-out.png")
    mask = np.zeros(np.asarray(Image.open(named.image_path)).shape[:2], np.uint8)
    mask[10:20, 10:30] = 255
    Image.fromarray(mask).save(folder / "ground_truth" / "missed" / "held-out_mask.png")
    rc = main(["fit", "--from", str(calibrated_run), "--add-anomalies", str(folder), "--epochs", "1",
               "--run-dir", str(tmp_path / "new"), "--quiet"])
    assert rc in (0, None)
    out = capsys.readouterr().out
    assert "1 of the parent's held-out good images came back as defects" in out and str(named.image_path) in out
    new = Split.load(tmp_path / "new" / "split.json")
    assert [s.image_path for s in new.not_good] == [named.image_path]
    assert [s.image_path for s in new.val_normal] == [s.image_path for s in split.val_normal if s != named]
    added = [s for s in new.train_anomalous if s.added]
    assert [s.image_path.name for s in added] == ["held-out.png"] and added[0].mask_path is not None
    parent = json.loads((tmp_path / "new" / "parent.json").read_text())
    assert parent["judged_not_good"] == [str(named.image_path)]
    assert json.loads((tmp_path / "new" / "calibration.json").read_text())["n_normal"] == len(split.val_normal) - 1
    # a good image of the fold sent back as good again is known, as before: nothing to add
    goods = tmp_path / "goods"
    (goods / "train" / "good").mkdir(parents=True)
    shutil.copy(named.image_path, goods / "train" / "good" / "again.png")
    with pytest.raises(DataError, match="already in"):
        fit_from(calibrated_run, add_normals=goods, epochs=1, run_dir=tmp_path / "none", progress=False)


def test_a_retrain_refuses_to_send_the_whole_held_out_fold_back_as_defects(calibrated_run, tmp_path):
    split = Split.load(calibrated_run / "split.json")
    folder = tmp_path / "all"
    (folder / "test" / "missed").mkdir(parents=True)
    for i, s in enumerate(split.val_normal):
        shutil.copy(s.image_path, folder / "test" / "missed" / f"{i}.png")
    with pytest.raises(UsageError, match="at least one must stay good"):
        fit_from(calibrated_run, add_anomalies=folder, added_annotation="label", epochs=1,
                 run_dir=tmp_path / "new", progress=False)
