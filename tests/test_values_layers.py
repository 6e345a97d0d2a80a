"""Decoder and fusion by value: the decoder's stages run in the documented order and sizes (on
non-square maps, to output sizes that are not a multiple of the finest skip); fusion branches
end in batch norm; the edge cases of MultiScaleFusion."""

import pytest
import torch
import torch.nn.functional as F

from prn.model.decoder import Decoder, conv_bn_relu


def maps(sizes, channels=(4, 6, 8), batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, c, h, w, generator=g) for c, (h, w) in zip(channels, sizes)]


def up(x, size):
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def test_conv_bn_relu_is_a_convolution_then_batch_norm_then_relu():
    torch.manual_seed(0)
    layer = conv_bn_relu(3, 4).train()
    x = torch.randn(2, 3, 5, 7)
    conv = layer[0]
    want = F.relu(F.batch_norm(F.conv2d(x, conv.weight, padding=1), None, None, training=True))
    torch.testing.assert_close(layer(x), want)
    assert (layer(x) == 0).any()


def test_decoder_follows_its_documented_stages_on_non_square_maps():
    torch.manual_seed(0)
    decoder = Decoder([4, 6, 8], (8, 6, 4, 2)).eval()
    skips = maps([(12, 20), (6, 10), (3, 5)])
    size = (50, 78)                                 # not 4 x the finest skip (48, 80)
    with torch.no_grad():
        x = decoder.lateral(skips[2])
        x = decoder.stages[0](torch.cat([up(x, (6, 10)), skips[1]], dim=1))    # 1/8
        x = decoder.stages[1](torch.cat([up(x, (12, 20)), skips[0]], dim=1))   # 1/4
        x = decoder.stages[2](up(x, (24, 40)))                                # 1/2: twice 1/4
        x = decoder.stages[3](up(x, size))                                    # 1/1: the input size
        want = decoder.head(x)
        got = decoder(skips, size)
    assert got.shape == (2, 1, 50, 78)
    torch.testing.assert_close(got, want)


def test_decoder_narrows_the_deepest_skip_with_a_1x1_convolution():
    decoder = Decoder([4, 6, 8], (8, 6, 4, 2))
    assert decoder.lateral[0].kernel_size == (1, 1) and decoder.lateral[0].in_channels == 8


def test_decoder_accepts_any_power_of_two_finest_reduction():
    decoder = Decoder([4, 6, 8], (8, 6, 4, 4, 2), finest_reduction=8)   # 2 merges + 3 doublings
    out = decoder(maps([(8, 8), (4, 4), (2, 2)]), (64, 64))
    assert out.shape == (2, 1, 64, 64)


def test_decoder_refuses_a_finest_reduction_that_is_not_a_power_of_two():
    with pytest.raises(ValueError, match="finest reduction must be a power of two, got 6"):
        Decoder([4, 6, 8], (8, 6, 4, 2), finest_reduction=6)


def test_decoder_width_error_names_the_stages():
    with pytest.raises(ValueError, match=r"needs 4 widths, one per stage from 1/8 to 1/1, got 3"):
        Decoder([4, 6, 8], (8, 6, 4))
    with pytest.raises(ValueError, match=r"needs 5 widths, one per stage from 1/16 to 1/1, got 4"):
        Decoder([4, 6, 8, 10], (8, 6, 4, 2))
    with pytest.raises(ValueError, match=r"needs 6 widths, one per stage from 1/32 to 1/1, got 5"):
        Decoder([4, 6, 8, 10, 12], (8, 6, 4, 2, 2))


# ---------------------------------------------------------------- multi-scale fusion

def test_down_branch_output_is_batch_normalised():
    from prn.model.fusion import DownBranch
    torch.manual_seed(0)
    branch = DownBranch(3, 4, 2).train()
    out = branch(torch.randn(8, 3, 8, 8) * 3 + 5)
    torch.testing.assert_close(out.mean(dim=(0, 2, 3)), torch.zeros(4), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.var(dim=(0, 2, 3), unbiased=False), torch.ones(4), atol=1e-3, rtol=0)


def test_fusion_of_a_single_scale_is_the_identity():
    from prn.model.fusion import MultiScaleFusion
    x = maps([(4, 4)], channels=(3,))
    assert MultiScaleFusion([3])(x)[0] is x[0]


def test_fusion_refuses_a_wrong_number_of_maps_with_the_counts():
    from prn.model.fusion import MultiScaleFusion
    with pytest.raises(ValueError, match="expected 3 maps, got 2"):
        MultiScaleFusion([4, 6, 8])(maps([(8, 8), (4, 4)], channels=(4, 6)))
