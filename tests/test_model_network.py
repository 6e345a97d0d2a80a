"""The whole PRN: shapes, ablations, prototype fitting, checkpoints, training steps, frozen encoder."""

import itertools

import numpy as np
import pytest
import torch

from prn.config import PRNConfig
from prn.model.backbone import create_encoder
from prn.model.loss import prn_loss
from prn.model.network import PRN

SIZE = 64


def images(n, size=SIZE, seed=0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def build(backbone="tf_efficientnet_lite0", size=SIZE, **changes):
    cfg = PRNConfig(backbone=backbone, backbone_weights="random", image_size=size, **changes)
    torch.manual_seed(0)
    return PRN(create_encoder(backbone, "random"), cfg.model)


@pytest.mark.parametrize("backbone", ["resnet18", "tf_efficientnet_lite0", "tf_efficientnet_lite2"])
def test_training_and_eval_outputs_have_the_contract_shapes(backbone):
    model = build(backbone, top_k=50)
    model.fit_prototypes([images(3, seed=1), images(2, seed=2)])
    x = images(2)
    logits = model.train()(x)
    assert logits.shape == (2, 1, SIZE, SIZE) and logits.dtype == torch.float32
    out = model.eval()(x)
    assert set(out) == {"anomaly_map", "pred_score"}
    amap = out["anomaly_map"]
    assert amap.shape == (2, 1, SIZE, SIZE) and out["pred_score"].shape == (2,)
    assert 0 <= amap.min() and amap.max() <= 1
    top = np.sort(amap.detach().numpy().reshape(2, -1), axis=1)[:, -50:].mean(axis=1)
    np.testing.assert_allclose(out["pred_score"].detach().numpy(), top, rtol=1e-6)


def test_resnet18_model_runs_at_the_papers_256_pixels():
    model = build("resnet18", size=256, top_k=100)
    model.fit_prototypes([images(2, size=256)])
    with torch.no_grad():
        out = model.eval()(images(1, size=256, seed=3))
    assert out["anomaly_map"].shape == (1, 1, 256, 256)
    assert model.prototypes.p1.shape == (1, 64, 64, 64)
    assert model.prototypes.p3.shape == (1, 256, 16, 16)


@pytest.mark.parametrize("mp, msa, mf", list(itertools.product([False, True], repeat=3)))
def test_every_ablation_combination_builds_and_runs(mp, msa, mf):
    model = build(use_prototypes=mp, use_attention=msa, use_fusion=mf, attention_layers=1)
    model.fit_prototypes([images(4, seed=1)])
    c = model.encoder.channels
    assert model.skip_channels == ([2 * x for x in c] if mp else c)
    assert (model.prototypes is not None) == mp
    assert (model.attention is not None) == msa
    assert (model.fuse_features is not None) == mf
    assert (model.fuse_attention is not None) == (mf and msa)
    assert any(k.startswith("prototypes.") for k in model.state_dict()) == mp
    skips = model.eval().skips(images(2))
    assert [s.shape[1] for s in skips] == model.skip_channels
    assert model.train()(images(2)).shape == (2, 1, SIZE, SIZE)


def test_baseline_without_modules_feeds_the_encoder_features_to_the_decoder():
    model = build(use_prototypes=False, use_attention=False, use_fusion=False).eval()
    x = images(2)
    for skip, feat in zip(model.skips(x), model.encoder(x)):
        assert torch.equal(skip, feat)


def test_fit_prototypes_clusters_to_ceil_ratio_of_the_normal_count():
    model = build(prototype_ratio=0.25)
    model.fit_prototypes([images(4, seed=1), images(4, seed=2), images(2, seed=3)])
    assert [p.shape[0] for p in (model.prototypes.p1, model.prototypes.p2, model.prototypes.p3)] == [3, 3, 3]


def test_ratio_one_makes_every_normal_feature_map_a_prototype():
    model = build(prototype_ratio=1.0)
    x = images(3, seed=4)
    model.fit_prototypes([{"image": x[:2]}, {"image": x[2:]}])
    for proto, feat in zip((model.prototypes.p1, model.prototypes.p2, model.prototypes.p3), model.encoder(x)):
        torch.testing.assert_close(proto, feat)


def test_fit_prototypes_without_images_raises():
    with pytest.raises(ValueError, match="at least one batch"):
        build().fit_prototypes([])


def test_state_dict_loads_into_a_fresh_model_with_another_k_and_gives_identical_outputs():
    fitted = build(prototype_ratio=0.5)
    fitted.fit_prototypes([images(6, seed=5)])
    fitted.train()(images(4, seed=6))  # move batch-norm statistics away from their defaults
    fresh = build(prototype_ratio=0.5)
    fresh.fit_prototypes([images(1, seed=7)])  # K = 1 here, 3 in the checkpoint
    fresh.load_state_dict(fitted.state_dict())
    assert fresh.prototypes.p2.shape[0] == 3
    x = images(2, seed=8)
    with torch.no_grad():
        a, b = fitted.eval()(x), fresh.eval()(x)
    assert torch.equal(a["anomaly_map"], b["anomaly_map"])
    unfitted = build(prototype_ratio=0.5)
    unfitted.load_state_dict(fitted.state_dict())
    with torch.no_grad():
        assert torch.equal(unfitted.eval()(x)["anomaly_map"], a["anomaly_map"])


def test_adam_steps_lower_the_loss_and_leave_the_encoder_untouched():
    model = build(attention_layers=1)
    model.fit_prototypes([images(4, seed=1)])
    x = images(4, seed=2)
    mask = torch.zeros(4, 1, SIZE, SIZE)
    mask[:2, :, 16:40, 20:44] = 1
    encoder_before = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    opt = torch.optim.Adam(model.trainable_parameters(), lr=1e-3)
    model.train()
    losses = []
    for _ in range(8):
        loss, _ = prn_loss(model(x), mask, PRNConfig().training)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]
    assert not model.encoder.body.training
    for name, p in model.encoder.named_parameters():
        assert not p.requires_grad and p.grad is None, name
    for k, v in model.encoder.state_dict().items():
        assert torch.equal(v, encoder_before[k]), k


def test_trainable_parameters_are_all_parameters_outside_the_encoder():
    model = build()
    trainable = {id(p) for p in model.trainable_parameters()}
    for name, p in model.named_parameters():
        assert (id(p) in trainable) == (not name.startswith("encoder.")), name
    assert trainable


def test_forward_refuses_images_that_are_not_rgb_batches():
    model = build()
    model.fit_prototypes([images(2)])
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        model.eval()(torch.rand(2, 1, SIZE, SIZE))


def test_from_config_builds_the_named_backbone():
    model = PRN.from_config(PRNConfig(backbone="tf_efficientnet_lite0", backbone_weights="random").model)
    assert model.encoder.name == "tf_efficientnet_lite0" and model.skip_channels == [48, 80, 224]


def test_trained_weight_keys_are_the_trainable_parameters_of_the_head():
    from prn.model.network import trained_weight_keys
    model = build(image_score="head")
    model.fit_prototypes([images(4)])
    state = model.state_dict()
    keys = trained_weight_keys(state)
    trained = {name for name, p in model.named_parameters() if p.requires_grad and not name.startswith("encoder.")}
    assert set(keys) == trained and {id(p) for p in model.trainable_parameters()} == \
        {id(p) for name, p in model.named_parameters() if name in trained}
    assert any(k.startswith("decoder.") for k in keys) and any(k.startswith("image_head.") for k in keys)
    assert not any(k.startswith(("encoder.", "prototypes.", "defect_memory.")) or "running" in k for k in keys)
