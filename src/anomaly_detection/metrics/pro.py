# src/anomaly_detection/metrics/pro.py
import math
import warnings

import numpy as np
from scipy import ndimage

from anomaly_detection.metrics.auroc import _flatten_scores_and_labels, _squeeze_channel
from anomaly_detection.utils import to_numpy

# 8-connectivity inside an image; each image is labelled on its own, so no region crosses images
_STRUCTURE = np.ones((3, 3), dtype=int)


def compute_aupro(maps, masks, fpr_limit=0.3, return_counts=False):
    # maps and masks: two stacks of equal-size images ((N, H, W), (N, 1, H, W) or (H, W)), or two lists
    # of per-image arrays whose sizes may differ from image to image (e.g. each at its own resolution)
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    pairs = _image_pairs(maps, masks)
    area, counts = _aupro(pairs, fpr_limit)
    return (area, counts) if return_counts else area


def _image_pairs(maps, masks):
    if isinstance(maps, (list, tuple)):
        if not isinstance(masks, (list, tuple)) or len(maps) != len(masks):
            found = f"{len(masks)} masks" if isinstance(masks, (list, tuple)) else f"a {type(masks).__name__}"
            raise ValueError(f"per-image anomaly maps need a list of masks of the same length, got {len(maps)} "
                             f"maps and {found}")
        pairs = []
        for index, (anomaly_map, mask) in enumerate(zip(maps, masks)):
            anomaly_map, mask = to_numpy(anomaly_map), to_numpy(mask)
            anomaly_map = anomaly_map[0] if anomaly_map.ndim == 3 and anomaly_map.shape[0] == 1 else anomaly_map
            mask = mask[0] if mask.ndim == 3 and mask.shape[0] == 1 else mask
            if anomaly_map.ndim != 2 or anomaly_map.shape != mask.shape:
                raise ValueError(f"image {index}: anomaly map {anomaly_map.shape} and mask {mask.shape} must be "
                                 "the same (H, W)")
            scores, defective = _flatten_scores_and_labels(anomaly_map, mask)
            pairs.append((scores.reshape(mask.shape), defective.reshape(mask.shape)))
        return pairs
    shape = _squeeze_channel(to_numpy(maps)).shape
    if len(shape) == 2:
        shape = (1,) + shape
    if len(shape) != 3:
        raise ValueError(f"anomaly maps must be (N, H, W), (N, 1, H, W) or (H, W), got {to_numpy(maps).shape}")
    scores, defective = _flatten_scores_and_labels(maps, masks)
    scores, defective = scores.reshape(shape), defective.reshape(shape)
    return [(scores[index], defective[index]) for index in range(shape[0])]


def _aupro(pairs, fpr_limit):
    region_count, positive, weights, negative_count = 0, [], [], 0
    for scores, defective in pairs:
        regions, count = ndimage.label(defective, structure=_STRUCTURE)
        if count:
            region_sizes = np.bincount(regions.ravel())
            positive.append(scores[defective])
            # each defect pixel weighs 1 / the size of its region (row-major order, as positive)
            weights.append(1.0 / region_sizes[regions[defective]])
        region_count += count
        negative_count += defective.size - int(np.count_nonzero(defective))
    positive_count = sum(part.size for part in positive)
    counts = {"num_defect_regions": int(region_count), "num_defect_pixels": int(positive_count),
              "num_normal_pixels": int(negative_count)}
    if region_count == 0:
        return _undefined("the ground-truth masks have no defect regions"), counts
    if negative_count == 0:
        return _undefined("the ground-truth masks have no defect-free pixels"), counts

    positive = np.concatenate(positive)
    order = np.argsort(positive)
    positive = positive[order]
    weights = np.concatenate(weights)[order] / region_count
    # pro_from[i]: PRO when exactly positive[i:] are flagged; pro_from[-1] = 0 flags nothing.
    pro_from = np.minimum(np.r_[np.cumsum(weights[::-1])[::-1], 0.0], 1.0)
    del weights

    # The FPR runs over the anomaly-free pixels of all images, gathered into one preallocated array
    # (image by image, so no per-image copies are held at once). Only the highest of them, down to
    # one rank past the limit, shape the integrated curve, so partition instead of a full sort,
    # keeping every pixel tied with the cut value so that its whole run is counted.
    negative = np.empty(negative_count, dtype=np.result_type(*(scores.dtype for scores, _ in pairs)))
    start = 0
    for scores, defective in pairs:
        part = scores[~defective]
        negative[start:start + part.size] = part
        start += part.size
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
    return float(area / fpr_limit), counts


def _undefined(reason):
    warnings.warn(f"AU-PRO is undefined: {reason}", RuntimeWarning, stacklevel=4)
    return float("nan")
