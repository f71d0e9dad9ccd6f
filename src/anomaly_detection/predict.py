# src/anomaly_detection/predict.py
# Scoring new images with any model file (model.pt, .onnx, OpenVINO .xml, .torchscript): batched, record by
# record, an unreadable image named and skipped while the rest are scored.
import csv
import math
import os
from pathlib import Path

import torch
from tqdm import tqdm

from anomaly_detection.data.datasets import IMAGE_EXTENSIONS, DatasetError, ImageReadError, load_image_raw
from anomaly_detection.utils import OUTPUT_FILE_MODE, logger

CSV_COLUMNS = ("image_path", "pred_score", "pred_label", "heatmap", "error")
DEFAULT_BATCH_SIZE = 16


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


def find_images(source):
    # a file, or every image under a folder, its sub-folders included, in a stable order; a broken link with an
    # image's name is kept, so it is reported as skipped rather than silently missing
    source = Path(source)
    if not source.exists() and not source.is_symlink():
        raise FileNotFoundError(f"--input {source} does not exist")
    if not source.is_dir():
        return [source]
    paths = sorted(path for path in source.rglob("*")
                   if path.suffix.lower() in IMAGE_EXTENSIONS and not path.is_dir())
    if not paths:
        raise FileNotFoundError(f"No images found under {source} (searched recursively for "
                                f"{', '.join(sorted(IMAGE_EXTENSIONS))})")
    return paths


def heatmap_path(heatmap_dir, path, input_root):
    # the input's sub-folders are kept, so two images with the same name in different folders keep both figures
    # (input_root: the --input folder, None for a single file)
    path = Path(path)
    try:
        relative = path.relative_to(input_root) if input_root is not None else Path(path.name)
    except ValueError:
        relative = Path(path.name)
    return Path(heatmap_dir) / relative.parent / f"{relative.stem}_heatmap.png"


def predict_images(opened, image_paths, heatmap_dir=None, input_root=None, batch_size=DEFAULT_BATCH_SIZE,
                   progress=None):
    # yields one record per image, in input order, as soon as its batch is scored
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"--batch-size must be an integer >= 1, got {batch_size!r}")
    transform = opened.transform()
    input_root = input_root if input_root is not None and Path(input_root).is_dir() else None
    pending, readable = [], 0
    for path in tqdm(image_paths, desc="predict", unit="img", disable=progress is False or None):
        try:
            pending.append((path, transform(load_image_raw(path)), None))
            readable += 1
        except (ImageReadError, DatasetError, OSError) as error:
            logger.warning("skipped %s: %s", path, error)
            pending.append((path, None, str(error)))
        if readable == batch_size:
            yield from score_batch(opened, pending, heatmap_dir, input_root)
            pending, readable = [], 0
    if pending:
        yield from score_batch(opened, pending, heatmap_dir, input_root)


def score_batch(opened, entries, heatmap_dir, input_root):
    threshold = opened.threshold
    images = [image for _, image, _ in entries if image is not None]
    outputs = opened.runtime.run(torch.stack(images), threshold["image_threshold"] if threshold else math.inf) \
        if images else None
    position = 0
    for path, image, error in entries:
        if image is None:
            yield {"image_path": str(path), "error": error}
            continue
        score = float(outputs["pred_score"][position])
        record = {"image_path": str(path), "pred_score": score}
        if not math.isfinite(score):
            record["error"] = f"the model gave a non-finite score ({score}) for this image"
            logger.warning("%s: %s", path, record["error"])
        else:
            if threshold is not None:
                record["pred_label"] = int(bool(outputs["pred_label"][position]))
            if heatmap_dir is not None:
                record["heatmap"] = str(save_heatmap(opened, image, outputs["anomaly_map"][position], score,
                                                     heatmap_path(heatmap_dir, path, input_root)))
        position += 1
        yield record


def save_heatmap(opened, image, anomaly_map, score, path):
    from anomaly_detection.metrics import denormalize_image, plot_heatmap_overlay
    anomaly_map = torch.as_tensor(anomaly_map)[0].float().numpy()
    level = opened.threshold["pixel_threshold"] if opened.threshold is not None else None
    verdict = "" if opened.threshold is None else \
        (" anomalous" if score >= opened.threshold["image_threshold"] else " normal")
    path.parent.mkdir(parents=True, exist_ok=True)
    return plot_heatmap_overlay(denormalize_image(image, opened.mean, opened.std), anomaly_map, level,
                                f"{path.stem[:-len('_heatmap')]}: score {score:.4g}{verdict}", path)


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
