"""The loss of Sec. 3.5 (Eq. 5) against hand computations."""

import math

import pytest
import torch

from prn.config import PRNConfig
from prn.model.loss import focal_loss, prn_loss

LOGITS = [0.0, 2.0, -1.0, 3.0, -4.0, 0.5]
TARGETS = [1.0, 0.0, 0.0, 1.0, 1.0, 0.0]


def sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))


def hand_focal(logits, targets, alpha, gamma):
    total = 0.0
    for x, y in zip(logits, targets):
        p = sigmoid(x)
        p_t = p if y == 1 else 1 - p
        a_t = alpha if y == 1 else 1 - alpha
        total += -a_t * (1 - p_t) ** gamma * math.log(p_t)
    return total / len(logits)


def as_map(values):
    return torch.tensor(values, dtype=torch.float32).view(1, 1, 2, 3)


@pytest.mark.parametrize("alpha, gamma", [(0.5, 4.0), (0.25, 2.0), (0.8, 0.0)])
def test_focal_loss_matches_a_hand_computation(alpha, gamma):
    got = focal_loss(as_map(LOGITS), as_map(TARGETS), alpha=alpha, gamma=gamma)
    assert got.item() == pytest.approx(hand_focal(LOGITS, TARGETS, alpha, gamma), rel=1e-5)


def test_focal_loss_stays_finite_for_saturated_wrong_logits():
    # Logit 100 for a background pixel: p_t = 1 - sigmoid(100) ~ e^-100, so the loss is ~ 0.5 * 100.
    logits = torch.tensor([100.0, -100.0, 1e4]).view(1, 1, 1, 3).requires_grad_()
    target = torch.tensor([0.0, 1.0, 0.0]).view(1, 1, 1, 3)
    loss = focal_loss(logits, target, alpha=0.5, gamma=4.0)
    assert loss.item() == pytest.approx((50.0 + 50.0 + 5000.0) / 3, rel=1e-4)
    loss.backward()
    assert torch.isfinite(logits.grad).all()


def test_prn_loss_is_smooth_l1_of_the_sigmoid_plus_lambda_times_focal():
    cfg = PRNConfig(focal_weight=5.0, focal_alpha=0.5, focal_gamma=4.0)
    total, parts = prn_loss(as_map(LOGITS).requires_grad_(), as_map(TARGETS), cfg.training)
    # |sigmoid - mask| < 1 everywhere, where Smooth L1 (beta 1) is half the squared difference.
    smooth = sum(0.5 * (sigmoid(x) - y) ** 2 for x, y in zip(LOGITS, TARGETS)) / len(LOGITS)
    focal = hand_focal(LOGITS, TARGETS, 0.5, 4.0)
    assert parts["smooth_l1"].item() == pytest.approx(smooth, rel=1e-5)
    assert parts["focal"].item() == pytest.approx(focal, rel=1e-5)
    assert total.item() == pytest.approx(smooth + 5.0 * focal, rel=1e-5)
    assert total.requires_grad and not parts["focal"].requires_grad


def test_prn_loss_is_near_zero_for_a_confident_correct_map():
    mask = as_map(TARGETS)
    total, _ = prn_loss((mask * 2 - 1) * 20, mask, PRNConfig().training)
    assert 0 <= total.item() < 1e-8


def test_prn_loss_refuses_maps_of_different_shapes():
    with pytest.raises(ValueError, match="shape"):
        prn_loss(torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4, 5), PRNConfig())


def test_top_k_loss_pushes_the_top_pixels_outside_a_defect_down_and_inside_it_up():
    from prn.model.loss import top_k_loss
    sig = torch.sigmoid
    logits = torch.full((3, 1, 8, 8), -3.0)
    mask = torch.zeros(3, 1, 8, 8)
    logits[0, 0, 4, 4] = 2.0                          # image 0: normal, one bright pixel
    mask[1, 0, :2, :2] = 1                            # image 1: a defect of 4 pixels...
    logits[1, 0, :2, :2] = 1.0                        # ...moderately high inside
    logits[1, 0, 7, 7] = 0.0                          # and one pixel outside at 0.5
    logits[2, 0, 0, 0] = 5.0                          # image 2: known by a label alone (weak): not counted
    weak = torch.tensor([0.0, 0.0, 1.0])
    got = top_k_loss(logits, mask, weak, top_k=2)
    # written out: per image, BCE of the top-2 mean outside (target 0), and inside (target 1)
    out0 = (sig(torch.tensor(2.0)) + sig(torch.tensor(-3.0))) / 2
    out1 = (sig(torch.tensor(0.0)) + sig(torch.tensor(-3.0))) / 2
    in1 = sig(torch.tensor(1.0))
    want = (-torch.log(1 - out0) - torch.log(1 - out1) - torch.log(in1)) / 2
    assert torch.allclose(got, want)
    # brighter false positives on the normal image cost more; a brighter defect costs less
    brighter = logits.clone()
    brighter[0, 0, 4, 4] = 4.0
    assert top_k_loss(brighter, mask, weak, top_k=2) > got
    brighter = logits.clone()
    brighter[1, 0, :2, :2] = 3.0
    assert top_k_loss(brighter, mask, weak, top_k=2) < got
    assert top_k_loss(logits, mask, torch.ones(3), top_k=2) == 0   # every image weak: nothing


def test_top_k_loss_weight_adds_the_loss_to_the_training_loss():
    from prn.model.loss import top_k_loss
    from prn.train import forward_loss
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 1, 8, 8, generator=g)
    masks = (torch.rand(2, 1, 8, 8, generator=g) > 0.9).float()
    net = lambda x: logits  # noqa: E731  (a stand-in network)
    cfg = PRNConfig(top_k=3)
    base, parts = forward_loss(net, torch.zeros(2, 3, 8, 8), masks, cfg, torch.device("cpu"))
    assert "top_k" not in parts
    cfg = PRNConfig(top_k=3, top_k_loss_weight=0.5)
    total, parts = forward_loss(net, torch.zeros(2, 3, 8, 8), masks, cfg, torch.device("cpu"))
    extra = top_k_loss(logits, masks, torch.zeros(2), 3)
    assert torch.allclose(total, base + 0.5 * extra) and torch.allclose(parts["top_k"], extra)


def test_the_top_k_loss_takes_k_as_the_image_score_does_with_top_k_share():
    from prn.model.loss import top_k_loss
    from prn.train import forward_loss
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 1, 10, 10, generator=g)
    masks = (torch.rand(2, 1, 10, 10, generator=g) > 0.8).float()
    cfg = PRNConfig(top_k=3, top_k_share=0.2, top_k_loss_weight=1.0)
    assert cfg.model.k_of(10, 10) == 20 and PRNConfig(top_k=3).model.k_of(10, 10) == 3
    _, parts = forward_loss(lambda x: logits, torch.zeros(2, 3, 10, 10), masks, cfg, torch.device("cpu"))
    assert torch.allclose(parts["top_k"], top_k_loss(logits, masks, torch.zeros(2), 20))
    assert not torch.allclose(parts["top_k"], top_k_loss(logits, masks, torch.zeros(2), 3))
