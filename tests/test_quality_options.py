"""The options added for detection quality on real data: optimiser and schedule,
seen anomalies as themselves, synthesis settings, H x W inputs, map smoothing, the
prototype-only model and the held-out validation fold."""

import csv
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from prn import api
from prn.anomalies.augment import mild_augment, sample_aug1
from prn.anomalies.compose import AnomalyGenerator, BalancedBatchSampler, TrainingSet, texture_for
from prn.anomalies.extended import make_extended
from prn.checkpoint import load_checkpoint
from prn.config import PRNConfig
from prn.presets import PRESETS
from prn.data.sample import Sample
from prn.data.split import Split, hold_out_validation
from prn.errors import DataError
from prn.baselines.prototype_map import build_prototype_map
from prn.model.network import PRN
from prn.model.scoring import smooth_map
from prn.model.prototypes import residual_map
from prn.train import lr_at, make_optimizer, param_groups, val_score


# ---------------------------------------------------------------- config


def test_seen_slots_are_taken_from_the_anomaly_slots_and_keep_the_batch_size():
    assert PRNConfig(batch_size=16).training.batch_slots == (8, 4, 4, 0)
    assert PRNConfig(batch_size=16, seen_fraction=0.125).training.batch_slots == (8, 3, 3, 2)
    assert PRNConfig(batch_size=16, seen_fraction=0.25).training.batch_slots == (8, 2, 2, 4)
    assert sum(PRNConfig(batch_size=64, seen_fraction=0.1).training.batch_slots) == 64


def test_the_final_real_epochs_fill_every_anomaly_slot_with_seen_anomalies():
    training = PRNConfig(batch_size=16, seen_fraction=0.125, epochs=10, final_real_epochs=3).training
    assert [training.at_epoch(e).batch_slots for e in (0, 6, 7, 9)] == [(8, 3, 3, 2), (8, 3, 3, 2),
                                                                        (8, 0, 0, 8), (8, 0, 0, 8)]
    assert PRNConfig(epochs=2, final_real_epochs=5).training.at_epoch(0).batch_slots[1:3] == (0, 0)
    assert PRNConfig(epochs=2).training.at_epoch(1) == PRNConfig(epochs=2).training


def test_a_fit_draws_its_final_epochs_from_the_real_seen_anomalies(demo_root, tiny_config, tmp_path, monkeypatch):
    import prn.train
    kinds = {}

    class Recording(prn.train.BalancedBatchSampler):
        def __iter__(self):
            for batch in super().__iter__():
                kinds.setdefault(self.epoch, set()).update(kind for kind, _, _ in batch)
                yield batch

    monkeypatch.setattr(prn.train, "BalancedBatchSampler", Recording)
    cfg = tiny_config(demo_root, tmp_path, seen_anomalies=3, val_anomalies=0, seen_fraction=0.125,
                      epochs=3, final_real_epochs=1)
    api.fit(cfg, run_dir=tmp_path / "run", progress=False)
    assert kinds == {0: {"normal", "extended", "simulated", "seen"}, 1: {"normal", "extended", "simulated", "seen"},
                     2: {"normal", "seen"}}


def test_input_size_is_square_unless_image_hw_is_set():
    assert PRNConfig(image_size=128).model.input_hw == (128, 128)
    assert PRNConfig(image_size=128, image_hw=(320, 128)).model.input_hw == (320, 128)
    with pytest.raises(ValueError, match="image_hw"):
        PRNConfig(image_hw=(100, 64))


@pytest.mark.parametrize("change", [dict(optimizer="sgd"), dict(lr_schedule="step"), dict(map_sigma=-1),
                                    dict(seen_fraction=0.9), dict(select_epoch="first"), dict(val_every=-1),
                                    dict(normal_flips="lr+ud"),
                                    dict(output_bias_prior=1.0), dict(gray_textures="maybe"),
                                    dict(perlin_min_scale=3, perlin_max_scale=3), dict(target_size=(0.5, 0.2)),
                                    dict(final_real_epochs=-1), dict(stroke_share=1.5), dict(stroke_width=(0, 2)),
                                    dict(stroke_width=(3, 2)),
                                    dict(strokes="yes"), dict(stroke_gate=0.5), dict(stroke_width=3),
                                    dict(stroke_width=("a", 2))])
def test_new_settings_refuse_values_outside_their_range(change):
    with pytest.raises(ValueError, match="invalid PRN config"):
        PRNConfig(**change)


@pytest.mark.parametrize("name, value", [("target_size", 0.5), ("target_size", ["a", "b"]), ("stroke_width", 3),
                                         ("image_hw", "ab"), ("decoder_channels", 7),
                                         ("attention_patch_divisors", None)])
def test_list_settings_that_are_not_lists_of_numbers_get_the_configs_message(name, value):
    # a config from Python or a hand-written file: the message names the setting, never a TypeError,
    # and says nothing else (the default stands in for the value while the other checks run)
    with pytest.raises(ValueError, match=rf"^invalid PRN config: {name} must be a list of [a-z ]*numbers, got "
                                         rf"{re.escape(repr(value))}$"):
        PRNConfig(**{name: value})


def test_validation_anomalies_default_to_three_tenths_of_the_seen_ones():
    assert [PRNConfig(seen_anomalies=k).data.val_anomaly_count() for k in (0, 1, 5, 10)] == [0, 0, 1, 3]
    assert PRNConfig(seen_anomalies=10, val_anomalies=2).data.val_anomaly_count() == 2


def test_the_paper_preset_keeps_the_papers_optimiser():
    cfg = PRNConfig().replace(**PRESETS["paper"])
    assert (cfg.training.optimizer, cfg.training.lr, cfg.training.weight_decay, cfg.training.lr_schedule, cfg.model.map_sigma) == ("adam", 1e-4, 1e-2, "constant", 0.0)


def test_the_fast_cpu_preset_is_the_cpu_preset_without_attention_or_strokes_in_native_precision():
    cpu, fast = PRNConfig().replace(**PRESETS["cpu"]), PRNConfig().replace(**PRESETS["cpu-fast"])
    assert cpu.model.use_attention and not fast.model.use_attention
    assert (cpu.training.precision, fast.training.precision) == ("32", "auto")
    assert (cpu.synthesis.strokes, fast.synthesis.strokes) == ("auto", "off")
    assert (cpu.model.resize_detail, fast.model.resize_detail) == ("auto", "auto")
    assert fast.replace(use_attention=True, precision="32", strokes="auto").to_dict() == cpu.to_dict()


def test_the_cpu_presets_smooth_the_map_but_score_the_map_before_it():
    """The paper's default scores and draws one unsmoothed map; the cpu presets smooth what is
    drawn and measured, and keep the paper's image score."""
    paper = PRNConfig().replace(**PRESETS["paper"])
    assert (paper.model.map_sigma, paper.model.score_smoothed) == (0.0, True)
    for name in ("cpu", "cpu-fast"):
        cfg = PRNConfig().replace(**PRESETS[name])
        assert cfg.model.map_sigma > 0 and cfg.model.score_smoothed is False


# ---------------------------------------------------------------- split


def _samples(n, label, kind="good"):
    return [Sample(Path(f"/d/{kind}_{i}.png"), Path(f"/d/{kind}_{i}_mask.png") if label else None, label, kind)
            for i in range(n)]


def _split(n_normal=40, n_seen=10):
    return Split(train_normal=_samples(n_normal, 0), train_anomalous=_samples(n_seen, 1, "crack"),
                 test=_samples(5, 1, "test"), dataset="mvtec", category="x", k=n_seen, seed=0)


def test_validation_fold_is_taken_from_training_data_only_and_is_disjoint():
    split = _split()
    held = hold_out_validation(split, 3, 0.1, 2, seed=0)
    assert len(held.val_anomalous) == 3 and len(held.train_anomalous) == 7
    assert len(held.val_normal) == 4 and len(held.train_normal) == 36
    assert not set(held.val_normal) & set(held.train_normal)
    assert not set(held.val_anomalous) & set(held.train_anomalous)
    assert set(held.val_normal) | set(held.train_normal) == set(split.train_normal)
    assert held.test == split.test


def test_validation_fold_is_the_same_for_the_same_seed_and_differs_for_another():
    a = hold_out_validation(_split(), 3, 0.1, 2, seed=0)
    b = hold_out_validation(_split(), 3, 0.1, 2, seed=0)
    c = hold_out_validation(_split(), 3, 0.1, 2, seed=1)
    assert a.val_normal == b.val_normal and a.val_anomalous == b.val_anomalous
    assert a.val_normal != c.val_normal


def test_validation_fold_respects_its_minimum_and_leaves_small_sets_alone():
    assert len(hold_out_validation(_split(n_normal=100), 0, 0.01, 8, seed=0).val_normal) == 8
    assert hold_out_validation(_split(n_normal=12), 0, 0.1, 8, seed=0).val_normal == []


def test_holding_out_every_seen_anomaly_is_refused():
    with pytest.raises(DataError, match="val_anomalies"):
        hold_out_validation(_split(n_seen=2), 2, 0.1, 2, seed=0)


def test_validation_fold_survives_a_round_trip_through_split_json(tmp_path):
    held = hold_out_validation(_split(), 3, 0.1, 2, seed=0)
    held.save(tmp_path / "split.json")
    back = Split.load(tmp_path / "split.json")
    assert back.val_normal == held.val_normal and back.val_anomalous == held.val_anomalous


# ---------------------------------------------------------------- optimiser


def test_learning_rate_warms_up_then_follows_a_cosine_down_to_one_percent():
    cfg = PRNConfig(lr=1e-3, lr_schedule="cosine", warmup_fraction=0.1)
    rates = [lr_at(s, 100, cfg) for s in range(100)]
    assert rates[0] == pytest.approx(1e-4) and rates[9] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(rates[9:], rates[10:]))
    assert rates[-1] == pytest.approx(1e-5, rel=0.05)
    assert lr_at(50, 100, PRNConfig(lr=1e-3)) == 1e-3


def _tiny_prn(**kw):
    cfg = PRNConfig(backbone="tf_efficientnet_lite0", backbone_weights="random", image_size=64,
                    decoder_channels=(16, 16, 8, 8), **kw)
    return PRN.from_config(cfg.model), cfg


def test_adamw_decays_weights_but_not_norms_or_biases():
    model, cfg = _tiny_prn(optimizer="adamw", weight_decay=0.1)
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() > 1 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(model.trainable_parameters())
    assert isinstance(make_optimizer(model, cfg), torch.optim.AdamW)


def test_output_bias_prior_starts_every_pixel_near_that_probability():
    model, _ = _tiny_prn(output_bias_prior=0.01)
    assert model.decoder.head.bias.item() == pytest.approx(math.log(0.01 / 0.99))


def test_val_score_prefers_higher_validation_figures_and_ignores_missing_ones():
    assert val_score({"val_pixel_ap": 0.5, "val_image_auroc": 0.9}) > val_score({"val_pixel_ap": 0.4, "val_image_auroc": 0.9})
    assert val_score({"val_pixel_ap": math.nan, "val_image_auroc": 0.7}) == pytest.approx(0.7)
    assert val_score({}) == -math.inf


# ---------------------------------------------------------------- anomalies


def _stripes(h=64, w=64):
    img = np.zeros((h, w, 3), np.uint8)
    img[:, ::4] = 200
    return img


def _defect(h=64, w=64):
    img = np.full((h, w, 3), 90, np.uint8)
    mask = np.zeros((h, w), bool)
    mask[20:44, 30:33] = True
    img[mask] = 250
    return img, mask


def test_seen_slots_show_the_seen_defect_itself():
    cfg = PRNConfig(image_size=64, batch_size=8, seen_fraction=0.25)
    image, mask = _defect()
    gen = AnomalyGenerator(cfg, [(image, mask)], "texture")
    data = TrainingSet([_stripes()], gen, cfg)
    batch = next(iter(BalancedBatchSampler(1, cfg, seed=0, epoch=0)))
    kinds = [k for k, _, _ in batch]
    assert kinds.count("seen") == 2
    item = data[next(key for key in batch if key[0] == "seen")]
    assert item["kind"] == "seen"
    got = item["mask"][0].numpy() > 0.5
    # a mild move keeps the crack's size (within the scale range) and its look
    assert 0.7 * mask.sum() <= got.sum() <= 1.3 * mask.sum()
    pixels = (item["image"].permute(1, 2, 0).numpy() * 255)[got].mean()
    assert pixels > 200


def test_mild_augmentation_moves_the_mask_with_the_defect():
    image, mask = _defect()
    for seed in range(5):
        out, moved = mild_augment(image, mask, np.random.default_rng(seed))
        assert out.shape == image.shape and moved.shape == mask.shape and moved.any()
        bright = out.astype(int).mean(axis=2) > 170
        assert (bright & moved).sum() >= 0.8 * moved.sum()


def test_colour_operations_are_drawn_with_their_probability():
    rng = np.random.default_rng(0)
    counts = [len(sample_aug1(rng, 2, 0.5)) for _ in range(400)]
    assert 0.8 < np.mean(counts) < 1.2
    assert all(len(sample_aug1(rng, 2, 1.0)) == 2 for _ in range(20))
    assert all(len(sample_aug1(rng, 2, 0.0)) == 0 for _ in range(20))


def test_unclipped_extended_anomalies_keep_the_defect_whole():
    normal = np.full((64, 64, 3), 60, np.uint8)
    image, mask = _defect()
    target = np.zeros((64, 64), bool)
    target[28:36, 28:36] = True  # far smaller than the crack
    rng = np.random.default_rng(0)
    _, clipped = make_extended(normal, image, mask, target, 0.0, rng, aug1_ops=0, max_angle=0)
    _, whole = make_extended(normal, image, mask, target, 0.0, np.random.default_rng(0), aug1_ops=0,
                             max_angle=0, clip_to_target=False)
    assert clipped.sum() <= target.sum()
    assert whole.sum() > target.sum() and whole.sum() >= 0.8 * mask.sum()


def test_textures_are_gray_on_gray_data_and_cropped_to_the_image():
    rng = np.random.default_rng(0)
    colour = rng.integers(0, 256, size=(96, 96, 3), dtype=np.uint8)
    gray = texture_for(colour, (96, 48), gray=True)
    assert gray.shape == (96, 48, 3)
    assert (gray[..., 0] == gray[..., 1]).all() and (gray[..., 1] == gray[..., 2]).all()
    assert not (texture_for(colour, (96, 48), gray=False)[..., 0] == gray[..., 0]).all()


# ---------------------------------------------------------------- model and maps


def test_smoothing_spreads_a_peak_and_keeps_its_mass():
    amap = torch.zeros(1, 1, 33, 33)
    amap[0, 0, 16, 16] = 1.0
    out = smooth_map(amap, 2.0)
    assert out[0, 0, 16, 16] < 0.1 and out[0, 0, 16, 18] > 0
    assert out.sum().item() == pytest.approx(1.0, abs=1e-3)
    assert torch.equal(smooth_map(amap, 0.0), amap)


def test_prn_runs_on_non_square_inputs():
    model, _ = _tiny_prn(image_hw=(64, 128))
    x = torch.rand(4, 3, 64, 128)
    model.fit_prototypes([x])
    out = model.eval()(x)
    assert out["anomaly_map"].shape == (4, 1, 64, 128)
    assert model.train()(x).shape == (4, 1, 64, 128)


def test_prototype_map_is_the_residual_alone_and_zero_on_a_prototype():
    cfg = PRNConfig(backbone="tf_efficientnet_lite0", backbone_weights="random", image_size=64,
                    prototype_ratio=1.0, top_k=5)
    model = build_prototype_map(cfg).eval()
    x = torch.rand(3, 3, 64, 64)
    model.fit_prototypes([x])  # ratio 1: every image is its own prototype
    out = model(x)
    assert out["anomaly_map"].abs().max().item() < 1e-5
    y = torch.rand(2, 3, 64, 64)
    feats = model.encoder(y)
    expected = residual_map(model.prototypes.residuals(feats), (64, 64))
    assert torch.allclose(model(y)["anomaly_map"], expected, atol=1e-5)
    assert (model(y)["pred_score"] > 0).all()


# ---------------------------------------------------------------- end to end


def test_prototype_only_model_fits_without_training_and_tests(demo_root, tiny_config, tmp_path):
    cfg = tiny_config(demo_root, tmp_path)
    run = api.fit(cfg, run_dir=tmp_path / "protos", progress=False, model="prototypes")
    assert load_checkpoint(run)["model"] == "prototypes"
    metrics = api.test(run, progress=False, overlays=2)
    # the demo's defects are bright blobs on a smooth pattern: residuals alone must find them
    assert metrics["pixel_auroc"] > 0.8


@pytest.mark.parametrize("kind", ["prototypes", "patchcore"])
def test_unsupervised_fit_is_the_same_whatever_ran_before_it(kind, demo_root, tiny_config, tmp_path):
    # the tiny config's encoder has random weights: drawn from the global generator, they made
    # the model depend on what the process had drawn before (the test above failed one run in six)
    cfg = tiny_config(demo_root, tmp_path)
    states = []
    for draw in (1, 1000):
        torch.rand(draw)
        run = api.fit(cfg, run_dir=tmp_path / f"{kind}{draw}", progress=False, model=kind)
        states.append(load_checkpoint(run)["state_dict"])
    assert states[0].keys() == states[1].keys()
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_fit_writes_validation_metrics_per_epoch_and_keeps_the_best_epoch(demo_root, tiny_config, tmp_path):
    cfg = tiny_config(demo_root, tmp_path, seen_anomalies=3, val_anomalies=1, val_normal_fraction=0.2,
                      val_normal_min=2, select_epoch="best", optimizer="adamw", lr_schedule="cosine",
                      warmup_fraction=0.2, output_bias_prior=0.01, seen_fraction=0.25, map_sigma=1.0)
    run = api.fit(cfg, run_dir=tmp_path / "run", progress=False)
    split = Split.load(run / "split.json")
    assert len(split.val_anomalous) == 1 and len(split.val_normal) == 2 and len(split.train_anomalous) == 2
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    assert all(0 <= float(r["val_pixel_ap"]) <= 1 for r in rows)
    scores = [val_score({k: float(v) for k, v in r.items() if k.startswith("val_")}) for r in rows]
    kept = load_checkpoint(run / "checkpoints" / "model.pt")
    assert kept["extra"]["selected_epoch"] == 1 + int(np.argmax(scores))
    assert load_checkpoint(run / "checkpoints" / "last.pt")["epoch"] == 3
    assert kept["epoch"] == kept["extra"]["selected_epoch"] and kept["config"]["model"]["map_sigma"] == 1.0
    assert "pixel_auroc" in api.test(run, progress=False, overlays=0)


def test_scoring_the_fold_less_often_changes_the_curve_and_the_time_not_the_model(demo_root, tiny_config, tmp_path):
    fitted = {}
    for every in (1, 2, 0):
        cfg = tiny_config(demo_root, tmp_path, epochs=3, val_normal_min=4, val_every=every)
        run = api.fit(cfg, run_dir=tmp_path / f"every{every}", progress=False)
        rows = list(csv.DictReader((run / "metrics.csv").open()))
        fitted[every] = (load_checkpoint(run / "checkpoints" / "model.pt"), rows,
                         json.loads((run / "calibration.json").read_text()))
        # scored after every N-th epoch and always after the last, whose outputs set the threshold
        scored = [int(r["epoch"]) for r in rows if r["val_image_auroc"]]
        assert scored == {1: [1, 2, 3], 2: [2, 3], 0: [3]}[every]
    for every in (2, 0):
        a, b = fitted[1][0]["state_dict"], fitted[every][0]["state_dict"]
        assert all(torch.equal(a[k], b[k]) for k in a)
        assert fitted[every][2] == fitted[1][2]
        assert fitted[every][1][-1]["val_pixel_ap"] == fitted[1][1][-1]["val_pixel_ap"]


def test_best_is_picked_among_the_epochs_scored(demo_root, tiny_config, tmp_path):
    cfg = tiny_config(demo_root, tmp_path, epochs=3, val_normal_min=4, val_every=2, select_epoch="best")
    run = api.fit(cfg, run_dir=tmp_path / "run", progress=False)
    assert load_checkpoint(run / "checkpoints" / "model.pt")["extra"]["selected_epoch"] in (2, 3)


def test_keep_aspect_sets_the_input_size_from_the_images(tmp_path):
    from PIL import Image

    from prn.runs import resolve_input_size
    path = tmp_path / "a.png"
    Image.new("RGB", (460, 1130)).save(path)
    split = Split(train_normal=[Sample(path, None, 0, "good")], train_anomalous=[], test=[],
                  dataset="folder", category="", k=0, seed=0)
    cfg = resolve_input_size(PRNConfig(image_size=512, keep_aspect=True), split)
    assert cfg.model.input_hw == (512, 224)


def test_a_non_square_run_writes_maps_at_each_images_original_size(demo_root, tiny_config, tmp_path):
    from PIL import Image
    cfg = tiny_config(demo_root, tmp_path, image_hw=(64, 96), epochs=1)
    run = api.fit(cfg, run_dir=tmp_path / "run", progress=False)
    inputs = tmp_path / "in"
    inputs.mkdir()
    Image.fromarray(np.full((50, 130, 3), 120, np.uint8)).save(inputs / "wide.png")
    out = api.predict(run, inputs, tmp_path / "out", progress=False).out_dir
    amap = np.load(out / "maps" / "wide.png.npy")
    assert amap.shape == (50, 130)
