# src/anomaly_detection/evaluator.py
import math
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from anomaly_detection.metrics import compute_aupro, compute_auroc, compute_classification_metrics
from anomaly_detection.utils import atomic_write_json, atomic_write_text, logger, resolve_device


def dataset_has_masks(dataset):
    while hasattr(dataset, "dataset") and not hasattr(dataset, "has_masks"):
        dataset = dataset.dataset
    return getattr(dataset, "has_masks", None)


class Evaluator:
    def __init__(self, model, device="auto", output_dir=None, mean=None, std=None, max_panels=40, figures=True,
                 progress_bar=True):
        self.device = resolve_device(device)
        self.model = model.to(self.device)
        self.output_dir = Path(output_dir) if output_dir else None
        self.mean = mean if mean is not None else getattr(model, "mean", (0.485, 0.456, 0.406))
        self.std = std if std is not None else getattr(model, "std", (0.229, 0.224, 0.225))
        self.max_panels = int(max_panels)
        self.figures = figures
        self.progress_bar = progress_bar

    @torch.no_grad()
    def predict(self, loader, keep_maps=True):
        self.model.eval()
        scores, labels, paths, defect_types, mask_found = [], [], [], [], False
        maps = masks = None
        count = 0
        started = time.perf_counter()
        for batch in tqdm(loader, desc="predict", disable=not self.progress_bar, leave=False):
            outputs = self.model(batch["image"].to(self.device, non_blocking=True))
            check_model_outputs(outputs, batch["image"])
            scores.append(outputs["pred_score"].float().cpu().numpy().reshape(-1))
            labels.append(np.asarray(batch["label"]).reshape(-1))
            size = len(scores[-1])
            if keep_maps:
                if maps is None:
                    # one array for the whole split: a list of batches plus a concatenated copy would
                    # hold every map twice at the end
                    total = len(loader.dataset)
                    maps = np.empty((total,) + tuple(batch["image"].shape[-2:]), dtype=np.float32)
                    masks = np.empty((total,) + tuple(batch["image"].shape[-2:]), dtype=bool)
                maps[count:count + size] = outputs["anomaly_map"].float().cpu().numpy()[:, 0]
                masks[count:count + size] = batch["mask"].numpy()[:, 0] > 0.5
            count += size
            paths += list(batch["image_path"])
            defect_types += list(batch["defect_type"])
            mask_found = mask_found or any(bool(p) for p in batch["mask_path"])
        elapsed = time.perf_counter() - started
        has_masks = dataset_has_masks(loader.dataset)
        return {
            "scores": np.concatenate(scores), "labels": np.concatenate(labels).astype(np.int64),
            "maps": maps[:count] if keep_maps else None,
            "masks": masks[:count] if keep_maps else None,
            "image_paths": paths, "defect_types": defect_types,
            "has_masks": mask_found if has_masks is None else bool(has_masks),
            "predict_s": elapsed,
        }

    def calibrate_threshold(self, val_loader, quantile=0.99):
        if not 0.0 < quantile <= 1.0:
            raise ValueError(f"threshold quantile must be in (0, 1], got {quantile}")
        predictions = self.predict(val_loader)
        if predictions["labels"].any():
            raise ValueError("The threshold is calibrated on normal validation images only, "
                             "but the loader holds defective ones")
        return {
            "image_threshold": float(np.quantile(predictions["scores"], quantile)),
            # the maps are not used after this: partition them in place instead of copying them
            "pixel_threshold": float(np.quantile(predictions["maps"].reshape(-1), quantile, overwrite_input=True)),
            "quantile": float(quantile),
            "num_images": int(predictions["scores"].size),
        }

    def evaluate(self, test_loader, threshold=None):
        predictions = self.predict(test_loader)
        metrics = compute_metrics(predictions, threshold)
        if self.output_dir is not None:
            self.write_results(test_loader, predictions, metrics, threshold)
        return metrics

    def write_results(self, test_loader, predictions, metrics, threshold=None):
        self.output_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.output_dir / "metrics.json", metrics)
        import pandas as pd  # imported here: a run with no results folder does not need it

        table = pd.DataFrame({
            "image_path": predictions["image_paths"], "defect_type": predictions["defect_types"],
            "label": predictions["labels"], "score": predictions["scores"],
        })
        if threshold is not None:
            table["predicted_anomalous"] = (table["score"] >= threshold["image_threshold"]).astype(int)
        atomic_write_text(self.output_dir / "scores.csv", table.to_csv(index=False))
        if self.figures:
            self.write_figures(test_loader, predictions, metrics, threshold)

    def write_figures(self, test_loader, predictions, metrics, threshold=None):
        # matplotlib is imported only when figures are drawn
        from anomaly_detection.metrics.visualization import (
            denormalize_image, plot_anomaly_panel, plot_pr_curve, plot_roc_curve, plot_score_histogram,
        )

        folder = self.output_dir / "figures"
        scores, labels = predictions["scores"], predictions["labels"]
        image_threshold = threshold["image_threshold"] if threshold else None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            plot_roc_curve(scores, labels, folder / "roc_curve.png", title="Image-level ROC")
            plot_pr_curve(scores, labels, folder / "pr_curve.png", title="Image-level precision-recall")
            plot_score_histogram(scores, labels, folder / "score_histogram.png", threshold=image_threshold,
                                 title="Anomaly scores: good vs defective")
        maps = predictions["maps"]
        if threshold is not None:
            pixel_threshold = threshold["pixel_threshold"]
        elif not math.isnan(metrics.get("pixel_f1_threshold", float("nan"))):
            pixel_threshold = metrics["pixel_f1_threshold"]
        else:
            pixel_threshold = float(np.quantile(maps, 0.99))
        # one colour scale for the whole category, so panels can be compared with each other
        vmin, vmax = float(np.min(maps)), float(np.quantile(maps, 0.999))
        for index in select_panel_indices(predictions, self.max_panels):
            item = test_loader.dataset[index]
            image = denormalize_image(item["image"], self.mean, self.std)
            name = f"{predictions['defect_types'][index]}_{Path(predictions['image_paths'][index]).stem}.png"
            title = (f"{predictions['defect_types'][index]} {Path(predictions['image_paths'][index]).name}  "
                     f"score {predictions['scores'][index]:.4g}")
            plot_anomaly_panel(image, predictions["masks"][index], maps[index], pixel_threshold, title,
                               folder / "panels" / name, vmin=vmin, vmax=vmax)


def check_model_outputs(outputs, images):
    if not isinstance(outputs, dict) or "anomaly_map" not in outputs or "pred_score" not in outputs:
        raise TypeError("In eval mode the model must return {'anomaly_map': Bx1xHxW, 'pred_score': B}, got "
                        f"{type(outputs).__name__}")
    batch, _, height, width = images.shape
    if tuple(outputs["anomaly_map"].shape) != (batch, 1, height, width):
        raise ValueError(f"anomaly_map has shape {tuple(outputs['anomaly_map'].shape)}, expected "
                         f"{(batch, 1, height, width)} (the input resolution)")


def select_panel_indices(predictions, max_panels):
    if max_panels <= 0:
        return []
    defect_types = np.asarray(predictions["defect_types"])
    scores = predictions["scores"]
    groups = sorted(set(defect_types.tolist()))
    per_group = max(1, max_panels // len(groups))
    chosen = []
    for group in groups:
        members = np.flatnonzero(defect_types == group)
        # spread over the score range of the group: best and worst cases are both worth a look
        ranked = members[np.argsort(scores[members])]
        picks = np.unique(np.linspace(0, len(ranked) - 1, num=min(per_group, len(ranked))).round().astype(int))
        chosen += ranked[picks].tolist()
    return sorted(chosen)[:max_panels]


def compute_metrics(predictions, threshold=None):
    scores, labels = predictions["scores"], predictions["labels"]
    notes = []
    metrics = {"num_images": int(labels.size), "num_good": int((labels == 0).sum()),
               "num_defective": int((labels == 1).sum())}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        image = compute_classification_metrics(scores, labels)
        metrics["image_auroc"], metrics["image_ap"] = image["auroc"], image["average_precision"]
        metrics["image_f1_max"], metrics["image_f1_threshold"] = image["f1_max"], image["f1_threshold"]
        metrics["f1_max"] = metrics["image_f1_max"]
        if predictions["has_masks"] and predictions["maps"] is not None:
            maps, masks = predictions["maps"], predictions["masks"]
            pixel = compute_classification_metrics(maps, masks, pixel_level=True)
            metrics["pixel_auroc"], metrics["pixel_ap"] = pixel["auroc"], pixel["average_precision"]
            metrics["pixel_f1_max"], metrics["pixel_f1_threshold"] = pixel["f1_max"], pixel["f1_threshold"]
            metrics["aupro"] = compute_aupro(maps, masks, fpr_limit=0.3)
        else:
            for key in ("pixel_auroc", "pixel_ap", "pixel_f1_max", "pixel_f1_threshold", "aupro"):
                metrics[key] = float("nan")
            notes.append("pixel metrics skipped: the test set has no ground-truth masks (label-only)")
    notes += sorted({str(w.message) for w in caught})
    per_type = {}
    for defect in sorted(set(predictions["defect_types"]) - {"good"}):
        keep = np.array([d in ("good", defect) for d in predictions["defect_types"]])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            per_type[defect] = compute_auroc(scores[keep], labels[keep])
    metrics["image_auroc_per_defect_type"] = per_type
    if threshold is not None:
        predicted = scores >= threshold["image_threshold"]
        metrics["threshold"] = dict(threshold)
        metrics["at_threshold"] = {
            "true_positive_rate": float(predicted[labels == 1].mean()) if (labels == 1).any() else float("nan"),
            "false_positive_rate": float(predicted[labels == 0].mean()) if (labels == 0).any() else float("nan"),
        }
    metrics["notes"] = notes
    for note in notes:
        logger.warning(note)
    return metrics
