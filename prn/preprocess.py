"""The one pre-process: uint8 RGB images of any size -> the model's input.

Training, validation, test, calibration, predict, serve and the exported graph all turn an image
into the model's input with ``Preprocess``: a bilinear resize to the model's input size H x W
(``resize``), then uint8 -> float32 in [0, 1] (``scale``; the encoder normalises by its own mean
and std inside).

``resize`` is Pillow's bilinear resize (``Image.resize(..., BILINEAR)``: a triangle filter widened
by the scale factor when shrinking, 22-bit fixed-point weights, two 1-D passes each rounded to
uint8) re-implemented in torch, so that it runs inside an exported ONNX / TorchScript graph with
any input size and gives the very pixels training saw. Written by hand because no library does
this: torch's ``interpolate(antialias=True)`` is the same filter in floating point and differs
from Pillow by a grey level at some pixels (and so would the exported model from training). Tests
hold it equal to Pillow, bit for bit, over random sizes, in torch and in onnxruntime. Outside a
graph, one image at a time (data, predict, serve), ``resize_image`` calls Pillow itself: the same
pixels, some fifty times faster than the torch twin on a CPU.

    >>> pre = Preprocess((160, 384))
    >>> x = pre(torch.randint(0, 256, (2, 3, 500, 1250), dtype=torch.uint8))   # (2, 3, 160, 384) in [0, 1]
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn
from torchvision.transforms.v2 import functional as TF

from prn.data.io import DEFAULT_MAX_PIXELS, decode_image, has_alpha, to_rgb

# Pillow's fixed-point weights for 8-bit images have 22 bits (32 - 8 - 2): the constants below are
# 2^22 and 2^21, written out because TorchScript compiles no module-level ints.


def as_hw(size: int | tuple[int, int]) -> tuple[int, int]:
    """An int S -> (S, S); (H, W) -> (H, W)."""
    if isinstance(size, int):
        return size, size
    h, w = size
    return int(h), int(w)


def _taps(in_size: int, out_size: int) -> tuple[Tensor, Tensor]:
    """Pillow's bilinear taps along one axis: source indices int64 (out, K) and integer weights
    int32 (out, K) summing to ~2^22 per row. ``in_size`` may be symbolic (export); the arithmetic
    is Pillow's ``precompute_coeffs`` and ``normalize_coeffs_8bpc`` in float64."""
    # 2 ceil(max(in/out, 1)) + 1 taps, Pillow's kernel size, from integers only (exportable)
    k = 2 * ((in_size + out_size - 1) // out_size) + 1
    scale = torch.full((), in_size, dtype=torch.float64) / out_size
    support = scale.clamp(min=1.0)  # the filter is widened when shrinking (bilinear support 1)
    center = (torch.arange(out_size, dtype=torch.float64) + 0.5) * scale
    first = torch.trunc(center - support + 0.5).clamp(min=0)
    count = torch.trunc(center + support + 0.5).clamp(max=in_size) - first
    t = torch.arange(k, dtype=torch.float64)
    x = (t[None] + first[:, None] - center[:, None] + 0.5) * (1.0 / support)
    w = (1.0 - x.abs()).clamp(min=0.0)
    w = torch.where(t[None] < count[:, None], w, torch.zeros_like(w))
    w = w / w.sum(1, keepdim=True)
    weights = torch.trunc(0.5 + w * 4194304.0).to(torch.int32)
    index = (first[:, None] + t[None]).clamp(max=in_size - 1).to(torch.int64)
    return index, weights


def _rounded(sums: Tensor) -> Tensor:
    """Pillow's rounding of fixed-point sums (half up) to uint8, clipped."""
    return ((sums + 2097152) // 4194304).clamp(0, 255).to(torch.uint8)


def _resize_axis(x: Tensor, size: int, dim: int) -> Tensor:
    """One 1-D pass of uint8 (..., H, W) along ``dim`` (-1: width, -2: height); int32 sums are
    exact (at most 255 * 2^22 * 1.0 + 2^21 < 2^31), as in Pillow."""
    index, weights = _taps(x.shape[dim], size)
    taps = x.index_select(dim, index.flatten()).unflatten(dim, index.shape).to(torch.int32)
    if dim == -1:
        return _rounded((taps * weights).sum(-1, dtype=torch.int32))
    return _rounded((taps * weights[..., None]).sum(-2, dtype=torch.int32))


class Resize(nn.Module):
    """Pillow's bilinear resize of uint8 (B, C, H, W) to uint8 (B, C, h, w); see the module docstring.

    Pillow runs the vertical pass first when the height shrinks by more than twice what the width
    does, else the horizontal one; the order changes the intermediate rounding, so it is followed
    (``torch.cond`` when exporting, an ONNX ``If``; a plain branch in eager mode and TorchScript)."""

    def __init__(self, hw: tuple[int, int]):
        super().__init__()
        self.h, self.w = as_hw(hw)

    def horizontal_first(self, x: Tensor) -> Tensor:
        return _resize_axis(_resize_axis(x, self.w, -1), self.h, -2)

    def vertical_first(self, x: Tensor) -> Tensor:
        return _resize_axis(_resize_axis(x, self.h, -2), self.w, -1)

    def forward(self, images: Tensor) -> Tensor:
        if images.dtype != torch.uint8:
            raise ValueError(f"Resize takes uint8 images, got {images.dtype}")
        dh, dw = images.shape[-2] - self.h, images.shape[-1] - self.w
        if not torch.jit.is_scripting():
            if torch.compiler.is_exporting():
                return torch.cond((dh > 0) & (dh > 2 * dw), self.vertical_first, self.horizontal_first, (images,))
        if (images.shape[-2], images.shape[-1]) == (self.h, self.w):
            return images
        if dh > 0 and dh > 2 * dw:
            return self.vertical_first(images)
        return self.horizontal_first(images)


def scale(images: Tensor) -> Tensor:
    """uint8 (..., H, W) -> float32 in [0, 1] (torchvision's ``to_dtype(scale=True)``)."""
    return TF.to_dtype(images, torch.float32, scale=True)


class Preprocess(nn.Module):
    """uint8 RGB (B, 3, H, W) of any size -> float32 (B, 3, h, w) in [0, 1] at the model's input
    size ``input_hw`` = (h, w)."""

    def __init__(self, input_hw: tuple[int, int]):
        super().__init__()
        self.input_hw = as_hw(input_hw)
        self.resize = Resize(self.input_hw)

    def forward(self, images: Tensor) -> Tensor:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"Preprocess expects uint8 images of shape (B, 3, H, W), got {tuple(images.shape)}")
        return scale(self.resize(images))


def image_batch(image: np.ndarray) -> Tensor:
    """uint8 (H, W, 3) array -> uint8 (1, 3, H, W) tensor (sharing memory unless the array is
    read-only or not contiguous)."""
    return torch.from_numpy(np.require(image, np.uint8, ["C", "W"])).permute(2, 0, 1)[None]


def resize_image(image: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """uint8 (h, w, 3) -> uint8 (H, W, 3): Pillow's bilinear resize, which ``Resize`` equals bit for
    bit (tests), run by Pillow (the arrays of data and synthesis, predict and serve). Always
    writable, so that ``torch.from_numpy`` takes it without a warning (a decoded image may be a
    read-only view; one already at the size is copied only then)."""
    h, w = as_hw(size)
    if image.shape[:2] == (h, w):
        return np.require(image, np.uint8, ["W"])
    return _pillow_bilinear(Image.fromarray(np.require(image, np.uint8, ["C"])), h, w)


def _pillow_bilinear(picture: Image.Image, h: int, w: int) -> np.ndarray:
    """The one Pillow call of the pre-process: ``picture`` resized to h x w, bilinear, as a new
    (writable: np.array, not asarray, whose view of Pillow's buffer is read-only) uint8 array."""
    return np.array(picture.resize((w, h), Image.BILINEAR))


def read_resized(path: str | Path, size: int | tuple[int, int],
                 max_pixels: int | None = DEFAULT_MAX_PIXELS) -> tuple[np.ndarray, tuple[int, int]]:
    """``resize_image(read_image(path), size)`` and the file's own (h, w), the same pixels for less
    work: a plain 8-bit gray file (mode L) is resized as its one channel and then repeated to three,
    and a plain RGB one is resized from the decoder's buffer, without the full-size RGB array between
    (Pillow resizes each channel alike, so the result is equal bit for bit; tests hold it for every
    mode). Any other mode goes through ``read_image``. Why: a KolektorSDD JPEG (1254 x 500, gray)
    took 7.7 ms to read and resize, 4.4 ms this way, and in ``prn predict`` that time is taken from
    the cores the model runs on."""
    h, w = as_hw(size)
    path = Path(path)
    with decode_image(path, max_pixels) as img:
        hw = (img.height, img.width)
        if img.mode not in ("L", "RGB") or has_alpha(img):
            return resize_image(to_rgb(path, img), (h, w)), hw
        small = np.array(img) if hw == (h, w) else _pillow_bilinear(img, h, w)
    if small.ndim == 2:
        small = np.repeat(small[:, :, None], 3, axis=2)
    return small, hw


def to_tensor(image: np.ndarray) -> Tensor:
    """uint8 (H, W, 3) -> float32 (3, H, W) in [0, 1] (``scale``), a plain tensor."""
    return scale(image_batch(image)[0])


def batches_of(images: list[np.ndarray], batch_size: int):
    """uint8 (H, W, 3) arrays of one size -> float32 (B, 3, H, W) model inputs, ``batch_size`` at a time."""
    for i in range(0, len(images), batch_size):
        chunk = torch.from_numpy(np.stack(images[i:i + batch_size])).permute(0, 3, 1, 2)
        yield scale(chunk)
