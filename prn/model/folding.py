"""Batch norms folded into the convolutions that feed them, for float32 inference.

In eval mode a batch norm is a fixed affine map per channel, so the convolution before it can
absorb it (w' = w g / sqrt(v + eps), b' = (b - m) g / sqrt(v + eps) + beta): the same outputs to
float32 rounding, one pass over each map fewer, so a float32 forward pass is faster (BENCHMARKS.md,
"Batch norms folded"). Training keeps them: this is for a loaded model (``prn.deploy.loading``).

torch gives the arithmetic (``torch.nn.utils.fusion.fuse_conv_bn_eval``); which convolution feeds
which batch norm is decided here, by hand, because no library does it for eager modules that a
graph tracer cannot follow (the attention's patch sizes depend on the input's shape). The rule: a
``Conv2d`` child immediately followed, in registration order, by a ``BatchNorm2d`` child of its
width. That holds for every block of prn's networks, torchvision's ResNet-18 and timm's
EfficientNet; since it is a rule about how modules are written, not a fact about them, the folded
model is checked against the original on an example input and everything is put back if they differ
(as it would be on a GPU whose convolutions round to TF32, a check this project has not run).

    >>> n = fold_batch_norms(model.eval(), torch.rand(1, 3, 384, 160))
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

# agreement required of the folded model, relative to each output's largest magnitude (the
# export's parity tolerance); measured differences are at most ~3e-5 of the map's scale
TOLERANCE = 1e-4


def _after_norm(bn: nn.BatchNorm2d) -> nn.Module | None:
    """What must still run where ``bn`` was: nothing for a plain batch norm, the dropout and
    activation of timm's ``BatchNormAct2d`` (normalise, drop, activate); None for any other
    subclass, whose forward is not known here."""
    if type(bn) is nn.BatchNorm2d:
        return nn.Identity()
    # by name, so that loading a ResNet-18 run does not import timm for its class
    if type(bn).__name__ == "BatchNormAct2d" and hasattr(bn, "act") and hasattr(bn, "drop"):
        rest = [m for m in (bn.drop, bn.act) if not isinstance(m, nn.Identity)]
        return rest[0] if len(rest) == 1 else nn.Sequential(*rest) if rest else nn.Identity()
    return None


def _outputs(out) -> list[Tensor]:
    if isinstance(out, Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    return [t for o in out for t in _outputs(o)] if isinstance(out, (list, tuple)) else []


def _agree(before: list[Tensor], after: list[Tensor]) -> bool:
    if len(before) != len(after):
        return False
    for a, b in zip(before, after):
        if a.shape != b.shape:
            return False
        scale = max(1.0, float(a.detach().abs().max())) if a.numel() else 1.0
        if a.numel() and float((a.float() - b.float()).abs().max()) > TOLERANCE * scale:
            return False
    return True


@torch.no_grad()
def fold_batch_norms(model: nn.Module, example: Tensor) -> int:
    """Fold ``model``'s eval-mode batch norms into their convolutions, in place; return how many.
    ``example``: an input for the check (the folded model must agree with the original on it, or
    the model is restored and 0 returned). The model must be in eval mode."""
    if model.training:
        raise ValueError("batch norms fold only in eval mode: call model.eval() first")
    before = _outputs(model(example))
    replaced = []  # (parent, name, original module): to put back if the check fails
    for parent in list(model.modules()):
        children = list(parent.named_children())
        for (conv_name, conv), (bn_name, bn) in zip(children, children[1:]):
            if not (isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d)):
                continue
            rest = _after_norm(bn)
            if rest is None or bn.running_mean is None or conv.out_channels != bn.num_features:
                continue
            replaced += [(parent, conv_name, conv), (parent, bn_name, bn)]
            setattr(parent, conv_name, fuse_conv_bn_eval(conv, bn))
            setattr(parent, bn_name, rest)
    if replaced and not _agree(before, _outputs(model(example))):
        for parent, name, module in replaced:
            setattr(parent, name, module)
        return 0
    return len(replaced) // 2
