"""Run folders and checkpoints written before the config had sections still load.

The fixture (tests/fixtures/v0_1_flat, see its README) holds a flat config.yaml and the plain
fields of a checkpoint (flat config, calibration, history) as prn 0.1.0 wrote them, with the name
and shape of every tensor of its state dict."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from prn import registry
from prn.checkpoint import FORMAT, FORMAT_VERSION
from prn.config import PRNConfig
from prn.deploy.loading import load_model
from prn.deploy.predict import Predictor, predict_folder

FIXTURE = Path(__file__).parent / "fixtures" / "v0_1_flat"


def flat_config() -> dict:
    return yaml.safe_load((FIXTURE / "config.yaml").read_text())


def test_a_flat_config_yaml_loads_into_its_sections():
    flat = flat_config()
    cfg = PRNConfig.load(FIXTURE / "config.yaml")
    assert "model" not in flat and flat["top_k"] == 10  # it is the old, flat form
    assert cfg.model.top_k == 10 and cfg.model.image_size == 64 and cfg.data.dataset == "demo"
    assert cfg.training.epochs == 1 and cfg.runtime.eval_batch_size == 8
    assert cfg.model.decoder_channels == (16, 16, 8, 8)
    assert cfg.flat() == {k: v for k, v in cfg.flat().items()}
    for key, value in flat.items():
        if key in ("residual_prior", "select_map_sigma", "checkpoint_every"):
            continue  # options removed since; their "off" values load
        assert cfg.flat()[key] == value, key


def test_a_flat_config_with_a_removed_option_switched_on_is_refused_with_the_reason():
    flat = dict(flat_config(), residual_prior=True)
    with pytest.raises(ValueError, match="residual_prior=True is no longer supported"):
        PRNConfig.from_dict(flat)


def test_the_sectioned_config_round_trips_through_yaml(tmp_path):
    cfg = PRNConfig.load(FIXTURE / "config.yaml")
    cfg.save(tmp_path / "config.yaml")
    written = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert set(written) == {"data", "model", "synthesis", "training", "calibration", "patchcore", "runtime"}
    assert PRNConfig.load(tmp_path / "config.yaml") == cfg


def old_checkpoint(tmp_path: Path, demo_root: Path) -> Path:
    """A checkpoint file with the old payload (flat config) around weights of today's network."""
    meta = json.loads((FIXTURE / "checkpoint_meta.json").read_text())
    config = dict(meta["config"], root=str(demo_root))
    model = registry.build(meta["model"], PRNConfig.from_dict(config), pretrained=False)
    state = model.state_dict()
    shapes = {k: list(v.shape) for k, v in state.items()}
    # Every tensor of the old checkpoint has its place in today's network, with its shape (the
    # prototypes take whatever K the checkpoint has, so theirs are copied as stored), except the
    # encoder's blocks past its last tap (Lite0's 1/32 stages), cut since: the file keeps their
    # weights, which the load must skip.
    kept = len(model.encoder.body.blocks)
    cut = {k for k in meta["state_dict_shapes"] if k.startswith("encoder.body.blocks.")
           and int(k.split(".")[3]) >= kept}
    assert kept == 5 and {k.split(".")[3] for k in cut} == {"5", "6"}
    # the memory of seen defects came later: the old file has none, and loads into an empty one
    added = {"defect_memory.features", "defect_memory.standard"}
    assert set(shapes) - added == set(meta["state_dict_shapes"]) - cut
    for key in added:
        del state[key]
    for key, shape in meta["state_dict_shapes"].items():
        if key.startswith("prototypes."):
            state[key] = torch.rand(shape).contiguous(memory_format=torch.channels_last)
        elif key in cut:
            state[key] = torch.rand(shape)
        else:
            assert shapes[key] == shape, key
    payload = {k: meta[k] for k in ("format", "format_version", "prn_version", "model", "config",
                                    "epoch", "history", "extra", "calibration")}
    payload.update(config=config, state_dict=state, optimizer=None)
    assert payload["format"] == FORMAT and payload["format_version"] == FORMAT_VERSION
    path = tmp_path / "model.pt"
    torch.save(payload, path)
    return path


def test_an_old_checkpoint_loads_predicts_and_decides_with_its_calibration(tmp_path, demo_root):
    path = old_checkpoint(tmp_path, demo_root)
    loaded = load_model(path, device="cpu")
    assert loaded.kind == "prn" and loaded.cfg.model.top_k == 10
    assert loaded.calibration["image_threshold"] == json.loads(
        (FIXTURE / "checkpoint_meta.json").read_text())["calibration"]["image_threshold"]
    summary = predict_folder(Predictor(path, device="cpu"), demo_root / "demo" / "test", tmp_path / "out",
                             maps="none", progress=False)
    rows = (tmp_path / "out" / "scores.csv").read_text().splitlines()[1:]
    assert summary.n_images == len(rows) == 10 and summary.n_errors == 0
    threshold = loaded.calibration["image_threshold"]
    for row in rows:
        path_, score, normalized, prediction = row.split(",")[:4]
        assert math.isfinite(float(score)) and int(prediction) == int(float(score) >= threshold)
        assert 0.0 <= float(normalized) <= 1.0


def test_a_checkpoint_keeps_no_runtime_settings(calibrated_run):
    payload = torch.load(calibrated_run / "checkpoints" / "model.pt", weights_only=True)
    assert "runtime" not in payload["config"] and "model" in payload["config"]
    assert not {"device", "num_workers", "output_dir", "eval_batch_size"} & set(
        k for section in payload["config"].values() for k in section)
    # the run folder's config.yaml keeps them, so the run can be repeated as it was
    assert yaml.safe_load((calibrated_run / "config.yaml").read_text())["runtime"]["device"] == "cpu"
    assert np.isfinite(payload["calibration"]["image_threshold"])
