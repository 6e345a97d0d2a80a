"""Extended and simulated anomalies: Eq. 4 / Eq. 6 and the mask invariants."""

import numpy as np
import pytest

from prn.anomalies.extended import blend, make_extended, place_on_target
from prn.anomalies.simulated import (
    elongation,
    make_heterologous,
    make_homologous,
    make_simulated,
    perlin_in_target,
    shuffle_grid,
    stroke_decision,
    stroke_in_target,
)
from prn.anomalies.target_areas import sample_target_area
from prn.anomalies.textures import procedural_texture

from anomaly_images import S, rng, normal_image


def seen_anomaly(seed=0):
    image = procedural_texture(S, rng(200 + seed))
    mask = np.zeros((S, S), bool)
    mask[10:22, 30:50] = True
    image[mask] = (230, 20, 40)
    return image, mask


def check_invariants(normal, image, mask, target):
    assert image.shape == normal.shape and image.dtype == np.uint8
    assert mask.shape == normal.shape[:2] and mask.dtype == bool
    assert mask.any(), "mask is empty"
    assert not (mask & ~target).any(), "mask leaves the target area"
    changed = (image != normal).any(axis=-1)
    assert np.array_equal(mask, changed), "mask differs from the changed pixels"


# ---------------------------------------------------------------- blend (Eq. 4 / 6)

def test_blend_matches_the_equation_computed_by_hand():
    g = rng(1)
    n = g.integers(0, 256, (6, 5, 3), dtype=np.uint8)
    a = g.integers(0, 256, (6, 5, 3), dtype=np.uint8)
    m = g.random((6, 5)) > 0.5
    a[0, 0], m[0, 0] = n[0, 0], True          # source equals normal: unchanged pixel
    a[1, 1], m[1, 1] = n[1, 1] + 1, True       # a one-level difference that beta rounds away
    beta = 0.7
    out, changed = blend(n, a, m, beta)
    for y in range(6):
        for x in range(5):
            mm = float(m[y, x])
            for c in range(3):
                want = (1 - mm) * n[y, x, c] + (1 - beta) * mm * a[y, x, c] + beta * mm * n[y, x, c]
                assert abs(int(out[y, x, c]) - want) <= 0.5 + 1e-6
            assert changed[y, x] == bool((out[y, x] != n[y, x]).any())
    assert not changed[0, 0] and not changed[1, 1]


def test_blend_with_zero_opacity_pastes_the_source():
    n, a = normal_image(0), normal_image(1)
    m = np.zeros((S, S), bool)
    m[5:20, 5:40] = True
    out, _ = blend(n, a, m, 0.0)
    assert np.array_equal(out[m], a[m]) and np.array_equal(out[~m], n[~m])


# ---------------------------------------------------------------- extended anomalies

@pytest.mark.parametrize("seed", range(8))
def test_extended_anomaly_keeps_the_invariants(seed):
    normal = normal_image(seed)
    seen_image, seen_mask = seen_anomaly(seed)
    target = sample_target_area((S, S), rng(seed))
    beta = rng(seed).uniform(0, 0.8)
    image, mask = make_extended(normal, seen_image, seen_mask, target, beta, rng(seed))
    check_invariants(normal, image, mask, target)
    again = make_extended(normal, seen_image, seen_mask, target, beta, rng(seed))
    assert np.array_equal(again[0], image) and np.array_equal(again[1], mask)


def test_extended_anomaly_is_the_seen_defect_not_the_target_area():
    normal = normal_image(0)
    seen_image, seen_mask = seen_anomaly(0)
    whole = np.ones((S, S), bool)
    for s in range(10):
        _, mask = make_extended(normal, seen_image, seen_mask, whole, 0.0, rng(s))
        # Rotation and shear keep a region's area; only the image border can cut it.
        assert mask.sum() <= 1.15 * seen_mask.sum()


def test_extended_anomaly_shrunk_by_ea_scale_min_keeps_the_invariants_and_draws_smaller_defects():
    from prn.anomalies.augment import sample_aug2

    normal = normal_image(4)
    seen_image, seen_mask = seen_anomaly(4)
    whole = np.ones((S, S), bool)
    areas = {1.0: [], 0.5: []}
    for s in range(12):
        for min_scale in areas:
            image, mask = make_extended(normal, seen_image, seen_mask, whole, 0.0, rng(s), min_scale=min_scale)
            check_invariants(normal, image, mask, whole)
            areas[min_scale].append(int(mask.sum()))
    # a factor in [0.5, 1] on each side: a quarter to all of the area, a little under half on average
    assert all(a <= 1.15 * seen_mask.sum() for a in areas[0.5])
    assert 0.25 * seen_mask.sum() * 0.8 <= min(areas[0.5]) and np.mean(areas[0.5]) < 0.75 * np.mean(areas[1.0])
    # at 1 the draws are the paper's, draw for draw: no extra random number is taken
    a, b = rng(7), rng(7)
    assert sample_aug2(a, (S, S), min_scale=1.0) == sample_aug2(b, (S, S)) and a.random() == b.random()
    shrunk = [sample_aug2(rng(k), (S, S), min_scale=0.5).scale for k in range(50)]
    assert 0.5 <= min(shrunk) and max(shrunk) <= 1.0 and np.std(shrunk) > 0.05


def test_ea_scale_min_is_checked():
    from prn.config import SynthesisConfig

    assert SynthesisConfig().ea_scale_min == 1.0
    for bad in (0.0, 1.5, -0.2):
        with pytest.raises(ValueError, match="ea_scale_min must be in"):
            SynthesisConfig(ea_scale_min=bad)


def test_extended_anomaly_opacity_limits_the_change():
    normal = normal_image(2)
    seen_image, seen_mask = seen_anomaly(2)
    target = np.ones((S, S), bool)
    for beta in (0.5, 0.9):
        image, _ = make_extended(normal, seen_image, seen_mask, target, beta, rng(3))
        assert np.abs(image.astype(int) - normal).max() <= (1 - beta) * 255 + 0.5


def test_extended_anomaly_reaches_a_small_far_target():
    normal = normal_image(3)
    seen_image = normal_image(4)
    seen_mask = np.zeros((S, S), bool)
    seen_mask[1:4, 1:4] = True                 # a tiny defect in the top-left corner
    target = np.zeros((S, S), bool)
    target[58:61, 58:61] = True                # a tiny target in the bottom-right corner
    for s in range(6):
        image, mask = make_extended(normal, seen_image, seen_mask, target, 0.3, rng(s))
        check_invariants(normal, image, mask, target)


def test_fallback_placement_always_overlaps_the_target():
    image = normal_image(5)
    mask = np.zeros((S, S), bool)
    mask[0:2, 0:2] = True
    target = np.zeros((S, S), bool)
    target[63, 63] = True
    for s in range(5):
        moved, moved_mask = place_on_target(image, mask, target, rng(s))
        assert moved_mask[63, 63] and moved.shape == image.shape


def test_extended_refuses_an_empty_seen_mask():
    with pytest.raises(ValueError, match="empty"):
        make_extended(normal_image(), normal_image(1), np.zeros((S, S), bool), np.ones((S, S), bool), 0.2, rng())


# ---------------------------------------------------------------- simulated anomalies

def test_shuffle_grid_permutes_whole_cells():
    image = rng(7).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    out = shuffle_grid(image, 8, rng(7))

    def cells(a):
        return sorted(a[y:y + 8, x:x + 8].tobytes() for y in range(0, 64, 8) for x in range(0, 64, 8))

    assert cells(out) == cells(image) and not np.array_equal(out, image)


def test_shuffle_grid_leaves_the_remainder_in_place():
    image = rng(8).integers(0, 256, (30, 35, 3), dtype=np.uint8)
    out = shuffle_grid(image, 4, rng(8))            # cells 7 x 8, remainder 2 rows and 3 columns
    assert np.array_equal(out[28:], image[28:]) and np.array_equal(out[:, 32:], image[:, 32:])


@pytest.mark.parametrize("seed", range(6))
def test_heterologous_anomaly_keeps_the_invariants(seed):
    normal = normal_image(seed)
    target = sample_target_area((S, S), rng(seed))
    texture = procedural_texture(S, rng(300 + seed))
    image, mask = make_heterologous(normal, texture, target, 0.4, 0.5, rng(seed))
    check_invariants(normal, image, mask, target)


@pytest.mark.parametrize("seed", range(6))
def test_homologous_anomaly_keeps_the_invariants(seed):
    normal = normal_image(seed)
    target = sample_target_area((S, S), rng(seed))
    image, mask = make_homologous(normal, target, 0.4, 0.5, 8, rng(seed))
    check_invariants(normal, image, mask, target)
    again = make_homologous(normal, target, 0.4, 0.5, 8, rng(seed))
    assert np.array_equal(again[0], image)


def test_simulated_mask_drops_pixels_where_the_source_equals_the_normal():
    normal = normal_image(0)
    texture = normal.copy()
    texture[:, 32:] = 255 - texture[:, 32:]          # only the right half differs
    image, mask = make_heterologous(normal, texture, np.ones((S, S), bool), 0.0, 0.0, rng(1))
    # Aug1 may recolour the left half too; whatever it did, the mask is exactly what changed.
    assert np.array_equal(mask, (image != normal).any(axis=-1)) and mask.any()


def test_perlin_in_target_falls_back_when_the_noise_never_reaches_the_threshold():
    target = np.zeros((S, S), bool)
    target[10:20, 10:30] = True
    m = perlin_in_target(target, rng(0), threshold=2.0)   # Perlin values never exceed 1
    assert m.any() and not (m & ~target).any()


def test_identical_source_and_normal_still_give_a_non_empty_anomaly():
    flat = np.full((S, S, 3), 128, np.uint8)
    # Aug1 of a flat image, shuffled, may equal the image: the generator must still mark a change.
    for s in range(4):
        image, mask = make_homologous(flat, np.ones((S, S), bool), 0.7, 0.5, 8, rng(s))
        check_invariants(flat, image, mask, np.ones((S, S), bool))


def test_a_source_equal_to_the_normal_falls_back_to_a_visible_patch():
    normal = normal_image(6)
    target = sample_target_area((S, S), rng(6))
    image, mask = make_simulated(normal, normal.copy(), target, 0.5, 0.5, rng(6))
    check_invariants(normal, image, mask, target)


# ---------------------------------------------------------------- strokes (ours)

@pytest.mark.parametrize("seed", range(6))
def test_a_stroke_is_a_thin_line_inside_the_target(seed):
    target = sample_target_area((S, S), rng(seed))
    m = stroke_in_target(target, rng(seed), width=(1, 2))
    assert m.dtype == bool and m.any() and not (m & ~target).any()
    ys, xs = np.nonzero(m)
    extent = max(np.ptp(ys), np.ptp(xs)) + 1
    # thin: its area is a few pixels per pixel of length (a blob's grows with its extent squared)
    assert m.sum() <= 3 * extent
    assert np.array_equal(m, stroke_in_target(target, rng(seed), width=(1, 2)))


def test_a_target_too_small_for_a_stroke_still_gets_a_mask():
    target = np.zeros((S, S), bool)
    target[30, 30] = True
    m = stroke_in_target(target, rng(0))
    assert m.any() and not (m & ~target).any()


def test_the_stroke_share_picks_the_mask_shape_and_zero_leaves_the_random_stream_alone():
    normal, texture = normal_image(1), procedural_texture(S, rng(301))
    target = np.ones((S, S), bool)
    strokes = [make_heterologous(normal, texture, target, 0.0, 0.5, rng(s), stroke_share=1.0, stroke_width=(1, 1))[1]
               for s in range(4)]
    blobs = [make_heterologous(normal, texture, target, 0.0, 0.5, rng(s))[1] for s in range(4)]
    assert max(m.sum() for m in strokes) < min(m.sum() for m in blobs)
    off = make_heterologous(normal, texture, target, 0.0, 0.5, rng(0), stroke_share=0.0)
    assert np.array_equal(off[0], make_heterologous(normal, texture, target, 0.0, 0.5, rng(0))[0])


def test_elongation_tells_a_line_from_a_blob():
    line, disc = np.zeros((S, S), bool), np.zeros((S, S), bool)
    line[30:32, 5:55] = True                                   # 50 x 2
    yy, xx = np.mgrid[:S, :S]
    disc[(yy - 32) ** 2 + (xx - 32) ** 2 <= 100] = True
    assert 20 < elongation(line) < 30 and elongation(disc) < 1.1
    speck = np.zeros((S, S), bool)
    speck[3, 3] = True
    assert elongation(speck) == pytest.approx(1.0) and elongation(np.zeros((S, S), bool)) is None
    two = line.copy()
    two[40:50, 40:50] = True                                   # the largest part decides
    assert elongation(two) == pytest.approx(elongation(line))


def test_auto_strokes_follow_the_shape_of_the_masked_seen_defects():
    image = normal_image(0)
    thin, blob = np.zeros((S, S), bool), np.zeros((S, S), bool)
    thin[20:22, 5:50] = True
    blob[20:30, 20:30] = True
    on = stroke_decision("auto", [(image, thin, "mask")] * 2 + [(image, blob, "mask")], 4.0)
    assert on["used"] and on["n"] == 3 and on["elongation"] > 4
    assert not stroke_decision("auto", [(image, blob, "mask")] * 2 + [(image, thin, "mask")], 4.0)["used"]
    # boxes and labels say nothing of the shape
    unknown = stroke_decision("auto", [(image, thin, "box"), (image, np.zeros((S, S), bool), "label")], 4.0)
    assert not unknown["used"] and "no seen defect has a mask" in unknown["why"]
    assert stroke_decision("on", [], 4.0)["used"] and not stroke_decision("off", [(image, thin, "mask")], 4.0)["used"]
