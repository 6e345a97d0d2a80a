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

Ours, off by default (``resize_detail``): before the resize, each full-size pixel may take the
darkest (``dark``: a min filter, Pillow's ``MinFilter``) or brightest (``bright``: ``MaxFilter``)
value of the window around it (``Detail``), wherever the resize changes the size. A resize by a
step of 3 averages a pit of 2 x 2 camera pixels into its neighbours at a third of its depth, under
the encoder's notice; filtered first, it keeps most of its depth in one input pixel. The resize
keeps its bit-for-bit twin: a window's min is exact in torch (``max_pool2d`` of the negated image).

    >>> pre = Preprocess((160, 384))
    >>> x = pre(torch.randint(0, 256, (2, 3, 500, 1250), dtype=torch.uint8))   # (2, 3, 160, 384) in [0, 1]
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from scipy import ndimage
from torch import Tensor, nn
from torch.nn import functional as F
from torchvision.transforms.v2 import functional as TF

from prn.data.io import DEFAULT_MAX_PIXELS, decode_image, has_alpha, read_image, read_mask, to_rgb

# Pillow's fixed-point weights for 8-bit images have 22 bits (32 - 8 - 2): the constants below are
# 2^22 and 2^21, written out because TorchScript compiles no module-level ints.


def as_hw(size: int | tuple[int, int]) -> tuple[int, int]:
    """An int S -> (S, S); (H, W) -> (H, W)."""
    if isinstance(size, int):
        return size, size
    h, w = size
    return int(h), int(w)


DETAIL_MODES = ("off", "dark", "bright")


@dataclass(frozen=True)
class Detail:
    """The filter run on the full-size image before the resize (see the module docstring): ``mode``
    "dark" (each pixel the min of the ``width`` x ``width`` window around it), "bright" (the max) or
    "off"; ``width`` odd, in the image's own pixels. A width of 1 or less changes nothing."""
    mode: str = "off"
    width: int = 0

    def __post_init__(self):
        if self.mode not in DETAIL_MODES:
            raise ValueError(f"Detail mode must be one of {', '.join(DETAIL_MODES)}, got {self.mode!r}")
        if self.width > 1 and self.width % 2 == 0:
            raise ValueError(f"Detail width must be odd, got {self.width}")

    @property
    def active(self) -> bool:
        return self.mode != "off" and self.width > 1

    def pillow(self, picture: Image.Image) -> Image.Image:
        """The filter of a Pillow image; the same pixels as Pillow's ``MinFilter`` / ``MaxFilter``
        (``rank_filter``)."""
        if not self.active:
            return picture
        return Image.fromarray(rank_filter(np.asarray(picture), self.width, self.mode == "dark"))


def rank_filter(image: np.ndarray, width: int, darkest: bool) -> np.ndarray:
    """Each pixel of uint8 (H, W) or (H, W, C) the min (``darkest``) or max of the width x width
    window around it, the window cut at the image's edges. Written by hand: Pillow's MinFilter and
    scipy's minimum_filter give these very pixels (tests) but took 87 and 28 ms for a BSData photo
    (1130 x 460 RGB) on 2 cores, where a window's min as the min of its rows' mins, over shifted
    views, takes under 2 ms; a line's predict spends about 30 ms an image in all."""
    reduce = np.minimum if darkest else np.maximum
    for axis in (0, 1):
        out, n = image.copy(), image.shape[axis]
        for s in range(1, min(width // 2, n - 1) + 1):
            lo = tuple(slice(0, n - s) if d == axis else slice(None) for d in range(image.ndim))
            hi = tuple(slice(s, n) if d == axis else slice(None) for d in range(image.ndim))
            reduce(out[lo], image[hi], out=out[lo])  # pixel i takes pixel i + s
            reduce(out[hi], image[lo], out=out[hi])  # and pixel i - s
        image = out
    return image


OFF = Detail()


def detail_width(full_hw: tuple[int, int], input_hw: tuple[int, int]) -> int:
    """The filter's width for images of ``full_hw`` resized to ``input_hw``: the odd number the
    resize's step (the smaller of the two axes' factors) falls beside, 3 for steps of 2 to 4, 5 for
    4 to 6, so that a defect one pixel wide spreads over about one input pixel; 0 (no filter) where
    the step is under 2."""
    step = min(full_hw[0] / input_hw[0], full_hw[1] / input_hw[1])
    return 2 * int(step // 2) + 1 if step >= 2 else 0


def defect_side(samples, max_pixels: int | None = DEFAULT_MAX_PIXELS, share: float = 0.75,
                ring: int = 5) -> dict:
    """Which side of their surroundings the seen defects are on, for ``resize_detail: auto``:
    {"mode": "dark" | "bright" | "off", "masks", "darker", "brighter", "why"}. Each defect with a
    pixel mask compares the median gray level inside its mask with that of a ring ``ring`` pixels
    wide around it, at the image's own size; ``share`` of them on one side picks that side, else
    (or with no mask: boxes and labels do not say where the defect's pixels are) "off"."""
    darker = brighter = 0
    masked = [s for s in samples if s.mask_path is not None and s.annotation == "mask"]
    for s in masked:
        gray = read_image(s.image_path, max_pixels).mean(axis=2)
        mask = read_mask(s.mask_path, gray.shape, max_pixels, image_path=s.image_path) > 0
        around = ndimage.binary_dilation(mask, iterations=ring) & ~mask
        if not mask.any() or not around.any():
            continue
        diff = float(np.median(gray[mask]) - np.median(gray[around]))
        darker, brighter = darker + (diff < 0), brighter + (diff > 0)
    n = darker + brighter
    mode = "dark" if n and darker >= share * n else "bright" if n and brighter >= share * n else "off"
    why = (f"{darker} of {n} seen defects darker than around them, {brighter} brighter" if n
           else "no seen defect with a pixel mask")
    return {"mode": mode, "masks": n, "darker": darker, "brighter": brighter, "why": why}


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
    (``torch.cond`` when exporting, an ONNX ``If``; a plain branch in eager mode and TorchScript).
    ``detail``'s filter runs first where the size changes (an image at the input size passes as it
    is, so a frame filtered and resized beforehand is not filtered twice), equal to Pillow's bit for
    bit: a max pool pads with -inf, so a window at the edge holds only the image's own pixels, as
    Pillow's does."""

    def __init__(self, hw: tuple[int, int], detail: Detail = OFF):
        super().__init__()
        self.h, self.w = as_hw(hw)
        # plain ints, which TorchScript and the exporters take as constants: the sign turns the
        # max pool into a min pool for "dark"; 0 is no filter
        self.detail_sign = {"dark": -1, "bright": 1}.get(detail.mode, 0) if detail.active else 0
        self.detail_width = detail.width

    def unfiltered(self, images: Tensor) -> Tensor:
        return images.clone()  # torch.cond's branches may not return their input itself

    def filtered(self, images: Tensor) -> Tensor:
        if self.detail_sign == 0:
            return images
        x = images.to(torch.float32) * self.detail_sign
        x = F.max_pool2d(x, self.detail_width, 1, self.detail_width // 2) * self.detail_sign
        return x.to(torch.uint8)

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
                if self.detail_sign != 0:
                    images = torch.cond((dh == 0) & (dw == 0), self.unfiltered, self.filtered, (images,))
                return torch.cond((dh > 0) & (dh > 2 * dw), self.vertical_first, self.horizontal_first, (images,))
        if (images.shape[-2], images.shape[-1]) == (self.h, self.w):
            return images
        images = self.filtered(images)
        if dh > 0 and dh > 2 * dw:
            return self.vertical_first(images)
        return self.horizontal_first(images)


def scale(images: Tensor) -> Tensor:
    """uint8 (..., H, W) -> float32 in [0, 1] (torchvision's ``to_dtype(scale=True)``)."""
    return TF.to_dtype(images, torch.float32, scale=True)


class Preprocess(nn.Module):
    """uint8 RGB (B, 3, H, W) of any size -> float32 (B, 3, h, w) in [0, 1] at the model's input
    size ``input_hw`` = (h, w)."""

    def __init__(self, input_hw: tuple[int, int], detail: Detail = OFF):
        super().__init__()
        self.input_hw = as_hw(input_hw)
        self.detail = detail
        self.resize = Resize(self.input_hw, detail)

    def forward(self, images: Tensor) -> Tensor:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"Preprocess expects uint8 images of shape (B, 3, H, W), got {tuple(images.shape)}")
        return scale(self.resize(images))


def image_batch(image: np.ndarray) -> Tensor:
    """uint8 (H, W, 3) array -> uint8 (1, 3, H, W) tensor (sharing memory unless the array is
    read-only or not contiguous)."""
    return torch.from_numpy(np.require(image, np.uint8, ["C", "W"])).permute(2, 0, 1)[None]


def resize_image(image: np.ndarray, size: int | tuple[int, int], detail: Detail = OFF) -> np.ndarray:
    """uint8 (h, w, 3) -> uint8 (H, W, 3): Pillow's bilinear resize, which ``Resize`` equals bit for
    bit (tests), run by Pillow (the arrays of data and synthesis, predict and serve). Always
    writable, so that ``torch.from_numpy`` takes it without a warning (a decoded image may be a
    read-only view; one already at the size is copied only then). ``detail``: the filter before
    the resize, where there is one (an image at the size passes as it is, as in ``Resize``)."""
    h, w = as_hw(size)
    if image.shape[:2] == (h, w):
        return np.require(image, np.uint8, ["W"])
    return _pillow_bilinear(Image.fromarray(np.require(image, np.uint8, ["C"])), h, w, detail)


def _pillow_bilinear(picture: Image.Image, h: int, w: int, detail: Detail = OFF) -> np.ndarray:
    """The one Pillow call of the pre-process: ``picture`` filtered (``detail``) and resized to
    h x w, bilinear, as a new (writable: np.array, not asarray, whose view of Pillow's buffer is
    read-only) uint8 array."""
    return np.array(detail.pillow(picture).resize((w, h), Image.BILINEAR))


def read_resized(path: str | Path, size: int | tuple[int, int], max_pixels: int | None = DEFAULT_MAX_PIXELS,
                 detail: Detail = OFF) -> tuple[np.ndarray, tuple[int, int]]:
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
            return resize_image(to_rgb(path, img), (h, w), detail), hw
        small = np.array(img) if hw == (h, w) else _pillow_bilinear(img, h, w, detail)
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
