"""Multi-scale fusion (Sec. 3.2), multi-size self-attention (Sec. 3.3) and the decoder."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from prn.model.attention import MSABlock, MultiSizeSelfAttention, from_patches, patch_size, to_patches
from prn.model.decoder import Decoder
from prn.model.fusion import DownBranch, MultiScaleFusion, UpBranch

CHANNELS = [4, 6, 8]
SIZES = [16, 8, 4]


def maps(batch=2, seed=0, channels=CHANNELS, sizes=SIZES):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, c, s, s, generator=g) for c, s in zip(channels, sizes)]


def test_fusion_keeps_the_shape_of_every_scale():
    out = MultiScaleFusion(CHANNELS)(maps())
    assert [tuple(o.shape) for o in out] == [(2, c, s, s) for c, s in zip(CHANNELS, SIZES)]


def test_fusion_branches_have_the_papers_kernels_strides_and_paddings():
    fusion = MultiScaleFusion([4, 6, 8, 10])
    for r in range(4):
        for j in range(4):
            branch = fusion.branches[r][j]
            if r == j:
                assert isinstance(branch, nn.Identity)
            elif r < j:
                assert isinstance(branch, DownBranch)
                depthwise, pointwise = branch[0], branch[1]
                s = 2 ** (j - r)
                assert depthwise.groups == depthwise.in_channels == depthwise.out_channels == [4, 6, 8, 10][r]
                assert depthwise.kernel_size == (s + 1, s + 1)
                assert depthwise.stride == (s, s)
                assert depthwise.padding == (2 ** (j - r - 1),) * 2
                assert pointwise.kernel_size == (1, 1) and pointwise.out_channels == [4, 6, 8, 10][j]
            else:
                assert isinstance(branch, UpBranch)
                assert branch.conv.kernel_size == (1, 1)
                assert (branch.conv.in_channels, branch.conv.out_channels) == ([4, 6, 8, 10][r], [4, 6, 8, 10][j])


def random_bn(bn: nn.BatchNorm2d) -> nn.BatchNorm2d:
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.uniform_(0.5, 2)
        bn.bias.uniform_(-1, 1)
    return bn


def hand_bn(x, mean, var, bn):
    x = (x - mean.view(1, -1, 1, 1)) / torch.sqrt(var.view(1, -1, 1, 1) + bn.eps)
    return x * bn.weight.view(1, -1, 1, 1) + bn.bias.view(1, -1, 1, 1)


def test_up_branch_in_eval_equals_bilinear_upsampling_followed_by_a_1x1_convolution():
    branch = UpBranch(6, 4).eval()
    random_bn(branch.bn)
    x = torch.randn(3, 6, 4, 4)
    up = F.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False)
    expected = hand_bn(F.conv2d(up, branch.conv.weight), branch.bn.running_mean, branch.bn.running_var, branch.bn)
    torch.testing.assert_close(branch(x, (16, 16)), expected, atol=1e-4, rtol=1e-4)


def test_up_branch_in_training_normalises_with_the_statistics_before_upsampling():
    branch = UpBranch(6, 4).train()
    random_bn(branch.bn)
    x = torch.randn(3, 6, 4, 4)
    conv = F.conv2d(x, branch.conv.weight)
    normed = hand_bn(conv, conv.mean(dim=(0, 2, 3)), conv.var(dim=(0, 2, 3), unbiased=False), branch.bn)
    expected = F.interpolate(normed, size=(16, 16), mode="bilinear", align_corners=False)
    torch.testing.assert_close(branch(x, (16, 16)), expected, atol=1e-4, rtol=1e-4)


def test_fusion_output_is_the_sum_of_the_transformed_scales():
    # In eval mode with fresh batch-norm statistics every branch is linear, so Eq. 2's sum can be
    # checked by superposition: feeding one scale at a time and adding the results.
    fusion = MultiScaleFusion(CHANNELS).eval()
    xs = maps()
    zeros = [torch.zeros_like(x) for x in xs]
    alone = [fusion([x if i == r else zeros[i] for i, x in enumerate(xs)]) for r in range(3)]
    out = fusion(xs)
    for j in range(3):
        torch.testing.assert_close(alone[j][j], xs[j], atol=0, rtol=0)
        torch.testing.assert_close(out[j], sum(alone[r][j] for r in range(3)), atol=1e-5, rtol=1e-5)
        assert all(alone[r][j].abs().sum() > 0 for r in range(3))


@pytest.mark.parametrize("size, divisor, p", [(64, 1, 64), (64, 2, 32), (64, 4, 16), (64, 8, 8),
                                              (16, 8, 2), (4, 8, 1), (6, 4, 1), (12, 8, 1), (12, 4, 3)])
def test_patch_size_is_the_map_size_over_the_divisor_when_it_tiles(size, divisor, p):
    assert patch_size(size, divisor) == p


def test_each_head_has_its_own_patch_size():
    block = MSABlock(16, (1, 2, 4, 8), head_dim=2)
    assert block.patch_sizes(64, 64) == [(64, 64), (32, 32), (16, 16), (8, 8)]
    assert block.patch_sizes(16, 16) == [(16, 16), (8, 8), (4, 4), (2, 2)]


@pytest.mark.parametrize("channels_last", [False, True])
def test_patches_match_unfold_and_fold_back(channels_last):
    x = torch.randn(2, 3, 8, 12)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    tokens = to_patches(x, 4, 4)
    torch.testing.assert_close(tokens, F.unfold(x, 4, stride=4).transpose(1, 2), atol=0, rtol=0)
    assert torch.equal(from_patches(tokens, 3, 8, 12, 4, 4), x)


@pytest.mark.parametrize("scale", ["sqrt", "paper"])
def test_attention_heads_match_an_explicit_softmax_over_unfolded_patches(scale):
    torch.manual_seed(0)
    block = MSABlock(6, (1, 2, 4), head_dim=2, scale=scale).eval()
    x = torch.randn(2, 6, 8, 8)
    qkv = F.conv2d(x.double(), block.qkv.weight.double(), block.qkv.bias.double())
    q, k, v = qkv.chunk(3, dim=1)
    heads = []
    for s, p in enumerate([8, 4, 2]):
        part = slice(2 * s, 2 * s + 2)
        qs, ks, vs = (F.unfold(t[:, part], p, stride=p).transpose(1, 2) for t in (q, k, v))
        dim = 2 * p * p
        logits = qs @ ks.transpose(1, 2) / (math.sqrt(dim) if scale == "sqrt" else dim)
        out = torch.softmax(logits, dim=-1) @ vs
        heads.append(F.fold(out.transpose(1, 2), (8, 8), p, stride=p))
    expected = torch.cat(heads, dim=1).float()
    torch.testing.assert_close(block.attend(x), expected, atol=1e-5, rtol=1e-4)


def test_whole_map_head_passes_the_values_through():
    block = MSABlock(4, (1,), head_dim=3).eval()
    x = torch.randn(2, 4, 8, 8)
    v = block.qkv(x)[:, 6:9]
    torch.testing.assert_close(block.attend(x), v)


def test_attention_stack_keeps_shapes_and_stacks_the_configured_layers():
    msa = MultiSizeSelfAttention([8, 16, 32], (1, 2, 4, 8), layers=3, head_dim=2)
    out = msa(maps(channels=[8, 16, 32], sizes=[16, 8, 4]))
    assert [tuple(o.shape) for o in out] == [(2, 8, 16, 16), (2, 16, 8, 8), (2, 32, 4, 4)]
    assert [len(stack) for stack in msa.stacks] == [3, 3, 3]


def test_attention_dim_zero_means_the_width_over_the_number_of_heads():
    msa = MultiSizeSelfAttention([8, 16, 32], (1, 2, 4, 8), layers=1, head_dim=0)
    assert [stack[0].head_dim for stack in msa.stacks] == [2, 4, 8]


def test_unknown_attention_scale_is_refused():
    with pytest.raises(ValueError, match="scale"):
        MSABlock(4, (1, 2), head_dim=2, scale="cubic")


def test_decoder_returns_one_logit_map_at_the_input_size():
    decoder = Decoder([4, 6, 8], (8, 6, 4, 2))
    out = decoder(maps(channels=[4, 6, 8], sizes=[16, 8, 4]), (64, 64))
    assert out.shape == (2, 1, 64, 64)


def test_decoder_refuses_a_wrong_number_of_widths():
    with pytest.raises(ValueError, match="decoder_channels needs 4 widths"):
        Decoder([4, 6, 8], (8, 6, 4))
