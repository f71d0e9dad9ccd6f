# src/anomaly_detection/metrics/pro.py
import math
import warnings

import numpy as np
from scipy import ndimage

from anomaly_detection.metrics.auroc import _flatten_scores_and_labels, _squeeze_channel
from anomaly_detection.utils import to_numpy

# 8-connectivity inside each image and none across images, so one ndimage.label call
# labels the whole (N, H, W) stack with globally unique region ids.
_STRUCTURE = np.zeros((3, 3, 3), dtype=int)
_STRUCTURE[1] = 1


def compute_aupro(maps, masks, fpr_limit=0.3):
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    shape = _squeeze_channel(to_numpy(maps)).shape
    if len(shape) == 2:
        shape = (1,) + shape
    if len(shape) != 3:
        raise ValueError(f"anomaly maps must be (N, H, W), (N, 1, H, W) or (H, W), got {to_numpy(maps).shape}")
    scores, defective = _flatten_scores_and_labels(maps, masks)
    regions, region_count = ndimage.label(defective.reshape(shape), structure=_STRUCTURE)
    if region_count == 0:
        return _undefined("the ground-truth masks have no defect regions")
    if defective.all():
        return _undefined("the ground-truth masks have no defect-free pixels")

    region_sizes = np.bincount(regions.ravel())
    defect_region_ids = regions.ravel()[defective]
    # the label image is as large as all the maps together: drop it before the anomaly-free pass
    del regions
    positive = scores[defective]
    order = np.argsort(positive)
    positive = positive[order]
    weights = (1.0 / region_sizes)[defect_region_ids[order]] / region_count
    # pro_from[i]: PRO when exactly positive[i:] are flagged; pro_from[-1] = 0 flags nothing.
    pro_from = np.minimum(np.r_[np.cumsum(weights[::-1])[::-1], 0.0], 1.0)

    # The FPR runs over the anomaly-free pixels of all images. Only the highest of them, down to
    # one rank past the limit, shape the integrated curve, so partition instead of a full sort,
    # keeping every pixel tied with the cut value so that its whole run is counted.
    negative = scores[~defective]
    cut = negative.size - 1 - min(negative.size - 1, math.ceil(fpr_limit * negative.size))
    negative.partition(cut)
    descending = np.sort(negative[negative >= negative[cut]])[::-1]

    # Between two distinct anomaly-free scores the FPR stays constant and only PRO moves: those
    # thresholds add vertical segments of zero area. So MVTec's curve reduces to one segment per
    # distinct anomaly-free score t, from (FPR above t, PRO(score > t)) to (FPR(t), PRO(score >= t)),
    # with ties merged by taking the last index of each run of equal scores.
    last_of_run = np.r_[descending[1:] != descending[:-1], True]
    thresholds = descending[last_of_run]
    x1 = (np.flatnonzero(last_of_run) + 1) / negative.size
    x0 = np.r_[0.0, x1[:-1]]
    y0 = pro_from[np.searchsorted(positive, thresholds, side="right")]
    y1 = pro_from[np.searchsorted(positive, thresholds, side="left")]

    # Trapezoid rule up to fpr_limit, cutting the segment that crosses it with linearly
    # interpolated PRO, as MVTec AD's generic_util.trapezoid does.
    last = int(np.searchsorted(x1, fpr_limit, side="left"))
    area = np.sum((x1[:last] - x0[:last]) * (y0[:last] + y1[:last])) / 2
    y_limit = y0[last] + (y1[last] - y0[last]) * (fpr_limit - x0[last]) / (x1[last] - x0[last])
    area += (fpr_limit - x0[last]) * (y0[last] + y_limit) / 2
    return float(area / fpr_limit)


def _undefined(reason):
    warnings.warn(f"AU-PRO is undefined: {reason}", RuntimeWarning, stacklevel=3)
    return float("nan")
