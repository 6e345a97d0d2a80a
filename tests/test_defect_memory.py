"""The memory of the seen defects: its distances, its gate, its score, its checkpoints, and the
fit and calibrate paths that build it."""

import json
import shutil

import numpy as np
import pytest
import torch

from prn import api
from prn.checkpoint import load_checkpoint
from prn.cli import main as cli_main
from prn.config import PRNConfig
from prn.deploy.calibrate import calibrate_run
from prn.errors import UsageError
from prn.model import defect_memory as defect_memory_module
from prn.model.backbone import create_encoder
from prn.model.defect_memory import (FUSED_SCALE, NEAR_GATE, DefectMemory, memory_scores, memory_summary,
                                     nearest_distance, pixel_features, remember)
from prn.model.network import PRN

SIZE = 64


def smooth_images(n, seed):
    """Smooth random pictures: noise blown up, so that they differ as parts would."""
    g = torch.Generator().manual_seed(seed)
    small = torch.rand(n, 3, 8, 8, generator=g)
    return torch.nn.functional.interpolate(small, size=(SIZE, SIZE), mode="bilinear", align_corners=False)


def with_square(images, corner):
    """The images with one white 10 x 10 square each, at ``corner`` (row, col) + 6 px per image,
    and the squares' masks: defects that look alike."""
    images, masks = images.clone(), torch.zeros(len(images), 1, SIZE, SIZE)
    for i in range(len(images)):
        r, c = corner[0] + 6 * i, corner[1]
        images[i, :, r:r + 10, c:c + 10] = 1.0
        masks[i, :, r:r + 10, c:c + 10] = 1
    return images, masks


def build(**changes):
    torch.manual_seed(0)
    cfg = PRNConfig(backbone="tf_efficientnet_lite0", backbone_weights="random", image_size=SIZE, top_k=10, **changes)
    model = PRN(create_encoder("tf_efficientnet_lite0", "random"), cfg.model).eval()
    model.fit_prototypes([smooth_images(8, seed=1)])
    return model


@pytest.fixture(scope="module")
def model_and_parts():
    model = build()
    goods = smooth_images(6, seed=2)
    seen, masks = with_square(smooth_images(4, seed=3), (4, 8))
    with torch.no_grad():
        good_scores = model(goods)["pred_score"]
    return model, goods, good_scores, seen, masks


def test_nearest_distance_is_the_smallest_euclidean_distance_whatever_the_chunk():
    g = torch.Generator().manual_seed(0)
    query, bank = torch.randn(50, 16, generator=g) + 3, torch.randn(37, 16, generator=g) + 3
    want = torch.cdist(query, bank).min(dim=1).values
    for chunk, rows in ((5, 7), (37, 4096), (1024, 13)):
        torch.testing.assert_close(nearest_distance(query, bank, chunk=chunk, rows=rows), want, atol=1e-4, rtol=1e-4)


@pytest.mark.filterwarnings("ignore:`torch.jit.trace` is deprecated:FutureWarning")
def test_a_traced_match_cuts_only_the_bank_and_holds_for_other_query_sizes():
    g = torch.Generator().manual_seed(1)
    bank = torch.randn(600, 8, generator=g)  # three blocks of at most 256 in a graph
    traced = torch.jit.trace(lambda q: nearest_distance(q, bank), torch.randn(50, 8, generator=g))
    for n in (1, 50, 5000):
        query = torch.randn(n, 8, generator=g)
        torch.testing.assert_close(traced(query), torch.cdist(query, bank).min(dim=1).values, atol=1e-4, rtol=1e-4)


def test_pixel_features_join_the_quarter_and_eighth_maps_at_a_quarter():
    feats = [torch.rand(2, 4, 16, 16), torch.rand(2, 6, 8, 8), torch.rand(2, 9, 4, 4)]
    f = pixel_features(feats)
    assert f.shape == (2, 10, 16, 16)
    # the 1/4 part is the 3 x 3 mean of the 1/4 map
    torch.testing.assert_close(f[0, :4, 5, 5], feats[0][0, :, 4:7, 4:7].mean(dim=(1, 2)))


def test_pixel_features_at_half_put_the_half_map_beside_the_others_up_sampled():
    feats = [torch.rand(2, 4, 16, 16), torch.rand(2, 6, 8, 8), torch.rand(2, 9, 4, 4)]
    half = torch.rand(2, 3, 32, 32)
    f = pixel_features(feats, half)
    assert f.shape == (2, 13, 32, 32)
    torch.testing.assert_close(f[0, :3, 5, 5], half[0, :, 4:7, 4:7].mean(dim=(1, 2)))  # its 3 x 3 mean
    up = torch.nn.functional.interpolate(pixel_features(feats), size=(32, 32), mode="bilinear", align_corners=False)
    torch.testing.assert_close(f[:, 3:], up)


def test_a_memory_at_stride_2_matches_the_half_map_and_keeps_a_spread_subset(model_and_parts, monkeypatch):
    """defect_memory_stride 2: the bank is of 1/2-map features (the encoder's 16 channels there
    beside its 24 + 40 up-sampled), cut to MAX_FEATURES by a greedy k-center subset, and the score
    fuses the match of each test image's 1/2 map; without that map the memory refuses to fuse."""
    _, goods, _, seen, masks = model_and_parts
    model = build(defect_memory_stride=2)
    assert model.defect_memory.stride == 2 and not model.defect_memory.needs_half  # empty: nothing to match
    with torch.no_grad():
        good_scores = model(goods)["pred_score"]
    whole = remember(model, seen, masks, goods, good_scores, mode="on", gate=0.9)
    assert whole["features"] > 30
    bank = model.defect_memory.features.clone()  # every masked pixel's feature at 1/2
    monkeypatch.setattr(defect_memory_module, "MAX_FEATURES", 30)
    found = remember(model, seen, masks, goods, good_scores, mode="on", gate=0.9)
    assert found["used"] and found["features"] == 30 and model.defect_memory.needs_half and found["stride"] == 2
    assert memory_summary(found).startswith("defect memory kept (30 features at 1/2 of the input)")
    assert model.defect_memory.features.shape == (30, model.encoder.half_channels + 24 + 40)
    # the 30 kept are the greedy k-center subset of the whole bank: spread over it, not its first 30
    from prn.baselines.patchcore import greedy_coreset
    torch.testing.assert_close(model.defect_memory.features, bank[greedy_coreset(bank, 30)])
    assert not torch.equal(model.defect_memory.features, bank[:30])
    x = torch.cat([goods[:2], with_square(smooth_images(1, seed=9), (30, 30))[0]])
    with torch.no_grad():
        fused = model(x)["pred_score"]
        taps, half = model.encoder(x, half=True)
        residuals = model.prototypes.residuals([t.float() for t in taps])
        memory = memory_scores(taps, residuals, model.defect_memory.features, half)
        m = model.defect_memory.standard
        with pytest.raises(ValueError, match="1/2 map"):
            model.defect_memory.fuse(fused, taps, residuals)
        model.defect_memory.clear()
        plain = model(x)["pred_score"]
    torch.testing.assert_close(fused, torch.sigmoid(((plain - m[0]) / m[1] + (memory - m[2]) / m[3]) / FUSED_SCALE))
    assert fused[2] > fused[:2].max()  # the remembered look, in a new place


@pytest.mark.parametrize("stride", [3, 1, 8])
def test_config_refuses_a_memory_stride_other_than_4_or_2(stride):
    with pytest.raises(ValueError, match="defect_memory_stride must be 4 or 2"):
        PRNConfig(defect_memory_stride=stride)


def test_memory_is_built_fused_into_the_score_and_kept_by_the_gate(model_and_parts):
    model, goods, good_scores, seen, masks = model_and_parts
    found = remember(model, seen, masks, goods, good_scores, mode="on", gate=0.9)
    assert found["used"] and model.defect_memory.built and found["features"] > 0
    assert 0 <= found["loo_auroc"] <= 1
    x = torch.cat([goods[:2], with_square(smooth_images(1, seed=9), (30, 30))[0]])
    with torch.no_grad():
        fused = model(x)["pred_score"]
        taps = model.encoder(x)
        residuals = model.prototypes.residuals([t.float() for t in taps])
        memory = memory_scores(taps, residuals, model.defect_memory.features)
    m = model.defect_memory.standard
    model.defect_memory.clear()
    with torch.no_grad():
        plain = model(x)["pred_score"]
    want = torch.sigmoid(((plain - m[0]) / m[1] + (memory - m[2]) / m[3]) / FUSED_SCALE)
    torch.testing.assert_close(fused, want)
    # the held-out goods' statistics: PRN's scores and the memory's of the same images
    assert m[0].item() == pytest.approx(good_scores.double().mean().item(), rel=1e-5)
    # a new part with the remembered look scores above the good parts
    assert fused[2] > fused[:2].max()
    # "auto" keeps the memory exactly when the leave-one-out AUROC reaches the gate
    auroc = found["loo_auroc"]
    kept = remember(model, seen, masks, goods, good_scores, mode="auto", gate=max(auroc, 1e-3))
    assert kept["used"] and model.defect_memory.built
    assert auroc < 1  # (0.875 here) so that a gate above it exists
    left = remember(model, seen, masks, goods, good_scores, mode="auto", gate=auroc + 1e-6)
    assert not left["used"] and not model.defect_memory.built and "below the gate" in left["why"]
    # left out a hair under the gate: the summary says how to try the memory anyway
    assert left["near_gate"] and "defect-memory on" in memory_summary(left) and "prn compare" in memory_summary(left)
    assert not kept["near_gate"] and "prn compare" not in memory_summary(kept)  # kept: nothing to add
    far = remember(model, seen, masks, goods, good_scores, mode="auto", gate=auroc + 2 * NEAR_GATE)
    assert not far["near_gate"] and "prn compare" not in memory_summary(far)
    assert "near_gate" not in found  # "on" was asked for: no gate decided anything


def test_too_few_marked_defects_build_no_memory(model_and_parts):
    model, goods, good_scores, seen, masks = model_and_parts
    empty = masks.clone()
    empty[1:] = 0  # three of the four masks mark nothing
    found = remember(model, seen, empty, goods, good_scores, mode="on", gate=0.9)
    assert not found["used"] and found["loo_auroc"] is None and "at least 2" in found["why"]
    assert not model.defect_memory.built


def test_checkpoints_without_a_memory_load_empty_and_other_missing_keys_still_fail(model_and_parts):
    model, goods, good_scores, seen, masks = model_and_parts
    remember(model, seen, masks, goods, good_scores, mode="on", gate=0.9)
    state = model.state_dict()
    fresh = build()
    fresh.load_state_dict(state)
    assert fresh.defect_memory.built
    torch.testing.assert_close(fresh.defect_memory.features, model.defect_memory.features)
    older = {k: v for k, v in state.items() if not k.startswith("defect_memory.")}
    fresh = build()
    fresh.load_state_dict(older)
    assert not fresh.defect_memory.built
    broken = dict(older)
    broken.pop(next(k for k in broken if k.startswith("decoder.")))
    with pytest.raises(RuntimeError, match="Missing key"):
        build().load_state_dict(broken)


def test_a_memory_refuses_bad_shapes():
    with pytest.raises(ValueError, match="defect memory needs"):
        DefectMemory().set(torch.rand(0, 4), torch.rand(4))
    with pytest.raises(ValueError, match="defect memory needs"):
        DefectMemory().set(torch.rand(3, 4), torch.rand(3))


@pytest.mark.parametrize("changes", [{"tiles": 2, "image_size": 128}, {"use_prototypes": False}])
def test_config_refuses_a_memory_without_whole_images_and_prototypes(changes):
    with pytest.raises(ValueError, match="defect_memory 'on'"):
        PRNConfig(defect_memory="on", **changes)
    assert not PRNConfig(defect_memory="auto", **changes).model.memory_possible  # the preset's: left out
    with pytest.raises(ValueError, match="defect_memory must be one of"):
        PRNConfig(defect_memory="yes")
    with pytest.raises(ValueError, match="defect_memory_gate"):
        PRNConfig(defect_memory_gate=0)


def test_fit_builds_the_memory_and_calibrate_removes_and_rebuilds_it(demo_root, tiny_config, tmp_path, capsys):
    cfg = tiny_config(demo_root, tmp_path, epochs=1, steps_per_epoch=1, val_normal_min=4, defect_memory="on")
    run = api.fit(cfg, run_dir=tmp_path / "run", progress=False)
    cal = json.loads((run / "calibration.json").read_text())
    assert cal["defect_memory"]["used"] and cal["defect_memory"]["features"] > 0
    payload = load_checkpoint(run)
    assert payload["state_dict"]["defect_memory.features"].shape[0] == cal["defect_memory"]["features"]
    assert [h for h in payload["history"] if h.get("event") == "defect memory"]
    metrics = api.test(run, progress=False, overlays=0)
    assert np.isfinite(metrics["image_auroc"]) and metrics["defect_memory_kept"] == 1.0
    assert "the image score is fused with the memory of the seen defects" in (run / "results.md").read_text()
    # the threshold was set on the fused scores of the held-out goods: they sit around 0.5
    assert 0.3 < cal["image_threshold"] < 1

    assert cli_main(["calibrate", str(run), "--defect-memory", "off", "--quiet"]) in (0, None)
    payload = load_checkpoint(run)
    assert payload["state_dict"]["defect_memory.features"].numel() == 0
    assert PRNConfig.load(run / "config.yaml").model.defect_memory == "off"
    assert json.loads((run / "calibration.json").read_text())["defect_memory"]["used"] is False
    plain = api.test(run, progress=False, overlays=0)
    assert plain["defect_memory_kept"] == 0.0
    assert "was left out" in (run / "results.md").read_text()

    assert cli_main(["calibrate", str(run), "--defect-memory", "on"]) in (0, None)
    assert "defect memory kept" in capsys.readouterr().out
    assert load_checkpoint(run)["state_dict"]["defect_memory.features"].shape[0] == cal["defect_memory"]["features"]
    again = api.test(run, progress=False, overlays=0)
    assert again["image_auroc"] == pytest.approx(metrics["image_auroc"])
    assert plain["pixel_auroc"] == pytest.approx(metrics["pixel_auroc"])  # the maps are PRN's either way

    # test flips change PRN's scores, on which the memory is standardised: it is built again with them
    old_stats = load_checkpoint(run)["state_dict"]["defect_memory.standard"].clone()
    assert cli_main(["calibrate", str(run), "--test-flips", "lr", "--quiet"]) in (0, None)
    payload = load_checkpoint(run)
    assert payload["config"]["model"]["test_flips"] == "lr" and payload["config"]["model"]["defect_memory"] == "on"
    assert payload["state_dict"]["defect_memory.features"].shape[0] == cal["defect_memory"]["features"]
    assert not torch.equal(payload["state_dict"]["defect_memory.standard"], old_stats)
    assert json.loads((run / "calibration.json").read_text())["defect_memory"]["used"]

    # the memory matched at 1/2 of the input instead, on the trained run: built anew, stored, tested
    quarter = payload["state_dict"]["defect_memory.features"]
    flipped = api.test(run, progress=False, overlays=0)
    scores_before = (run / "predictions" / "scores.csv").read_text()
    assert cli_main(["calibrate", str(run), "--defect-memory-stride", "2", "--quiet"]) in (0, None)
    payload = load_checkpoint(run)
    model_config = payload["config"]["model"]
    assert model_config["defect_memory_stride"] == 2 and model_config["defect_memory"] == "on"
    assert PRNConfig.load(run / "config.yaml").model.defect_memory_stride == 2
    fine = payload["state_dict"]["defect_memory.features"]
    assert fine.shape[1] == quarter.shape[1] + 16 and fine.shape[0] > 0
    halved = api.test(run, progress=False, overlays=0)
    assert halved["defect_memory_kept"] == 1.0 and np.isfinite(halved["image_auroc"])
    assert halved["pixel_auroc"] == pytest.approx(flipped["pixel_auroc"])  # the maps are PRN's either way
    assert (run / "predictions" / "scores.csv").read_text() != scores_before  # the image scores are not


def test_a_warm_start_leaves_the_parents_memory_behind(demo_root, tiny_config, tmp_path):
    parent = api.fit(tiny_config(demo_root, tmp_path, epochs=1, steps_per_epoch=1, val_normal_min=4,
                                 defect_memory="on"), run_dir=tmp_path / "parent", progress=False)
    assert load_checkpoint(parent)["state_dict"]["defect_memory.features"].numel() > 0
    child = api.fit(tiny_config(demo_root, tmp_path, epochs=1, steps_per_epoch=1, val_normal_min=4),
                    run_dir=tmp_path / "child", progress=False, init_from=parent / "checkpoints" / "model.pt")
    assert load_checkpoint(child)["state_dict"]["defect_memory.features"].numel() == 0
    assert "defect_memory" not in json.loads((child / "calibration.json").read_text())


def test_calibrate_refuses_a_memory_for_models_without_prototypes_or_with_tiles(demo_root, tiny_config, tiled_run,
                                                                                tmp_path):
    patchcore = api.fit(tiny_config(demo_root, tmp_path, val_normal_min=4), run_dir=tmp_path / "patchcore",
                        progress=False, model="patchcore")
    with pytest.raises(UsageError, match="a defect memory is PRN's"):
        calibrate_run(patchcore, defect_memory="auto")
    tiled = tmp_path / "tiled"
    shutil.copytree(tiled_run, tiled)
    before = (tiled / "checkpoints" / "model.pt").read_bytes()
    with pytest.raises(UsageError, match="use tiles 1"):
        calibrate_run(tiled, defect_memory="on")
    assert (tiled / "checkpoints" / "model.pt").read_bytes() == before  # refused before anything was written



@pytest.mark.parametrize("changes", [{"tiles": 2, "image_size": 128}, {"use_prototypes": False}])
def test_the_presets_auto_leaves_the_memory_out_of_tiled_runs_and_the_plain_u_net(demo_root, tiny_config, tmp_path,
                                                                                  changes):
    run = api.fit(tiny_config(demo_root, tmp_path, epochs=1, steps_per_epoch=1, val_normal_min=4, defect_memory="auto",
                              **changes), run_dir=tmp_path / "run", progress=False)
    memory = json.loads((run / "calibration.json").read_text())["defect_memory"]
    assert not memory["used"] and "whole images" in memory["why"]
