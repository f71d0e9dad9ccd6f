# src/anomaly_detection/metrics/__init__.py
from anomaly_detection.metrics.auroc import (
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
from anomaly_detection.metrics.pro import compute_aupro
from anomaly_detection.metrics.visualization import (
    denormalize_image,
    plot_anomaly_panel,
    plot_pr_curve,
    plot_roc_curve,
    plot_score_histogram,
)

__all__ = [
    "compute_aupro",
    "compute_auroc",
    "compute_average_precision",
    "compute_classification_metrics",
    "compute_f1_max",
    "compute_pixel_auroc",
    "compute_pixel_average_precision",
    "compute_pixel_f1_max",
    "compute_pr_curve",
    "compute_roc_curve",
    "denormalize_image",
    "plot_anomaly_panel",
    "plot_pr_curve",
    "plot_roc_curve",
    "plot_score_histogram",
]
