"""`prn benchmark --jobs J`: categories side by side, one process each, one combined report."""

import json
import shutil

import pytest

from prn.benchmark import job_devices, run_benchmark
from prn.cli import main
from prn.data.demo import make_demo_dataset
from prn.errors import UsageError

from test_benchmark import tiny


def test_jobs_take_the_cuda_devices_in_turn_or_the_cpu_or_the_one_asked_for():
    assert job_devices(5, "auto", 2) == ["cuda:0", "cuda:1", "cuda:0", "cuda:1", "cuda:0"]
    assert job_devices(3, "auto", 0) == ["cpu"] * 3
    assert job_devices(2, "cuda:1", 4) == ["cuda:1", "cuda:1"]


def test_jobs_must_be_positive_and_do_not_combine_with_torchrun(tmp_path, monkeypatch):
    cfg = tiny(tmp_path, tmp_path)
    with pytest.raises(UsageError, match="--jobs must be >= 1"):
        run_benchmark(cfg, jobs=0, out_dir=tmp_path / "t")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(UsageError, match="under torchrun"):
        run_benchmark(cfg, jobs=2, out_dir=tmp_path / "t")


@pytest.fixture
def three_categories(tmp_path):
    """demo and demo2 (copies of the demo category) and broken, whose training image is no image."""
    root = tmp_path / "data"
    make_demo_dataset(root, seed=1, n_train=8, n_test_good=3, n_test_defect=4, size=64)
    shutil.copytree(root / "demo", root / "demo2")
    (root / "broken" / "train" / "good").mkdir(parents=True)
    (root / "broken" / "train" / "good" / "000.png").write_bytes(b"not a png")
    for sub in ("test", "ground_truth"):
        shutil.copytree(root / "demo" / sub, root / "broken" / sub)
    return root


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_failed_category_is_reported_and_the_others_finish(three_categories, tmp_path, capsys):
    config = tmp_path / "tiny.yaml"
    tiny(three_categories, tmp_path).save(config)
    out = tmp_path / "table"
    assert main(["benchmark", "--config", str(config), "--jobs", "2", "--out", str(out), "--quiet"]) == 1
    printed = capsys.readouterr()
    assert "| demo |" in printed.out and "| demo2 |" in printed.out
    assert "1 of 3 jobs failed (broken: DataError:" in printed.err and "000.png" in printed.err
    results = json.loads((out / "results.json").read_text())
    assert sorted(results["categories"]) == ["demo", "demo2"]
    # the same data, seed and config in separate processes give the same metrics
    assert results["categories"]["demo"]["image_auroc"] == results["categories"]["demo2"]["image_auroc"]
    assert "not an image file" in json.loads((out / "failed.json").read_text())["broken"]
    assert "## Failed" in (out / "results.md").read_text()
    for cat in ("demo", "demo2"):
        assert (out / "runs" / "prn" / cat / "checkpoints" / "model.pt").is_file()
        assert (out / "jobs" / f"prn__{cat}.log").is_file()
