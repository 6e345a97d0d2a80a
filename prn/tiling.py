"""Tiles: a large input cut into t x t equal tiles that the network sees one at a time, and their
maps put back together (``ModelConfig.tiles``; ours, not the paper's).

A defect of a few pixels in a 1,000-pixel photo vanishes when the photo is shrunk to the network's
input; cut into tiles, the photo keeps t times its linear resolution while each pass costs what one
image did. Tiles lie on a fixed grid without overlap, in training (``tile_at``) and inference alike,
so the prototypes fitted on the grid's tiles match what the network sees.

    >>> tiles = to_tiles(x, 3)          # (B, C, 3h, 3w) -> (9B, C, h, w), image-major, row-major
    >>> from_tiles(tiles, 3).equal(x)   # True
"""

from __future__ import annotations

import numpy as np
from torch import Tensor


def to_tiles(x: Tensor, t: int) -> Tensor:
    """(B, C, H, W) -> (B * t * t, C, H / t, W / t): image b's tiles at b*t*t + row*t + col.
    H and W must be multiples of t."""
    if t == 1:
        return x
    b, c, h, w = x.shape
    if h % t or w % t:
        raise ValueError(f"a {h} x {w} input does not cut into {t} x {t} equal tiles")
    x = x.reshape(b, c, t, h // t, t, w // t).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b * t * t, c, h // t, w // t)


def from_tiles(x: Tensor, t: int) -> Tensor:
    """Inverse of ``to_tiles``: (B * t * t, C, h, w) -> (B, C, t h, t w)."""
    if t == 1:
        return x
    n, c, h, w = x.shape
    if n % (t * t):
        raise ValueError(f"{n} tiles are not whole images of {t} x {t} tiles")
    x = x.reshape(n // (t * t), t, t, c, h, w).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(n // (t * t), c, t * h, t * w)


def tile_at(array: np.ndarray, t: int, row: int, col: int) -> np.ndarray:
    """Tile (row, col) of the t x t grid of an (H, W, ...) array (a view)."""
    h, w = array.shape[0] // t, array.shape[1] // t
    return array[row * h:(row + 1) * h, col * w:(col + 1) * w]


def tile_of_pixel(shape: tuple[int, int], t: int, y: int, x: int) -> tuple[int, int]:
    """(row, col) of the grid tile holding pixel (y, x) of an (H, W) image."""
    return min(t - 1, y // (shape[0] // t)), min(t - 1, x // (shape[1] // t))
