import itertools
import math

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import average_precision_score, roc_auc_score

from prn import metrics


def concordant_pair_auroc(labels, scores):
    """P(score of a positive > score of a negative), ties counted half: the AUROC by hand."""
    labels, scores = np.asarray(labels, bool), np.asarray(scores, float)
    pos, neg = scores[labels], scores[~labels]
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def random_masks_and_maps(rng, n=6, size=20, quantise=True):
    """Blobby masks (some images defect-free) and noisy maps correlated with them."""
    masks = np.zeros((n, size, size), bool)
    for i in range(n // 2, n):
        masks[i] = ndimage.binary_dilation(rng.random((size, size)) < 0.02, iterations=1)
        masks[i, 2:4, 2:5] = True  # at least one region per defective image
    maps = 0.6 * ndimage.uniform_filter(masks.astype(float), size=(1, 3, 3)) + 0.5 * rng.random(masks.shape)
    if quantise:
        maps = np.round(maps, 1)  # many ties, which a PRO curve must group
    return masks, maps


def brute_force_pro(masks, maps, limit=0.3):
    """PRO computed literally: every distinct score as a threshold, regions by 8-connectivity."""
    labelled = [ndimage.label(m, structure=np.ones((3, 3)))[0] for m in masks]
    num_normal = sum((~m).sum() for m in masks)
    curve = [(0.0, 0.0), (1.0, 1.0)]
    for t in np.unique(np.concatenate([a.ravel() for a in maps])):
        false_positives, overlaps = 0, []
        for mask, amap, regions in zip(masks, maps, labelled):
            predicted = amap >= t
            false_positives += (predicted & ~mask).sum()
            for r in range(1, regions.max() + 1):
                region = regions == r
                overlaps.append((predicted & region).sum() / region.sum())
        curve.append((false_positives / num_normal, np.mean(overlaps)))
    curve.sort()
    # The trapezoid rule up to the limit, with the curve's value there interpolated.
    area = 0.0
    for (x0, y0), (x1, y1) in itertools.pairwise(curve):
        if x0 >= limit:
            break
        if x1 > limit:
            y1 = y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
            x1 = limit
        area += (x1 - x0) * (y0 + y1) / 2
    return area / limit


def test_image_auroc_matches_concordant_pair_count():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, 40)
    scores = np.round(rng.random(40) + 0.3 * labels, 1)  # with ties
    assert metrics.image_auroc(labels, scores) == pytest.approx(concordant_pair_auroc(labels, scores))


def test_pixel_auroc_matches_concordant_pair_count():
    rng = np.random.default_rng(2)
    masks, maps = random_masks_and_maps(rng, n=4, size=12)
    expected = concordant_pair_auroc(masks.ravel(), maps.ravel())
    assert metrics.pixel_auroc(masks, maps) == pytest.approx(expected, abs=1e-12)


def test_pixel_metrics_match_scikit_learn_on_tied_and_untied_maps():
    rng = np.random.default_rng(3)
    for quantise in (True, False):
        masks, maps = random_masks_and_maps(rng, n=8, size=24, quantise=quantise)
        y, s = masks.ravel(), maps.ravel()
        assert metrics.pixel_auroc(masks, maps) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
        assert metrics.pixel_ap(masks, maps) == pytest.approx(average_precision_score(y, s), abs=1e-12)


def test_pixel_ap_matches_mean_precision_at_each_defect_pixel():
    rng = np.random.default_rng(4)
    masks, maps = random_masks_and_maps(rng, n=4, size=16, quantise=False)  # no ties
    y, s = masks.ravel(), maps.ravel()
    ranked = y[np.argsort(-s)]
    precision_at_hits = np.cumsum(ranked)[ranked] / (np.flatnonzero(ranked) + 1)
    assert metrics.pixel_ap(masks, maps) == pytest.approx(precision_at_hits.mean(), abs=1e-12)


def test_pixel_ap_by_hand_on_five_pixels():
    # Ranked: 0.9 (defect), 0.8 (ok), 0.7 (defect), 0.2 (ok), 0.1 (defect):
    # AP = (1/1 + 2/3 + 3/5) / 3.
    mask = np.array([[1, 0, 1, 0, 1]], bool)
    amap = np.array([[0.9, 0.8, 0.7, 0.2, 0.1]])
    assert metrics.pixel_ap([mask], [amap]) == pytest.approx((1 + 2 / 3 + 3 / 5) / 3)


def test_f1_max_matches_brute_force_threshold_sweep():
    rng = np.random.default_rng(5)
    labels = rng.integers(0, 2, 50)
    scores = np.round(rng.random(50) + 0.4 * labels, 2)
    best = 0.0
    for t in np.unique(scores):
        pred = scores >= t
        tp = np.sum(pred & (labels == 1))
        f1 = 2 * tp / (pred.sum() + labels.sum())
        best = max(best, f1)
    f1, threshold = metrics.f1_max(labels, scores)
    assert f1 == pytest.approx(best)
    pred = scores >= threshold
    reached = 2 * np.sum(pred & (labels == 1)) / (pred.sum() + labels.sum())
    assert reached == pytest.approx(best)


def test_pro_matches_brute_force_on_random_masks():
    rng = np.random.default_rng(6)
    for quantise in (True, False):
        masks, maps = random_masks_and_maps(rng, n=6, size=20, quantise=quantise)
        expected = brute_force_pro(masks, maps)
        assert 0.05 < expected < 0.999
        assert metrics.pro_score(masks, maps) == pytest.approx(expected, abs=1e-3)


def test_pro_accepts_images_of_different_sizes():
    rng = np.random.default_rng(7)
    a_masks, a_maps = random_masks_and_maps(rng, n=2, size=16)
    b_masks, b_maps = random_masks_and_maps(rng, n=2, size=24)
    masks, maps = [*a_masks, *b_masks], [*a_maps, *b_maps]
    assert metrics.pro_score(masks, maps) == pytest.approx(brute_force_pro(masks, maps), abs=1e-3)


def test_pro_joins_diagonal_neighbours_into_one_region():
    # An L of three defect pixels plus one diagonal neighbour: one 8-connected region of 4
    # pixels. Only the diagonal pixel scores high, so at FPR 0 the overlap is 1/4 (two
    # 4-connected regions would give (0 + 1) / 2). Curve: (0, 0), (0, .25), (1, 1); the value
    # at FPR .3 is .25 + .3 * .75 = .475, area = .3 * (.25 + .475) / 2, normalised: .3625.
    mask = np.zeros((6, 6), bool)
    mask[1, 1] = mask[2, 1] = mask[2, 2] = True
    mask[3, 3] = True
    amap = np.zeros((6, 6))
    amap[3, 3] = 1.0
    assert metrics.pro_score([mask], [amap]) == pytest.approx(0.3625)


def test_pro_of_a_constant_map_is_the_diagonal_area():
    # All pixels tie: the curve jumps straight from (0, 0) to (1, 1); area to .3 is .3 * .3 / 2.
    mask = np.zeros((8, 8), bool)
    mask[2:5, 2:5] = True
    assert metrics.pro_score([mask], [np.full((8, 8), 0.5)]) == pytest.approx(0.15)


def test_pro_of_a_perfect_map_is_one():
    rng = np.random.default_rng(8)
    masks, _ = random_masks_and_maps(rng)
    assert metrics.pro_score(masks, masks.astype(float)) == pytest.approx(1.0)


def test_compute_all_returns_nan_for_undefined_metrics_instead_of_raising():
    masks = np.zeros((3, 8, 8), bool)
    maps = np.random.default_rng(9).random((3, 8, 8))
    out = metrics.compute_all([0, 0, 0], [0.1, 0.2, 0.3], masks, maps)
    assert set(out) == set(metrics.METRIC_KEYS)
    assert all(isinstance(v, float) for v in out.values())
    assert all(math.isnan(out[k]) for k in ("image_auroc", "pixel_auroc", "pro", "pixel_ap", "f1_max"))
    only_defects = np.ones((2, 4, 4), bool)
    out = metrics.compute_all([1, 1], [0.4, 0.9], only_defects, np.random.default_rng(0).random((2, 4, 4)))
    assert math.isnan(out["image_auroc"]) and math.isnan(out["pixel_auroc"]) and math.isnan(out["pro"])
    assert out["pixel_ap"] == pytest.approx(1.0) and out["f1_max"] == pytest.approx(1.0)


def test_compute_all_agrees_with_the_single_metrics():
    rng = np.random.default_rng(10)
    masks, maps = random_masks_and_maps(rng, n=8, size=16)
    labels = masks.reshape(8, -1).any(axis=1).astype(int)
    scores = maps.reshape(8, -1).max(axis=1) + rng.random(8) * 0.1
    out = metrics.compute_all(labels, scores, list(masks), list(maps))
    assert out["image_auroc"] == pytest.approx(roc_auc_score(labels, scores))
    assert out["pixel_auroc"] == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()))
    assert out["pixel_ap"] == pytest.approx(average_precision_score(masks.ravel(), maps.ravel()))
    assert out["pro"] == pytest.approx(brute_force_pro(masks, maps), abs=1e-3)
    assert (out["f1_max"], out["f1_threshold"]) == pytest.approx(metrics.f1_max(labels, scores))


def test_mismatched_mask_and_map_shapes_are_refused():
    with pytest.raises(ValueError, match="image 1"):
        metrics.pixel_auroc([np.zeros((4, 4)), np.zeros((4, 4))], [np.zeros((4, 4)), np.zeros((4, 5))])
    with pytest.raises(ValueError, match="non-finite"):
        metrics.pro_score([np.ones((2, 2))], [np.full((2, 2), np.nan)])


def test_pro_handles_two_hundred_full_size_maps():
    rng = np.random.default_rng(11)
    masks = np.zeros((200, 256, 256), bool)
    masks[::2, 100:140, 60:90] = True
    maps = rng.random(masks.shape, dtype=np.float32) * 0.6 + masks * 0.3
    value = metrics.pro_score(masks, maps)  # timing: benchmarks/metrics_speed.py
    assert 0.5 < value < 1.0


# ---------------------------------------------------------------- decisions (what the line acts on)

def test_oracle_threshold_allows_exactly_the_floor_of_rate_times_goods_false_rejects():
    from prn.metrics import oracle_threshold
    labels = np.r_[np.zeros(200), np.ones(3)]
    scores = np.r_[np.arange(200) / 200, [0.5, 0.999, 2.0]]
    for rate, allowed in [(0.001, 0), (0.01, 2), (0.05, 10), (0.0149, 2)]:
        t = oracle_threshold(labels, scores, rate)
        assert int((scores[:200] >= t).sum()) == allowed
        assert (scores[:200] >= np.nextafter(t, -np.inf)).sum() == allowed + 1  # the lowest such threshold


def test_decision_metrics_give_ap_oracle_recalls_and_per_kind_figures():
    from prn.metrics import decision_metrics
    labels = np.r_[np.zeros(100), np.ones(6)]
    scores = np.r_[np.linspace(0, 1, 100), [0.995, 1.5, 2.0, 0.2, 0.3, 3.0]]
    kinds = np.array(["good"] * 100 + ["crack"] * 3 + ["pore"] * 3)
    m = decision_metrics(labels, scores, kinds, threshold=0.9)
    from sklearn.metrics import average_precision_score
    assert m["image_ap"] == pytest.approx(average_precision_score(labels, scores))
    assert m["recall_at_0.1%"] == pytest.approx(3 / 6)   # no false reject: above the best good (1.0)
    assert m["recall_at_1%"] == pytest.approx(4 / 6)     # one allowed: above 0.9899
    assert m["recall_at_5%"] == pytest.approx(4 / 6)
    assert m["recall[crack]"] == 1.0 and m["recall[pore]"] == pytest.approx(1 / 3)
    assert m["auroc[crack]"] > m["auroc[pore]"]
    assert "auroc[good]" not in m and m["n[crack]"] == m["n[pore]"] == 3 and "n[good]" not in m


def test_size_metrics_split_the_defects_by_the_share_of_the_image_their_mask_covers():
    from prn.metrics import SIZE_BINS, size_metrics, size_name
    assert [size_name(lo, hi) for lo, hi in SIZE_BINS] == ["< 0.05 %", "0.05-0.2 %", "0.2-1 %", ">= 1 %"]
    labels = np.r_[np.zeros(100), np.ones(7)]
    scores = np.r_[np.linspace(0, 1, 100), [0.2, 0.95, 3.0, 2.0, 0.5, 1.5, 0.1]]
    # defects: two tiny, three mid-sized (one of them exactly at a bin's lower edge), one large,
    # one label alone (nan: left out); good parts' areas are not read
    areas = np.r_[np.full(100, 0.5), [0.0001, 0.0004, 0.0005, 0.001, 0.0019, 0.3, np.nan]]
    m = size_metrics(labels, scores, areas, threshold=0.9)
    assert m["size_n[< 0.05 %]"] == 2 and m["size_recall[< 0.05 %]"] == pytest.approx(1 / 2)
    assert m["size_n[0.05-0.2 %]"] == 3 and m["size_recall[0.05-0.2 %]"] == pytest.approx(2 / 3)
    assert m["size_n[>= 1 %]"] == 1 and m["size_recall[>= 1 %]"] == 1.0
    assert "size_n[0.2-1 %]" not in m  # no defect of that size
    from sklearn.metrics import roc_auc_score
    pick = np.r_[np.ones(100, bool), [True, True, False, False, False, False, False]]
    assert m["size_auroc[< 0.05 %]"] == pytest.approx(roc_auc_score(labels[pick], scores[pick]))
    assert "size_recall[< 0.05 %]" not in size_metrics(labels, scores, areas)  # no threshold, no recall
    with pytest.raises(ValueError, match="one value per image"):
        size_metrics(labels, scores, areas[:-1])


def test_size_metrics_by_pixels_of_the_input_bin_at_one_cell_of_the_finest_map():
    from prn.metrics import PIXEL_BINS, pixels_name, size_metrics
    assert [pixels_name(lo, hi) for lo, hi in PIXEL_BINS] == ["< 16 px", "16-32 px", "32-64 px", "64-128 px",
                                                              ">= 128 px"]
    labels = np.r_[np.zeros(4), np.ones(5)]
    scores = np.r_[0.1, 0.2, 0.3, 0.4, 0.05, 0.9, 0.95, 0.99, 0.5]
    pixels = np.r_[np.zeros(4), [9, 15, 16, 4000, np.nan]]  # 16 is a cell: the second bin's lower edge
    m = size_metrics(labels, scores, pixels, threshold=0.5, kind="pixels")
    assert m["pixels_n[< 16 px]"] == 2 and m["pixels_recall[< 16 px]"] == pytest.approx(1 / 2)
    assert m["pixels_n[16-32 px]"] == 1 and m["pixels_n[>= 128 px]"] == 1
    assert not any(k.startswith("size_") for k in m) and "pixels_n[32-64 px]" not in m


def test_a_defect_covering_the_whole_image_is_in_the_largest_share_bin():
    from prn.metrics import size_metrics
    m = size_metrics(np.r_[0, 1], np.r_[0.1, 0.9], np.r_[0.0, 1.0], threshold=0.5)
    assert m["size_n[>= 1 %]"] == 1 and m["size_recall[>= 1 %]"] == 1.0


def test_proportion_interval_is_the_exact_binomial_one():
    # at 0 and n successes Clopper-Pearson has a closed form: 1 - (alpha/2)^(1/n) and its mirror
    assert metrics.proportion_interval(0, 10) == pytest.approx((0.0, 1 - 0.025 ** 0.1))
    assert metrics.proportion_interval(10, 10) == pytest.approx((0.025 ** 0.1, 1.0))
    low, high = metrics.proportion_interval(39, 50)
    assert low < 39 / 50 < high and high - low > 0.2  # 50 parts leave a recall about +- 12 points
    wide, narrow = metrics.proportion_interval(5, 10), metrics.proportion_interval(500, 1000)
    assert narrow[1] - narrow[0] < (wide[1] - wide[0]) / 5
    assert all(math.isnan(v) for v in metrics.proportion_interval(0, 0))
    with pytest.raises(ValueError, match="11 successes out of 10"):
        metrics.proportion_interval(11, 10)


def test_auroc_interval_holds_the_auroc_narrows_with_data_and_repeats():
    rng = np.random.default_rng(0)

    def data(n_good, n_bad):
        y = np.r_[np.zeros(n_good), np.ones(n_bad)]
        return y, rng.normal(size=y.size) + 1.5 * y
    y, s = data(80, 20)
    low, high = metrics.auroc_interval(y, s)
    assert 0 <= low < roc_auc_score(y, s) < high <= 1
    assert metrics.auroc_interval(y, s) == (low, high)  # a fixed seed: the same interval twice
    big_y, big_s = data(800, 200)
    big_low, big_high = metrics.auroc_interval(big_y, big_s, resamples=500)
    assert big_high - big_low < (high - low) / 2
    ties = np.round(s, 1)  # ties count half, as roc_auc_score counts them
    low, high = metrics.auroc_interval(y, ties)
    assert low < roc_auc_score(y, ties) < high
    assert metrics.auroc_interval([0, 0, 1], [0.1, 0.2, 0.9]) == (1.0, 1.0)  # separated: nothing to resample
    assert all(math.isnan(v) for v in metrics.auroc_interval([0, 0], [0.1, 0.2]))
