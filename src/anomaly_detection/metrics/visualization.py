# src/anomaly_detection/metrics/visualization.py
import numpy as np
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure

from anomaly_detection.metrics.auroc import (
    _flatten_scores_and_labels,
    _has_both_classes,
    compute_auroc,
    compute_average_precision,
    compute_pr_curve,
    compute_roc_curve,
)
from anomaly_detection.utils import atomic_save_figure, to_numpy

# Figures are built as plain Figure objects (never pyplot), so plotting needs no GUI backend
# and touches no global state: it is safe from worker threads and on headless machines.
_RED = ListedColormap(["red"])


def denormalize_image(image_chw, mean, std):
    image = to_numpy(image_chw).astype(np.float32)
    mean = np.asarray(mean, dtype=np.float32).reshape(-1, 1, 1)
    std = np.asarray(std, dtype=np.float32).reshape(-1, 1, 1)
    image = np.clip((image * std + mean).transpose(1, 2, 0), 0.0, 1.0)
    if image.shape[2] == 1:
        image = np.repeat(image, 3, axis=2)
    return image


def _display_image(image):
    image = to_numpy(image)
    if image.dtype == np.uint8:
        image = image / 255.0
    image = np.clip(image.astype(np.float32), 0.0, 1.0)
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    return image


def _pixel_extent(array_shape, height, width):
    # Places an array of any resolution exactly over the image: edges for imshow,
    # pixel centres for contour.
    rows, cols = array_shape
    half_x, half_y = 0.5 * width / cols, 0.5 * height / rows
    edges = (-0.5, width - 0.5, height - 0.5, -0.5)
    centres = (half_x - 0.5, width - half_x - 0.5, half_y - 0.5, height - half_y - 0.5)
    return edges, centres


def _draw_contour(axis, binary, height, width, color):
    if binary.any() and not binary.all():
        _, centres = _pixel_extent(binary.shape, height, width)
        axis.contour(binary.astype(np.float32), levels=[0.5], colors=color, linewidths=1.2, extent=centres)


def plot_anomaly_panel(image_hw3, mask_hw, anomaly_map_hw, threshold, title, path, vmin=None, vmax=None):
    image = _display_image(image_hw3)
    height, width = image.shape[:2]
    anomaly_map = np.squeeze(to_numpy(anomaly_map_hw)).astype(np.float32)
    mask = np.zeros(anomaly_map.shape, dtype=bool) if mask_hw is None else np.squeeze(to_numpy(mask_hw)) > 0.5
    vmin = float(anomaly_map.min()) if vmin is None else float(vmin)
    vmax = float(anomaly_map.max()) if vmax is None else float(vmax)
    map_edges, _ = _pixel_extent(anomaly_map.shape, height, width)

    figure = Figure(figsize=(16, 4.4), layout="constrained")
    axes = figure.subplots(1, 4)
    for axis in axes:
        axis.imshow(image)
        axis.set_axis_off()
    axes[0].set_title("Image")
    axes[1].set_title("Ground truth")
    _draw_contour(axes[1], mask, height, width, "red")
    heat = axes[2].imshow(anomaly_map, cmap="jet", alpha=0.5, vmin=vmin, vmax=vmax, extent=map_edges)
    figure.colorbar(heat, ax=axes[2], fraction=0.046, pad=0.02)
    axes[2].set_title("Anomaly map")
    if threshold is None:
        axes[3].set_title("Prediction (no threshold)")
    else:
        predicted = anomaly_map >= threshold
        overlay = np.ma.masked_where(~predicted, predicted.astype(np.float32))
        axes[3].imshow(overlay, cmap=_RED, alpha=0.4, extent=map_edges)
        _draw_contour(axes[3], predicted, height, width, "yellow")
        axes[3].set_title(f"Prediction (score >= {threshold:.4g})")
    figure.suptitle(title)
    return atomic_save_figure(figure, path, dpi=100)


def plot_heatmap_overlay(image_hw3, anomaly_map_hw, threshold, title, path, vmin=None, vmax=None):
    # one picture for an operator: the image, the map over it, and the region at or above the pixel threshold
    image = _display_image(image_hw3)
    height, width = image.shape[:2]
    anomaly_map = np.squeeze(to_numpy(anomaly_map_hw)).astype(np.float32)
    vmin = float(anomaly_map.min()) if vmin is None else float(vmin)
    vmax = float(anomaly_map.max()) if vmax is None else float(vmax)
    map_edges, _ = _pixel_extent(anomaly_map.shape, height, width)
    figure = Figure(figsize=(5.4, 5), layout="constrained")
    axis = figure.subplots()
    axis.imshow(image)
    axis.set_axis_off()
    heat = axis.imshow(anomaly_map, cmap="jet", alpha=0.45, vmin=vmin, vmax=vmax, extent=map_edges)
    figure.colorbar(heat, ax=axis, fraction=0.046, pad=0.02)
    if threshold is not None:
        _draw_contour(axis, anomaly_map >= threshold, height, width, "white")
    axis.set_title(title, fontsize=9)
    return atomic_save_figure(figure, path, dpi=100)


def _curve_figure(title, xlabel, ylabel):
    figure = Figure(figsize=(5, 5), layout="constrained")
    axis = figure.subplots()
    axis.set(title=title, xlabel=xlabel, ylabel=ylabel, xlim=(0, 1), ylim=(0, 1.02))
    axis.grid(alpha=0.3)
    return figure, axis


def _note_single_class(axis, labels, curve_name):
    missing = "defective" if not labels.any() else "good"
    axis.text(0.5, 0.5, f"{curve_name} undefined:\nno {missing} samples", ha="center", va="center")


def plot_roc_curve(scores, labels, path, title="ROC curve"):
    scores, labels = _flatten_scores_and_labels(scores, labels)
    figure, axis = _curve_figure(title, "False positive rate", "True positive rate")
    axis.plot([0, 1], [0, 1], linestyle="--", color="grey", label="chance")
    if _has_both_classes(labels):
        fpr, tpr, _ = compute_roc_curve(scores, labels)
        axis.plot(fpr, tpr, label=f"AUROC = {compute_auroc(scores, labels):.4f}")
    else:
        _note_single_class(axis, labels, "ROC")
    axis.legend(loc="lower right")
    return atomic_save_figure(figure, path, dpi=100)


def plot_pr_curve(scores, labels, path, title="Precision-recall curve"):
    scores, labels = _flatten_scores_and_labels(scores, labels)
    figure, axis = _curve_figure(title, "Recall", "Precision")
    if labels.size:
        axis.axhline(labels.mean(), linestyle="--", color="grey", label="chance")
    if _has_both_classes(labels):
        precision, recall, _ = compute_pr_curve(scores, labels)
        axis.step(recall, precision, where="post", label=f"AP = {compute_average_precision(scores, labels):.4f}")
    else:
        _note_single_class(axis, labels, "PR curve")
    if axis.get_legend_handles_labels()[0]:
        axis.legend(loc="lower left")
    return atomic_save_figure(figure, path, dpi=100)


def plot_score_histogram(scores, labels, path, threshold=None, title="Anomaly scores"):
    scores, labels = _flatten_scores_and_labels(scores, labels)
    figure = Figure(figsize=(7, 4), layout="constrained")
    axis = figure.subplots()
    bins = np.histogram_bin_edges(scores, bins=40)
    for selected, name, color in ((~labels, "good", "tab:green"), (labels, "defective", "tab:red")):
        if selected.any():
            label = f"{name} (n={int(selected.sum())})"
            axis.hist(scores[selected], bins=bins, alpha=0.6, color=color, label=label)
    if threshold is not None:
        axis.axvline(threshold, color="black", linestyle="--", label=f"threshold = {threshold:.4g}")
    axis.set(title=title, xlabel="Anomaly score", ylabel="Count")
    if axis.get_legend_handles_labels()[0]:
        axis.legend()
    return atomic_save_figure(figure, path, dpi=100)
