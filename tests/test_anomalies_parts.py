"""Building blocks of anomaly generation: Perlin noise, textures, Aug1/Aug2, target areas."""

import math

import numpy as np
import pytest
from PIL import Image, ImageOps

from prn.anomalies.augment import (
    AUG1_OPS,
    Affine,
    apply_aug1,
    apply_aug2,
    aug1,
    sample_aug1,
)
from prn.anomalies.perlin import (
    perlin_from_angles,
    perlin_mask,
    perlin_noise,
    random_perlin_noise,
)
from prn.anomalies.target_areas import (
    SIZE_RANGE,
    draw_shape,
    foreground_mask,
    otsu_threshold,
    sample_target_area,
)
from prn.anomalies.textures import PATTERNS, TextureSource, procedural_texture
from prn.errors import DataError


def rng(seed=0):
    return np.random.default_rng(seed)


def random_image(size=32, seed=0):
    return rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


# ---------------------------------------------------------------- Perlin noise

def reference_perlin(py, px, h, w, angles):
    """Textbook Perlin noise at one pixel, scalar code, scaled by sqrt(2)."""
    ry, rx = angles.shape[0] - 1, angles.shape[1] - 1
    y, x = py * ry / h, px * rx / w
    i, j = math.floor(y), math.floor(x)
    fy, fx = y - i, x - j

    def dot(ci, cj):
        a = angles[ci, cj]
        return math.cos(a) * (y - ci) + math.sin(a) * (x - cj)

    def fade(t):
        return 6 * t ** 5 - 15 * t ** 4 + 10 * t ** 3

    def lerp(a, b, t):
        return a + (b - a) * t

    top = lerp(dot(i, j), dot(i, j + 1), fade(fx))
    bottom = lerp(dot(i + 1, j), dot(i + 1, j + 1), fade(fx))
    return math.sqrt(2) * lerp(top, bottom, fade(fy))


def test_perlin_noise_matches_scalar_reference_at_every_pixel():
    angles = rng(3).uniform(0, 2 * np.pi, size=(4, 6))  # 3 x 5 cells
    h, w = 24, 40
    noise = perlin_from_angles((h, w), angles)
    expected = np.array([[reference_perlin(y, x, h, w, angles) for x in range(w)] for y in range(h)])
    assert noise.dtype == np.float32 and noise.shape == (h, w)
    np.testing.assert_allclose(noise, expected, atol=1e-5)


def test_perlin_noise_is_zero_on_lattice_points_and_bounded():
    noise = perlin_noise((64, 64), (4, 4), rng(1))
    assert np.abs(noise[::16, ::16]).max() < 1e-6
    assert np.abs(noise).max() <= 1.0 and noise.std() > 0.05


def test_perlin_noise_same_seed_same_field_and_other_seed_differs():
    a = perlin_noise((32, 32), (2, 4), rng(7))
    assert np.array_equal(a, perlin_noise((32, 32), (2, 4), rng(7)))
    assert not np.array_equal(a, perlin_noise((32, 32), (2, 4), rng(8)))


def test_random_perlin_noise_is_rotated_and_in_range():
    fields = [random_perlin_noise((64, 48), rng(s)) for s in range(20)]
    for f in fields:
        assert f.shape == (64, 48) and f.dtype == np.float32
        assert np.isfinite(f).all() and np.abs(f).max() <= 1.0
    # A field rotated off the axes is not zero along a whole row/column grid (unrotated ones are).
    assert any(np.abs(f[::8, ::8]).max() > 0.05 for f in fields)


def test_perlin_mask_shrinks_as_threshold_rises():
    areas = [perlin_mask((64, 64), rng(5), t).sum() for t in (-1.01, 0.0, 0.3, 0.6, 1.0)]
    assert areas[0] == 64 * 64 and areas[-1] == 0
    assert areas == sorted(areas, reverse=True)


# ---------------------------------------------------------------- textures

@pytest.mark.parametrize("pattern", sorted(PATTERNS))
def test_procedural_texture_is_varied_uint8_and_seeded(pattern):
    a = procedural_texture(48, rng(2), pattern)
    assert a.shape == (48, 48, 3) and a.dtype == np.uint8
    assert a.astype(float).std() > 3
    assert np.array_equal(a, procedural_texture(48, rng(2), pattern))
    assert not np.array_equal(a, procedural_texture(48, rng(3), pattern))


def test_default_texture_source_paints_different_textures():
    source = TextureSource(None, 32)
    g = rng(0)
    samples = [source.sample(g) for _ in range(6)]
    means = {tuple(np.round(s.reshape(-1, 3).mean(0))) for s in samples}
    assert len(means) == 6
    assert source.sample(rng(0), size=40).shape == (40, 40, 3)


def test_texture_folder_samples_its_images_resized(tmp_path):
    colours = {"banded": (200, 10, 10), "dotted": (10, 200, 10), "woven": (10, 10, 200)}
    for name, colour in colours.items():
        folder = tmp_path / "dtd" / "images" / name
        folder.mkdir(parents=True)
        Image.new("RGB", (60, 45), colour).save(folder / f"{name}_0001.png")
    (tmp_path / "dtd" / "labels.txt").write_text("not an image")
    source = TextureSource(str(tmp_path / "dtd"), 32)
    seen = set()
    for s in range(30):
        t = source.sample(rng(s))
        assert t.shape == (32, 32, 3) and t.dtype == np.uint8
        pixel = tuple(int(v) for v in t[0, 0])
        assert pixel in colours.values() and (t == t[0, 0]).all()
        seen.add(pixel)
    assert seen == set(colours.values())


def test_texture_folder_without_images_raises_data_error_naming_it(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(DataError, match=f"^{tmp_path}.*no images"):
        TextureSource(str(tmp_path), 32)
    with pytest.raises(DataError, match=f"^{tmp_path / 'missing'}"):
        TextureSource(str(tmp_path / "missing"), 32)


# ---------------------------------------------------------------- Aug1

def test_aug1_draws_two_distinct_known_operations_and_uses_them_all():
    names_seen = set()
    for s in range(200):
        ops = sample_aug1(rng(s))
        names = [n for n, _ in ops]
        assert len(ops) == 2 and len(set(names)) == 2 and set(names) <= set(AUG1_OPS)
        names_seen |= set(names)
    assert names_seen == set(AUG1_OPS)


def test_aug1_operations_match_independent_references():
    x = random_image(24, seed=4)
    xi = x.astype(int)
    assert np.array_equal(apply_aug1(x, [("invert", 0)]), 255 - x)
    assert np.array_equal(apply_aug1(x, [("solarize", 100)]), np.where(xi >= 100, 255 - xi, xi))
    assert np.array_equal(apply_aug1(x, [("posterize", 3)]), x & 0b11100000)
    gamma = np.clip(np.rint(255 * (xi / 255) ** 1.7), 0, 255)
    assert np.abs(apply_aug1(x, [("gamma", 1.7)]).astype(int) - gamma).max() <= 1
    assert np.array_equal(apply_aug1(x, [("equalize", 0)]), np.asarray(ImageOps.equalize(Image.fromarray(x))))
    low = (x // 2 + 40).astype(np.uint8)
    lo, hi = low.min(axis=(0, 1)), low.max(axis=(0, 1))
    stretched = (low.astype(float) - lo) * 255 / (hi - lo).astype(float)
    assert np.abs(apply_aug1(low, [("autocontrast", 0)]).astype(int) - stretched).max() <= 1
    assert np.array_equal(apply_aug1(x, [("sharpness", 1.0)]), x)
    # Operations compose in order: invert then posterize differs from posterize then invert.
    both = apply_aug1(x, [("invert", 0), ("posterize", 2)])
    assert np.array_equal(both, (255 - x) & 0b11000000)


def test_aug1_keeps_shape_dtype_and_is_seeded():
    x = random_image(32)
    a = aug1(x, rng(9))
    assert a.shape == x.shape and a.dtype == np.uint8
    assert np.array_equal(a, aug1(x, rng(9)))


# ---------------------------------------------------------------- Aug2

def shifted(a, dy, dx):
    """Brute-force integer translation with zero fill."""
    out = np.zeros_like(a)
    h, w = a.shape[:2]
    for y in range(h):
        for x in range(w):
            if 0 <= y + dy < h and 0 <= x + dx < w:
                out[y + dy, x + dx] = a[y, x]
    return out


def test_aug2_pure_shift_moves_image_and_mask_like_brute_force():
    x = random_image(20, seed=1)
    m = rng(1).random((20, 20)) > 0.6
    params = Affine(angle=0.0, shear=(0.0, 0.0), translate=(3.0, -5.0), center=(9.5, 9.5))
    img, mask = apply_aug2(x, m, params)
    assert np.array_equal(img, shifted(x, -5, 3)) and np.array_equal(mask, shifted(m, -5, 3))
    assert mask.dtype == bool


def test_aug2_quarter_turn_about_the_centre_is_an_exact_rotation():
    x = random_image(9, seed=2)
    m = rng(2).random((9, 9)) > 0.5
    img, mask = apply_aug2(x, m, Affine(90.0, (0.0, 0.0), (0.0, 0.0), (4.0, 4.0)))
    # torchvision turns clockwise for positive angles: np.rot90 with k=-1.
    assert np.array_equal(mask, np.rot90(m, -1)) and np.array_equal(img, np.rot90(x, -1))


def test_aug2_moves_image_and_mask_together():
    m = np.zeros((64, 64), bool)
    m[20:40, 15:30] = True
    x = np.repeat((m * 255).astype(np.uint8)[..., None], 3, axis=-1)
    params = Affine(angle=37.0, shear=(12.0, -8.0), translate=(6.0, -4.0), center=(22.0, 30.0))
    img, mask = apply_aug2(x, m, params)
    assert 0.8 * m.sum() < mask.sum() < 1.2 * m.sum()
    assert ((img[..., 0] > 127) == mask).mean() > 0.98


# ---------------------------------------------------------------- target areas

def brute_force_otsu_split(values):
    best, best_t = -1.0, None
    for t in range(1, 256):
        lo, hi = values[values < t], values[values >= t]
        if len(lo) == 0 or len(hi) == 0:
            continue
        var = len(lo) * len(hi) * (lo.mean() - hi.mean()) ** 2
        if var > best:
            best, best_t = var, t
    return values >= best_t


def test_otsu_threshold_splits_like_brute_force_search():
    g = rng(6)
    values = np.concatenate([g.normal(60, 15, 300), g.normal(170, 25, 200)]).clip(0, 255).round()
    assert np.array_equal(values >= otsu_threshold(values), brute_force_otsu_split(values))


def disk_image(size=64, bright_object=True, seed=0):
    yy, xx = np.mgrid[0:size, 0:size]
    disk = np.hypot(yy - size * 0.55, xx - size * 0.45) < size * 0.3
    g = rng(seed)
    img = np.where(disk[..., None], 190, 40) + g.normal(0, 12, (size, size, 3))
    img = np.clip(img, 0, 255).astype(np.uint8)
    return (img if bright_object else 255 - img), disk


@pytest.mark.parametrize("bright_object", [True, False])
def test_foreground_mask_finds_the_object_on_either_background(bright_object):
    img, disk = disk_image(64, bright_object)
    fg = foreground_mask(img)
    assert fg.dtype == bool
    assert (fg & disk).sum() / (fg | disk).sum() > 0.9


def test_foreground_mask_falls_back_to_whole_image_when_nothing_is_found():
    flat = np.full((32, 32, 3), 128, np.uint8)
    assert foreground_mask(flat).all()
    speck = np.zeros((64, 64, 3), np.uint8)
    speck[30:32, 30:32] = 255
    assert foreground_mask(speck).all()


def test_circle_and_rectangle_target_areas_have_their_shape_and_size():
    size = 128
    for s in range(10):
        circle = draw_shape((size, size), rng(s), (63.5, 63.5), "circle")
        ys, xs = np.nonzero(circle)
        width = xs.max() - xs.min() + 1
        assert SIZE_RANGE[0] * size - 2 <= width <= SIZE_RANGE[1] * size + 2
        assert abs(circle.sum() / (math.pi * (width / 2) ** 2) - 1) < 0.15
        rect = draw_shape((size, size), rng(s), (63.5, 63.5), "rectangle")
        ys, xs = np.nonzero(rect)
        assert rect.sum() == (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)


def test_polygon_target_area_holds_its_centre():
    for s in range(20):
        poly = draw_shape((64, 64), rng(s), (30.0, 20.0), "polygon")
        assert poly[20, 30]


def test_target_areas_are_non_empty_and_inside_the_foreground():
    img, _ = disk_image(64)
    fg = foreground_mask(img)
    for s in range(30):
        area = sample_target_area((64, 64), rng(s), fg)
        assert area.dtype == bool and area.any() and not (area & ~fg).any()
        assert sample_target_area((64, 64), rng(s)).any()


def test_target_area_on_a_single_pixel_foreground_is_that_pixel():
    fg = np.zeros((64, 64), bool)
    fg[3, 60] = True
    for s in range(5):
        assert np.array_equal(sample_target_area((64, 64), rng(s), fg), fg)
