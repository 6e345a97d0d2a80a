"""benchmarks/image_score_study.py: every rule computed from a run's maps, and the position rules
(a map judged against where the training good parts light up)."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import load_script

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "image_score_study.py"


@pytest.fixture
def study(monkeypatch):
    return load_script(SCRIPT, monkeypatch)


def test_a_spot_where_good_parts_light_up_counts_less_than_the_same_spot_elsewhere(study):
    goods = np.zeros((20, 32, 32), np.float32)
    goods[:, 4, 4] = np.linspace(0.5, 0.7, 20)  # every good part is bright at one place (an edge, a mark)
    stats = study.position_stats(goods)
    assert stats["max"][6, 6] == pytest.approx(0.7)  # widened over the 5 x 5 around it
    assert stats["max"][20, 20] == 0
    there, elsewhere = torch.zeros(2, 32, 32), torch.zeros(2, 32, 32)
    there[:, 4, 4], elsewhere[:, 20, 20] = 0.8, 0.8
    for key, maps in study.position_maps(torch.cat([there, elsewhere]), stats).items():
        assert maps[0].max() < maps[2].max(), key
    # where goods are all 0 the standardised map is the map over the floor of the deviation
    z = study.position_maps(elsewhere, stats)["train_z"]
    assert z[0, 20, 20] == pytest.approx(0.8 / 0.02, rel=1e-3)


def test_a_line_mean_ranks_a_thin_crack_above_a_speck_of_as_many_pixels(study):
    kernels = study.line_kernels(9)
    assert kernels.shape == (study.ANGLES, 1, 9, 9)
    torch.testing.assert_close(kernels.sum(dim=(1, 2, 3)), torch.ones(study.ANGLES))
    crack, speck = torch.zeros(1, 1, 48, 48), torch.zeros(1, 1, 48, 48)
    for i in range(16):  # a diagonal crack of 16 pixels at 0.5
        crack[0, 0, 10 + i, 10 + i] = 0.5
    speck[0, 0, 20:24, 20:24] = 0.5  # a 4 x 4 speck, also 16 pixels at 0.5
    line_crack, line_speck = study.line_mean(crack, 9), study.line_mean(speck, 9)
    assert line_crack.shape == (1, 48, 48)
    assert line_crack.max() == pytest.approx(0.5)  # the segment lies along the crack
    assert line_speck.max() < 0.6 * line_crack.max()  # at most 4 of a segment's 7 to 11 pixels


def test_the_study_judges_every_rule_on_a_run(study, calibrated_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(calibrated_run, run)  # the study caches its outputs in the run folder
    out = tmp_path / "rules.json"
    assert study.main([str(run), "--json", str(out)]) == 0
    table = json.loads(out.read_text())
    paper = table["top-100 (paper)"][str(run)]
    assert 0 <= paper["calibrated_frr"] <= 1 and 0 <= paper["image_auroc"] <= 1
    for rule in ("top-100 of the map less the training goods' largest",
                 "top-100 of the map standardised per pixel on the training goods",
                 "max of the 17-pixel line mean", "mean of the top-100 logits"):
        assert set(table[rule][str(run)]) == set(paper)
    assert (run / "study" / "outputs.npz").is_file()


def test_each_rule_is_judged_at_the_threshold_the_runs_own_tail_sets(study):
    from prn.deploy.calibrate import image_threshold
    rng = np.random.default_rng(0)
    n_val, n_test = 30, 200
    part = np.array(["val"] * n_val + ["test"] * n_test)
    label = np.r_[np.zeros(n_val), np.zeros(n_test - 20), np.ones(20)].astype(int)
    d = {"part": part, "label": label, "kind": np.where(label == 1, "crack", "good")}
    scores = np.r_[rng.beta(2, 20, n_val + n_test - 20), rng.beta(8, 4, 20)]
    test_goods = scores[(part == "test") & (label == 0)]
    for tail in ("gumbel", "gumbel_logit", "conformal", "normal"):
        t, _ = image_threshold(scores[:n_val], 0.01, tail, score_bound=1.0)
        row = study.judge(d, scores, 0.01, tail)
        assert row["calibrated_frr"] == pytest.approx(np.mean(test_goods >= t)), tail
    # a score that is not a probability (a z-score) has no logit: the Gumbel tail judges it
    z = (scores - scores[:n_val].mean()) / scores[:n_val].std()
    assert study.judge(d, z, 0.01, "gumbel_logit") == study.judge(d, z, 0.01, "gumbel")


def test_the_study_scores_the_map_the_runs_own_score_reads(study, calibrated_run, tmp_path, monkeypatch):
    """A run that smooths its map but scores it before smoothing (the cpu presets): the study's
    top-k rule must be the run's own image score, not the top-k of the smoothed map."""
    import dataclasses

    from prn.data.datasets import ImageDataset
    from prn.data.split import Split
    from prn.deploy.loading import load_model
    run = tmp_path / "run"
    shutil.copytree(calibrated_run, run)

    def smoothing_run(path, **kw):
        loaded = load_model(path, **kw)
        loaded.model.cfg = dataclasses.replace(loaded.model.cfg, map_sigma=2.0, score_smoothed=False)
        return loaded
    monkeypatch.setattr(study, "load_model", smoothing_run)
    data = study.outputs(run)
    loaded = smoothing_run(run, device="cpu")
    split = Split.load(run / "split.json")
    samples = split.val_normal + split.val_anomalous + split.test
    batch = torch.stack([ImageDataset(samples, loaded.cfg.model.input_hw)[i]["image"] for i in range(len(samples))])
    with torch.no_grad():
        out = loaded.model(batch)
    k = int(data["top_k"])
    assert np.allclose(data["prn"][:, :k].mean(1), out["pred_score"].numpy(), atol=1e-6)
    assert not np.allclose(out["anomaly_map"].flatten(1).topk(k).values.mean(1).numpy(), out["pred_score"].numpy())
    assert str(data["scored"]) == "raw"
