"""benchmarks/throughput.py and benchmarks/gpu_check.py, on the CPU at tiny sizes: the GPU check
must work the first time a session is lent a GPU, so every part it can run here is run here."""

import json
from pathlib import Path

import pytest
import torch
from conftest import load_script

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def load(name, monkeypatch):
    return load_script(BENCHMARKS / f"{name}.py", monkeypatch)  # gpu_check imports throughput beside it


def test_throughput_measures_training_and_inference_per_precision(monkeypatch):
    throughput = load("throughput", monkeypatch)
    result = throughput.measure("cpu", "tf_efficientnet_lite0", 64, train_batch=4, train_steps=1,
                                infer_batches=[1, 2], infer_repeats=1, precisions=["32", "bf16", "16"])
    # float16 trains on CUDA only, so the CPU run leaves it out rather than failing
    assert [r["precision"] for r in result["train"]] == ["32", "bf16"]
    assert [(r["precision"], r["batch"]) for r in result["infer"]] == [("32", 1), ("32", 2), ("bf16", 1), ("bf16", 2)]
    assert all(r["images_per_s"] > 0 and "peak_memory_mb" not in r for r in result["train"] + result["infer"])
    assert "| train | bf16 | 4 |" in throughput.markdown(result)


def test_a_training_step_changes_the_weights_it_is_timed_on(monkeypatch):
    throughput = load("throughput", monkeypatch)
    model, cfg = throughput.make_model("tf_efficientnet_lite0", 64, torch.device("cpu"))
    before = [p.detach().clone() for p in model.trainable_parameters()]
    throughput.train_throughput(model, cfg, torch.device("cpu"), "32", batch=2, steps=1)
    assert any(not torch.equal(a, p) for a, p in zip(before, model.trainable_parameters()))


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_the_gpu_check_dry_run_writes_every_part_to_one_json_file(tmp_path, monkeypatch):
    gpu_check = load("gpu_check", monkeypatch)
    out = tmp_path / "gpu_check.json"
    report = gpu_check.main(["--cpu", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    for part in ("environment", "cuda_tests", "throughput", "ddp", "fit_precisions"):
        assert report[part]["ok"], report[part].get("traceback")
    assert "skipped" in report["cuda_tests"]["summary"] or not torch.cuda.is_available()
    ddp = report["ddp"]
    assert ddp["one_process"]["train_images_per_s_by_epoch"] and ddp["two_processes"]["train_images_per_s_by_epoch"]
    assert 0 <= ddp["max_abs_weight_difference"] < ddp["max_abs_weight"]
    for precision in ("32", "bf16"):
        fitted = report["fit_precisions"][precision]
        assert fitted["train_images_per_s_by_epoch"] and fitted["phases_seconds"]["training"] > 0
        assert sum(fitted["phases_seconds"].values()) <= fitted["wall_seconds"]
