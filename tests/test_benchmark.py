"""Every table of the paper is a command: each runs end to end on a tiny fixture."""

import json

import pytest

from prn.benchmark import ABLATIONS, _slug, run_benchmark
from prn.cli import main
from prn.config import PRNConfig
from prn.data.demo import make_demo_dataset


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    make_demo_dataset(root, seed=1, n_train=8, n_test_good=3, n_test_defect=12, size=64)  # table7 needs 10 seen
    return root


def tiny(root, out, **kw):
    base = dict(dataset="demo", root=str(root), image_size=64, seen_anomalies=1,
                backbone="tf_efficientnet_lite0", backbone_weights="random", epochs=1, batch_size=4,
                steps_per_epoch=1, eval_batch_size=8, attention_dim=4, decoder_channels=(8, 8, 8, 8),
                prototype_ratio=0.25, kmeans_max_iter=5, output_dir=str(out), top_k=10, device="cpu",
                patchcore_max_bank=2000, num_workers=0)
    base.update(kw)
    return PRNConfig(**base)


@pytest.mark.parametrize("model", ["prn", "patchcore"])
def test_dataset_table_has_a_row_per_category_and_a_mean_row(root, tmp_path, model):
    table = run_benchmark(tiny(root, tmp_path), model=model, out_dir=tmp_path / "t", progress=False)
    assert "| demo |" in table and "| mean |" in table
    results = json.loads((tmp_path / "t" / "results.json").read_text())
    row = results["categories"]["demo"]
    assert 0 <= row["image_auroc"] <= 1 and row["seconds_per_image"] > 0
    assert (tmp_path / "t" / "results.csv").is_file() and (tmp_path / "t" / "results.md").is_file()


def test_prn_and_patchcore_are_tested_on_the_same_images(root, tmp_path):
    for model in ("prn", "patchcore"):
        run_benchmark(tiny(root, tmp_path), model=model, out_dir=tmp_path / model, progress=False)
    splits = [json.loads((tmp_path / m / "runs" / m / "demo" / "split.json").read_text()) for m in ("prn", "patchcore")]
    assert splits[0]["test"] == splits[1]["test"]


@pytest.mark.parametrize("ablation", sorted(ABLATIONS))
def test_each_ablation_table_runs_every_variant_with_its_switches(root, tmp_path, ablation):
    out = tmp_path / ablation
    assert main(["benchmark", "--config", _save(tiny(root, tmp_path), tmp_path), "--ablation", ablation,
                 "--out", str(out), "--quiet"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert list(results["categories"]) == [name for name, _ in ABLATIONS[ablation]]
    for name, changes in ABLATIONS[ablation]:
        used = PRNConfig.load(out / "runs" / _slug(name) / "demo" / "config.yaml")
        assert all(used.flat()[k] == v for k, v in changes.items()), name
    assert "| mean |" not in (out / "results.md").read_text()


def test_an_ablation_leaves_the_presets_memory_out_and_keeps_one_asked_for(root, tmp_path):
    for mode, want in (("auto", "off"), ("on", "on")):
        out = tmp_path / mode
        run_benchmark(tiny(root, tmp_path, defect_memory=mode, seen_anomalies=3), ablation="table6", out_dir=out,
                      progress=False)
        for name, _ in ABLATIONS["table6"]:
            assert PRNConfig.load(out / "runs" / _slug(name) / "demo" / "config.yaml").model.defect_memory == want


def _save(cfg, tmp_path):
    path = tmp_path / "cfg.yaml"
    cfg.save(path)
    return str(path)
