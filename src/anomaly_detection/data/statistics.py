# src/anomaly_detection/data/statistics.py
from collections import Counter

import numpy as np

from anomaly_detection.data.datasets import image_size, read_mask


def _distribution(values):
    if not values:
        return {"count": 0}
    array = np.asarray(values, dtype=np.float64)
    return {"count": int(array.size), "min": float(array.min()), "max": float(array.max()),
            "mean": float(array.mean()), "median": float(np.median(array)),
            "p05": float(np.percentile(array, 5)), "p95": float(np.percentile(array, 95))}


def _examples(found):
    return {"count": len(found), "example": found[0] if found else ""}


def split_statistics(dataset):
    counts = Counter(sample["defect_type"] for sample in dataset.samples)
    widths, heights, sizes = [], [], Counter()
    mask_fractions, empty_masks, non_binary, mismatched = [], [], [], []
    for sample in dataset.samples:
        width, height = image_size(sample["image_path"])
        widths.append(width)
        heights.append(height)
        sizes[f"{width}x{height}"] += 1
        if sample["mask_path"]:
            mask, info = read_mask(sample["mask_path"])
            fraction = info["fraction"]
            mask_fractions.append(fraction)
            if fraction == 0.0:
                empty_masks.append(str(sample["image_path"]))
            if info["non_binary"]:
                non_binary.append(str(sample["mask_path"]))
            mask_size = (mask.shape[-1], mask.shape[-2])
            if mask_size != (width, height):
                # the header read skips PNG metadata stored after the pixels; the decoded mask does not
                width, height = image_size(sample["image_path"], exact=True)
            if mask_size != (width, height):
                mismatched.append(f"{sample['mask_path']} is {mask_size[0]}x{mask_size[1]}, its image "
                                  f"{sample['image_path']} is {width}x{height}")
    return {
        "images": len(dataset.samples),
        "per_defect_type": dict(sorted(counts.items())),
        "good": counts.get("good", 0),
        "defective": len(dataset.samples) - counts.get("good", 0),
        "width": _distribution(widths),
        "height": _distribution(heights),
        "distinct_sizes": len(sizes),
        "most_common_sizes": dict(sizes.most_common(5)),
        "mask_area_fraction": _distribution(mask_fractions),
        "empty_masks": empty_masks,
        "non_binary_masks": _examples(non_binary),
        "mask_size_mismatches": _examples(mismatched),
        "has_masks": dataset.has_masks,
    }


def dataset_statistics(dataset_cls, root_dir, category, **options):
    result = {"dataset": dataset_cls.dataset_name, "root_dir": str(root_dir), "category": category}
    for split in ("train", "test"):
        # stats reports bad masks itself instead of stopping at the first one
        dataset = dataset_cls(root_dir, category, split, None, check_files=False, **options)
        result[split] = split_statistics(dataset)
    return result


def format_statistics(stats):
    lines = [f"{stats['dataset']} / {stats['category']}  ({stats['root_dir']})"]
    lines.append(f"{'split':<8}{'defect type':<20}{'images':>8}")
    for split in ("train", "test"):
        for defect, count in stats[split]["per_defect_type"].items():
            lines.append(f"{split:<8}{defect:<20}{count:>8}")
    for split in ("train", "test"):
        part = stats[split]
        width, height = part["width"], part["height"]
        lines.append(f"{split}: width {width['min']:.0f}-{width['max']:.0f} (median {width['median']:.0f}), "
                     f"height {height['min']:.0f}-{height['max']:.0f} (median {height['median']:.0f}), "
                     f"{part['distinct_sizes']} distinct sizes")
    area = stats["test"]["mask_area_fraction"]
    if area["count"]:
        lines.append(f"test masks: {area['count']}, area fraction median {area['median']:.4f} "
                     f"(p05 {area['p05']:.4f}, p95 {area['p95']:.4f}, max {area['max']:.4f}), "
                     f"{len(stats['test']['empty_masks'])} empty")
    else:
        lines.append("test masks: none (label-only category: pixel metrics are skipped)")
    non_binary, mismatched = stats["test"]["non_binary_masks"], stats["test"]["mask_size_mismatches"]
    if non_binary["count"]:
        lines.append(f"test masks: {non_binary['count']} hold more than two values (binarised at half their "
                     f"maximum), e.g. {non_binary['example']}")
    if mismatched["count"]:
        lines.append(f"test masks: {mismatched['count']} differ in size from their image (training and "
                     f"testing stop on them), e.g. {mismatched['example']}")
    return "\n".join(lines)
