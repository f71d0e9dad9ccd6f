# tests/phase_02/test_metrics.py
import math
from bisect import bisect

import numpy as np
import pytest
import torch
from scipy import ndimage

from anomaly_detection.metrics import (
    compute_aupro,
    compute_auroc,
    compute_average_precision,
    compute_classification_metrics,
    compute_f1_max,
    compute_pixel_auroc,
    compute_pixel_average_precision,
    compute_pixel_f1_max,
    compute_pr_curve,
    compute_roc_curve,
)

EIGHT_CONNECTED = np.ones((3, 3), dtype=int)
FOUR_CONNECTED = ndimage.generate_binary_structure(2, 1)


# Brute-force references: one pass per distinct threshold, counting predictions directly.


def brute_counts(scores, labels):
    scores = np.asarray(scores, dtype=np.float64).ravel()
    labels = np.asarray(labels).ravel() > 0.5
    rows = []
    for threshold in np.unique(scores)[::-1]:
        predicted = scores >= threshold
        rows.append((threshold, np.sum(predicted & labels), np.sum(predicted & ~labels)))
    return rows, labels.sum(), (~labels).sum()


def brute_auroc(scores, labels):
    rows, positives, negatives = brute_counts(scores, labels)
    area, previous_fpr, previous_tpr = 0.0, 0.0, 0.0
    for _, tp, fp in rows:
        fpr, tpr = fp / negatives, tp / positives
        area += (fpr - previous_fpr) * (tpr + previous_tpr) / 2
        previous_fpr, previous_tpr = fpr, tpr
    return area


def brute_average_precision(scores, labels):
    rows, positives, _ = brute_counts(scores, labels)
    total, previous_recall = 0.0, 0.0
    for _, tp, fp in rows:
        recall = tp / positives
        total += (recall - previous_recall) * tp / (tp + fp)
        previous_recall = recall
    return total


def brute_f1_max(scores, labels):
    rows, positives, _ = brute_counts(scores, labels)
    best_f1, best_threshold = -1.0, None
    # Ascending thresholds and a strict improvement keep the lowest threshold among ties.
    for threshold, tp, fp in reversed(rows):
        f1 = 2 * tp / (2 * tp + fp + (positives - tp))
        if f1 > best_f1 + 1e-12:
            best_f1, best_threshold = f1, threshold
    return best_f1, best_threshold


def brute_aupro(maps, masks, fpr_limit, structure=EIGHT_CONNECTED):
    maps = np.asarray(maps, dtype=np.float64)
    masks = np.asarray(masks) > 0.5
    regions = []
    for index, mask in enumerate(masks):
        labeled, count = ndimage.label(mask, structure=structure)
        regions += [(index, labeled == region) for region in range(1, count + 1)]
    points = [(0.0, 0.0)]
    for threshold in np.unique(maps)[::-1]:
        predicted = maps >= threshold
        fpr = np.sum(predicted & ~masks) / np.sum(~masks)
        pro = np.mean([predicted[index][region].mean() for index, region in regions])
        points.append((fpr, pro))
    points.append((1.0, 1.0))
    area = 0.0
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x0 >= fpr_limit:
            break
        if x1 <= fpr_limit:
            area += (x1 - x0) * (y0 + y1) / 2
        else:
            y_limit = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)
            area += (fpr_limit - x0) * (y0 + y_limit) / 2
            break
    return area / fpr_limit


def mvtec_aupro(maps, masks, fpr_limit):
    # Port of the official MVTec AD evaluation (pro_curve_util.compute_pro + generic_util.trapezoid).
    fp_changes, pro_changes, ok_pixels, gt_regions = [], [], 0, 0
    for mask in np.asarray(masks) > 0.5:
        labeled, count = ndimage.label(mask, EIGHT_CONNECTED)
        gt_regions += count
        ok_pixels += np.sum(labeled == 0)
        pro_change = np.zeros(mask.shape)
        for region in range(1, count + 1):
            pro_change[labeled == region] = 1.0 / np.sum(labeled == region)
        fp_changes.append(labeled == 0)
        pro_changes.append(pro_change)
    scores = np.asarray(maps, dtype=np.float64).ravel()
    order = np.argsort(scores)[::-1]
    scores = scores[order]
    fprs = np.cumsum(np.ravel(fp_changes)[order]) / ok_pixels
    pros = np.cumsum(np.ravel(pro_changes)[order]) / gt_regions
    keep = np.append(np.diff(scores) != 0, True)
    x = np.concatenate(([0.0], np.clip(fprs[keep], None, 1.0), [1.0]))
    y = np.concatenate(([0.0], np.clip(pros[keep], None, 1.0), [1.0]))
    correction = 0.0
    if fpr_limit not in x:
        ins = bisect(x, fpr_limit)
        y_interp = y[ins - 1] + (y[ins] - y[ins - 1]) * (fpr_limit - x[ins - 1]) / (x[ins] - x[ins - 1])
        correction = 0.5 * (y_interp + y[ins - 1]) * (fpr_limit - x[ins - 1])
    inside = x <= fpr_limit
    x, y = x[inside], y[inside]
    return (np.sum(0.5 * (y[1:] + y[:-1]) * (x[1:] - x[:-1])) + correction) / fpr_limit


def random_case(seed, decimals, count=5, height=10, width=12):
    rng = np.random.default_rng(seed)
    noise = ndimage.gaussian_filter(rng.normal(size=(count, height, width)), sigma=(0, 1.2, 1.2))
    masks = noise > np.quantile(noise, 0.85)
    masks[0] = False
    masks[1, 0, 0] = True
    maps = rng.random((count, height, width)) + 0.4 * masks
    if decimals is not None:
        maps = np.round(maps, decimals)
    labels = masks.reshape(count, -1).any(axis=1)
    scores = maps.reshape(count, -1).max(axis=1)
    return maps, masks, scores, labels


def random_image_case(seed, decimals, count=40):
    rng = np.random.default_rng(seed)
    labels = rng.random(count) < 0.4
    labels[:2] = [False, True]
    scores = rng.normal(size=count) + labels
    if decimals is not None:
        scores = np.round(scores, decimals)
    return scores, labels


@pytest.mark.parametrize("decimals", [1, None])
@pytest.mark.parametrize("seed", range(4))
def test_image_metrics_match_brute_force(seed, decimals):
    scores, labels = random_image_case(seed, decimals)
    assert compute_auroc(scores, labels) == pytest.approx(brute_auroc(scores, labels), abs=1e-6)
    average_precision = compute_average_precision(scores, labels)
    assert average_precision == pytest.approx(brute_average_precision(scores, labels), abs=1e-6)
    f1, threshold = compute_f1_max(scores, labels)
    expected_f1, expected_threshold = brute_f1_max(scores, labels)
    assert f1 == pytest.approx(expected_f1, abs=1e-6)
    assert threshold == pytest.approx(expected_threshold, abs=1e-12)


@pytest.mark.parametrize("decimals", [1, None])
@pytest.mark.parametrize("seed", range(4))
def test_pixel_metrics_match_brute_force(seed, decimals):
    maps, masks, _, _ = random_case(seed, decimals)
    auroc = compute_pixel_auroc(maps, masks)
    average_precision = compute_pixel_average_precision(maps, masks)
    f1, threshold = compute_pixel_f1_max(maps, masks)
    assert auroc == pytest.approx(brute_auroc(maps, masks), abs=1e-6)
    assert average_precision == pytest.approx(brute_average_precision(maps, masks), abs=1e-6)
    expected_f1, expected_threshold = brute_f1_max(maps, masks)
    assert f1 == pytest.approx(expected_f1, abs=1e-6)
    assert threshold == pytest.approx(expected_threshold, abs=1e-12)
    # The fast pixel path agrees with the sklearn-based image-level functions on the same pixels.
    assert auroc == pytest.approx(compute_auroc(maps.ravel(), masks.ravel()), abs=1e-9)
    assert average_precision == pytest.approx(compute_average_precision(maps.ravel(), masks.ravel()), abs=1e-9)
    assert (f1, threshold) == pytest.approx(compute_f1_max(maps.ravel(), masks.ravel()), abs=1e-9)


@pytest.mark.parametrize("fpr_limit", [0.3, 0.05, 1.0])
@pytest.mark.parametrize("decimals", [1, 2, None])
@pytest.mark.parametrize("seed", range(3))
def test_aupro_matches_brute_force(seed, decimals, fpr_limit):
    maps, masks, _, _ = random_case(seed, decimals)
    assert compute_aupro(maps, masks, fpr_limit=fpr_limit) == pytest.approx(
        brute_aupro(maps, masks, fpr_limit), abs=1e-6
    )


@pytest.mark.parametrize("decimals", [2, None])
def test_aupro_matches_official_mvtec_algorithm(decimals):
    maps, masks, _, _ = random_case(7, decimals, count=12, height=40, width=48)
    for fpr_limit in (0.3, 0.01):
        assert compute_aupro(maps, masks, fpr_limit) == pytest.approx(mvtec_aupro(maps, masks, fpr_limit), abs=1e-6)


def test_aupro_uses_8_connectivity():
    # Region A = (1,1),(1,2); pixel B = (2,3) touches A only diagonally, so with
    # 8-connectivity A+B is one 3-pixel region, with 4-connectivity two regions.
    maps = np.zeros((1, 4, 4))
    masks = np.zeros((1, 4, 4), dtype=bool)
    masks[0, 1, 1] = masks[0, 1, 2] = masks[0, 2, 3] = True
    maps[0, 2, 3] = 3.0
    maps[0, 0, 0] = 2.0
    maps[0, 1, 1] = maps[0, 1, 2] = 1.0
    # Curve: (0, 1/3) -> (1/13, 1/3) -> (1/13, 1) -> (1, 1), integrated to 0.3.
    expected = (1 / 13 * 1 / 3 + (0.3 - 1 / 13)) / 0.3
    four_connected = brute_aupro(maps, masks, 0.3, structure=FOUR_CONNECTED)
    assert four_connected == pytest.approx((1 / 13 * 0.5 + (0.3 - 1 / 13)) / 0.3)
    assert compute_aupro(maps, masks, 0.3) == pytest.approx(expected, abs=1e-9)
    assert abs(compute_aupro(maps, masks, 0.3) - four_connected) > 0.01


def test_aupro_separates_images():
    # Defects touching across the border of two consecutive images must not merge into one region.
    maps = np.zeros((2, 3, 3))
    masks = np.zeros((2, 3, 3), dtype=bool)
    masks[0, 2, :] = True
    masks[1, 0, 0] = True
    maps[0, 2, :] = 1.0
    maps[0, 0, 0] = 0.5
    assert compute_aupro(maps, masks, 0.3) == pytest.approx(brute_aupro(maps, masks, 0.3), abs=1e-9)


def test_perfect_and_inverted_scores():
    maps, masks, scores, labels = random_case(0, None)
    perfect_maps = masks + 0.5 * maps
    inverted_maps = -perfect_maps
    perfect_scores = labels + 0.5 * scores
    assert compute_auroc(perfect_scores, labels) == 1.0
    assert compute_auroc(-perfect_scores, labels) == 0.0
    assert compute_average_precision(perfect_scores, labels) == 1.0
    assert compute_f1_max(perfect_scores, labels)[0] == 1.0
    assert compute_pixel_auroc(perfect_maps, masks) == 1.0
    assert compute_pixel_auroc(inverted_maps, masks) == 0.0
    assert compute_pixel_average_precision(perfect_maps, masks) == 1.0
    assert compute_pixel_f1_max(perfect_maps, masks)[0] == 1.0
    assert compute_aupro(perfect_maps, masks) == pytest.approx(1.0, abs=1e-12)
    assert compute_aupro(inverted_maps, masks) == pytest.approx(0.0, abs=1e-12)


def test_f1_max_returns_f1_and_threshold():
    scores = np.array([0.1, 0.4, 0.35, 0.8, 0.8, 0.2])
    labels = np.array([0, 0, 1, 1, 0, 1])
    result = compute_f1_max(scores, labels)
    assert isinstance(result, tuple) and len(result) == 2
    f1, threshold = result
    # Predicting "defective" for score >= threshold reproduces the reported F1.
    predicted = scores >= threshold
    tp = np.sum(predicted & (labels == 1))
    assert f1 == pytest.approx(2 * tp / (predicted.sum() + labels.sum()))
    assert (f1, threshold) == pytest.approx((brute_f1_max(scores, labels)))
    assert compute_pixel_f1_max(scores.reshape(1, 2, 3), labels.reshape(1, 2, 3)) == pytest.approx(result)


def test_tensor_and_numpy_inputs_agree():
    maps, masks, scores, labels = random_case(1, 1)
    pairs = [
        (compute_auroc, scores, labels),
        (compute_average_precision, scores, labels),
        (compute_f1_max, scores, labels),
        (compute_pixel_auroc, maps, masks),
        (compute_pixel_average_precision, maps, masks),
        (compute_pixel_f1_max, maps, masks),
        (compute_aupro, maps, masks),
    ]
    for function, values, targets in pairs:
        expected = function(values, targets)
        assert function(torch.from_numpy(values), torch.from_numpy(targets)) == expected
        assert function(torch.from_numpy(values), torch.from_numpy(targets).float()) == expected


def test_channel_dimension_is_optional():
    maps, masks, _, _ = random_case(2, 1)
    for function in (compute_pixel_auroc, compute_pixel_average_precision, compute_pixel_f1_max, compute_aupro):
        expected = function(maps, masks)
        assert function(maps[:, None], masks[:, None]) == expected
        assert function(torch.from_numpy(maps[:, None]), torch.from_numpy(masks)) == expected


def test_raw_scores_are_not_squashed():
    # Scores far outside [0, 1] must rank exactly like their rescaled versions (no sigmoid, no clamp).
    rng = np.random.default_rng(3)
    raw_maps = rng.integers(100, 701, size=(4, 8, 8)).astype(np.float64)
    masks = rng.random((4, 8, 8)) < 0.2
    raw_maps += 150 * masks
    scaled_maps = (raw_maps - 100) / 750
    raw_scores, labels = raw_maps.max(axis=(1, 2)), masks.any(axis=(1, 2))
    labels[:2] = [False, True]
    scaled_scores = (raw_scores - 100) / 750
    assert compute_auroc(raw_scores, labels) == compute_auroc(scaled_scores, labels)
    assert compute_average_precision(raw_scores, labels) == compute_average_precision(scaled_scores, labels)
    assert compute_pixel_auroc(raw_maps, masks) == compute_pixel_auroc(scaled_maps, masks)
    assert compute_aupro(raw_maps, masks) == pytest.approx(compute_aupro(scaled_maps, masks), abs=1e-12)
    assert compute_pixel_auroc(raw_maps, masks) == pytest.approx(brute_auroc(raw_maps, masks), abs=1e-9)
    assert compute_pixel_auroc(raw_maps, masks) < 1.0
    f1, threshold = compute_pixel_f1_max(raw_maps, masks)
    assert threshold >= 100


SINGLE_CLASS_CASES = [
    (compute_auroc, np.zeros(6), "AUROC is undefined: the test set has no defective images"),
    (compute_auroc, np.ones(6), "AUROC is undefined: the test set has no good images"),
    (compute_average_precision, np.zeros(6), "no defective images"),
    (compute_f1_max, np.ones(6), "no good images"),
    (compute_pixel_auroc, np.zeros((2, 3, 1)), "no defective pixels"),
    (compute_pixel_auroc, np.ones((2, 3, 1)), "no defect-free pixels"),
    (compute_pixel_average_precision, np.zeros((2, 3, 1)), "no defective pixels"),
    (compute_pixel_f1_max, np.zeros((2, 3, 1)), "no defective pixels"),
    (compute_aupro, np.zeros((2, 3, 1)), "AU-PRO is undefined: the ground-truth masks have no defect regions"),
    (compute_aupro, np.ones((2, 3, 1)), "no defect-free pixels"),
]


@pytest.mark.parametrize("function, labels, message", SINGLE_CLASS_CASES)
def test_single_class_returns_nan_and_warns(function, labels, message):
    scores = np.linspace(0, 5, labels.size).reshape(labels.shape)
    with pytest.warns(RuntimeWarning, match=message):
        result = function(scores, labels)
    values = result if isinstance(result, tuple) else (result,)
    assert all(isinstance(value, float) and math.isnan(value) for value in values)


def test_curve_helpers():
    scores, labels = random_image_case(0, 1)
    fpr, tpr, _ = compute_roc_curve(scores, labels)
    assert fpr[0] == 0 and fpr[-1] == 1 and tpr[-1] == 1
    precision, recall, _ = compute_pr_curve(torch.from_numpy(scores), torch.from_numpy(labels))
    assert recall[0] == 1 and recall[-1] == 0 and precision[-1] == 1
    with pytest.warns(RuntimeWarning, match="ROC curve is undefined"):
        assert compute_roc_curve(scores, np.zeros_like(labels)) is None


def test_invalid_inputs_raise():
    maps, masks, _, _ = random_case(0, 1)
    with pytest.raises(ValueError, match="same shape"):
        compute_pixel_auroc(maps, masks[:, :5])
    bad = maps.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        compute_aupro(bad, masks)
    with pytest.raises(ValueError, match="fpr_limit"):
        compute_aupro(maps, masks, fpr_limit=0.0)


@pytest.mark.parametrize("pixel_level", [False, True])
def test_classification_metrics_in_one_pass_equal_the_single_metrics(pixel_level):
    rng = np.random.default_rng(7)
    if pixel_level:
        scores = np.round(rng.random((6, 16, 16)), 1)
        labels = rng.random((6, 16, 16)) > 0.8
        single = (compute_pixel_auroc, compute_pixel_average_precision, compute_pixel_f1_max)
    else:
        scores = np.round(rng.random(40), 1)
        labels = rng.random(40) > 0.5
        single = (compute_auroc, compute_average_precision, compute_f1_max)
    together = compute_classification_metrics(scores, labels, pixel_level=pixel_level)
    assert together["auroc"] == single[0](scores, labels)
    assert together["average_precision"] == single[1](scores, labels)
    assert (together["f1_max"], together["f1_threshold"]) == single[2](scores, labels)


def test_classification_metrics_single_class_warn_for_each_metric():
    with pytest.warns(RuntimeWarning) as caught:
        result = compute_classification_metrics(np.arange(5.0), np.zeros(5))
    assert all(math.isnan(value) for value in result.values())
    messages = " | ".join(str(w.message) for w in caught)
    for name in ("AUROC is undefined", "average precision is undefined", "F1-max is undefined"):
        assert name in messages
