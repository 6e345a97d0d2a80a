"""Batch norms folded into their convolutions for float32 inference (prn.model.folding)."""

import pytest
import torch
from timm.layers import BatchNormAct2d, Conv2dSame
from torch import nn

from prn.checkpoint import load_checkpoint, save_checkpoint
from prn.deploy.loading import load_model
from prn.deploy.predict import Predictor
from prn.model.folding import fold_batch_norms


def _randomise_norms(model: nn.Module, seed: int = 0) -> None:
    """Running statistics and affine parameters far from their initial values, so that folding
    them is not the identity."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g))
            m.running_var.copy_(torch.rand(n, generator=g) * 3 + 0.2)
            m.weight.data.copy_(torch.randn(n, generator=g))
            m.bias.data.copy_(torch.randn(n, generator=g))


class Block(nn.Module):
    """timm's way (a 'same'-padded strided convolution, then normalise-and-activate) beside
    torch's (a Sequential of convolution, batch norm, ReLU)."""

    def __init__(self):
        super().__init__()
        self.conv_dw = Conv2dSame(3, 8, 3, stride=2)
        self.bn1 = BatchNormAct2d(8, act_layer=nn.ReLU6)
        self.head = nn.Sequential(nn.Conv2d(8, 4, 3, padding=1, bias=True), nn.BatchNorm2d(4), nn.ReLU())

    def forward(self, x):
        return {"map": self.head(self.bn1(self.conv_dw(x))), "pair": [x.mean()]}


class Crossed(nn.Module):
    """A convolution registered just before a batch norm that it does not feed."""

    def __init__(self):
        super().__init__()
        self.pre = nn.Conv2d(3, 4, 1)
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.conv(self.bn(self.pre(x)))


def test_folding_keeps_the_outputs_and_removes_every_batch_norm():
    model = Block().eval()
    _randomise_norms(model)
    x = torch.rand(2, 3, 30, 22)
    with torch.no_grad():
        before = model(x)["map"]
    w0 = model.conv_dw.weight.clone()
    assert fold_batch_norms(model, x[:1]) == 2
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert isinstance(model.conv_dw, Conv2dSame)          # the 'same' padding kept
    assert isinstance(model.bn1, nn.ReLU6)                 # the activation kept where the norm was
    with torch.no_grad():
        after = model(x)["map"]
    assert not torch.allclose(model.conv_dw.weight, w0, atol=1e-2)  # the norms were far from the identity
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)


def test_a_batch_norm_its_neighbour_does_not_feed_is_put_back_and_training_mode_is_refused():
    model = Crossed().eval()
    _randomise_norms(model)
    x = torch.rand(1, 3, 9, 9)
    with torch.no_grad():
        before = model(x)
    conv, bn = model.conv, model.bn
    assert fold_batch_norms(model, x) == 0
    assert model.conv is conv and model.bn is bn
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, rtol=0, atol=0)
    with pytest.raises(ValueError, match="eval mode"):
        fold_batch_norms(Crossed().train(), x)


def test_a_float32_checkpoint_loads_folded_and_computes_as_the_unfolded(calibrated_run):
    folded, plain = load_model(calibrated_run), load_model(calibrated_run, fold=False)
    assert folded.folded > 0 and plain.folded == 0
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.model.modules())
    # the whole network (encoder, prototypes, fusion, attention, decoder) with norms far from
    # their initial values, folded by the rule load_model uses
    _randomise_norms(plain.model, seed=1)
    x = torch.rand(3, 3, *plain.cfg.model.input_hw, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = plain.model(x)
        assert fold_batch_norms(plain.model, x[:1]) == folded.folded
        got = plain.model(x)
    scale = max(1.0, float(want["anomaly_map"].abs().max()))
    torch.testing.assert_close(got["anomaly_map"], want["anomaly_map"], rtol=0, atol=1e-4 * scale)
    torch.testing.assert_close(got["pred_score"], want["pred_score"], rtol=0, atol=1e-4)
    assert Predictor(calibrated_run).loaded.folded == folded.folded  # the path of predict and serve


def test_a_run_that_infers_in_bfloat16_keeps_its_batch_norms(calibrated_run, tmp_path):
    payload = load_checkpoint(calibrated_run / "checkpoints" / "model.pt")
    payload["config"]["training"]["precision"] = "bf16"
    if payload.get("calibration"):  # thresholds name the precision they were set at
        payload["calibration"]["precision"] = "bf16"
    path = save_checkpoint(tmp_path / "bf16.pt", model=payload["model"], config=payload["config"],
                           state_dict=payload["state_dict"], calibration=payload.get("calibration"))
    loaded = load_model(path)
    assert loaded.cfg.training.precision == "bf16" and loaded.folded == 0
    assert any(isinstance(m, nn.BatchNorm2d) for m in loaded.model.modules())


def test_the_resnet18_encoder_folds_as_torchvision_builds_it():
    from prn.model.backbone import create_encoder
    enc = create_encoder("resnet18", weights="random").eval()
    _randomise_norms(enc)
    x = torch.rand(2, 3, 64, 96)
    with torch.no_grad():
        before = enc(x)
    # the stem, two per block of layer1..3 (6 blocks), and the two down-sampling shortcuts
    assert fold_batch_norms(enc, x[:1]) == 15
    with torch.no_grad():
        for a, b in zip(before, enc(x)):
            torch.testing.assert_close(b, a, rtol=0, atol=1e-5 * float(a.abs().max()))
