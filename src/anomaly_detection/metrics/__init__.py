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

# the plotting functions load matplotlib on first use, so scoring and metrics alone do not import it
_VISUALIZATION = ("denormalize_image", "plot_anomaly_panel", "plot_heatmap_overlay", "plot_pr_curve", "plot_roc_curve",
                  "plot_score_histogram")


def __getattr__(name):
    if name in _VISUALIZATION:
        from anomaly_detection.metrics import visualization

        return getattr(visualization, name)
    raise AttributeError(f"module 'anomaly_detection.metrics' has no attribute '{name}'")


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
    "plot_heatmap_overlay",
    "plot_pr_curve",
    "plot_roc_curve",
    "plot_score_histogram",
]
