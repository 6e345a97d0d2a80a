"""Detection and localisation metrics: arrays in, floats out (Sec. 4.1 of the paper).

- image AUROC (``I``) on image labels and image scores;
- pixel AUROC (``P``) and pixel AP (``A``) on every pixel of every test image;
- PRO (``O``), the area under the per-region-overlap curve up to FPR 0.3 (Bergmann et al., MVTec AD);
- F1-max on image labels and scores, with the threshold that reaches it.

Masks and maps are sequences of 2-D arrays (or one ``(N, H, W)`` array); each map must have its
mask's shape, but images may differ in size. A metric that is undefined for the data (a single
class, no defect region) is ``nan``, never an exception.

    >>> masks = np.zeros((2, 4, 4), bool); masks[1, 1:3, 1:3] = True
    >>> compute_all([0, 1], [0.1, 0.8], masks, masks * 0.9 + 0.05)["pro"]
    1.0
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

# MVTec AD's evaluation script labels regions with a full 3x3 structure: 8-connectivity.
REGION_STRUCTURE = np.ones((3, 3), dtype=bool)

METRIC_KEYS = ("image_auroc", "pixel_auroc", "pro", "pixel_ap", "f1_max", "f1_threshold")
# false-reject rates at which the recall an oracle threshold reaches is reported
ORACLE_RATES = (0.001, 0.01, 0.05)


def _image_arrays(labels, scores) -> tuple[np.ndarray, np.ndarray]:
    labels = np.asarray(labels).reshape(-1)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if labels.shape != scores.shape:
        raise ValueError(f"labels and scores differ in length: {labels.size} vs {scores.size}")
    if not np.isfinite(scores).all():
        raise ValueError(f"scores hold {int((~np.isfinite(scores)).sum())} non-finite values")
    return labels.astype(bool), scores


def image_auroc(labels, scores) -> float:
    """Area under the ROC curve of image scores. labels: (N,) in {0, 1}; scores: (N,) float."""
    y, s = _image_arrays(labels, scores)
    if y.all() or not y.any():
        return math.nan
    from sklearn.metrics import roc_auc_score  # in the functions: predict and serve never need sklearn
    return float(roc_auc_score(y, s))


def image_ap(labels, scores) -> float:
    """Average precision of image scores, defective parts the positives (nan without both classes)."""
    y, s = _image_arrays(labels, scores)
    if y.all() or not y.any():
        return math.nan
    from sklearn.metrics import average_precision_score
    return float(average_precision_score(y, s))


def oracle_threshold(labels, scores, rate: float) -> float:
    """The lowest threshold at which at most ``rate`` of the good parts' scores are judged
    defective (``score >= threshold``): just above the (floor(rate * n) + 1)-th largest good
    score. Taken on the data it is measured on, it is the best any threshold could do there."""
    y, s = _image_arrays(labels, scores)
    good = np.sort(s[~y])[::-1]
    if good.size == 0:
        return math.nan
    allowed = int(math.floor(rate * good.size + 1e-9))
    return float(np.nextafter(good[allowed], np.inf)) if allowed < good.size else float(good[-1])


def recall_at(labels, scores, threshold: float) -> float:
    """Share of the defective parts with ``score >= threshold`` (nan without any)."""
    y, s = _image_arrays(labels, scores)
    return float(np.mean(s[y] >= threshold)) if y.any() else math.nan


# The confidence of the intervals prn test reports: a test set of 50 defective parts pins a recall
# down to about +- 12 points, and a reader comparing two runs should see that before the digits.
CONFIDENCE = 0.95


def proportion_interval(successes: int, trials: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Clopper-Pearson (exact binomial) interval of a rate seen as ``successes`` of ``trials``:
    conservative, and defined at 0 and at ``trials`` where a recall or false-reject rate often
    sits. (nan, nan) without a trial."""
    if trials <= 0:
        return math.nan, math.nan
    if not 0 <= successes <= trials:
        raise ValueError(f"{successes} successes out of {trials} trials")
    from scipy.stats import binomtest
    ci = binomtest(int(successes), int(trials)).proportion_ci(confidence_level=confidence, method="exact")
    return float(ci.low), float(ci.high)


def auroc_interval(labels, scores, confidence: float = CONFIDENCE, resamples: int = 2000,
                   seed: int = 0) -> tuple[float, float]:
    """Bootstrap interval of the image AUROC: good and defective parts resampled apart (each
    resample keeps both classes and their counts), BCa by scipy; a fixed seed, so a test run
    reports the same interval twice. (nan, nan) without both classes."""
    y, s = _image_arrays(labels, scores)
    good, bad = s[~y], s[y]
    if good.size == 0 or bad.size == 0:
        return math.nan, math.nan
    if good.max() < bad.min() or bad.max() < good.min():  # separated: every resample agrees
        value = float(bad.min() > good.max())
        return value, value
    from scipy.stats import bootstrap

    def auroc(g, b, axis=-1):  # P(defective > good) + half the ties, over every pair (Mann-Whitney U)
        g, b = g[..., :, None], b[..., None, :]
        return ((b > g).mean(axis=(-2, -1)) + 0.5 * (b == g).mean(axis=(-2, -1)))
    ci = bootstrap((good, bad), auroc, n_resamples=resamples, confidence_level=confidence,
                   vectorized=True, batch=max(1, 2_000_000 // (good.size * bad.size)),
                   random_state=np.random.default_rng(seed)).confidence_interval
    return float(ci.low), float(ci.high)


def decision_metrics(labels, scores, kinds=None, threshold: float | None = None) -> dict[str, float]:
    """What a line judges first, beside the paper's metrics: image AP; the recall an oracle
    threshold reaches at each of ORACLE_RATES false rejects (``recall_at_0.1%`` ...); and per
    defect kind (``kinds``: (N,) names, the test sub-folders) its image AUROC against every good
    part and, given a ``threshold``, its recall there (``auroc[kind]``, ``recall[kind]``), with
    its number of defective parts (``n[kind]``)."""
    y, s = _image_arrays(labels, scores)
    out = {"image_ap": image_ap(y, s)}
    for rate in ORACLE_RATES:
        out[f"recall_at_{100 * rate:g}%"] = recall_at(y, s, oracle_threshold(y, s, rate))
    if kinds is not None:
        kinds = np.asarray(kinds)
        for kind in sorted(set(kinds[y].tolist())):
            out[f"n[{kind}]"] = float((y & (kinds == kind)).sum())
            out[f"auroc[{kind}]"], recall = _group_figures(y, s, kinds == kind, threshold)
            if recall is not None:
                out[f"recall[{kind}]"] = recall
    return out


def _group_figures(y: np.ndarray, s: np.ndarray, group: np.ndarray,
                   threshold: float | None) -> tuple[float, float | None]:
    """Image AUROC of the defects in ``group`` (bool (N,)) against every good part, and their
    recall at ``threshold`` (None without one)."""
    pick = ~y | group
    return image_auroc(y[pick], s[pick]), None if threshold is None else recall_at(y[pick], s[pick], threshold)


# Defect sizes, as the share of the image the defect's mask covers, that `prn test` reports figures
# for: the small defects are the ones an image score loses (the `cpu` preset stops BSData's pits
# under 0.05 % of the photo one time in six at the calibrated threshold, the larger ones 91-100 %
# of the time), and a line's engineer should see that before trusting the recall as a whole.
SIZE_BINS = ((0.0, 0.0005), (0.0005, 0.002), (0.002, 0.01), (0.01, math.inf))
# The same defects by their mask's pixels at the model's input, which is what the network sees: one
# cell of the encoder's finest (1/4) map is 16 pixels, and BSData's pits under it are stopped one
# time in five at 384 and at 512 pixels alike (README, "Small defects").
PIXEL_BINS = ((0, 16), (16, 32), (32, 64), (64, 128), (128, math.inf))


def size_name(lo: float, hi: float) -> str:
    """'< 0.05 %', '0.05-0.2 %', '0.2-1 %', '>= 1 %' for the bins of SIZE_BINS."""
    if lo == 0:
        return f"< {100 * hi:g} %"
    return f">= {100 * lo:g} %" if hi == math.inf else f"{100 * lo:g}-{100 * hi:g} %"


def pixels_name(lo: float, hi: float) -> str:
    """'< 16 px', '16-32 px', ..., '>= 128 px' for the bins of PIXEL_BINS."""
    if lo == 0:
        return f"< {hi:g} px"
    return f">= {lo:g} px" if hi == math.inf else f"{lo:g}-{hi:g} px"


# the two ways ``size_metrics`` bins a defect: its share of the image, its pixels at the input
SIZE_KINDS = {"size": (SIZE_BINS, size_name), "pixels": (PIXEL_BINS, pixels_name)}


def size_metrics(labels, scores, areas, threshold: float | None = None, kind: str = "size") -> dict[str, float]:
    """Per defect size (the bins of ``SIZE_KINDS[kind]`` over ``areas``: (N,) the share of each
    image its defect mask covers for "size", the mask's pixels at the model's input for "pixels";
    nan for a defect without pixel truth, a box or a label alone, which is left out; good parts'
    values unused): the number of defects (``<kind>_n[<name>]``), their image AUROC against every
    good part (``<kind>_auroc[...]``) and, given a ``threshold``, their recall there
    (``<kind>_recall[...]``). A bin without a defect is left out."""
    y, s = _image_arrays(labels, scores)
    areas = np.asarray(areas, dtype=np.float64)
    if areas.shape != s.shape:
        raise ValueError(f"areas must hold one value per image, got {areas.shape} for {s.shape[0]} images")
    bins, namer = SIZE_KINDS[kind]
    out = {}
    for lo, hi in bins:
        inside = y & (areas >= lo) & (areas < hi)
        if not inside.any():
            continue
        name = namer(lo, hi)
        out[f"{kind}_n[{name}]"] = float(inside.sum())
        out[f"{kind}_auroc[{name}]"], recall = _group_figures(y, s, inside, threshold)
        if recall is not None:
            out[f"{kind}_recall[{name}]"] = recall
    return out


def f1_max(labels, scores) -> tuple[float, float]:
    """Best F1 over all thresholds; returns (f1, threshold), anomalous meaning ``score >= threshold``."""
    y, s = _image_arrays(labels, scores)
    if not y.any():
        return math.nan, math.nan
    from sklearn.metrics import precision_recall_curve
    precision, recall, thresholds = precision_recall_curve(y, s)
    # The last (precision 1, recall 0) point has no threshold; its F1 is 0 anyway.
    precision, recall = precision[:-1], recall[:-1]
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(denom), where=denom > 0)
    best = int(np.argmax(f1))
    return float(f1[best]), float(thresholds[best])


@dataclass
class PixelCounts:
    """Counts over all pixels at each distinct score ``t`` of a defect pixel, highest ``t`` first.

    Between two such scores only defect-free pixels change sides, which moves FPR but neither TPR
    nor PRO, so these points (with the ``> t`` ones just before each) trace the exact ROC, PR and
    PRO curves. All arrays are (T,) float64; ``*_ge``: pixels with score >= t; ``*_gt``: > t.
    """

    neg_gt: np.ndarray     # defect-free pixels scoring above t
    neg_ge: np.ndarray
    pos_gt: np.ndarray     # defect pixels scoring above t
    pos_ge: np.ndarray
    overlap_gt: np.ndarray  # sum over regions of (share of the region scoring above t)
    overlap_ge: np.ndarray
    num_neg: int
    num_pos: int
    num_regions: int


def pixel_counts(masks, maps) -> PixelCounts:
    """Tally masks (N x bool (H, W)) against maps (N x float (H, W)) for the pixel metrics."""
    masks, maps = list(masks), list(maps)
    if len(masks) != len(maps):
        raise ValueError(f"got {len(masks)} masks but {len(maps)} maps")
    neg, pos, weight, num_regions = [], [], [], 0
    for i, (mask, amap) in enumerate(zip(masks, maps)):
        mask, amap = np.asarray(mask) > 0, np.asarray(amap)
        if mask.ndim != 2 or mask.shape != amap.shape:
            raise ValueError(f"image {i}: mask {mask.shape} and map {amap.shape} must be equal and 2-D")
        if not np.isfinite(amap).all():
            raise ValueError(f"image {i}: anomaly map holds non-finite values")
        regions, n = ndimage.label(mask, structure=REGION_STRUCTURE)
        sizes = np.bincount(regions[mask], minlength=n + 1)
        neg.append(amap[~mask])
        pos.append(amap[mask])
        weight.append(1.0 / sizes[regions[mask]])  # each pixel's share of its region
        num_regions += n
    neg = np.sort(np.concatenate(neg)) if neg else np.zeros(0)
    pos = np.concatenate(pos) if pos else np.zeros(0)
    weight = np.concatenate(weight) if weight else np.zeros(0)

    # Written by hand because scikit-learn's curves sort every pixel with its label (slow and
    # memory-hungry at 10^7-10^8 pixels); here only the few defect pixels are argsorted and the
    # defect-free ones need a plain sort, and the results are exact (tests compare to sklearn).
    order = np.argsort(pos, kind="stable")[::-1]
    pos, weight = pos[order], weight[order]
    last_of_tie = np.append(pos[1:] != pos[:-1], True) if pos.size else np.zeros(0, bool)
    t = pos[last_of_tie]
    pos_ge = np.flatnonzero(last_of_tie) + 1.0
    overlap_ge = np.cumsum(weight)[last_of_tie]
    return PixelCounts(
        neg_gt=(neg.size - np.searchsorted(neg, t, side="right")).astype(np.float64),
        neg_ge=(neg.size - np.searchsorted(neg, t, side="left")).astype(np.float64),
        pos_gt=np.concatenate(([0.0], pos_ge))[:-1],
        pos_ge=pos_ge,
        overlap_gt=np.concatenate(([0.0], overlap_ge))[:-1],
        overlap_ge=overlap_ge,
        num_neg=int(neg.size), num_pos=int(pos.size), num_regions=num_regions,
    )


def _curve(counts: PixelCounts, gt: np.ndarray, ge: np.ndarray, total: float):
    """(fpr, y) through every threshold, from (0, 0) to (1, 1); y = counts / total."""
    x = np.stack([counts.neg_gt, counts.neg_ge], axis=1).ravel() / counts.num_neg
    y = np.stack([gt, ge], axis=1).ravel() / total
    # Rounding in the cumulative sums must not push the curve past 1.
    return (np.concatenate(([0.0], np.minimum(x, 1.0), [1.0])),
            np.concatenate(([0.0], np.minimum(y, 1.0), [1.0])))


def _pixel_auroc(c: PixelCounts) -> float:
    if c.num_pos == 0 or c.num_neg == 0:
        return math.nan
    fpr, tpr = _curve(c, c.pos_gt, c.pos_ge, c.num_pos)
    return float(np.trapezoid(tpr, fpr))


def _pixel_ap(c: PixelCounts) -> float:
    if c.num_pos == 0:
        return math.nan
    # scikit-learn's definition: sum over thresholds of (recall gained) x (precision there).
    precision = c.pos_ge / (c.pos_ge + c.neg_ge)
    return float(np.sum((c.pos_ge - c.pos_gt) / c.num_pos * precision))


def _pro(c: PixelCounts, fpr_limit: float) -> float:
    if c.num_regions == 0 or c.num_neg == 0:
        return math.nan
    fpr, pro = _curve(c, c.overlap_gt, c.overlap_ge, c.num_regions)
    return float(area_to_limit(fpr, pro, fpr_limit) / fpr_limit)


def pixel_auroc(masks, maps) -> float:
    """Area under the ROC curve over all pixels. masks: N x bool (H, W); maps: N x float (H, W)."""
    return _pixel_auroc(pixel_counts(masks, maps))


def pixel_ap(masks, maps) -> float:
    """Average precision over all pixels, as ``sklearn.metrics.average_precision_score``."""
    return _pixel_ap(pixel_counts(masks, maps))


def pro_curve(masks, maps) -> tuple[np.ndarray, np.ndarray]:
    """The PRO curve: (fpr, pro), float64 (T,), from (0, 0) to (1, 1), fpr non-decreasing.

    At threshold t (anomalous: ``map >= t``) fpr is the share of defect-free pixels, over all
    images, at or above t; pro is the mean, over every connected defect region of every image
    (8-connected, as MVTec's script), of the share of that region's pixels at or above t.
    """
    c = pixel_counts(masks, maps)
    if c.num_regions == 0 or c.num_neg == 0:
        return np.array([0.0, 1.0]), np.array([math.nan, math.nan])
    return _curve(c, c.overlap_gt, c.overlap_ge, c.num_regions)


def area_to_limit(x: np.ndarray, y: np.ndarray, limit: float) -> float:
    """Trapezoid area under y(x) for x in [0, limit], interpolating y at the limit.

    x: (T,) non-decreasing from 0 with x[-1] >= limit; y: (T,).
    """
    inside = x <= limit
    xs, ys = x[inside], y[inside]
    area = float(np.trapezoid(ys, xs))
    if xs[-1] < limit:
        after = int(np.argmax(~inside))  # first point past the limit
        x0, y0, x1, y1 = xs[-1], ys[-1], x[after], y[after]
        y_limit = y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
        area += (limit - x0) * (y0 + y_limit) / 2
    return area


def pro_score(masks, maps, fpr_limit: float = 0.3) -> float:
    """Normalised area under the PRO curve for FPR in [0, fpr_limit] (1.0 is perfect).

    masks: N x bool (H, W) (or (N, H, W)); maps: N x float (H, W). Exact: one curve point per
    distinct score, like MVTec's script, rather than a fixed number of thresholds. nan when no
    image has a defect region or no pixel is defect-free.
    """
    if not 0 < fpr_limit <= 1:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    return _pro(pixel_counts(masks, maps), fpr_limit)


def compute_all(labels, scores, masks=None, maps=None, fpr_limit: float = 0.3) -> dict[str, float]:
    """All metrics of the paper's tables as floats (``nan`` where undefined).

    labels: (N,) int in {0, 1}; scores: (N,) float image scores; masks: N x bool (H, W);
    maps: N x float (H, W) at the masks' size. Without masks/maps the pixel metrics are nan.
    Keys: image_auroc, pixel_auroc, pro, pixel_ap, f1_max, f1_threshold.
    """
    f1, threshold = f1_max(labels, scores)
    out = {"image_auroc": image_auroc(labels, scores), "pixel_auroc": math.nan, "pro": math.nan,
           "pixel_ap": math.nan, "f1_max": f1, "f1_threshold": threshold}
    if masks is not None and maps is not None:
        counts = pixel_counts(masks, maps)
        out.update(pixel_auroc=_pixel_auroc(counts), pro=_pro(counts, fpr_limit),
                   pixel_ap=_pixel_ap(counts))
    return out
