# src/anomaly_detection/metrics/auroc.py
import warnings

import numpy as np
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score, roc_curve

from anomaly_detection.utils import to_numpy


def _flatten_scores_and_labels(scores, labels):
    scores = to_numpy(scores)
    labels = to_numpy(labels)
    if scores.size != labels.size or _squeeze_channel(scores).shape != _squeeze_channel(labels).shape:
        raise ValueError(f"scores {scores.shape} and labels {labels.shape} must have the same shape")
    if scores.dtype not in (np.float32, np.float64):
        scores = scores.astype(np.float64)
    scores = scores.ravel()
    if not np.isfinite(scores).all():
        raise ValueError("anomaly scores contain NaN or infinite values")
    return scores, labels.ravel() > 0.5


def _squeeze_channel(array):
    if array.ndim == 4 and array.shape[1] == 1:
        return array[:, 0]
    return array


def _undefined_metric(name, labels, pixel_level):
    # A metric over a single class would be a meaningless number, so report NaN and say why.
    if pixel_level:
        missing = "defective pixels" if not labels.any() else "defect-free pixels"
        reason = f"the ground-truth masks have no {missing}"
    else:
        missing = "defective images" if not labels.any() else "good images"
        reason = f"the test set has no {missing}"
    warnings.warn(f"{name} is undefined: {reason}", RuntimeWarning, stacklevel=3)
    return float("nan")


def _has_both_classes(labels):
    return bool(labels.any()) and not bool(labels.all())


def compute_auroc(scores, labels):
    scores, labels = _flatten_scores_and_labels(scores, labels)
    if not _has_both_classes(labels):
        return _undefined_metric("AUROC", labels, pixel_level=False)
    return float(roc_auc_score(labels, scores))


def compute_average_precision(scores, labels):
    scores, labels = _flatten_scores_and_labels(scores, labels)
    if not _has_both_classes(labels):
        return _undefined_metric("average precision", labels, pixel_level=False)
    return float(average_precision_score(labels, scores))


def compute_f1_max(scores, labels):
    scores, labels = _flatten_scores_and_labels(scores, labels)
    if not _has_both_classes(labels):
        nan = _undefined_metric("F1-max", labels, pixel_level=False)
        return nan, nan
    precision, recall, thresholds = precision_recall_curve(labels, scores)
    # The last point (precision 1, recall 0) has no threshold.
    precision, recall = precision[:-1], recall[:-1]
    denominator = precision + recall
    f1 = np.divide(2 * precision * recall, denominator, out=np.zeros_like(denominator), where=denominator > 0)
    best = int(np.argmax(f1))
    return float(f1[best]), float(thresholds[best])


def compute_roc_curve(scores, labels):
    scores, labels = _flatten_scores_and_labels(scores, labels)
    if not _has_both_classes(labels):
        _undefined_metric("ROC curve", labels, pixel_level=False)
        return None
    return roc_curve(labels, scores)


def compute_pr_curve(scores, labels):
    scores, labels = _flatten_scores_and_labels(scores, labels)
    if not _has_both_classes(labels):
        _undefined_metric("PR curve", labels, pixel_level=False)
        return None
    return precision_recall_curve(labels, scores)


# Pixel-level metrics run over tens of millions of pixels. sklearn argsorts all of them with a
# stable mergesort; sorting the two classes separately with np.sort and counting with
# searchsorted gives the same exact values several times faster and with less memory.


def _sorted_pixel_scores(maps, masks):
    scores, labels = _flatten_scores_and_labels(maps, masks)
    if not _has_both_classes(labels):
        return None, None, labels
    positive = scores[labels]
    positive.sort()
    negative = scores[~labels]
    negative.sort()
    return positive, negative, labels


def _positive_threshold_counts(positive, negative):
    # Only distinct defective-pixel scores can move recall, so they are the thresholds that
    # matter for AP and F1-max (a threshold between them only adds false positives).
    starts = np.flatnonzero(np.r_[True, positive[1:] != positive[:-1]])
    thresholds = positive[starts]
    true_positives = positive.size - starts
    false_positives = negative.size - np.searchsorted(negative, thresholds, side="left")
    return thresholds, starts, true_positives, false_positives


def compute_pixel_auroc(maps, masks):
    positive, negative, labels = _sorted_pixel_scores(maps, masks)
    if positive is None:
        return _undefined_metric("pixel AUROC", labels, pixel_level=True)
    # Mann-Whitney U: equals the trapezoidal ROC area with tied scores merged into one threshold.
    below = np.searchsorted(negative, positive, side="left").sum(dtype=np.int64)
    below_or_tied = np.searchsorted(negative, positive, side="right").sum(dtype=np.int64)
    return float((below + below_or_tied) / (2.0 * positive.size * negative.size))


def compute_pixel_average_precision(maps, masks):
    positive, negative, labels = _sorted_pixel_scores(maps, masks)
    if positive is None:
        return _undefined_metric("pixel average precision", labels, pixel_level=True)
    _, starts, true_positives, false_positives = _positive_threshold_counts(positive, negative)
    # Each distinct threshold raises recall by (positives at that score) / (all positives).
    positives_at_threshold = np.diff(np.r_[starts, positive.size])
    precision = true_positives / (true_positives + false_positives)
    return float(np.dot(positives_at_threshold, precision) / positive.size)


def compute_pixel_f1_max(maps, masks):
    positive, negative, labels = _sorted_pixel_scores(maps, masks)
    if positive is None:
        nan = _undefined_metric("pixel F1-max", labels, pixel_level=True)
        return nan, nan
    thresholds, _, true_positives, false_positives = _positive_threshold_counts(positive, negative)
    f1 = 2.0 * true_positives / (true_positives + false_positives + positive.size)
    best = int(np.argmax(f1))
    return float(f1[best]), float(thresholds[best])
