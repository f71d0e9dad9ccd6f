# src/anomaly_detection/metrics/auroc.py
import warnings

import numpy as np

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
    # a bool mask is used as it is: a thresholded copy would cost one more byte per pixel
    return scores, labels.ravel() if labels.dtype == bool else labels.ravel() > 0.5


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
    warnings.warn(f"{name} is undefined: {reason}", RuntimeWarning, stacklevel=4)
    return float("nan")


def _has_both_classes(labels):
    return bool(labels.any()) and not bool(labels.all())


# Every metric here sorts the two classes separately and counts with searchsorted: exact (tied scores
# merged into one threshold, as sklearn does), several times faster than sklearn's mergesort of all
# values on tens of millions of pixels, and no sklearn import at run time (about 100 MB of RSS).


def _sorted_classes(scores, labels, name, pixel_level):
    scores, labels = _flatten_scores_and_labels(scores, labels)
    if not _has_both_classes(labels):
        return None, None, _undefined_metric(name, labels, pixel_level)
    return (*_sort_by_class(scores, labels), None)


def _sort_by_class(scores, labels):
    positive = scores[labels]
    positive.sort()
    negative = scores[~labels]
    negative.sort()
    return positive, negative


def _positive_threshold_counts(positive, negative):
    # Only distinct defective scores can move recall, so they are the thresholds that matter for AP and
    # F1-max (a threshold between them only adds false positives).
    starts = np.flatnonzero(np.r_[True, positive[1:] != positive[:-1]])
    thresholds = positive[starts]
    true_positives = positive.size - starts
    false_positives = negative.size - np.searchsorted(negative, thresholds, side="left")
    return thresholds, starts, true_positives, false_positives


def _auroc(positive, negative):
    # Mann-Whitney U: equals the trapezoidal ROC area with tied scores merged into one threshold.
    below = np.searchsorted(negative, positive, side="left").sum(dtype=np.int64)
    below_or_tied = np.searchsorted(negative, positive, side="right").sum(dtype=np.int64)
    return float((below + below_or_tied) / (2.0 * positive.size * negative.size))


def _average_precision(positive, negative):
    _, starts, true_positives, false_positives = _positive_threshold_counts(positive, negative)
    # Each distinct threshold raises recall by (positives at that score) / (all positives).
    positives_at_threshold = np.diff(np.r_[starts, positive.size])
    precision = true_positives / (true_positives + false_positives)
    return float(np.dot(positives_at_threshold, precision) / positive.size)


def _f1_max(positive, negative):
    thresholds, _, true_positives, false_positives = _positive_threshold_counts(positive, negative)
    f1 = 2.0 * true_positives / (true_positives + false_positives + positive.size)
    # ties in F1 go to the lowest threshold (the first one, thresholds ascending)
    best = int(np.argmax(f1))
    return float(f1[best]), float(thresholds[best])


def compute_auroc(scores, labels):
    positive, negative, undefined = _sorted_classes(scores, labels, "AUROC", pixel_level=False)
    return undefined if positive is None else _auroc(positive, negative)


def compute_average_precision(scores, labels):
    positive, negative, undefined = _sorted_classes(scores, labels, "average precision", pixel_level=False)
    return undefined if positive is None else _average_precision(positive, negative)


def compute_f1_max(scores, labels):
    positive, negative, undefined = _sorted_classes(scores, labels, "F1-max", pixel_level=False)
    return (undefined, undefined) if positive is None else _f1_max(positive, negative)


def compute_roc_curve(scores, labels):
    positive, negative, _ = _sorted_classes(scores, labels, "ROC curve", pixel_level=False)
    if positive is None:
        return None
    everything = np.concatenate([positive, negative])
    thresholds = np.unique(everything)[::-1]
    tpr = (positive.size - np.searchsorted(positive, thresholds, side="left")) / positive.size
    fpr = (negative.size - np.searchsorted(negative, thresholds, side="left")) / negative.size
    return np.r_[0.0, fpr], np.r_[0.0, tpr], np.r_[np.inf, thresholds]


def compute_pr_curve(scores, labels):
    positive, negative, _ = _sorted_classes(scores, labels, "PR curve", pixel_level=False)
    if positive is None:
        return None
    thresholds, _, true_positives, false_positives = _positive_threshold_counts(positive, negative)
    precision = true_positives / (true_positives + false_positives)
    recall = true_positives / positive.size
    # as sklearn: thresholds ascending, a last point at precision 1, recall 0 with no threshold
    return np.r_[precision, 1.0], np.r_[recall, 0.0], thresholds


def compute_pixel_auroc(maps, masks):
    positive, negative, undefined = _sorted_classes(maps, masks, "pixel AUROC", pixel_level=True)
    return undefined if positive is None else _auroc(positive, negative)


def compute_pixel_average_precision(maps, masks):
    positive, negative, undefined = _sorted_classes(maps, masks, "pixel average precision", pixel_level=True)
    return undefined if positive is None else _average_precision(positive, negative)


def compute_pixel_f1_max(maps, masks):
    positive, negative, undefined = _sorted_classes(maps, masks, "pixel F1-max", pixel_level=True)
    return (undefined, undefined) if positive is None else _f1_max(positive, negative)


def compute_classification_metrics(scores, labels, pixel_level=False):
    # AUROC, average precision and F1-max from one sort of the two classes: the evaluator needs all three,
    # and at pixel level each sort is tens of millions of values
    prefix = "pixel " if pixel_level else ""
    names = (f"{prefix}AUROC", f"{prefix}average precision", f"{prefix}F1-max")
    scores, labels = _flatten_scores_and_labels(scores, labels)
    if not _has_both_classes(labels):
        auroc, average_precision, f1 = (_undefined_metric(name, labels, pixel_level) for name in names)
        return {"auroc": auroc, "average_precision": average_precision, "f1_max": f1, "f1_threshold": f1}
    positive, negative = _sort_by_class(scores, labels)
    f1, threshold = _f1_max(positive, negative)
    return {"auroc": _auroc(positive, negative), "average_precision": _average_precision(positive, negative),
            "f1_max": f1, "f1_threshold": threshold}

