"""PRN's data flow pinned by value: residuals are |F - P*| and reach the map, every skip is used.

Shape tests pass for a PRN that computes its prototypes and throws them away; these do not.
The model is tiny (random EfficientNet-Lite0 encoder, 64 px, one attention block).
"""

import dataclasses
import math
import re

import pytest
import torch

from prn.config import PRNConfig
from prn.model.backbone import create_encoder
from prn.model.network import PRN
from prn.model.prototypes import Prototypes, nearest_prototype

SIZE = 64


def images(n, seed=0):
    return torch.rand(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def build(**changes):
    base = dict(backbone="tf_efficientnet_lite0", backbone_weights="random", image_size=SIZE,
                attention_layers=1, decoder_channels=(16, 16, 8, 8), top_k=10, prototype_ratio=0.5)
    base.update(changes)
    cfg = PRNConfig(**base)
    torch.manual_seed(0)
    model = PRN(create_encoder(cfg.model.backbone, "random"), cfg.model)
    model.fit_prototypes([images(4, seed=1)])
    return model.eval()


def prototype_tensors(model):
    return [getattr(model.prototypes, n) for n in model.prototypes.names]


@torch.no_grad()
def anomaly_map(model, x):
    return model(x)["anomaly_map"]


@torch.no_grad()
def logits_of(model, x):
    """Training-mode output (logits) with every layer in eval mode (batch norm frozen)."""
    model.eval()
    model.training = True  # only PRN.forward reads this flag; its layers stay in eval mode
    try:
        return model(x)
    finally:
        model.training = False


# ---------------------------------------------------------------- prototypes and residuals

def test_nearest_prototype_is_not_always_the_first_one():
    protos = torch.stack([torch.full((2, 3, 3), v) for v in (0.0, 1.0, 5.0)])
    feats = torch.stack([torch.full((2, 3, 3), v) for v in (4.0, 0.4, 0.6, -3.0)])
    assert nearest_prototype(feats, protos).tolist() == [2, 0, 1, 0]


def test_residual_equals_distance_to_nearest_prototype():
    protos = torch.stack([torch.full((2, 3, 3), v) for v in (0.0, 1.0, 5.0)])
    feats = torch.arange(2 * 2 * 3 * 3, dtype=torch.float32).reshape(2, 2, 3, 3) / 6.0
    module = Prototypes(num_scales=1)
    module.set([protos])
    (res,) = module.residuals([feats])
    idx = nearest_prototype(feats, protos)
    assert idx.tolist() == [1, 2]  # the maps' means are 1.42 and 4.42: prototypes 1 and 5 are nearest
    torch.testing.assert_close(res, (feats - protos[idx]).abs(), rtol=0, atol=0)
    assert (res >= 0).all() and res.shape == feats.shape


def test_residuals_record_the_nearest_index_of_each_scale():
    module = Prototypes(num_scales=2)
    module.set([torch.stack([torch.zeros(1, 2, 2), torch.ones(1, 2, 2)]),
                torch.stack([torch.zeros(1, 1, 1), torch.ones(1, 1, 1)])])
    _, indices = module.residuals_and_indices([torch.ones(1, 1, 2, 2), torch.zeros(1, 1, 1, 1)])
    assert [i.tolist() for i in indices] == [[1], [0]]


def test_skip_without_fusion_or_attention_is_features_then_their_residuals():
    model = build(use_fusion=False, use_attention=False)
    x = images(2, seed=3)
    with torch.no_grad():
        feats = model.encoder(x)
        skips = model.skips(x)
    for f, p, s in zip(feats, prototype_tensors(model), skips):
        c = f.shape[1]
        assert s.shape[1] == 2 * c
        torch.testing.assert_close(s[:, :c], f, rtol=0, atol=0)
        torch.testing.assert_close(s[:, c:], (f - p[nearest_prototype(f, p)]).abs(), rtol=0, atol=0)


def test_skips_are_fused_features_beside_fused_residuals_then_attention():
    model = build()
    x = images(2, seed=3)
    with torch.no_grad():
        feats = model.encoder(x)
        residuals = [(f - p[nearest_prototype(f, p)]).abs() for f, p in zip(feats, prototype_tensors(model))]
        by_hand = [torch.cat([a, b], dim=1) for a, b in
                   zip(model.fuse_features(feats), model.fuse_residuals(residuals))]
        by_hand = model.fuse_attention(model.attention(by_hand))
        skips = model.skips(x)
    for a, b in zip(skips, by_hand):
        torch.testing.assert_close(a, b)


def test_the_output_changes_when_only_the_prototypes_change():
    model = build()
    x = images(2, seed=3)
    before = anomaly_map(model, x)
    model.prototypes.set([p + 0.5 for p in prototype_tensors(model)])  # features stay the same
    after = anomaly_map(model, x)
    assert (before - after).abs().max() > 1e-4


@pytest.mark.parametrize("scale", [0, 1, 2])
def test_the_residual_of_every_scale_reaches_the_output(scale):
    model = build()
    x = images(2, seed=3)
    before = logits_of(model, x)
    protos = prototype_tensors(model)
    protos[scale] = protos[scale] + 0.5
    model.prototypes.set(protos)
    assert (before - logits_of(model, x)).abs().max() > 1e-4


@pytest.mark.parametrize("scale", [0, 1, 2])
def test_every_skip_reaches_the_output(scale, monkeypatch):
    model = build()
    x = images(2, seed=3)
    before = logits_of(model, x)
    real_decoder = model.decoder.forward

    def perturbed(skips, size):  # the decoder receives the skips with one of them changed
        skips = list(skips)
        skips[scale] = skips[scale] + torch.randn(skips[scale].shape, generator=torch.Generator().manual_seed(1))
        return real_decoder(skips, size)

    monkeypatch.setattr(model.decoder, "forward", perturbed)
    assert (before - logits_of(model, x)).abs().max() > 1e-4


def test_an_input_equal_to_a_prototype_has_a_zero_residual():
    model = build(prototype_ratio=1.0, use_fusion=False, use_attention=False)
    x = images(4, seed=1)[2:3]  # one of the normal images the prototypes were fitted on
    with torch.no_grad():
        skips = model.skips(x)
    for s, c in zip(skips, model.encoder.channels):
        assert s[:, c:].abs().max() < 1e-5 and s[:, :c].abs().max() > 0


# ---------------------------------------------------------------- maps and scores

def test_eval_map_is_the_sigmoid_of_the_logits():
    model = build()
    x = images(2, seed=4)
    torch.testing.assert_close(anomaly_map(model, x), torch.sigmoid(logits_of(model, x)))


def test_image_score_is_the_mean_of_the_top_k_map_pixels():
    model = build(top_k=7)
    x = images(2, seed=5)
    with torch.no_grad():
        out = model(x)
    flat = out["anomaly_map"].flatten(1)
    want = flat.sort(dim=1, descending=True).values[:, :7].mean(dim=1)
    torch.testing.assert_close(out["pred_score"], want)
    assert not torch.allclose(out["pred_score"], flat.mean(dim=1))


def test_different_images_get_different_maps():
    model = build()
    m = anomaly_map(model, torch.cat([images(1, seed=6), images(1, seed=7)]))
    assert (m[0] - m[1]).abs().max() > 1e-4


# ---------------------------------------------------------------- the Prototypes module's contract

def three_scales(k=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(k, c, s, s, generator=g) for c, s in ((4, 8), (6, 4), (8, 2))]


def test_prototypes_are_stored_as_float32_channels_last_maps():
    module = Prototypes()
    module.set([p.double() for p in three_scales()])
    for name in module.names:
        p = getattr(module, name)
        assert p.dtype == torch.float32 and p.is_contiguous(memory_format=torch.channels_last), name


def test_loaded_prototypes_keep_the_channels_last_layout():
    fitted = Prototypes()
    fitted.set(three_scales(k=3))
    fresh = Prototypes()
    fresh.load_state_dict(fitted.state_dict())
    for name in fresh.names:
        p = getattr(fresh, name)
        assert p.shape[0] == 3 and p.is_contiguous(memory_format=torch.channels_last), name


def test_an_unfitted_modules_state_dict_loads_and_stays_unfitted():
    fresh = Prototypes()
    fresh.load_state_dict(Prototypes().state_dict())
    assert not fresh.fitted


def test_a_fresh_prototypes_module_is_unfitted_until_set():
    module = Prototypes()
    assert not module.fitted
    module.set(three_scales())
    assert module.fitted


def test_residuals_leave_the_module_unchanged():
    # No state assigned in forward: exported graphs (ONNX, TorchScript) then run the same code.
    module = Prototypes()
    module.set(three_scales())
    before = {k: v for k, v in vars(module).items() if not k.startswith("_")}
    buffers = {k: v.clone() for k, v in module.state_dict().items()}
    g = torch.Generator().manual_seed(1)
    module.residuals([torch.randn(2, c, s, s, generator=g) for c, s in ((4, 8), (6, 4), (8, 2))])
    assert {k: v for k, v in vars(module).items() if not k.startswith("_")} == before
    assert all(torch.equal(v, buffers[k]) for k, v in module.state_dict().items())


@pytest.mark.parametrize("bad, message", [
    (torch.zeros(4, 8, 8), r"\(K, c, h, w\).*\(4, 8, 8\)"),
    (torch.zeros(0, 4, 8, 8), r"K >= 1, got \(0, 4, 8, 8\)"),
])
def test_set_refuses_prototypes_that_are_not_k_maps(bad, message):
    protos = three_scales()
    protos[0] = bad
    with pytest.raises(ValueError, match=message):
        Prototypes().set(protos)


def test_set_refuses_a_wrong_number_of_scales():
    with pytest.raises(ValueError, match="expected 3 prototype tensors, got 2"):
        Prototypes().set(three_scales()[:2])


def test_num_prototypes_refuses_zero_images_with_the_count():
    from prn.model.prototypes import num_prototypes
    with pytest.raises(ValueError, match="at least one normal image.*got 0"):
        num_prototypes(0, 0.1)


def test_residuals_before_fitting_say_which_call_fits_them():
    with pytest.raises(RuntimeError, match=r"^prototypes are not fitted: call PRN\.fit_prototypes"):
        Prototypes().residuals([torch.zeros(1, 1, 2, 2)] * 3)


def test_residuals_at_another_image_size_name_both_map_shapes():
    module = Prototypes()
    module.set([torch.zeros(1, 1, s, s) for s in (8, 4, 2)])
    with pytest.raises(ValueError, match=r"p1 have map shape \(1, 8, 8\) but features are \(1, 16, 16\)"):
        module.residuals([torch.zeros(1, 1, s, s) for s in (16, 8, 4)])


def test_prototypes_repr_shows_each_scale_shape():
    module = Prototypes()
    module.set(three_scales(k=2))
    assert "p1=(2, 4, 8, 8), p2=(2, 6, 4, 4), p3=(2, 8, 2, 2)" in repr(module)


def test_residual_map_sums_the_channel_means_of_every_scale_at_the_image_size():
    from prn.model.prototypes import residual_map
    fine = torch.zeros(1, 2, 2, 2)
    fine[0, 0, 0, 1] = 4.0                         # channel mean 2 at row 0, column 1
    coarse = torch.full((1, 3, 1, 1), 0.5)         # channel mean 0.5 everywhere
    out = residual_map([fine, coarse], (2, 2))
    assert out.shape == (1, 1, 2, 2)
    torch.testing.assert_close(out[0, 0], torch.tensor([[0.5, 2.5], [0.5, 0.5]]))
    wide = residual_map([fine, coarse], (2, 6))    # (H, W): columns stretch, rows stay
    assert wide.shape == (1, 1, 2, 6)
    # bilinear with half-pixel centres (align_corners=False), as the decoder and resize_map use
    torch.testing.assert_close(wide[0, 0, 0], torch.tensor([0, 0, 2 / 3, 4 / 3, 2, 2]) + 0.5)
    torch.testing.assert_close(wide[0, 0, 1], torch.full((6,), 0.5))


# ---------------------------------------------------------------- output prior, smoothing, prototype-only maps

def test_output_bias_prior_shifts_every_logit_to_the_prior_probability():
    x = images(2, seed=9)
    neutral = logits_of(build(output_bias_prior=0.5), x)       # logit(0.5) = 0
    rare = logits_of(build(output_bias_prior=0.01), x)
    torch.testing.assert_close(rare - neutral, torch.full_like(rare, math.log(0.01 / 0.99)))


def test_without_a_prior_the_output_bias_keeps_its_default_initialisation():
    x = images(2, seed=9)
    assert (logits_of(build(), x) - logits_of(build(output_bias_prior=0.5), x)).abs().max() > 1e-3


def test_smooth_map_is_a_gaussian_truncated_at_four_sigma():
    from prn.model.scoring import smooth_map
    impulse = torch.zeros(1, 1, 41, 41)
    impulse[0, 0, 20, 20] = 1.0
    sigma = 2.0
    out = smooth_map(impulse, sigma)[0, 0]
    row = out[20, 20:]
    kernel_1d = torch.exp(-torch.arange(9.0) ** 2 / (2 * sigma ** 2))
    kernel_1d = kernel_1d / (2 * kernel_1d[1:].sum() + kernel_1d[0])
    torch.testing.assert_close(row[:9], kernel_1d[0] * kernel_1d, rtol=1e-4, atol=1e-7)
    assert row[8] > 0 and (row[9:] == 0).all()                 # radius round(4 sigma) = 8 px
    torch.testing.assert_close(out.sum(), torch.tensor(1.0))


@pytest.mark.parametrize("sigma", [1.0, 1.5, 4.0])
def test_smooth_map_in_two_passes_equals_torchvisions_gaussian_blur(sigma):
    """The same kernel and reflected border as torchvision's 2-D blur, at a non-square size."""
    from torchvision.transforms.v2.functional import gaussian_blur

    from prn.model.scoring import smooth_map
    amap = torch.rand(3, 1, 48, 37, generator=torch.Generator().manual_seed(1))
    k = 2 * int(4 * sigma + 0.5) + 1
    torch.testing.assert_close(smooth_map(amap, sigma), gaussian_blur(amap, [k, k], [sigma, sigma]),
                               rtol=0, atol=2e-6)


def test_smooth_map_with_sigma_zero_returns_the_map_unchanged():
    from prn.model.scoring import smooth_map
    amap = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    assert smooth_map(amap, 0.0) is amap


def test_map_sigma_smooths_the_eval_map_and_the_score_follows_it():
    from prn.model.scoring import smooth_map
    x = images(2, seed=10)
    sharp = build(top_k=5)
    smooth = build(top_k=5, map_sigma=1.5)
    with torch.no_grad():
        a, b = sharp(x), smooth(x)
    torch.testing.assert_close(b["anomaly_map"], smooth_map(a["anomaly_map"], 1.5))
    want = b["anomaly_map"].flatten(1).sort(dim=1, descending=True).values[:, :5].mean(dim=1)
    torch.testing.assert_close(b["pred_score"], want)


def test_a_map_smoothed_for_localisation_alone_keeps_the_score_of_the_map_before_it():
    """score_smoothed false: the map (pixel metrics, regions, pictures) is smoothed, the image
    score is the top-k of the unsmoothed map, as with no smoothing at all."""
    from prn.model.scoring import smooth_map, top_k_score
    x = images(2, seed=10)
    sharp = build(top_k=5)
    smooth = build(top_k=5, map_sigma=1.5, score_smoothed=False)
    with torch.no_grad():
        a, b = sharp(x), smooth(x)
    torch.testing.assert_close(b["anomaly_map"], smooth_map(a["anomaly_map"], 1.5))
    torch.testing.assert_close(b["pred_score"], a["pred_score"])
    assert not torch.allclose(b["pred_score"], top_k_score(b["anomaly_map"], 5))


def test_top_k_score_is_the_mean_of_the_k_largest_pixels_capped_at_the_map_size():
    from prn.model.scoring import top_k_score
    amap = torch.tensor([[[[0.1, 0.9], [0.5, 0.3]]]])
    torch.testing.assert_close(top_k_score(amap, 2), torch.tensor([0.7]))
    torch.testing.assert_close(top_k_score(amap, 100), torch.tensor([0.45]))


def test_prototype_residual_map_is_the_residual_map_of_the_nearest_prototypes():
    from prn.baselines.prototype_map import PrototypeResidualMap
    from prn.model.prototypes import residual_map
    from prn.model.scoring import smooth_map, top_k_score
    cfg = PRNConfig(backbone="tf_efficientnet_lite0", backbone_weights="random", image_size=SIZE,
                    prototype_ratio=1.0, top_k=10)
    torch.manual_seed(0)
    model = PrototypeResidualMap(create_encoder(cfg.model.backbone, "random"), cfg.model).eval()
    normals = images(3, seed=11)
    model.fit_prototypes([normals])
    x = torch.cat([normals[1:2], images(1, seed=12)])
    with torch.no_grad():
        out = model(x)
        want = residual_map(model.prototypes.residuals(model.encoder(x)), (SIZE, SIZE))
    torch.testing.assert_close(out["anomaly_map"], want)
    assert out["anomaly_map"][0].max() < 1e-4 < out["anomaly_map"][1].min()  # a normal image scores 0
    assert out["pred_score"][0] < out["pred_score"][1]
    # smoothed for localisation alone, the map changes and the score stays the unsmoothed map's
    model.cfg = dataclasses.replace(cfg.model, map_sigma=1.5, score_smoothed=False)
    with torch.no_grad():
        smoothed = model(x)
    torch.testing.assert_close(smoothed["anomaly_map"], smooth_map(want, 1.5))
    torch.testing.assert_close(smoothed["pred_score"], top_k_score(want, 10))


def test_smooth_map_smooths_for_any_positive_sigma():
    from prn.model.scoring import smooth_map
    impulse = torch.zeros(1, 1, 9, 9)
    impulse[0, 0, 4, 4] = 1.0
    out = smooth_map(impulse, 0.5)
    assert out[0, 0, 4, 4] < 1 and out[0, 0, 4, 5] > 0


def test_attention_dim_sets_the_width_of_the_attention_embeddings():
    def n_params(model):
        return sum(p.numel() for p in model.attention.parameters())
    assert n_params(build(attention_dim=4)) < n_params(build(attention_dim=8))


def test_attention_scale_reaches_the_attention():
    x = images(2, seed=13)
    assert (logits_of(build(), x) - logits_of(build(attention_scale="paper"), x)).abs().max() > 1e-5


@pytest.mark.parametrize("kind", ["prn", "prototype_map"])
def test_from_config_honours_random_backbone_weights(kind):
    from prn import registry
    cfg = PRNConfig(backbone="tf_efficientnet_lite0", backbone_weights="random", image_size=SIZE)
    encoders = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = registry.build("prn" if kind == "prn" else "prototypes", cfg)
        assert model.encoder.name == "tf_efficientnet_lite0" and model.cfg == cfg.model
        encoders.append(model.encoder.state_dict())
    assert any(not torch.equal(v, encoders[1][k]) for k, v in encoders[0].items())  # random, not ImageNet


@pytest.mark.parametrize("shape", [(2, 1, SIZE, SIZE), (3, SIZE, SIZE)])
def test_prototype_residual_map_refuses_inputs_that_are_not_rgb_batches(shape):
    from prn.baselines.prototype_map import PrototypeResidualMap
    cfg = PRNConfig(backbone="tf_efficientnet_lite0", backbone_weights="random", image_size=SIZE)
    model = PrototypeResidualMap(create_encoder(cfg.model.backbone, "random"), cfg.model)
    model.fit_prototypes([images(2)])
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\), got " + re.escape(str(shape))):
        model.eval()(torch.zeros(shape))


# ---------------------------------------------------------------- image score rules

def test_top_k_share_takes_that_share_of_the_maps_pixels():
    from prn.model.scoring import top_k_score
    x = images(2, seed=20)
    model = build(top_k_share=0.01)
    out = model(x)
    k = round(0.01 * SIZE * SIZE)
    torch.testing.assert_close(out["pred_score"], top_k_score(out["anomaly_map"], k))


@pytest.mark.parametrize("rule", ["head", "mean"])
def test_the_image_head_scores_from_detached_inputs_and_leaves_the_map_unchanged(rule):
    from prn.model.scoring import top_k_score
    x = images(3, seed=21)
    plain, headed = build(), build(image_score=rule)   # same torch seed: same weights but the head
    with torch.no_grad():
        a, b = plain(x), headed(x)
        quarter = headed.decoder(headed.skips(x), x.shape[-2:], features=True)[1]
        head = torch.sigmoid(headed.image_head(quarter, b["anomaly_map"]))
    torch.testing.assert_close(a["anomaly_map"], b["anomaly_map"])
    want = head if rule == "head" else 0.5 * (head + top_k_score(b["anomaly_map"], 10))
    torch.testing.assert_close(b["pred_score"], want)
    headed.train()
    logits, image_logits = headed(x)
    assert logits.shape == (3, 1, SIZE, SIZE) and image_logits.shape == (3,)
    image_logits.sum().backward()   # the image loss reaches the head only
    assert all(p.grad is None for n, p in headed.named_parameters() if not n.startswith("image_head."))
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in headed.image_head.parameters())


@pytest.mark.parametrize("flips", ["lr", "ud", "all"])
def test_test_flips_average_the_maps_of_the_mirrored_images_mirrored_back(flips):
    from prn.model.scoring import top_k_score
    # Written out by hand here: each mirrored copy's map, computed alone (batch of one image's
    # copies, not the stacked batch the model uses), mirrored back and averaged with the plain map.
    x = images(2, seed=22)
    plain, flipped = build(), build(test_flips=flips)   # same torch seed: the same weights
    dims = {"lr": [[-1]], "ud": [[-2]], "all": [[-1], [-2], [-2, -1]]}[flips]
    with torch.no_grad():
        maps = [plain(x)["anomaly_map"]] + [plain(x.flip(d))["anomaly_map"].flip(d) for d in dims]
        out = flipped(x)
    want = torch.stack(maps).mean(dim=0)
    torch.testing.assert_close(out["anomaly_map"], want, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(out["anomaly_map"], maps[0], atol=1e-4)   # the flips changed the map
    torch.testing.assert_close(out["pred_score"], top_k_score(out["anomaly_map"], 10))
