"""benchmarks/defect_memory_study.py: a memory of the seen defects' features, fused with PRN's score."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import load_script

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "defect_memory_study.py"


@pytest.fixture
def study(monkeypatch):
    return load_script(SCRIPT, monkeypatch)


@pytest.mark.parametrize("normal", ["prototypes", "bank"])
def test_a_seen_defect_met_again_at_test_scores_highest_in_the_memory(study, calibrated_run, tmp_path,
                                                                      normal, capsys):
    run = tmp_path / "run"
    shutil.copytree(calibrated_run, run)  # the study caches its features in the run folder
    split = json.loads((run / "split.json").read_text())
    seen = next(s for s in split["train_anomalous"] if s["mask"])
    split["test"].append(seen)  # the very defect the memory holds: its own features are in it
    split["train_anomalous"].append(seen)  # and a second copy among the seen: each recognises the other
    (run / "split.json").write_text(json.dumps(split))
    assert study.main([str(run), "--normal", normal, "--bank", "300"]) == 0
    d = dict(np.load(run / "study" / f"defect_memory_{normal}.npz"))
    test = d["part"] == "test"
    memory = d["memory"][test]
    assert np.argmax(memory) == test.sum() - 1  # the repeated defect, far above the rest
    assert memory[-1] > 10 * np.sort(memory)[-2]
    assert d["defect_features"] > 0 and np.isfinite(d["prn"]).all()
    # leave-one-out: each seen defect against the others' memory, so only the two copies score high
    loo = d["seen_loo"]
    masked = [s for s in split["train_anomalous"] + split["val_anomalous"] if s["mask"]]
    copies = [i for i, s in enumerate(masked) if s == seen]
    assert len(copies) == 2 and len(loo) == len(masked)
    others = np.delete(loo, copies)
    assert loo[copies].min() > 10 * others.max()
    out = capsys.readouterr().out
    assert "| PRN + memory |" in out and "| PRN |" in out and "recognise one another" in out


def test_mirrored_views_remember_a_defect_met_again_mirrored(study, calibrated_run, tmp_path):
    from PIL import Image, ImageOps

    run = tmp_path / "run"
    shutil.copytree(calibrated_run, run)
    split = json.loads((run / "split.json").read_text())
    seen = next(s for s in split["train_anomalous"] if s["mask"])
    mirrored = dict(seen)  # the same defect, met again mirrored left-right and up-down
    for key, name in (("image", "mirrored.png"), ("mask", "mirrored_mask.png")):
        ImageOps.flip(ImageOps.mirror(Image.open(seen[key]))).save(tmp_path / name)
        mirrored[key] = str(tmp_path / name)
    split["test"].append(mirrored)
    (run / "split.json").write_text(json.dumps(split))
    assert study.main([str(run), "--normal", "prototypes"]) == 0
    assert study.main([str(run), "--normal", "prototypes", "--views", "mirrored"]) == 0
    plain = dict(np.load(run / "study" / "defect_memory_prototypes.npz"))
    both = dict(np.load(run / "study" / "defect_memory_prototypes_mirrored.npz"))
    assert both["defect_features"] == 4 * plain["defect_features"]  # each seen defect and its 3 mirrors
    test = both["part"] == "test"
    # the mirrored copy is now one of the memory's own features: the nearest distance falls to ~0
    assert both["memory"][test][-1] > 10 * plain["memory"][test][-1]
    assert np.argmax(both["memory"][test]) == test.sum() - 1
    assert len(both["seen_loo"]) == len(plain["seen_loo"])  # a defect's mirrors are left out with it
    np.testing.assert_allclose(both["prn"], plain["prn"], rtol=1e-5)


@pytest.mark.parametrize("features, coreset", [("half", 40), ("half-fine", 0), ("raw", 0)])
def test_other_pixel_features_find_the_defect_met_again_too(study, calibrated_run, tmp_path, features, coreset):
    """--features half (the model's memory at stride 2), half-fine, raw; --coreset cuts the bank."""
    run = tmp_path / "run"
    shutil.copytree(calibrated_run, run)
    split = json.loads((run / "split.json").read_text())
    seen = next(s for s in split["train_anomalous"] if s["mask"])
    split["test"].append(seen)
    (run / "split.json").write_text(json.dumps(split))
    cut = ["--coreset", str(coreset)] if coreset else []
    assert study.main([str(run), "--normal", "prototypes", "--features", features] + cut) == 0
    name = f"defect_memory_prototypes_{features}{f'_coreset{coreset}' if coreset else ''}.npz"
    d = dict(np.load(run / "study" / name))
    memory = d["memory"][d["part"] == "test"]
    assert np.argmax(memory) == len(memory) - 1 and memory[-1] > 3 * np.sort(memory)[-2]
    assert 0 < d["defect_features"] <= (coreset or np.inf)
    with pytest.raises(SystemExit):  # the other features are matched against the prototypes only
        study.main([str(run), "--features", features])
