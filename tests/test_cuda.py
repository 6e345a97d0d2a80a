"""The CUDA path. Each test runs twice: on the CPU everywhere, and on CUDA where a GPU is present.
The CPU run keeps these tests in step with the calls they make: while they ran on CUDA alone
(skipped on every machine without a GPU) they drifted from the API and failed on the first GPU
lent to the project. The comparisons between devices mean something on CUDA only; on the CPU
they compare the CPU with itself and check that the code they call still runs."""

import pytest
import torch

from prn import api
from prn.model.network import PRN

DEVICES = pytest.mark.parametrize("device", [
    "cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))])


@DEVICES
def test_prn_gives_the_same_maps_on_cuda_as_on_the_cpu(tiny_config, demo_root, tmp_path, device):
    cfg = tiny_config(demo_root, tmp_path)
    torch.manual_seed(0)
    model = PRN.from_config(cfg.model).eval()
    model.fit_prototypes([torch.rand(4, 3, 64, 64)])
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        cpu = model(x)["anomaly_map"]
        other = model.to(device)(x.to(device))["anomaly_map"].cpu()
    assert torch.allclose(cpu, other, atol=1e-3)


@DEVICES
def test_fit_test_and_predict_run_on_cuda(tiny_config, demo_root, tmp_path, device):
    cfg = tiny_config(demo_root, tmp_path, device=device, epochs=1)
    run = api.fit(cfg, run_dir=tmp_path / "run", progress=False)
    metrics = api.test(run, progress=False, overlays=1)
    assert 0.0 <= metrics["image_auroc"] <= 1.0 and metrics["seconds_per_image"] > 0
    good = demo_root / "demo" / "test" / "good"
    summary = api.predict(run, good, tmp_path / "pred", progress=False)
    assert summary.csv.is_file() and summary.n_errors == 0
    assert summary.n_images == len(list(good.iterdir())) == len(summary.csv.read_text().splitlines()) - 1


@DEVICES
@pytest.mark.parametrize("precision", ["bf16", "16"])
def test_mixed_precision_fit_and_test_run_on_cuda(tiny_config, demo_root, tmp_path, precision, device):
    from prn.checkpoint import load_checkpoint
    if device == "cpu" and precision == "16":
        pytest.skip("float16 trains on CUDA only")
    cfg = tiny_config(demo_root, tmp_path, device=device, epochs=2, precision=precision)
    run = api.fit(cfg, run_dir=tmp_path / "run", progress=False)
    payload = load_checkpoint(run / "checkpoints" / "last.pt")
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in payload["history"] if "loss" in r)
    assert ("grad_scaler" in payload["extra"]) == (precision == "16")  # loss scaling is resumable
    metrics = api.test(run, progress=False, overlays=0)
    assert 0.0 <= metrics["image_auroc"] <= 1.0


@DEVICES
@pytest.mark.parametrize("precision", ["bf16", "16"])
def test_mixed_precision_maps_on_cuda_stay_close_to_float32(tiny_config, demo_root, tmp_path, precision, device):
    from prn.precision import inference_autocast
    cfg = tiny_config(demo_root, tmp_path, map_sigma=2.0)
    torch.manual_seed(0)
    model = PRN.from_config(cfg.model).eval().to(device)
    model.fit_prototypes([torch.rand(4, 3, 64, 64)])
    x = torch.rand(2, 3, 64, 64, device=device)
    with torch.no_grad():
        full = model(x)
        with inference_autocast(torch.device(device), precision):  # float16 runs in float32 on the CPU
            half = model(x)
    assert half["anomaly_map"].dtype == half["pred_score"].dtype == torch.float32
    assert (half["anomaly_map"] - full["anomaly_map"]).abs().max() < 0.05


@DEVICES
@pytest.mark.parametrize("stride", [4, 2])
def test_a_memory_of_seen_defects_built_on_cuda_scores_as_on_the_cpu(tiny_config, demo_root, tmp_path, stride, device):
    import numpy as np

    from prn.data.split import Split
    from prn.deploy.loading import load_model
    from prn.infer import predict_samples
    cfg = tiny_config(demo_root, tmp_path, device=device, epochs=1, val_normal_min=4, defect_memory="on",
                      defect_memory_stride=stride)
    run = api.fit(cfg, run_dir=tmp_path / "run", progress=False)
    test = Split.load(run / "split.json").test
    scores = {}
    for where in (device, "cpu"):
        loaded = load_model(run, device=where)
        assert loaded.model.defect_memory.built
        scores[where] = predict_samples(loaded.model, test, loaded.cfg.model.input_hw, batch_size=4,
                                        device=torch.device(where)).scores
    assert np.allclose(scores[device], scores["cpu"], atol=1e-3)
