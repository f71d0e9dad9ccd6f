# src/anomaly_detection/predict.py
import csv
import math
import os
from pathlib import Path

import torch

from anomaly_detection.allocator import configure_cpu_allocator
from anomaly_detection.data.datasets import DatasetError, ImageReadError, load_image_raw
from anomaly_detection.runner import build_transforms, load_model_file
from anomaly_detection.utils import OUTPUT_FILE_MODE, logger, resolve_device

CSV_COLUMNS = ("image_path", "score", "anomalous", "figure", "error")


def check_output_folder(folder):
    # an unwritable --output is found before any image is scored, not after
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OSError(f"cannot create --output folder {folder}: {error.strerror or error}") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OSError(f"cannot write into --output folder {folder}: permission denied")
    return folder


def usable_threshold(state, path):
    threshold = state.get("threshold")
    if not threshold:
        logger.warning("%s has no threshold (it was not calibrated): scores only, no anomalous/normal verdict", path)
        return None
    for key in ("image_threshold", "pixel_threshold"):
        value = threshold.get(key)
        if value is None or not math.isfinite(float(value)):
            raise ValueError(f"{path} holds {key}={value}: a model with a non-finite threshold would call every "
                             "image normal. Retrain it (the run diverged)")
    return threshold


def predict_images(checkpoint_path, image_paths, output_dir=None, overrides=None, config_dir=None):
    # yields one record per image, as soon as it is scored: an unreadable image gives a record with an
    # "error" and the rest are still scored
    model, config, state = load_model_file(checkpoint_path, overrides, config_dir)
    threshold = usable_threshold(state, checkpoint_path)
    configure_cpu_allocator(config["cpu_allocator"])
    _, transform = build_transforms(config)
    device = resolve_device(config["device"])
    model = model.to(device).eval()
    mean, std = config["data"]["normalization"]
    for path in image_paths:
        try:
            image = transform(load_image_raw(path))
        except (ImageReadError, DatasetError) as error:
            logger.warning("skipped %s: %s", path, error)
            yield {"image_path": str(path), "error": str(error)}
            continue
        with torch.no_grad():
            outputs = model(image[None].to(device))
        score = float(outputs["pred_score"][0])
        record = {"image_path": str(path), "score": score}
        if not math.isfinite(score):
            record["error"] = f"the model gave a non-finite score ({score}) for this image"
            logger.warning("%s: %s", path, record["error"])
            yield record
            continue
        if threshold is not None:
            record["anomalous"] = bool(score >= threshold["image_threshold"])
        if output_dir is not None:
            from anomaly_detection.metrics import denormalize_image, plot_anomaly_panel
            anomaly_map = outputs["anomaly_map"][0, 0].float().cpu().numpy()
            figure_path = Path(output_dir) / f"{Path(path).stem}_prediction.png"
            level = threshold["pixel_threshold"] if threshold is not None else float(anomaly_map.max())
            plot_anomaly_panel(denormalize_image(image, mean, std), anomaly_map * 0, anomaly_map, level,
                               f"{Path(path).name} score {score:.4g}", figure_path)
            record["figure"] = str(figure_path)
        yield record


class PredictionTable:
    # predictions.csv, one row written (and flushed) per image, so an interrupted run keeps what it scored
    def __init__(self, path):
        self.path = Path(path)
        # 0600 from the start, whatever the umask, as every other output file
        descriptor = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, OUTPUT_FILE_MODE)
        os.fchmod(descriptor, OUTPUT_FILE_MODE)
        self.handle = os.fdopen(descriptor, "w", newline="")
        self.writer = csv.DictWriter(self.handle, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        self.writer.writeheader()

    def write(self, record):
        self.writer.writerow(record)
        self.handle.flush()

    def close(self):
        self.handle.close()
