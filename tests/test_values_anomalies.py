"""Anomaly synthesis pinned by value: Eq. 4 / Eq. 6 pixel by pixel, masks that are the changed
pixels where the Perlin mask and the changed pixels differ, and show-anomalies grids that show.

Several tests replay a generator: they draw from a copy of the same seeded rng in the order the
docstrings give (Aug1, then the Perlin mask, ...) and compare with the function's output. That
pins which image each step applies to (the texture, the normal image, the seen defect).
"""

import numpy as np
import pytest
from PIL import Image

from prn.anomalies.augment import aug1, sample_aug2, warp_image, warp_mask
from prn.anomalies.compose import AnomalyGenerator
from prn.anomalies.extended import AUG2_TRIES, BLEND_TRIES, MIN_AREA, blend, make_extended, place_on_target
from prn.anomalies.perlin import perlin_mask, random_perlin_noise
from prn.anomalies.show import HEADER, PAD, show_anomalies
from prn.anomalies.simulated import (
    PERLIN_TRIES,
    make_heterologous,
    make_homologous,
    make_simulated,
    perlin_in_target,
    shuffle_grid,
)
from prn.anomalies.textures import procedural_texture
from prn.config import PRNConfig

from anomaly_images import S, normal_image, object_image, rng

WHOLE = np.ones((S, S), bool)


def changed_pixels(a, b):
    return (a != b).any(axis=-1)


def seed_whose_perlin_mask_crosses_the_middle(threshold=0.5):
    for s in range(50):
        m = perlin_in_target(WHOLE, rng(s), threshold)
        if m[:, :S // 2].any() and m[:, S // 2:].any():
            return s, m
    raise AssertionError("no seed gives a Perlin mask on both halves")


# ---------------------------------------------------------------- Eq. 6 and its mask

def test_simulated_mask_is_the_changed_part_of_the_perlin_region_not_the_whole_region():
    normal = normal_image(0)
    source = normal.copy()
    source[:, S // 2:] = 255 - source[:, S // 2:]     # the source equals the normal on the left half
    s, perlin = seed_whose_perlin_mask_crosses_the_middle()
    image, mask = make_simulated(normal, source, WHOLE, 0.0, 0.5, rng(s))
    right = np.zeros((S, S), bool)
    right[:, S // 2:] = True
    assert np.array_equal(mask, perlin & right)
    assert np.array_equal(mask, changed_pixels(image, normal))
    assert np.array_equal(image[mask], source[mask]) and np.array_equal(image[~mask], normal[~mask])


def test_simulated_pixels_follow_equation_6():
    normal = normal_image(1)
    source = rng(2).integers(0, 256, (S, S, 3), dtype=np.uint8)
    beta = 0.3
    s, perlin = seed_whose_perlin_mask_crosses_the_middle()
    image, mask = make_simulated(normal, source, WHOLE, beta, 0.5, rng(s))
    want = np.clip(np.rint((1 - beta) * source.astype(np.float32) + beta * normal.astype(np.float32)), 0, 255)
    assert np.array_equal(image[perlin], want[perlin].astype(np.uint8))
    assert np.array_equal(image[~perlin], normal[~perlin])
    assert np.array_equal(mask, perlin & changed_pixels(want.astype(np.uint8), normal))


def test_simulated_anomaly_with_beta_near_one_falls_back_to_an_inverted_perlin_patch():
    normal = normal_image(2)
    source = np.clip(normal.astype(int) + 60, 0, 255).astype(np.uint8)   # 60 levels * 0.005 rounds away
    replay = rng(3)
    for _ in range(BLEND_TRIES):
        last = perlin_in_target(WHOLE, replay, 0.5)
    image, mask = make_simulated(normal, source, WHOLE, 0.995, 0.5, rng(3))
    assert np.array_equal(mask, last) and mask.any()
    assert np.array_equal(image[mask], 255 - normal[mask])
    assert np.array_equal(image[~mask], normal[~mask])


def test_blend_with_beta_near_one_changes_nothing_it_cannot_show():
    normal = normal_image(3)
    source = np.clip(normal.astype(int) + 60, 0, 255).astype(np.uint8)
    out, changed = blend(normal, source, WHOLE, 0.995)
    assert np.array_equal(out, normal) and not changed.any()
    out, changed = blend(normal, source, WHOLE, 0.9)   # 6 levels: visible
    assert changed.sum() > 0.9 * S * S and np.array_equal(changed, changed_pixels(out, normal))


def test_heterologous_source_is_the_augmented_texture():
    normal, texture = normal_image(4), procedural_texture(S, rng(400))
    replay = rng(5)
    source = aug1(texture, replay)
    want = make_simulated(normal, source, WHOLE, 0.2, 0.5, replay)
    image, mask = make_heterologous(normal, texture, WHOLE, 0.2, 0.5, rng(5))
    assert np.array_equal(image, want[0]) and np.array_equal(mask, want[1])


def test_homologous_source_is_the_augmented_normal_image_shuffled_on_the_grid():
    normal = normal_image(5)
    replay = rng(6)
    source = shuffle_grid(aug1(normal, replay), 4, replay)
    want = make_simulated(normal, source, WHOLE, 0.0, 0.5, replay)
    image, mask = make_homologous(normal, WHOLE, 0.0, 0.5, 4, rng(6))
    assert np.array_equal(image, want[0]) and np.array_equal(mask, want[1])


def draws_of(seed, target, threshold=0.5, n=PERLIN_TRIES, **kw):
    replay = rng(seed)
    return [perlin_mask((S, S), replay, threshold, **kw) & target for _ in range(n)]


def find_seed(condition, target, **kw):
    for seed in range(500):
        draws = draws_of(seed, target, **kw)
        if condition([int(d.sum()) for d in draws], draws):
            return seed, draws
    raise AssertionError("no seed meets the test's precondition")


WANTED = int(np.ceil(MIN_AREA * S * S))  # 5 px at 64 x 64


def test_perlin_in_target_keeps_the_first_draw_that_reaches_min_area_exactly():
    band = np.zeros((S, S), bool)
    band[30] = True                                # a one-pixel band: overlaps are short runs

    def first_reaching_is_exact(areas, draws):
        return any(a >= WANTED for a in areas) and next(a for a in areas if a >= WANTED) == WANTED

    seed, draws = find_seed(first_reaching_is_exact, band)
    first = next(d for d in draws if d.sum() >= WANTED)
    assert np.array_equal(perlin_in_target(band, rng(seed), 0.5), first)


def test_perlin_in_target_keeps_the_largest_draw_when_none_reaches_min_area():
    target = np.zeros((S, S), bool)
    target[30:36, 30:36] = True                    # 36 px, so MIN_AREA's 5 px are wanted

    def slivers_growing(areas, draws):
        nonzero = [a for a in areas if a]
        return max(areas) < WANTED and len(nonzero) >= 2 and nonzero[0] < max(areas)

    seed, draws = find_seed(slivers_growing, target)
    largest = draws[int(np.argmax([d.sum() for d in draws]))]
    assert np.array_equal(perlin_in_target(target, rng(seed), 0.5), largest)


def test_perlin_in_target_keeps_the_first_of_equally_large_slivers():
    target = np.zeros((S, S), bool)
    target[30:36, 30:36] = True

    def tie(areas, draws):
        top = [i for i, a in enumerate(areas) if a == max(areas)]
        return 0 < max(areas) < WANTED and len(top) >= 2 and not np.array_equal(draws[top[0]], draws[top[1]])

    seed, draws = find_seed(tie, target)
    assert np.array_equal(perlin_in_target(target, rng(seed), 0.5), draws[int(np.argmax([d.sum() for d in draws]))])


def test_perlin_in_target_of_one_pixel_that_the_noise_misses_is_that_pixel():
    target = np.zeros((S, S), bool)
    target[5, 7] = True
    assert np.array_equal(perlin_in_target(target, rng(0), threshold=2.0), target)  # noise never > 1


def test_perlin_in_target_fallback_uses_the_same_noise_scales():
    target = np.zeros((S, S), bool)
    target[10:40, 10:50] = True
    replay = rng(20)
    for _ in range(PERLIN_TRIES):
        assert not perlin_mask((S, S), replay, 2.0, (0, 1)).any()   # threshold 2 is never reached
    noise = random_perlin_noise((S, S), replay, (0, 1))
    want = target & (noise >= np.median(noise[target]))
    assert np.array_equal(perlin_in_target(target, rng(20), 2.0, (0, 1)), want)


def test_perlin_in_target_refuses_an_empty_target():
    with pytest.raises(ValueError, match="^the target area is empty$"):
        perlin_in_target(np.zeros((S, S), bool), rng(0), 0.5)


def test_perlin_scales_reach_every_draw_of_a_simulated_anomaly():
    normal = normal_image(11)
    source = 255 - normal
    scales = (0, 1)                                # one lattice cell per side: a few large blobs
    replay = rng(12)
    want = perlin_in_target(WHOLE, replay, 0.5, scales)
    assert not np.array_equal(want, perlin_in_target(WHOLE, rng(12), 0.5))
    assert np.array_equal(make_simulated(normal, source, WHOLE, 0.0, 0.5, rng(12), scales)[1], want)
    texture = procedural_texture(S, rng(13))
    assert not np.array_equal(aug1(texture, rng(14), 3, 0.3), aug1(texture, rng(14), 3, 1.0))
    replay = rng(14)
    src = aug1(texture, replay, 3, 0.3)
    want = make_simulated(normal, src, WHOLE, 0.0, 0.5, replay, scales)
    got = make_heterologous(normal, texture, WHOLE, 0.0, 0.5, rng(14), aug1_ops=3, aug1_prob=0.3, scales=scales)
    assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1])
    replay = rng(15)
    src = shuffle_grid(aug1(normal, replay, 1, 0.5), 4, replay)
    want = make_simulated(normal, src, WHOLE, 0.0, 0.5, replay, scales)
    got = make_homologous(normal, WHOLE, 0.0, 0.5, 4, rng(15), aug1_ops=1, aug1_prob=0.5, scales=scales)
    assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1])


def test_shuffle_grid_works_down_to_one_pixel_cells_and_refuses_smaller():
    image = rng(16).integers(0, 256, (8, 64, 3), dtype=np.uint8)
    out = shuffle_grid(image, 8, rng(16))                      # cells of 1 x 8 pixels
    assert sorted(map(bytes, out.reshape(-1, 3))) == sorted(map(bytes, image.reshape(-1, 3)))
    assert shuffle_grid(image.transpose(1, 0, 2).copy(), 8, rng(16)).shape == (64, 8, 3)
    with pytest.raises(ValueError, match="a 8x8 grid does not fit a 64x4 image"):
        shuffle_grid(np.zeros((64, 4, 3), np.uint8), 8, rng(16))
    with pytest.raises(ValueError, match="a 8x8 grid does not fit a 4x64 image"):
        shuffle_grid(np.zeros((4, 64, 3), np.uint8), 8, rng(16))


# ---------------------------------------------------------------- Eq. 4

def seen_defect():
    image = procedural_texture(S, rng(200))
    mask = np.zeros((S, S), bool)
    mask[10:22, 30:50] = True
    image[mask] = (230, 20, 40)
    return image, mask


def test_extended_anomaly_is_the_recoloured_moved_defect_blended_inside_the_target():
    normal = normal_image(6)
    seen_image, seen_mask = seen_defect()
    target = np.zeros((S, S), bool)
    target[16:56, 8:48] = True
    replay = rng(9)
    recoloured = aug1(seen_image, replay, 2, 1.0)
    moved, moved_mask = place_on_target(recoloured, seen_mask, target, replay, 90.0)
    want = blend(normal, moved, moved_mask & target, 0.25)
    image, mask = make_extended(normal, seen_image, seen_mask, target, 0.25, rng(9))
    assert np.array_equal(image, want[0]) and np.array_equal(mask, want[1])
    assert np.array_equal(mask, changed_pixels(image, normal)) and not (mask & ~target).any()


def test_extended_anomaly_unclipped_keeps_the_defect_outside_the_target():
    normal = normal_image(7)
    seen_image = normal_image(8)
    seen_mask = np.zeros((S, S), bool)
    seen_mask[20:44, 20:44] = True
    target = np.zeros((S, S), bool)
    target[30:34, 30:34] = True
    kw = dict(aug1_ops=0, max_angle=0.0)
    _, clipped = make_extended(normal, seen_image, seen_mask, target, 0.0, rng(1), **kw)
    image, whole = make_extended(normal, seen_image, seen_mask, target, 0.0, rng(1), clip_to_target=False, **kw)
    assert not (clipped & ~target).any()
    assert (whole & ~target).sum() > 10 * target.sum()
    assert np.array_equal(whole, changed_pixels(image, normal))


def test_extended_anomaly_with_beta_near_one_falls_back_to_an_inverted_patch_in_the_target():
    normal = np.full((S, S, 3), 128, np.uint8)
    seen_image = np.full((S, S, 3), 160, np.uint8)  # 32 levels (or 128 where Aug2 fills) * 0.002 round away
    seen_mask = np.zeros((S, S), bool)
    seen_mask[20:40, 20:40] = True
    image, mask = make_extended(normal, seen_image, seen_mask, WHOLE, 0.998, rng(2), aug1_ops=0)
    assert mask.any() and np.array_equal(image[mask], 255 - normal[mask])
    assert np.array_equal(image[~mask], normal[~mask])


def test_placement_overlaps_the_target_by_at_least_min_area_when_it_can():
    image = normal_image(10)
    mask = np.zeros((S, S), bool)
    mask[4:20, 4:20] = True
    target = np.zeros((S, S), bool)
    target[32:60, 32:60] = True
    for s in range(5):
        _, moved = place_on_target(image, mask, target, rng(s))
        assert (moved & target).sum() >= WANTED


def aug2_draws(seed, mask, n=AUG2_TRIES, max_angle=90.0):
    """The Aug2 maps place_on_target draws, pivoting on the defect's centroid."""
    ys, xs = np.nonzero(mask)
    replay = rng(seed)
    return [sample_aug2(replay, mask.shape, center=(xs.mean(), ys.mean()), max_angle=max_angle) for _ in range(n)]


def test_placement_is_the_first_aug2_draw_that_overlaps_min_area_pivoting_on_the_defect():
    image = normal_image(11)
    mask = np.zeros((S, S), bool)
    mask[10:22, 30:50] = True
    target = np.zeros((S, S), bool)
    target[:, :S // 2] = True                      # the left half
    for seed in range(200):                        # first overlap a sliver, a later one large enough
        params = aug2_draws(seed, mask)
        areas = [int((warp_mask(mask, p) & target).sum()) for p in params]
        if 0 < areas[0] < WANTED and any(a >= WANTED for a in areas):
            break
    else:
        raise AssertionError("no seed meets the test's precondition")
    chosen = params[next(i for i, a in enumerate(areas) if a >= WANTED)]
    moved, moved_mask = place_on_target(image, mask, target, rng(seed))
    assert np.array_equal(moved_mask, warp_mask(mask, chosen))
    assert np.array_equal(moved, warp_image(image, chosen))


def test_placement_keeps_a_draw_that_overlaps_min_area_exactly():
    image = normal_image(11)
    mask = np.zeros((S, S), bool)
    mask[10:22, 30:50] = True
    band = np.zeros((S, S), bool)
    band[10] = True                                # one row: overlaps are short runs
    for seed in range(300):                        # the first large-enough draw has exactly 5 px
        params = aug2_draws(seed, mask)
        areas = [int((warp_mask(mask, p) & band).sum()) for p in params]
        enough = [i for i, a in enumerate(areas) if a >= WANTED]
        if enough and areas[enough[0]] == WANTED and max(areas) > WANTED:
            break
    else:
        raise AssertionError("no seed meets the test's precondition")
    _, moved_mask = place_on_target(image, mask, band, rng(seed))
    assert np.array_equal(moved_mask, warp_mask(mask, params[enough[0]]))


def test_a_defect_smaller_than_min_area_is_placed_by_the_first_draw_that_keeps_it_whole():
    image = normal_image(11)
    mask = np.zeros((S, S), bool)
    mask[30:32, 30:32] = True                      # 4 px: less than MIN_AREA's 5
    for seed in range(300):                        # a later draw's shear grows it to 5 px
        params = aug2_draws(seed, mask)
        areas = [int(warp_mask(mask, p).sum()) for p in params]
        whole = [i for i, a in enumerate(areas) if a >= 4]
        if whole and areas[whole[0]] == 4 and max(areas) >= WANTED:
            break
    else:
        raise AssertionError("no seed meets the test's precondition")
    _, moved_mask = place_on_target(image, mask, WHOLE, rng(seed))
    assert np.array_equal(moved_mask, warp_mask(mask, params[whole[0]]))


def test_placement_draws_aug2_within_the_given_rotation_range():
    image = normal_image(11)
    mask = np.zeros((S, S), bool)
    mask[10:22, 30:50] = True
    first = aug2_draws(21, mask, n=1, max_angle=20.0)[0]
    moved, moved_mask = place_on_target(image, mask, WHOLE, rng(21), 20.0)
    assert np.array_equal(moved_mask, warp_mask(mask, first)) and np.array_equal(moved, warp_image(image, first))
    assert not np.array_equal(moved_mask, warp_mask(mask, aug2_draws(21, mask, n=1)[0]))


def test_placement_keeps_a_one_pixel_overlap_with_a_one_pixel_target():
    image = normal_image(12)
    mask = np.zeros((S, S), bool)
    mask[24:40, 24:40] = True
    target = np.zeros((S, S), bool)
    target[32, 32] = True
    for seed in range(100):
        params = aug2_draws(seed, mask)
        hits = [bool(warp_mask(mask, p)[32, 32]) for p in params]
        if any(hits):
            break
    chosen = params[hits.index(True)]
    moved, moved_mask = place_on_target(image, mask, target, rng(seed))
    assert np.array_equal(moved_mask, warp_mask(mask, chosen))


def test_fallback_placement_puts_the_pixel_nearest_the_centroid_on_the_target_exactly():
    image = normal_image(13)
    image[image == 0] = 1                          # zero is the shift's fill value
    mask = np.zeros((S, S), bool)
    mask[59:62, 59:62] = True                      # a 3 x 3 defect: its centre is (60, 60)
    target = np.zeros((S, S), bool)
    target[2, 3] = True                            # far away and tiny: Aug2 misses it
    moved, moved_mask = place_on_target(image, mask, target, rng(0))
    want_mask = np.zeros((S, S), bool)
    want_mask[1:4, 2:5] = True                     # the centre lands on (2, 3)
    assert np.array_equal(moved_mask, want_mask)
    want = np.zeros_like(image)
    want[:S - 58, :S - 57] = image[58:, 57:]       # the whole image moved by (-58, -57), zero fill
    assert np.array_equal(moved, want)


def test_fallback_placement_moves_down_and_right_exactly():
    image = normal_image(14)
    image[image == 0] = 1
    mask = np.zeros((S, S), bool)
    mask[1:4, 2:5] = True                          # centre (2, 3)
    target = np.zeros((S, S), bool)
    target[61, 60] = True
    moved, moved_mask = place_on_target(image, mask, target, rng(0))
    assert moved_mask[60:63, 59:62].all() and moved_mask.sum() == 9
    want = np.zeros_like(image)
    want[59:, 57:] = image[:S - 59, :S - 57]       # moved by (+59, +57)
    assert np.array_equal(moved, want)


def test_extended_anomaly_defaults_are_two_aug1_ops_always_applied_and_90_degrees():
    normal = normal_image(15)
    seen_image, seen_mask = seen_defect()
    target = np.zeros((S, S), bool)
    target[8:56, 8:56] = True
    want = make_extended(normal, seen_image, seen_mask, target, 0.1, rng(16),
                         aug1_ops=2, aug1_prob=1.0, max_angle=90.0)
    got = make_extended(normal, seen_image, seen_mask, target, 0.1, rng(16))
    assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1])
    assert not np.array_equal(aug1(seen_image, rng(17), 3, 0.2), aug1(seen_image, rng(17), 3, 1.0))
    replay = rng(17)
    recoloured = aug1(seen_image, replay, 3, 0.2)
    moved, moved_mask = place_on_target(recoloured, seen_mask, target, replay, 30.0)
    want = blend(normal, moved, moved_mask & target, 0.1)
    got = make_extended(normal, seen_image, seen_mask, target, 0.1, rng(17), aug1_ops=3, aug1_prob=0.2, max_angle=30.0)
    assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1])


def test_placement_default_rotation_range_is_90_degrees():
    image = normal_image(18)
    mask = np.zeros((S, S), bool)
    mask[10:22, 30:50] = True
    a = place_on_target(image, mask, WHOLE, rng(19))
    b = place_on_target(image, mask, WHOLE, rng(19), 90.0)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])


def test_extended_fallback_patch_stays_inside_the_target():
    normal = np.full((S, S, 3), 128, np.uint8)
    seen_image = np.full((S, S, 3), 160, np.uint8)
    seen_mask = np.zeros((S, S), bool)
    seen_mask[20:40, 20:40] = True
    target = np.zeros((S, S), bool)
    target[24:36, 10:54] = True
    image, mask = make_extended(normal, seen_image, seen_mask, target, 0.998, rng(3), aug1_ops=0)
    assert mask.any() and not (mask & ~target).any()
    assert np.array_equal(image[mask], 255 - normal[mask]) and np.array_equal(image[~mask], normal[~mask])


@pytest.mark.parametrize("which, message", [
    ("seen", "^the seen anomaly's mask is empty: it has no defect region to extend$"),
    ("target", "^the target area is empty$"),
])
def test_extended_anomaly_refuses_empty_regions_with_a_message(which, message):
    seen_image, seen_mask = seen_defect()
    empty = np.zeros((S, S), bool)
    args = (empty, WHOLE) if which == "seen" else (seen_mask, empty)
    with pytest.raises(ValueError, match=message):
        make_extended(normal_image(0), seen_image, *args, 0.2, rng(0))


# ---------------------------------------------------------------- show-anomalies grids

def seen_anomalies():
    image = object_image(50)
    mask = np.zeros((S, S), bool)
    mask[25:33, 28:40] = True
    image[mask] = (240, 240, 30)
    return [(image, mask)]


def tiles(grid, row, n_cols=4):
    top = HEADER + row * (S + PAD)
    return [grid[top:top + S, PAD + c * (S + PAD):PAD + c * (S + PAD) + S] for c in range(n_cols)]


def test_show_anomalies_grids_show_each_anomaly_and_exactly_its_mask(tmp_path):
    cfg = PRNConfig(image_size=S, batch_size=8)
    gen = AnomalyGenerator(cfg, seen_anomalies(), "object")
    normals = [object_image(s) for s in range(3)]
    paths = show_anomalies(normals, gen, tmp_path, n=2, seed=0)
    for path in paths:
        grid = np.asarray(Image.open(path).convert("RGB"))
        for row in range(2):
            normal, anomaly, mask, target = tiles(grid, row)
            assert any(np.array_equal(normal, n) for n in normals), path.name
            white = (mask == 255).all(axis=-1)
            assert white.any(), path.name
            assert np.array_equal(white | (mask == 0).all(axis=-1), np.ones((S, S), bool))
            assert np.array_equal(white, changed_pixels(anomaly, normal)), path.name
            inside = (target == normal).all(axis=-1)
            assert inside.any() and not inside.all(), path.name

