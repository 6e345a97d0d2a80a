"""End-to-end behaviour of fit / resume / test / predict on a tiny synthetic dataset."""

import csv
import json

import numpy as np
import pytest
import torch

from prn import api
from prn.checkpoint import load_checkpoint
from prn.cli import main
from prn.config import PRNConfig
from prn.errors import TrainingError
from prn.train import train


def state(result):
    return {k: v.detach().clone() for k, v in result.model.state_dict().items()}


def test_a_resumed_run_ends_with_the_same_weights_as_an_uninterrupted_one(demo_root, tiny_config, tmp_path):
    cfg = tiny_config(demo_root, tmp_path)
    split = api.make_split(cfg)
    full = state(train(cfg, split, tmp_path / "full", progress=False))

    train(cfg, split, tmp_path / "cut", progress=False, stop_after_epoch=lambda e: e == 1)
    after_one = load_checkpoint(tmp_path / "cut" / "checkpoints" / "last.pt")
    assert after_one["epoch"] == 1
    resumed = state(train(cfg, split, tmp_path / "cut", resume=True, progress=False))

    assert full.keys() == resumed.keys()
    for k in full:
        assert torch.equal(full[k], resumed[k]), k
    # epochs 2 and 3 did change the weights, so the equality above is not vacuous
    assert any(not torch.equal(after_one["state_dict"][k], v) for k, v in full.items())


@pytest.mark.parametrize("ending", ["early return", "error"])
def test_the_fit_s_data_workers_stop_with_it(ending, demo_root, tiny_config, tmp_path, monkeypatch):
    # one DataLoader serves every epoch (prn.anomalies.compose.EpochBatches), its workers reading
    # ahead; a fit that ends before its last batch, by a hook or by an error whose traceback still
    # holds the fit's frame, must not leave them running
    import multiprocessing
    import prn.train as train_module
    cfg = tiny_config(demo_root, tmp_path, epochs=3, num_workers=2)
    split = api.make_split(cfg)
    if ending == "early return":
        assert train(cfg, split, tmp_path / "run", progress=False, stop_after_epoch=lambda e: e == 1).epoch == 1
    else:
        real_loss = train_module.prn_loss
        monkeypatch.setattr(train_module, "prn_loss", lambda *a, **k: (real_loss(*a, **k)[0] * float("nan"), {}))
        with pytest.raises(TrainingError, match="nan") as raised:
            train(cfg, split, tmp_path / "run", progress=False)
        assert raised.tb is not None  # the fit's frame is still referenced here
    assert multiprocessing.active_children() == []


def test_same_seed_data_and_config_give_the_same_metrics(demo_root, tiny_config, tmp_path):
    cfg = tiny_config(demo_root, tmp_path, epochs=2)
    results = []
    for name in ("a", "b"):
        run = api.fit(cfg, run_dir=tmp_path / name, progress=False)
        results.append(api.test(run, progress=False, overlays=0))
    for key in ("image_auroc", "pixel_auroc", "pro", "pixel_ap"):
        a, b = results[0][key], results[1][key]
        assert (np.isnan(a) and np.isnan(b)) or abs(a - b) <= 1e-6, key


def test_a_non_finite_loss_stops_training_and_keeps_the_last_good_checkpoint(demo_root, tiny_config, tmp_path, monkeypatch):
    import prn.train as train_module
    cfg = tiny_config(demo_root, tmp_path, epochs=3)
    split = api.make_split(cfg)
    real_loss, calls = train_module.prn_loss, {"n": 0}

    def loss_that_explodes(logits, mask, training, weight=None):
        calls["n"] += 1
        total, parts = real_loss(logits, mask, training, weight)
        return (total * float("nan"), parts) if calls["n"] > training.steps_per_epoch else (total, parts)

    monkeypatch.setattr(train_module, "prn_loss", loss_that_explodes)
    with pytest.raises(TrainingError, match="nan"):
        train(cfg, split, tmp_path / "run", progress=False)
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["epoch"] == 1


def test_run_folder_records_config_split_versions_and_results(demo_root, tiny_config, tmp_path):
    cfg = tiny_config(demo_root, tmp_path, epochs=1)
    run = api.fit(cfg, run_dir=tmp_path / "run", progress=False)
    metrics = api.test(run, progress=False, overlays=2)
    for name in ("config.yaml", "split.json", "environment.json", "checkpoints/last.pt",
                 "results.json", "results.md", "predictions/scores.csv"):
        assert (run / name).is_file(), name
    assert PRNConfig.load(run / "config.yaml") == cfg
    env = (run / "environment.json").read_text()
    assert torch.__version__ in env and "torchvision" in env
    from prn.allocator import in_use
    assert json.loads(env)["allocator"] == in_use()  # this process's: pytest is not re-executed
    assert 0.0 <= metrics["image_auroc"] <= 1.0 and metrics["n_test"] == 4 + 6 - 2
    assert len(list((run / "images").glob("*.png"))) == 2


def test_cli_fit_test_and_predict_write_scores_and_maps_at_original_size(demo_root, tiny_config, tmp_path):
    cfg = tiny_config(demo_root, tmp_path, epochs=1)
    cfg.save(tmp_path / "cfg.yaml")
    run = tmp_path / "run"
    assert main(["fit", "--config", str(tmp_path / "cfg.yaml"), "--run-dir", str(run), "--quiet", "--test"]) == 0
    images = demo_root / "demo" / "test"
    out = tmp_path / "pred"
    assert main(["predict", str(run), str(images), "--out", str(out), "--quiet"]) == 0
    rows = list(csv.DictReader(open(out / "scores.csv")))
    n_images = len([p for p in images.rglob("*.png")])
    assert len(rows) == n_images
    first = next(images.rglob("*.png"))
    rel = first.relative_to(images)
    amap = np.load(out / "maps" / f"{rel}.npy")  # maps keep the full name: a.png and a.jpg differ
    from PIL import Image
    w, h = Image.open(first).size
    assert amap.shape == (h, w) and amap.dtype == np.float32
