"""Small seeded images shared by the anomaly-synthesis tests (64 x 64, uint8 RGB)."""

import numpy as np

from prn.anomalies.textures import procedural_texture

S = 64


def rng(seed=0):
    return np.random.default_rng(seed)


def normal_image(seed=0):
    """A procedural texture, standing in for a defect-free texture image."""
    return procedural_texture(S, rng(100 + seed))


def object_image(seed=0):
    """A textured disk on a dark backdrop, like an MVTec object."""
    yy, xx = np.mgrid[0:S, 0:S]
    disk = np.hypot(yy - 30, xx - 34) < 20
    img = np.full((S, S, 3), 15, np.uint8)
    img[disk] = 90 + procedural_texture(S, rng(seed))[disk] // 2
    return img
