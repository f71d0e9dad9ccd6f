# src/anomaly_detection/evaluator.py
import math
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Subset
from tqdm.auto import tqdm

from anomaly_detection import distributed
from anomaly_detection.data.datasets import image_size, load_mask
from anomaly_detection.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from anomaly_detection.metrics import compute_aupro, compute_auroc, compute_classification_metrics
from anomaly_detection.utils import atomic_write_json, atomic_write_text, logger, resolve_device


PIXEL_RESOLUTIONS = ("input", "native")


def dataset_has_masks(dataset):
    while hasattr(dataset, "dataset") and not hasattr(dataset, "has_masks"):
        dataset = dataset.dataset
    return getattr(dataset, "has_masks", None)


def check_pixel_resolution(value):
    if value not in PIXEL_RESOLUTIONS:
        raise ValueError(f"evaluation.pixel_resolution must be 'input' or 'native', got {value!r}")
    return value


class Evaluator:
    def __init__(self, model, device="auto", output_dir=None, mean=None, std=None, max_panels=40, figures=True,
                 progress_bar=True, pixel_resolution="input"):
        self.pixel_resolution = check_pixel_resolution(pixel_resolution)
        self.device = resolve_device(device)
        self.model = model.to(self.device)
        self.output_dir = Path(output_dir) if output_dir else None
        self.mean = mean if mean is not None else getattr(model, "mean", IMAGENET_MEAN)
        self.std = std if std is not None else getattr(model, "std", IMAGENET_STD)
        self.max_panels = int(max_panels)
        self.figures = figures
        self.progress_bar = progress_bar

    @torch.no_grad()
    def predict(self, loader, keep_maps=True, pixel_resolution="input", gather_to="all"):
        # keep_maps: the maps and masks at input size (threshold, figures); pixel_resolution="native" also
        # keeps every map upsampled to its image's own size with the mask read at that size (pixel metrics).
        # Under torchrun a loader with a ShardSampler scores this process's share; the shares are gathered
        # back into the dataset's order on every process (gather_to="all") or on the first (gather_to="main",
        # the others get None)
        check_pixel_resolution(pixel_resolution)
        local = self.predict_local(loader, keep_maps, pixel_resolution)
        if not (distributed.active() and isinstance(getattr(loader, "sampler", None), distributed.ShardSampler)):
            return local
        if pixel_resolution == "native":
            raise ValueError("native-resolution pixel metrics need the whole test split in one process: "
                             "build the loader without a ShardSampler")
        parts = distributed.all_gather_objects(local) if gather_to == "all" else distributed.gather_objects(local)
        return merge_predictions(parts, loader.sampler.batch_size) if parts is not None else None

    def predict_local(self, loader, keep_maps, pixel_resolution):
        self.model.eval()
        scores, labels, paths, defect_types, mask_found = [], [], [], [], False
        maps = masks = None
        native = None
        if pixel_resolution == "native" and dataset_has_masks(loader.dataset) is not False:
            native = NativePixels.for_dataset(loader.dataset)
        count = 0
        started = time.perf_counter()
        for batch in tqdm(loader, desc="predict", disable=not self.progress_bar, leave=False):
            outputs = self.model(batch["image"].to(self.device, non_blocking=True))
            check_model_outputs(outputs, batch["image"], batch["image_path"])
            if native is not None:
                native.add(outputs["anomaly_map"], batch["image_path"], batch["mask_path"])
            scores.append(outputs["pred_score"].float().cpu().numpy().reshape(-1))
            labels.append(np.asarray(batch["label"]).reshape(-1))
            size = len(scores[-1])
            if keep_maps:
                if maps is None:
                    # one array for the whole split: a list of batches plus a concatenated copy would
                    # hold every map twice at the end
                    total = len(loader.sampler) if hasattr(loader, "sampler") else len(loader.dataset)
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
            "native": native.finish() if native is not None else None,
            "pixel_resolution": pixel_resolution,
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
        # at native resolution the input-size maps serve only the figures. Under torchrun the first process
        # computes the metrics and writes the results from every process's scores; the others get the metrics
        keep_maps = self.pixel_resolution == "input" or (self.figures and self.output_dir is not None)
        sharded = isinstance(getattr(test_loader, "sampler", None), distributed.ShardSampler)
        # a model whose forward is a collective (PatchCore's sharded search) runs on every process, on every image
        if distributed.is_main() or sharded or getattr(self.model, "collective_forward", False):
            predictions = self.predict(test_loader, keep_maps=keep_maps, pixel_resolution=self.pixel_resolution,
                                       gather_to="main")
        metrics = None
        if distributed.is_main():
            metrics = compute_metrics(predictions, threshold)
            if self.output_dir is not None:
                self.write_results(test_loader, predictions, metrics, threshold)
        return distributed.broadcast_object(metrics)

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


def merge_predictions(parts, batch_size):
    # the inverse of ShardSampler: process r scored the dataset's batches r, r + N, ...
    merged = dict(parts[0])
    for key in ("scores", "labels", "maps", "masks", "image_paths", "defect_types"):
        if parts[0][key] is not None:
            merged[key] = distributed.merge_shards([part[key] for part in parts], batch_size)
    merged["has_masks"] = any(part["has_masks"] for part in parts)
    merged["predict_s"] = max(part["predict_s"] for part in parts)
    return merged


def check_model_outputs(outputs, images, image_paths=None):
    if not isinstance(outputs, dict) or "anomaly_map" not in outputs or "pred_score" not in outputs:
        raise TypeError("In eval mode the model must return {'anomaly_map': Bx1xHxW, 'pred_score': B}, got "
                        f"{type(outputs).__name__}")
    batch, _, height, width = images.shape
    if tuple(outputs["anomaly_map"].shape) != (batch, 1, height, width):
        raise ValueError(f"anomaly_map has shape {tuple(outputs['anomaly_map'].shape)}, expected "
                         f"{(batch, 1, height, width)} (the input resolution)")
    # a NaN score sorts anywhere and would make every metric (and the threshold) a silent wrong number
    finite = torch.isfinite(outputs["pred_score"].detach().reshape(batch)) & \
        torch.isfinite(outputs["anomaly_map"].detach()).flatten(1).all(1)
    if not bool(finite.all()):
        bad = [str(image_paths[i]) if image_paths is not None else f"batch item {i}"
               for i in torch.nonzero(~finite).flatten().tolist()]
        raise FloatingPointError(f"the model gave non-finite scores or maps for {len(bad)} image(s), first {bad[0]}: "
                                 "the run diverged or the input holds NaN. Retrain with a lower "
                                 "training.learning_rate; no metric or threshold is computed from them")


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
        native = predictions.get("native")
        if predictions["has_masks"] and (native is not None or predictions["maps"] is not None):
            if native is not None:
                maps, masks = native["maps"], native["masks"]
                per_image_maps, per_image_masks = native_views(native)
            else:
                maps, masks = predictions["maps"], predictions["masks"]
                per_image_maps, per_image_masks = maps, masks
            pixel = compute_classification_metrics(maps, masks, pixel_level=True)
            metrics["pixel_auroc"], metrics["pixel_ap"] = pixel["auroc"], pixel["average_precision"]
            metrics["pixel_f1_max"], metrics["pixel_f1_threshold"] = pixel["f1_max"], pixel["f1_threshold"]
            metrics["aupro"], counts = compute_aupro(per_image_maps, per_image_masks, fpr_limit=0.3,
                                                     return_counts=True)
            metrics["pixel_resolution"] = "native" if native is not None else "input"
            metrics["num_pixels"] = int(masks.size)
            metrics.update(counts)
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


def base_dataset_and_indices(dataset):
    indices = None
    while isinstance(dataset, Subset):
        indices = list(dataset.indices) if indices is None else [dataset.indices[i] for i in indices]
        dataset = dataset.dataset
    return dataset, indices


class NativePixels:
    # Every test pixel at its image's own size, in one flat float32 array of maps and one flat bool array
    # of masks, with per-image offsets. The exact metrics need all pixels at once; sizing both arrays from
    # the image headers before the first batch means they are filled in place and held once, with no
    # per-batch lists and no concatenated copy.
    def __init__(self, image_paths, where=None):
        # where: the dataset's name for the mask reader's once-per-category warnings
        self.where = where
        self.sizes = {}
        total = 0
        for path in image_paths:
            if path not in self.sizes:
                width, height = image_size(path)
                self.sizes[path] = (height, width)
            total += self.sizes[path][0] * self.sizes[path][1]
        self.maps = np.empty(total, dtype=np.float32)
        # zeros come from the OS as untouched pages: the masks of good images cost no memory
        self.masks = np.zeros(total, dtype=bool)
        self.offsets, self.shapes = [0], []

    @classmethod
    def for_dataset(cls, dataset):
        base, indices = base_dataset_and_indices(dataset)
        crop = getattr(getattr(base, "transform", None), "center_crop", None)
        if crop:
            # the map covers only the centre of the resized image, so it has no place on the whole original
            raise ValueError(f"evaluation.pixel_resolution=native cannot be used with data.center_crop={list(crop)}: "
                             "the anomaly map covers only the cropped centre of the image. Set data.center_crop=null "
                             "or evaluation.pixel_resolution=input")
        samples = getattr(base, "samples", None)
        if samples is None:
            raise ValueError("evaluation.pixel_resolution=native reads each test image's size from its file, but "
                             f"the test dataset ({type(base).__name__}) does not list its files (.samples)")
        paths = [str(sample["image_path"]) for sample in samples]
        where = base.warning_key() if hasattr(base, "warning_key") else None
        return cls(paths if indices is None else [paths[index] for index in indices], where)

    def add(self, anomaly_maps, image_paths, mask_paths):
        for index, (image_path, mask_path) in enumerate(zip(image_paths, mask_paths)):
            if image_path not in self.sizes:
                raise ValueError(f"image {image_path} is not in the test dataset's list of files")
            height, width = self.sizes[image_path]
            start, end = self.offsets[-1], self.offsets[-1] + height * width
            if end > self.maps.size:
                raise ValueError("the test loader yielded more images than its dataset lists")
            mask = load_mask(mask_path, self.where) if mask_path else None
            if mask is not None:
                if mask[0].numel() != height * width:
                    raise ValueError(f"Mask {mask_path} is {mask.shape[-1]}x{mask.shape[-2]} but its image "
                                     f"{image_path} is {width}x{height}: expected the same size")
                # the header read skips EXIF stored after a PNG's pixels; the mask, read whole, is oriented
                height, width = mask.shape[-2:]
            # one image at a time, upsampled as the models upsample their own maps
            upsampled = F.interpolate(anomaly_maps[index:index + 1].float(), size=(height, width), mode="bilinear",
                                      align_corners=False)
            self.maps[start:end] = upsampled.reshape(-1).cpu().numpy()
            if mask is not None:
                self.masks[start:end] = mask.reshape(-1).numpy() > 0.5
            self.offsets.append(end)
            self.shapes.append((height, width))

    def finish(self):
        if self.offsets[-1] != self.maps.size:
            raise ValueError(f"the test loader yielded {len(self.shapes)} images, fewer than its dataset lists")
        return {"maps": self.maps, "masks": self.masks, "offsets": np.asarray(self.offsets, dtype=np.int64),
                "shapes": list(self.shapes)}


def native_views(native):
    maps, masks = [], []
    for start, end, shape in zip(native["offsets"][:-1], native["offsets"][1:], native["shapes"]):
        maps.append(native["maps"][start:end].reshape(shape))
        masks.append(native["masks"][start:end].reshape(shape))
    return maps, masks
