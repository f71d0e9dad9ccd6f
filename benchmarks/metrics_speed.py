# benchmarks/metrics_speed.py
# Time of the pixel-level metrics on one generated category of magnetic_tile's size; appended to
# benchmarks/results/metrics_speed.jsonl through record.py.
import argparse
import os
import time

import numpy as np
from scipy import ndimage
from sklearn.metrics import roc_auc_score

from anomaly_detection.metrics import (
    compute_aupro,
    compute_pixel_auroc,
    compute_pixel_average_precision,
    compute_pixel_f1_max,
)
from anomaly_detection.utils import peak_rss_mb
from record import append_record, results_path, typed_command


def make_category(count, size, defective_fraction, seed):
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[:size, :size]
    masks = np.zeros((count, size, size), dtype=bool)
    for index in np.flatnonzero(rng.random(count) < defective_fraction):
        for _ in range(rng.integers(1, 4)):
            centre_row, centre_col = rng.uniform(0.1, 0.9, size=2) * size
            radius_row, radius_col = rng.uniform(0.02, 0.12, size=2) * size
            masks[index] |= ((rows - centre_row) / radius_row) ** 2 + ((cols - centre_col) / radius_col) ** 2 <= 1
    noise = rng.normal(size=(count, size, size)).astype(np.float32)
    maps = ndimage.gaussian_filter(noise, sigma=(0, 3, 3)) + 0.15 * ndimage.gaussian_filter(
        masks.astype(np.float32), sigma=(0, 2, 2)
    )
    return maps, masks


def timed(function, *args):
    start = time.perf_counter()
    result = function(*args)
    return result, time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description="Time the pixel-level metrics on one synthetic category.")
    parser.add_argument("--count", type=int, default=630)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-sklearn", action="store_true", help="skip the slow sklearn baseline")
    parser.add_argument("--out", default=str(results_path(__file__)),
                        help="append the record here (default: %(default)s; '' writes none)")
    args = parser.parse_args()

    maps, masks = make_category(args.count, args.size, 0.6, args.seed)
    defective_images = int(masks.any(axis=(1, 2)).sum())
    print(
        f"{args.count} maps of {args.size}x{args.size} = {maps.size / 1e6:.1f}M pixels, "
        f"{defective_images} defective images, {masks.mean():.2%} defective pixels"
    )
    rows = []
    auroc, seconds = timed(compute_pixel_auroc, maps, masks)
    rows.append(("compute_pixel_auroc", seconds, f"{auroc:.6f}"))
    if not args.skip_sklearn:
        baseline, baseline_seconds = timed(lambda: roc_auc_score(masks.ravel(), maps.ravel()))
        value = f"{baseline:.6f} (|diff| {abs(baseline - auroc):.1e})"
        rows.append(("sklearn roc_auc_score", baseline_seconds, value))
    average_precision, seconds = timed(compute_pixel_average_precision, maps, masks)
    rows.append(("compute_pixel_average_precision", seconds, f"{average_precision:.6f}"))
    (f1, threshold), seconds = timed(compute_pixel_f1_max, maps, masks)
    rows.append(("compute_pixel_f1_max", seconds, f"{f1:.6f} at {threshold:.4f}"))
    aupro, seconds = timed(compute_aupro, maps, masks)
    rows.append(("compute_aupro (fpr_limit=0.3)", seconds, f"{aupro:.6f}"))

    print(f"{'metric':34s} {'seconds':>8s}  value")
    for name, seconds, value in rows:
        print(f"{name:34s} {seconds:8.2f}  {value}")
    if not args.skip_sklearn:
        print(f"sklearn roc_auc_score / compute_pixel_auroc time: {baseline_seconds / rows[0][1]:.1f}x")
    print(f"peak RSS: {peak_rss_mb():.0f} MB")
    if args.out:
        figures = {name: {"seconds": seconds, "value": value} for name, seconds, value in rows}
        figures["peak_rss_mb"] = peak_rss_mb()
        append_record(__file__, typed_command(), figures, out=args.out,
                      variant=f"{args.count} maps of {args.size}x{args.size}", seed=args.seed,
                      loadavg=os.getloadavg()[0])


if __name__ == "__main__":
    main()
