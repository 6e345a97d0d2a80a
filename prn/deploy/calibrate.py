"""Decision thresholds that travel with the model, set on held-out normal training images.

No test image is used: ``fit`` holds out a fold of the training data (``split.json``:
``val_normal``, ``val_anomalous``; see ``prn.data.split.hold_out_validation``) that is never
trained on and never used for prototypes. Its scores set

- the image threshold, at a target false-reject rate ``target_fpr`` on good parts (a part is
  judged defective when ``score >= image_threshold``);
- the pixel threshold, at ``pixel_target_fpr`` of the good parts' pixels (for masks and contours);
- optionally a review threshold under it, at ``review_fpr`` (> target_fpr) of good parts: a part
  scored between the two passes the image threshold but goes to a person (the review band);
- anomalib's score normalisation: ``clip((s - threshold) / (max - min) + 0.5, 0, 1)``, so 0.5 is
  the threshold whatever the model's score scale (PRN's probabilities, PatchCore's distances).

The result is stored in the checkpoint (``payload["calibration"]``) and in the run folder's
``calibration.json``; ``prn.postprocess.Postprocess`` decides and normalises with it. Beside the
thresholds it keeps how the fold's good images look (``appearance``: ``prn.deploy.drift``), so
that predict and serve can say when the line's photos no longer look like them.

``fit`` calibrates the model it holds on the fold's outputs that the last validation computed
(``calibrate_predictions``); ``prn calibrate`` scores the fold again from its files
(``calibrate_run``), e.g. to set another target rate.

    >>> cal = calibrate(normal_scores, normal_maps, target_fpr=0.01)
    >>> Postprocess(cal).judge(np.array([0.7]))
"""

from __future__ import annotations

import json
import math
import shlex
from pathlib import Path

import numpy as np

from prn.config import CALIBRATION_TAILS, CalibrationConfig
from prn.deploy.drift import appearance_reference
from prn.errors import DataError, PRNError, UsageError

SOURCE = "held-out normal training images (split.json val_normal)"
# what the suspect warning and the threshold image's note tell a person to do about an image
NOT_GOOD_ADVICE = ("if a defect shows, set the thresholds without it: prn calibrate {run} --not-good {images} "
                   "(and put it with the defects before the next fit)")


def not_good_advice(paths: list[str], run: str | Path | None = None) -> str:
    """``NOT_GOOD_ADVICE`` with the run folder and the images' paths where known (quoted for a
    shell), else RUN and IMAGE."""
    images = " ".join(shell_word(p) for p in paths) if paths and all(paths) else "IMAGE"
    return NOT_GOOD_ADVICE.format(run=shell_word(run, "RUN"), images=images)


def shell_word(value: str | Path | None, placeholder: str = "") -> str:
    """``value`` quoted for a shell, so that a command the messages give can be pasted as it is
    (a path with a space); ``placeholder`` where it is unknown."""
    return shlex.quote(str(value)) if value else placeholder


TAILS = CALIBRATION_TAILS


def image_threshold(normal_scores: np.ndarray, target_fpr: float, tail: str = "gumbel",
                    score_bound: float | None = None) -> tuple[float, str]:
    """The image threshold for a false-reject rate ``target_fpr`` on good parts, and how it was set.

    With enough good parts (n * target_fpr >= 1) it is their empirical (1 - target_fpr) quantile.
    With fewer, an empirical quantile cannot resolve the rate (a threshold at the largest of n
    scores rejects about 1 / (n + 1) of new good parts, 11 % for n = 8), so the tail is taken from
    a distribution fitted to the scores, never below the largest held-out score: ``gumbel``
    (default; an image score is the mean of a map's largest pixels, a maximum-like statistic,
    whose tail the extreme-value distribution describes) or ``normal`` (mean + z sd). On 16 runs of
    two real sets at a 1 % target, the normal fit rejected 1.6-7.6 % of unseen good parts per
    model, the Gumbel fit 0.7-2.2 % (BENCHMARKS.md, "Calibrated thresholds").

    ``gumbel_logit`` fits the Gumbel to the scores' logits and maps its quantile back: for a
    model whose score is a probability (PRN's, ``score_bound`` 1) good parts pile up near 0 with a
    long right tail, which a Gumbel on the scores themselves fits too thinly, so its quantile often
    falls under the largest held-out score and the threshold is that score, which rejects about
    1 / (n + 1) of new good parts. On the logit scale the tail fits; over 132 runs of the two
    development sets it kept closer to a 1 % target (BENCHMARKS.md, "A threshold fitted on the
    logit scale"), at some recall. Refused for scores that are not probabilities.

    ``conformal`` fits nothing: the threshold is just above the k-th smallest held-out score, k =
    ceil((n + 1)(1 - target_fpr)), which bounds the expected false-reject rate of new good parts
    by target_fpr whatever the scores' distribution, as long as they are exchangeable with the
    held-out ones (split conformal prediction). It needs n >= 1 / target_fpr - 1 (99 for 1 %);
    with fewer it is the largest held-out score, whose bound 1 / (n + 1) it says.

    ``score_bound``: the largest score the model can give (1 for PRN, whose map is a probability).
    A fitted tail at or past it would reject nothing at all; the largest held-out score is taken
    instead, and the method says so. (Seen on a run trained on boxes alone, whose scores crowd
    just under 1: the Gumbel fit put the threshold at 1.25.)
    """
    if tail not in TAILS:
        raise UsageError(f"calibration tail must be one of {', '.join(TAILS)}, got {tail!r}")
    s = np.sort(np.asarray(normal_scores, dtype=np.float64).ravel())
    if s.size == 0:
        raise PRNError("calibration needs at least one held-out normal image")
    if tail == "conformal":
        k = math.ceil((s.size + 1) * (1.0 - target_fpr))
        if k <= s.size:
            return float(np.nextafter(s[k - 1], np.inf)), f"conformal (above the {k}-th of {s.size} held-out scores)"
        return (float(np.nextafter(s[-1], np.inf)),
                f"conformal: too few held-out images for {100 * target_fpr:g} % ({s.size} < "
                f"{math.ceil(1 / target_fpr) - 1}); the largest held-out score, expected rate <= 1/{s.size + 1}")
    if s.size * target_fpr >= 1:
        return float(np.quantile(s, 1.0 - target_fpr, method="higher")), "empirical quantile"
    # nextafter: the largest held-out score itself must pass (the rule is score >= threshold)
    floor = float(np.nextafter(s[-1], np.inf))
    if s.size < 2 or s[-1] == s[0]:
        return floor, "largest held-out score (too few distinct scores to fit a tail)"
    from scipy.stats import gumbel_r, norm  # here: scipy.stats costs predict's start-up 0.3-0.5 s
    if tail == "gumbel":
        loc, scale = gumbel_r.fit(s)
        fitted = float(gumbel_r.ppf(1.0 - target_fpr, loc, scale))
    elif tail == "gumbel_logit":
        if score_bound != 1.0 or s[0] < 0 or s[-1] > 1:
            raise UsageError("calibration tail gumbel_logit is for scores that are probabilities "
                             "(PRN's); use gumbel, normal or conformal for distances")
        from scipy.special import expit, logit
        # the clip keeps a score of exactly 0 or 1 finite on the logit scale
        loc, scale = gumbel_r.fit(logit(np.clip(s, 1e-6, 1 - 1e-6)))
        fitted = float(expit(gumbel_r.ppf(1.0 - target_fpr, loc, scale)))
    else:
        fitted = float(s.mean() + norm.ppf(1.0 - target_fpr) * s.std(ddof=1))
    if score_bound is not None and fitted >= score_bound:
        return floor, (f"largest held-out score (the {tail} tail fit, {fitted:.4g}, is past the largest "
                       f"score the model can give, {score_bound:g})")
    if fitted < floor:  # the fit would reject a held-out good part: its score decides, and says so
        return floor, (f"largest held-out score (the {tail} tail fit, {fitted:.4g}, is below it; too few "
                       f"images for a quantile)")
    return fitted, f"{tail} tail fit (too few images for a quantile)"


# a held-out good score is suspect when a Gumbel tail fitted to the scores below it gives a score
# at least this high less than this probability
SUSPECT_P = 1e-3
SUSPECT_MAX = 3     # the largest scores looked at, one after the other
SUSPECT_MIN_REST = 8  # scores below it needed for a fit


def suspect_normals(normal_scores) -> list[dict]:
    """The held-out good images whose scores the others make unlikely, largest first: for the
    largest score, a Gumbel tail (the calibration's default family, on the scores as they are) is
    fitted to the scores below it; if it gives less than ``SUSPECT_P`` probability of a score at
    least that high, the image is suspect and the next largest is looked at the same way (at most
    ``SUSPECT_MAX``). Each: {"index" into ``normal_scores``, "score", "p"}.

    Why: the image threshold is set by the top of these scores, so one good image that is not
    good (an unannotated defect, a part from another station) moves it for every part after it;
    on one BSData split two of the three held-out images this names show pits, one of them the
    threshold itself (BENCHMARKS.md, "Suspect held-out good images"). Nothing is left out here: the
    engineer looks at the image and decides (``prn calibrate RUN`` again after moving it)."""
    s = np.asarray(normal_scores, dtype=np.float64).ravel()
    order = np.argsort(s, kind="stable")
    out = []
    for k in range(1, SUSPECT_MAX + 1):
        rest, top = s[order[:-k]], s[order[-k]]
        if rest.size < SUSPECT_MIN_REST or rest.max() == rest.min():
            break
        from scipy.stats import gumbel_r  # here: scipy.stats costs predict's start-up 0.3-0.5 s
        p = float(gumbel_r.sf(top, *gumbel_r.fit(rest)))
        if p >= SUSPECT_P:
            break
        out.append({"index": int(order[-k]), "score": float(top), "p": p})
    return out


def threshold_image(normal_scores, threshold: float) -> dict | None:
    """The held-out good image whose score is the threshold, when one is: {"index" into
    ``normal_scores``, "score", "next_score" (the largest below it; None for a single score)}, where
    the threshold sits just above the largest held-out score (the rule's floor, or the largest score
    taken for want of a fit). None where a fit or a quantile set it.

    Why: then one image decides for every part after it, however the other held-out scores lie.
    On KolektorSDD's folds of 53 images this happened on four of seven splits, always with one of
    two images, one of which shows a dark line like a crack (BENCHMARKS.md, "The held-out image
    that sets the threshold"); the suspect check (``suspect_normals``) names such an image only
    when the others make it unlikely enough (two of the four)."""
    s = np.asarray(normal_scores, dtype=np.float64).ravel()
    top = int(np.argmax(s))
    if threshold != np.nextafter(s[top], np.inf):
        return None
    rest = np.delete(s, top)
    return {"index": top, "score": float(s[top]), "next_score": float(rest.max()) if rest.size else None}


def named_held_out(calibration: dict | None) -> list[tuple[str, dict]]:
    """The held-out good images a calibration names, as ("suspect" | "threshold", entry) pairs: the
    suspects (``suspect_normals``), then the image whose score is the threshold (``threshold_image``)
    unless it is one of them; what the messages and prn serve's page speak of."""
    suspects = (calibration or {}).get("suspect_normals") or []
    top = (calibration or {}).get("threshold_image")
    named = [("suspect", s) for s in suspects]
    if top and not any(s["index"] == top["index"] for s in suspects):
        named.append(("threshold", top))
    return named


def threshold_image_note(calibration: dict | None, run: str | Path | None = None) -> str | None:
    """A line naming the held-out good image whose score is the image threshold
    (``threshold_image``, with its path where known), or None: none did, or it is named as a
    suspect already (``suspect_warning``). ``run``: the run folder the commands it gives name
    (else RUN)."""
    top = next((n for why, n in named_held_out(calibration) if why == "threshold"), None)
    if top is None:
        return None
    where = f", {top['path']}" if "path" in top else f" (number {top['index']} of the fold)"
    nxt = "" if top["next_score"] is None else f"; the next held-out good part scores {top['next_score']:.4g}"
    look = (f" (prn predict {shell_word(run, 'RUN')} {shell_word(top['path'])} --out DIR --overlays 1)"
            if "path" in top else "")
    return (f"the image threshold ({calibration['image_threshold']:.4g}) is the score of one held-out good "
            f"image{where}{nxt}. Look at it{look}; {not_good_advice([top.get('path')], run)}")


def calibration_messages(calibration: dict | None, run: str | Path | None = None) -> list[tuple[str, str]]:
    """What `fit` and `prn calibrate` say on stderr about a calibration's held-out images, as
    ("warning" | "note", text) pairs in order: the suspects (``suspect_warning``), then the image
    whose score is the threshold (``threshold_image_note``); ``run`` names the run folder in the
    commands they give."""
    said = (("warning", suspect_warning(calibration, run)), ("note", threshold_image_note(calibration, run)))
    return [(kind, text) for kind, text in said if text]


def suspect_warning(calibration: dict | None, run: str | Path | None = None) -> str | None:
    """A warning naming the suspect held-out good images of a calibration (``suspect_normals``,
    with their paths where known), or None. ``run``: the run folder its command names (else RUN)."""
    suspects = (calibration or {}).get("suspect_normals") or []
    if not suspects:
        return None
    named = "; ".join(f"{s.get('path', 'image ' + str(s['index']))} scores {s['score']:.4g} "
                      f"(p = {s['p']:.1e} under the others' tail)" for s in suspects)
    return (f"{len(suspects)} held-out good image(s) score far above the other "
            f"{calibration['n_normal'] - len(suspects)}: {named}. The image threshold "
            f"({calibration['image_threshold']:.4g}) is set by the top of these scores: look at "
            f"{'them' if len(suspects) > 1 else 'it'}; "
            f"{not_good_advice([s.get('path') for s in suspects], run)}")


def pixel_threshold(normal_maps: np.ndarray, pixel_target_fpr: float) -> float:
    """The (1 - pixel_target_fpr) quantile of the good parts' map pixels."""
    pixels = np.asarray(normal_maps, dtype=np.float32).ravel()
    if pixels.size == 0:
        raise PRNError("calibration needs at least one held-out normal map")
    return float(np.quantile(pixels, 1.0 - pixel_target_fpr))


def calibrate(normal_scores, normal_maps, anomalous_scores=None, anomalous_maps=None, *,
              target_fpr: float = 0.01, pixel_target_fpr: float = 0.001, tail: str = "gumbel",
              score_bound: float | None = None, review_fpr: float = 0.0) -> dict:
    """Thresholds and normalisation from the held-out fold's outputs.

    normal_scores (N,), normal_maps (N, H, W): the good parts; anomalous_* (M,) / (M, H, W):
    held-out defects, optional, only widen the normalisation range and give the miss rate.
    review_fpr: 0, or the share of good parts (> target_fpr) whose threshold opens the review band.
    Returns the plain dict stored in checkpoints (see the module docstring).
    """
    for name, rate in (("target_fpr", target_fpr), ("pixel_target_fpr", pixel_target_fpr)):
        if not 0.0 < rate < 1.0:
            raise UsageError(f"{name} must be in (0, 1), got {rate}")
    if review_fpr and not target_fpr < review_fpr < 1.0:
        raise UsageError(f"review_fpr must be 0 (no review band) or between target_fpr ({target_fpr:g}) "
                         f"and 1, got {review_fpr:g}")
    normal_scores = np.asarray(normal_scores, dtype=np.float64).ravel()
    anomalous_scores = np.asarray([] if anomalous_scores is None else anomalous_scores,
                                  dtype=np.float64).ravel()
    threshold, method = image_threshold(normal_scores, target_fpr, tail, score_bound)
    review = None
    if review_fpr:  # the same rule at the looser rate; never above the image threshold
        review, review_method = image_threshold(normal_scores, review_fpr, tail, score_bound)
        review = min(review, threshold)
    pix = pixel_threshold(normal_maps, pixel_target_fpr)
    all_scores = np.concatenate([normal_scores, anomalous_scores])
    maps = [np.asarray(normal_maps, dtype=np.float32)]
    if anomalous_maps is not None and len(anomalous_maps):
        maps.append(np.asarray(anomalous_maps, dtype=np.float32))
    pixel_min = min(float(m.min()) for m in maps)
    pixel_max = max(float(m.max()) for m in maps)
    return {
        "image_threshold": threshold,
        "pixel_threshold": pix,
        "target_fpr": float(target_fpr),
        "pixel_target_fpr": float(pixel_target_fpr),
        "method": method,
        # the span covers the threshold too, so normalised scores of the fold stay inside [0, 1]
        "score_min": float(min(all_scores.min(), threshold)),
        "score_max": float(max(all_scores.max(), threshold)),
        "pixel_min": min(pixel_min, pix),
        "pixel_max": max(pixel_max, pix),
        "n_normal": int(normal_scores.size),
        "n_anomalous": int(anomalous_scores.size),
        "fold_false_reject_rate": float(np.mean(normal_scores >= threshold)),
        # distribution-free: the expected false-reject rate of new good parts exchangeable with
        # the fold is at most (m + 1) / (n + 1), m the fold's scores at or above the threshold
        "frr_bound": float((np.sum(normal_scores >= threshold) + 1) / (normal_scores.size + 1)),
        "fold_miss_rate": float(np.mean(anomalous_scores < threshold)) if anomalous_scores.size else None,
        **({"review_threshold": float(review), "review_fpr": float(review_fpr), "review_method": review_method,
            "fold_review_rate": float(np.mean((normal_scores >= review) & (normal_scores < threshold)))}
           if review is not None else {}),
        # good images the others make unlikely (suspect_normals): looked at, never left out
        "suspect_normals": suspect_normals(normal_scores),
        "threshold_image": threshold_image(normal_scores, threshold),
        "source": SOURCE,
        # the fold's scores, so a reader can check the threshold or set another by hand
        "normal_scores": [float(v) for v in np.sort(normal_scores)],
        "anomalous_scores": [float(v) for v in np.sort(anomalous_scores)],
    }


def rates_at(labels, scores, threshold: float) -> dict:
    """What the line would do at ``threshold``: false rejects among good parts, misses among
    defective ones and the recall (rates and counts; a rate is nan when its class is absent),
    and ``oracle_recall_at_frr``, the recall of the best threshold on the same data at that same
    false-reject rate (how much a better-placed threshold would have caught); ``*_low`` and
    ``*_high``: the exact 95 % interval of the false-reject rate and of the recall, which a test
    set of a few dozen parts leaves wide."""
    from prn.metrics import oracle_threshold, proportion_interval, recall_at
    labels = np.asarray(labels).astype(bool)
    scores = np.asarray(scores, dtype=np.float64)
    flagged = scores >= threshold
    n_good, n_bad = int((~labels).sum()), int(labels.sum())
    false_rejects, misses = int((flagged & ~labels).sum()), int((~flagged & labels).sum())
    frr = false_rejects / n_good if n_good else math.nan
    oracle = recall_at(labels, scores, oracle_threshold(labels, scores, frr)) if n_good and n_bad else math.nan
    frr_low, frr_high = proportion_interval(false_rejects, n_good)
    recall_low, recall_high = proportion_interval(n_bad - misses, n_bad)
    return {"threshold": float(threshold), "false_reject_rate": frr,
            "miss_rate": misses / n_bad if n_bad else math.nan,
            "recall": 1 - misses / n_bad if n_bad else math.nan,
            "false_rejects": false_rejects, "misses": misses, "oracle_recall_at_frr": oracle,
            "false_reject_rate_low": frr_low, "false_reject_rate_high": frr_high,
            "recall_low": recall_low, "recall_high": recall_high}


def review_rates(labels, scores, postprocess) -> dict:
    """What the review band of ``postprocess`` (a ``prn.postprocess.Postprocess`` with one) did on
    a test set: its lower edge, the good and defective parts it passed to a person (counts, and
    ``review_rate``, the share of good parts), and ``recall_with_review``, the share of defective
    parts stopped or passed to review. Decided as predict decides, by the same post-process."""
    labels = np.asarray(labels).astype(bool)
    band = postprocess.review(scores).astype(bool)
    caught = postprocess.judge(scores)[1].astype(bool) | band
    n_good, n_bad = int((~labels).sum()), int(labels.sum())
    return {"review_threshold": float(postprocess.review_threshold),
            "good_reviewed": int((band & ~labels).sum()), "defective_reviewed": int((band & labels).sum()),
            "review_rate": float((band & ~labels).sum() / n_good) if n_good else math.nan,
            "recall_with_review": float(caught[labels].mean()) if n_bad else math.nan}


def decision_summary(metrics: dict) -> str | None:
    """One line of what the line would have done on a test set at the calibrated threshold (the
    figure a quality engineer reads first): defective parts stopped and good parts rejected, as
    counts and rates. ``metrics``: ``rates_at``'s keys with ``n_test`` and ``n_test_anomalous``;
    None when the run has no threshold, or the counts are missing or not whole (a mean)."""
    keys = ("threshold", "n_test", "n_test_anomalous", "misses", "false_rejects")
    if any(not isinstance(metrics.get(k), (int, float)) or math.isnan(metrics[k]) for k in keys):
        return None
    if not all(float(metrics[k]).is_integer() for k in keys[1:]):
        return None
    n_bad = int(metrics["n_test_anomalous"])
    n_good, stopped = int(metrics["n_test"]) - n_bad, n_bad - int(metrics["misses"])
    rejected = int(metrics["false_rejects"])
    from prn.metrics import proportion_interval

    def pct(k, n):  # the rate, and its exact 95 % interval: the share a larger test set could show
        if not n:
            return ""
        low, high = proportion_interval(k, n)
        return f" ({100 * k / n:.1f} %, 95 % interval {100 * low:.1f}-{100 * high:.1f} %)"
    line = (f"at the calibrated threshold {metrics['threshold']:.4g} the model stops {stopped} of {n_bad} "
            f"defective parts{pct(stopped, n_bad)} and rejects {rejected} of {n_good} good parts{pct(rejected, n_good)}")
    if isinstance(metrics.get("good_reviewed"), int) and isinstance(metrics.get("defective_reviewed"), int):
        caught = stopped + metrics["defective_reviewed"]
        line += (f"; its review band (from {metrics['review_threshold']:.4g}) passes {metrics['good_reviewed']} "
                 f"good and {metrics['defective_reviewed']} defective parts to a person: {caught} of {n_bad} "
                 f"defective parts stopped or reviewed{pct(caught, n_bad)}")
    return line


def threshold_warning(metrics: dict) -> str | None:
    """A line of warning when the calibrated threshold rejected more than twice its target's share of
    a test set's good parts (``metrics``: ``rates_at``'s keys and ``target_fpr``), else None. The
    threshold holds only as far as the held-out good images are like these parts, and a line
    should hear when they were not before it trusts the threshold."""
    frr, target = metrics.get("false_reject_rate"), metrics.get("target_fpr")
    if frr is None or target is None or not frr > 2 * target:
        return None
    return (f"the calibrated threshold rejected {100 * frr:.1f} % of these good parts "
            f"({metrics.get('false_rejects', '?')}), more than twice its {100 * target:g} % target: the "
            "held-out good images it was set on score lower than these; check it on good parts of the "
            "line and set it again (prn calibrate RUN --target-fpr R, or --threshold T)")


def calibrate_predictions(preds, cfg: CalibrationConfig, score_bound: float | None = None,
                          precision: str | None = None) -> dict | None:
    """Calibrate on the held-out fold's outputs (a ``prn.infer.Predictions``; labels 0 are the
    good parts), with the calibration section's rates; None when the fold holds no good part.
    score_bound: the model kind's largest score (``prn.registry.score_bound``). precision: what
    the outputs were computed at, recorded (the run then infers at it)."""
    if preds is None or not (preds.labels == 0).any():
        return None
    good = preds.labels == 0
    calibration = calibrate(preds.scores[good], preds.maps[good], preds.scores[~good], preds.maps[~good],
                            target_fpr=cfg.target_fpr, pixel_target_fpr=cfg.pixel_target_fpr,
                            tail=cfg.calibration_tail, score_bound=score_bound, review_fpr=cfg.review_fpr)
    good_samples = [sample for sample, g in zip(preds.samples, good) if g]
    top = calibration["threshold_image"]
    for named in calibration["suspect_normals"] + ([top] if top else []):
        named["path"] = str(good_samples[named["index"]].image_path)
    if precision is not None:
        calibration["precision"] = precision
    if preds.appearance is not None:  # what predict and serve compare the line's photos with
        calibration["appearance"] = appearance_reference(preds.appearance[good])
    return calibration


def added_good_images(folder: str | Path, split) -> tuple[list, dict]:
    """The good parts in ``folder`` (``prn calibrate --good-images``: parts known good, e.g.
    collected from the line after the fit) as samples to calibrate on beside the held-out fold,
    and what was found: {"folder", "n", "left_out"}. Refused, naming the file: an image with the
    bytes of one the run trained on (a model scores its training images low, so the threshold
    would come out too low) or of one in its test split (the test would then judge the
    threshold on images that set it). Images already in the fold, or in the folder twice, count
    once."""
    from prn.data.io import require_images
    from prn.data.sample import Sample
    from prn.data.split import drop_copies

    folder = Path(folder)
    added = [Sample(path, None, 0, "good") for path in require_images(folder, "good-images folder")]
    refused = {"which the run trained on": list(split.train_normal) + list(split.train_anomalous),
               "which is in the run's test split": list(split.test)}
    known = [s for group in refused.values() for s in group] + list(split.val_normal)
    _, pairs = drop_copies(known + added)
    where = {id(s): why for why, group in refused.items() for s in group}
    mine = {id(s) for s in added}
    left_out = set()
    for copy, kept in pairs:
        if id(copy) not in mine:
            continue
        if id(kept) in where:
            raise UsageError(f"{copy.image_path}: the same image as {kept.image_path}, {where[id(kept)]}; "
                             f"calibrate on good parts outside the run's split")
        left_out.add(id(copy))  # in the fold already, or twice in the folder
    kept = [s for s in added if id(s) not in left_out]
    return kept, {"folder": str(folder), "n": len(kept), "left_out": len(left_out)}


def _find(given: str | Path, samples: list, root: str) -> int | None:
    """The index in ``samples`` of the image ``given`` names (as split.json lists it, from the
    working folder, or relative to the dataset's root), or None."""
    import os
    given = Path(given)
    tries = [given] + ([Path(root) / given] if root and not given.is_absolute() else [])
    keys = {os.path.normpath(os.path.abspath(t)) for t in tries}
    existing = [t for t in tries if t.exists()]  # for a name reached another way (a link): once
    for i, sample in enumerate(samples):
        path = Path(sample.image_path)
        if os.path.normpath(os.path.abspath(path)) in keys:
            return i
        if existing and path.exists() and any(os.path.samefile(t, path) for t in existing):
            return i
    return None


def judge_fold(split, not_good=(), good_again=()):
    """The split with the held-out good images a person judged not good (``not_good``) moved from
    ``val_normal`` to ``not_good``, and those judged good after all (``good_again``) moved back.
    Why: one such image in the fold is the largest held-out score, so the threshold sits above it
    and every part that scores under that defect passes (BENCHMARKS.md, "The held-out image that
    sets the threshold"); the suspect check and the threshold image's note name the image, a person
    looks, and this takes it out without a refit (the network never trained on it). Naming an image
    already where it is asked to go is no change; any other image is refused by name."""
    import dataclasses
    fold, out = list(split.val_normal), list(split.not_good)
    _move(not_good, fold, out, split.root, lambda: f"not one of the run's {len(fold)} held-out good images "
                                                   f"(split.json val_normal), the only images its thresholds are set on")
    _move(good_again, out, fold, split.root, lambda: f"not one of the run's held-out images judged not good "
                                                     f"(split.json not_good: {len(out)})")
    return dataclasses.replace(split, val_normal=fold, not_good=out)


def _move(names, source: list, target: list, root: str, refusal) -> None:
    """Each image of ``names`` from ``source`` to the end of ``target`` (in place); one already in
    ``target`` stays, one in neither is refused: UsageError "NAME: refusal()"."""
    for given in names:
        i = _find(given, source, root)
        if i is not None:
            target.append(source.pop(i))
        elif _find(given, target, root) is None:
            raise UsageError(f"{given}: {refusal()}")


def check_fold_files(split, run: str | Path) -> None:
    """DataError naming the first held-out good image whose file is gone, and what to do: the
    thresholds are the fold's, so scoring a smaller fold unasked would move them silently."""
    missing = split.missing(split.val_normal)
    if missing:
        raise DataError(f"{split.not_found(missing)}; it is one of the run's held-out good images "
                        f"(split.json val_normal), on which its thresholds are set: put it back, or set "
                        f"them without it: prn calibrate {shell_word(run)} --not-good {shell_word(missing[0])}; "
                        f"or, if the data set ({split.root}) has moved: prn calibrate {shell_word(run)} "
                        f"--root NEW_FOLDER")


def calibrate_model(model, cfg, split, *, device, progress: bool = False,
                    score_bound: float | None = None, added_good: list | None = None) -> dict | None:
    """Score the split's held-out fold with ``model`` (from its files) at cfg.training.precision
    and calibrate; None when the split holds no held-out normal images (then there is nothing to
    calibrate on). The calibration records that precision: the run then infers at it.
    ``added_good``: more good parts' samples (``added_good_images``), scored and calibrated on
    with the fold's, or alone where the split holds no fold."""
    from prn.infer import predict_samples

    if not split.val_normal and not added_good:
        return None
    samples = split.val_normal + list(added_good or []) + split.val_anomalous
    preds = predict_samples(model, samples, cfg.model.input_hw,
                            batch_size=cfg.runtime.eval_batch_size, device=device,
                            max_pixels=cfg.data.max_image_pixels, progress=progress,
                            precision=cfg.training.precision, detail=cfg.model.detail)
    return calibrate_predictions(preds, cfg.calibration, score_bound, cfg.training.precision)


def write_calibration(run_dir: str | Path, calibration: dict | None) -> Path:
    path = Path(run_dir) / "calibration.json"
    path.write_text(json.dumps(calibration, indent=2) + "\n")
    return path


def calibrate_run(run: str | Path, *, target_fpr: float | None = None,
                  pixel_target_fpr: float | None = None, tail: str | None = None,
                  device: str | None = None, precision: str | None = None,
                  defect_memory: str | None = None, test_flips: str | None = None,
                  defect_memory_stride: int | None = None, review_fpr: float | None = None,
                  good_images: str | Path | None = None, not_good=(), good_again=(),
                  root: str | Path | None = None, progress: bool = False) -> dict | None:
    """(Re)calibrate a run on its held-out fold (``split.json``) and store the result in its
    checkpoint and ``calibration.json``. ``target_fpr``/``pixel_target_fpr`` override the
    config's (and are written back to ``config.yaml``). Returns the calibration, or None when the
    split holds no held-out normal images. ``tail`` overrides cfg.calibration.calibration_tail.
    ``precision`` ("32", "bf16", "16", "auto"): score the fold, and so infer from then on, at this
    precision instead of the run's (bf16 where the CPU computes it natively halves the model's time;
    the figures in BENCHMARKS.md); recorded in the calibration, config.yaml keeps the training's.
    ``defect_memory`` ("on", "auto", "off"): build the memory of the seen defects anew from the
    split (``prn.model.defect_memory``; or remove it) before calibrating, as a fit with that
    setting would have; stored in the checkpoint, the setting in config.yaml. ``test_flips`` ("none",
    "lr", "ud", "all"): from now on average each map with those of the mirrored image (PRN's
    ``test_flips``; inference only, so no refit): the fold is scored so, a memory the run keeps is
    built anew on those scores (its standardisation is of PRN's score), and the setting is stored in
    the checkpoint and config.yaml. ``defect_memory_stride`` (4 or 2): the grid a memory matches at;
    the memory is built anew with it (and the run's ``defect_memory`` unless given). ``review_fpr``:
    the review band's share of good parts (0 removes the band), written back to config.yaml.
    ``good_images``: a folder of more good parts, never trained on and outside the run's split
    (``added_good_images``), scored and calibrated on with the fold's good images; the calibration
    says how many (``added_good``). Each calibration is of the fold and the folder it is given.
    ``not_good``, ``good_again``: held-out good images a person judged not good, left out of the
    fold from now on, or good after all, put back (``judge_fold``); split.json keeps the change
    (its ``not_good`` list) and the calibration names them (``not_good``). ``root``: where the run's
    data set is now, if it moved since the fit (``Split.rerooted``); a split.json rewritten for
    ``not_good`` keeps the new paths."""
    from prn.checkpoint import update_checkpoint
    from prn.data.split import Split
    from prn.deploy.loading import load_model

    run_dir = Path(run)
    if not run_dir.is_dir():
        raise UsageError(f"{run}: calibration needs the run folder (its split.json lists the held-out fold)")
    split_path = run_dir / "split.json"
    if not split_path.is_file():
        raise DataError(f"{split_path}: not found; the held-out fold of this run is unknown")
    loaded = load_model(run_dir, device=device)
    changes = {k: v for k, v in (("target_fpr", target_fpr), ("pixel_target_fpr", pixel_target_fpr),
                                 ("calibration_tail", tail), ("review_fpr", review_fpr)) if v is not None}
    try:
        cfg = loaded.cfg.replace(**changes) if changes else loaded.cfg
    except ValueError as exc:  # a rate out of range, named by the config's check
        raise UsageError(f"{run_dir}: {exc}") from exc
    if precision is not None:
        from prn.precision import check_precision, resolve_precision
        precision = resolve_precision(precision, loaded.device)
        check_precision(precision, loaded.device)
        cfg = cfg.replace(precision=precision)
    loaded_split = Split.load(split_path)
    if root is not None:  # the data set moved since the fit (a split saved below keeps the new paths)
        loaded_split = loaded_split.rerooted(root)
    split = judge_fold(loaded_split, not_good, good_again)
    if loaded_split.val_normal and not split.val_normal and good_images is None:
        raise UsageError(f"{run}: that leaves none of its {len(loaded_split.val_normal)} held-out good images to "
                         f"set the thresholds on; give good parts to set them on with --good-images DIR")
    check_fold_files(split, run)
    added, added_info = added_good_images(good_images, split) if good_images is not None else ([], None)
    memory = (loaded.calibration or {}).get("defect_memory")  # what the fit found, kept
    stored = {}  # the checkpoint's fields a new memory changes, written with the calibration
    if test_flips is not None:
        cfg = _set_test_flips(run_dir, loaded, cfg, test_flips)
        changes["test_flips"] = test_flips
        if defect_memory is None and getattr(loaded.model, "defect_memory", None) is not None \
                and loaded.model.defect_memory.built:
            defect_memory = cfg.model.defect_memory  # standardised on PRN's scores, which the flips change
    if defect_memory_stride is not None:
        defect_memory = defect_memory or cfg.model.defect_memory
        changes["defect_memory_stride"] = defect_memory_stride
    if defect_memory is not None:
        cfg, memory, stored = _set_defect_memory(run_dir, loaded, cfg, split, defect_memory, progress,
                                                 stride=defect_memory_stride)
        changes["defect_memory"] = defect_memory
    if test_flips is not None:  # the stored config carries the flips, beside a rebuilt memory's setting
        from prn.checkpoint import load_checkpoint
        from prn.config import PRNConfig
        config = stored.get("config") or load_checkpoint(run_dir)["config"]
        stored["config"] = PRNConfig.from_dict(config).replace(test_flips=test_flips).to_dict(runtime=False)
    from prn.registry import score_bound
    calibration = calibrate_model(loaded.model, cfg, split, device=loaded.device, progress=progress,
                                  score_bound=score_bound(loaded.kind), added_good=added)
    if calibration is not None and added_info is not None:
        calibration["added_good"] = added_info
        folder = f"{added_info['n']} good images of {added_info['folder']}"
        calibration["source"] = f"{SOURCE} and {folder}" if split.val_normal else folder
    if calibration is not None and memory is not None:
        calibration["defect_memory"] = memory
    if calibration is not None and split.not_good:
        calibration["not_good"] = [str(s.image_path) for s in split.not_good]
    if changes and (run_dir / "config.yaml").is_file():
        from prn.config import PRNConfig
        PRNConfig.load(run_dir / "config.yaml").replace(**changes).save(run_dir / "config.yaml")
    # one rewrite: a memory is never stored beside the thresholds of the score without it
    update_checkpoint(run_dir, calibration=calibration, **stored)
    write_calibration(run_dir, calibration)
    if split != loaded_split:  # after the thresholds it set are stored
        split.save(split_path)
    return calibration


def _set_test_flips(run_dir: Path, loaded, cfg, flips: str):
    """The config with ``test_flips`` set, and the loaded PRN set to infer so."""
    if loaded.kind != "prn":
        raise UsageError(f"{run_dir}: test flips are PRN's; this run is a {loaded.kind} model")
    try:
        cfg = cfg.replace(test_flips=flips)
    except ValueError as exc:
        raise UsageError(f"{run_dir}: {exc}") from exc
    loaded.model.cfg = cfg.model
    return cfg


def _set_defect_memory(run_dir: Path, loaded, cfg, split, mode: str, progress: bool, stride: int | None = None):
    """Build (or, with "off", remove) the loaded PRN's defect memory from ``split``, at ``stride``
    (else the run's); returns the config with the new setting, what was found, and the checkpoint
    fields that store it (``state_dict``, ``config``, ``history``)."""
    from prn.checkpoint import load_checkpoint
    from prn.config import PRNConfig
    from prn.data.datasets import load_seen_arrays, load_validation
    from prn.model.defect_memory import left_out, memory_summary
    from prn.train import remember_seen_defects

    if loaded.kind != "prn" or getattr(loaded.model, "defect_memory", None) is None:
        raise UsageError(f"{run_dir}: a defect memory is PRN's, with prototypes; this run is a {loaded.kind} model "
                         f"without them")
    settings = {"defect_memory": mode, **({} if stride is None else {"defect_memory_stride": stride})}
    try:
        cfg = cfg.replace(**settings)
    except ValueError as exc:
        raise UsageError(f"{run_dir}: {exc}") from exc
    memory = loaded.model.defect_memory
    memory.clear()  # never a memory of one stride matched at the other
    memory.stride = cfg.model.defect_memory_stride
    loaded.model.cfg = cfg.model
    if mode == "off":
        found = left_out("defect_memory off")
    else:
        found = remember_seen_defects(loaded.model, cfg, load_seen_arrays(cfg, split), load_validation(cfg, split),
                                      None, loaded.device)
    if progress:
        print(memory_summary(found))
    payload = load_checkpoint(run_dir)
    state = {k: v for k, v in payload["state_dict"].items() if not k.startswith("defect_memory.")}
    state.update({f"defect_memory.{k}": v.cpu() for k, v in memory.state_dict().items()})
    config = PRNConfig.from_dict(payload["config"]).replace(**settings).to_dict(runtime=False)
    history = list(payload.get("history") or []) + [{"event": "defect memory", **found}]
    return cfg, found, {"state_dict": state, "config": config, "history": history}

