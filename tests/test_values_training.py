"""Training and benchmark by value: a briefly trained PRN and PatchCore find the demo's defects
far better than a random map would, and each epoch trains on its own batches.

A random map scores pixel AUROC 0.5 and PRO about 0.15 (its overlap equals its false-positive
rate); the thresholds below sit well above that and below what the models reach (PRN: pixel
AUROC 0.81-0.98 and PRO 0.56-0.94 on two demo seeds; PatchCore 0.94-0.95 and 0.69-0.74).
"""

import json

import pytest

from prn import api
from prn.benchmark import run_benchmark
from prn.data.demo import make_demo_dataset


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo16")
    make_demo_dataset(root, seed=0, n_train=12, n_test_good=6, n_test_defect=10, size=64)
    return root


def test_a_briefly_trained_prn_beats_a_random_map_by_a_margin(demo, tiny_config, tmp_path):
    cfg = tiny_config(demo, tmp_path, backbone_weights="imagenet", seen_anomalies=4, epochs=5,
                      steps_per_epoch=4, lr=3e-3)
    run = api.fit(cfg, run_dir=tmp_path / "run", progress=False)
    metrics = api.test(run, progress=False, overlays=0)
    assert metrics["n_test"] == 6 + 10 - 4
    assert metrics["pixel_auroc"] >= 0.7
    assert metrics["pro"] >= 0.35


def test_patchcore_benchmark_row_beats_a_random_map_by_a_margin(demo, tiny_config, tmp_path):
    cfg = tiny_config(demo, tmp_path, backbone_weights="imagenet", seen_anomalies=4)
    run_benchmark(cfg, model="patchcore", out_dir=tmp_path / "bench", progress=False)
    row = json.loads((tmp_path / "bench" / "results.json").read_text())["categories"]["demo"]
    assert row["image_auroc"] >= 0.9
    assert row["pixel_auroc"] >= 0.85
    assert row["pro"] >= 0.5


def test_each_epoch_trains_on_its_own_batches(demo_root, tiny_config, tmp_path, monkeypatch):
    import prn.train as train_module
    seen = {}

    class Recording(train_module.BalancedBatchSampler):
        def __iter__(self):
            batches = list(super().__iter__())
            seen.setdefault(self.epoch, []).extend(batches)
            return iter(batches)

    monkeypatch.setattr(train_module, "BalancedBatchSampler", Recording)
    cfg = tiny_config(demo_root, tmp_path, epochs=2)
    train_module.train(cfg, api.make_split(cfg), tmp_path / "run", progress=False)
    assert sorted(seen) == [0, 1]
    assert seen[0] and seen[1] and seen[0] != seen[1]
    seeds = [[key[-1] for batch in seen[e] for key in batch if key[0] != "normal"] for e in (0, 1)]
    assert not set(seeds[0]) & set(seeds[1])      # no anomaly is generated twice
