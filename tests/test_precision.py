"""`--precision {32,bf16,16,auto}`: autocast where it runs, float32 where rounding would change results."""

import contextlib

import numpy as np
import pytest
import torch

from prn import api
from prn.checkpoint import load_checkpoint
from prn.cli import main
from prn.config import PRNConfig
from prn.errors import ExitStatus, UsageError
from prn.model.network import PRN
from prn.precision import autocast, check_precision, inference_autocast

CPU = torch.device("cpu")


def test_float16_training_needs_cuda_and_unknown_precisions_are_refused():
    check_precision("bf16", CPU)
    with pytest.raises(UsageError, match="precision 16 .* needs CUDA"):
        check_precision("16", CPU)
    with pytest.raises(UsageError, match="precision must be one of"):
        check_precision("8", CPU)
    with pytest.raises(ValueError, match="precision must be 32, bf16, 16 or auto"):
        PRNConfig(precision="fp8")
    assert PRNConfig(precision=16).training.precision == "16"  # YAML reads `precision: 16` as a number


def test_a_float16_model_predicts_in_float32_on_the_cpu_and_bf16_autocasts_there():
    with inference_autocast(CPU, "16"):
        assert not torch.is_autocast_enabled("cpu")
    with inference_autocast(CPU, "bf16"):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    with autocast(CPU, "32"):
        assert not torch.is_autocast_enabled("cpu")


def _fitted_model(tiny_config, demo_root, tmp_path, **kw) -> PRN:
    torch.manual_seed(0)
    model = PRN.from_config(tiny_config(demo_root, tmp_path, **kw).model).eval()
    model.fit_prototypes([torch.rand(8, 3, 64, 64, generator=torch.Generator().manual_seed(1))])
    return model


@torch.no_grad()
def test_bf16_inference_keeps_maps_scores_and_nearest_prototypes_in_float32(tiny_config, demo_root, tmp_path):
    model = _fitted_model(tiny_config, demo_root, tmp_path, map_sigma=2.0)
    x = torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    full = model(x)
    with inference_autocast(CPU, "bf16"):
        half = model(x)
        _, residuals = model.skips_and_residuals(x.contiguous(memory_format=torch.channels_last))
    # bfloat16 maps or scores (8-bit mantissa) would round scores into ties
    assert half["anomaly_map"].dtype == half["pred_score"].dtype == torch.float32
    assert all(r.dtype == torch.float32 for r in residuals)
    assert (half["anomaly_map"] - full["anomaly_map"]).abs().max() < 0.05
    assert len(set(half["pred_score"].tolist())) == 4


class FixedFeatures(torch.nn.Module):
    def __init__(self, feats):
        super().__init__()
        self.feats = feats

    def forward(self, x):
        return self.feats


@torch.no_grad()
def test_nearest_prototypes_are_chosen_in_float32_under_autocast(tiny_config, demo_root, tmp_path):
    """Each image's features lie almost as near (1e-5 relative) to a second prototype as to its
    nearest: distances in bfloat16 pick the wrong one about half the time; PRN picks as in float32."""
    model = _fitted_model(tiny_config, demo_root, tmp_path)
    g = torch.Generator().manual_seed(0)
    feats, protos = [], []
    for c, r in zip(model.encoder.channels, model.encoder.reductions):
        f = torch.randn(6, c, 64 // r, 64 // r, generator=g) + 30
        d = 0.5 * torch.randn(f.shape, generator=g)
        twin = d.flatten(1)[:, torch.randperm(d[0].numel(), generator=g)].view_as(d) * (1 + 1e-5) ** 0.5
        feats.append(f.contiguous(memory_format=torch.channels_last))
        protos.append(torch.stack([f + d, f + twin], dim=1).flatten(0, 1))
    model.prototypes.set(protos)
    model.encoder = FixedFeatures(feats)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the case is one bfloat16 gets wrong
        wrong = model.prototypes.residuals_and_indices(feats)[1]
    assert any((i != 2 * torch.arange(6)).any() for i in wrong)
    x = torch.zeros(6, 3, 64, 64)
    _, full = model.skips_and_residuals(x)
    with inference_autocast(CPU, "bf16"):
        _, half = model.skips_and_residuals(x)
    assert all(torch.equal(a, b) for a, b in zip(full, half))


def test_a_bf16_fit_on_the_cpu_trains_tests_and_records_its_precision(tiny_config, demo_root, tmp_path):
    cfg = tiny_config(demo_root, tmp_path, epochs=1, precision="bf16")
    run = api.fit(cfg, run_dir=tmp_path / "run", progress=False)
    payload = load_checkpoint(run / "checkpoints" / "last.pt")
    assert payload["config"]["training"]["precision"] == "bf16"
    assert np.isfinite(payload["history"][-1]["loss"])
    assert all(v.dtype != torch.bfloat16 for v in payload["state_dict"].values())  # weights stay float32
    metrics = api.test(run, progress=False, overlays=0)
    assert 0.0 <= metrics["image_auroc"] <= 1.0


def test_cli_precision_flag_sets_the_config_and_16_on_the_cpu_is_a_usage_error(tiny_config, demo_root, tmp_path, capsys):
    config = tmp_path / "tiny.yaml"
    tiny_config(demo_root, tmp_path, epochs=1).save(config)
    status = main(["fit", "--config", str(config), "--precision", "16", "--run-dir", str(tmp_path / "run"),
                   "--quiet"])
    assert status == ExitStatus.USAGE
    assert "precision 16 (float16 with loss scaling) needs CUDA" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # refused before any work


def test_auto_precision_is_bf16_only_where_the_device_computes_it_natively(monkeypatch):
    from prn import precision as prec
    cpu = torch.device("cpu")
    for flags, want in ((set(), "32"), ({"avx512f", "avx512bw"}, "32"), ({"avx512_bf16"}, "bf16"),
                        ({"amx_bf16", "amx_tile"}, "bf16")):
        monkeypatch.setattr(prec, "_cpu_flags", lambda flags=flags: frozenset(flags))
        assert prec.resolve_precision("auto", cpu) == want
        assert prec.resolve_precision("32", cpu) == "32" and prec.resolve_precision("bf16", cpu) == "bf16"
    monkeypatch.setattr(prec, "_cpu_flags", lambda: frozenset())
    assert isinstance(prec.autocast(cpu, "auto"), contextlib.nullcontext)   # float32 there


def test_fit_writes_the_precision_auto_resolved_to(demo_root, tiny_config, tmp_path, monkeypatch):
    from prn import precision as prec
    monkeypatch.setattr(prec, "_cpu_flags", lambda: frozenset())
    cfg = tiny_config(demo_root, tmp_path, precision="auto", epochs=1, steps_per_epoch=1)
    run = api.fit(cfg, run_dir=tmp_path / "run", progress=False)
    assert PRNConfig.load(run / "config.yaml").training.precision == "32"
