# src/anomaly_detection/runtimes.py
# One way to score images with any model file: a model.pt (PyTorch), an exported .onnx (ONNX Runtime), an
# OpenVINO .xml or a .torchscript file. `open_model` gives the runtime, the threshold and the preprocessing;
# `runtime.run(images, threshold)` gives anomaly_map, pred_score and pred_label for a preprocessed batch.
# onnxruntime and openvino are imported only when such a file is opened.
import json
import math
from pathlib import Path

import numpy as np
import torch

from anomaly_detection.allocator import configure_cpu_allocator
from anomaly_detection.utils import logger, resolve_device

METADATA_FILE = "metadata.json"
EXPORTED_SUFFIXES = {".onnx": "onnx", ".xml": "openvino", ".torchscript": "torchscript"}
EXPORT_EXTRA = 'pip install -e ".[export]"'


class PyTorchRuntime:
    name = "pytorch"

    def __init__(self, model, device):
        self.device = device
        self.model = model.to(device).eval()

    def run(self, images, threshold):
        with torch.no_grad():
            outputs = self.model(torch.as_tensor(images).to(self.device))
        score = outputs["pred_score"].float().cpu()
        return {"anomaly_map": outputs["anomaly_map"].float().cpu(), "pred_score": score,
                "pred_label": score >= threshold}


class TorchScriptRuntime:
    name = "torchscript"

    def __init__(self, path):
        self.module = torch.jit.load(str(path), map_location="cpu").eval()

    def run(self, images, threshold):
        with torch.no_grad():
            anomaly_map, score, label = self.module(torch.as_tensor(images), torch.tensor([float(threshold)]))
        return {"anomaly_map": anomaly_map, "pred_score": score, "pred_label": label}


class OnnxRuntime:
    name = "onnxruntime"

    def __init__(self, path, providers=None):
        onnxruntime = import_optional("onnxruntime", path)
        self.session = onnxruntime.InferenceSession(str(path), providers=providers or ["CPUExecutionProvider"])

    def run(self, images, threshold):
        feed = {"images": as_numpy(images), "threshold": np.array([threshold], dtype=np.float32)}
        anomaly_map, score, label = self.session.run(["anomaly_map", "pred_score", "pred_label"], feed)
        return {"anomaly_map": torch.from_numpy(anomaly_map), "pred_score": torch.from_numpy(score),
                "pred_label": torch.from_numpy(label)}


class OpenVinoRuntime:
    name = "openvino"

    def __init__(self, path, device="CPU"):
        openvino = import_optional("openvino", path)
        # f32: on a CPU with bfloat16 OpenVINO would otherwise compute in bfloat16 and move the scores by ~1e-2
        self.compiled = openvino.Core().compile_model(str(path), device, {"INFERENCE_PRECISION_HINT": "f32"})
        self.request = self.compiled.create_infer_request()

    def run(self, images, threshold):
        results = self.request.infer({"images": as_numpy(images),
                                      "threshold": np.array([threshold], dtype=np.float32)})
        by_name = {output.get_any_name(): value for output, value in results.items()}
        return {key: torch.from_numpy(np.array(by_name[key])) for key in ("anomaly_map", "pred_score", "pred_label")}


def as_numpy(images):
    array = images.numpy() if isinstance(images, torch.Tensor) else images
    return np.ascontiguousarray(array, dtype=np.float32)


def import_optional(package, path):
    try:
        return __import__(package)
    except ImportError:
        raise RuntimeError(f"{path} needs the '{package}' package, which is not installed: {EXPORT_EXTRA}") from None


def load_runtime(path):
    # an exported model file in the runtime its format runs in
    path = Path(path)
    kind = EXPORTED_SUFFIXES.get(path.suffix.lower())
    if kind == "onnx":
        return OnnxRuntime(path)
    if kind == "openvino":
        return OpenVinoRuntime(path)
    if kind == "torchscript":
        return TorchScriptRuntime(path)
    raise ValueError(f"{path}: expected a model.pt, an .onnx, an OpenVINO .xml or a .torchscript file")


class OpenedModel:
    # a runtime, and what scoring with it needs: the threshold (image_threshold and pixel_threshold, finite;
    # None when the model was not calibrated) and the test transform's settings
    def __init__(self, runtime, model_name, threshold, image_size, center_crop, mean, std, path):
        self.runtime, self.model_name, self.threshold = runtime, model_name, threshold
        self.image_size, self.center_crop, self.mean, self.std, self.path = image_size, center_crop, mean, std, path

    def transform(self):
        from anomaly_detection.data import get_test_transforms
        return get_test_transforms(self.image_size, self.center_crop, (self.mean, self.std))


def usable_threshold(threshold, path):
    if not threshold or threshold.get("image_threshold") is None:
        logger.warning("%s has no threshold (it was not calibrated): scores only, no pred_label", path)
        return None
    for key in ("image_threshold", "pixel_threshold"):
        value = threshold.get(key)
        try:
            finite = value is not None and math.isfinite(float(value))
        except (TypeError, ValueError):
            finite = False
        if not finite:
            raise ValueError(f"{path} holds {key}={value}: a model with a non-finite threshold would call every "
                             "image normal. Retrain it (the run diverged)")
    return {"image_threshold": float(threshold["image_threshold"]),
            "pixel_threshold": float(threshold["pixel_threshold"])}


def read_metadata(model_path):
    path = Path(model_path).parent / METADATA_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{model_path} has no {METADATA_FILE} beside it ({path}): it holds the threshold "
                                "and the preprocessing; export the model again with anomaly-detection export")
    try:
        metadata = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"{path} is not readable JSON: {error}") from None
    for key in ("model_file", "model", "preprocessing", "threshold"):
        if key not in metadata:
            raise ValueError(f"{path} has no '{key}' entry: expected the metadata anomaly-detection export writes")
    if metadata["model_file"] != Path(model_path).name:
        raise ValueError(f"{path} describes {metadata['model_file']}, not {Path(model_path).name}: keep each "
                         "exported model in its own folder with its own metadata.json")
    return metadata


def open_model(path, overrides=None, device="auto"):
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Checkpoint not found: {path}")
    if path.suffix.lower() in EXPORTED_SUFFIXES:
        if overrides:
            raise ValueError(f"overrides ({' '.join(overrides)}) apply to a model.pt; {path} is an exported model "
                             "whose settings are fixed in its metadata.json")
        metadata = read_metadata(path)
        steps = metadata["preprocessing"]
        return OpenedModel(load_runtime(path), metadata["model"],
                           usable_threshold(metadata["threshold"], path.parent / METADATA_FILE),
                           tuple(steps["image_size"]), tuple(steps["center_crop"]) if steps["center_crop"] else None,
                           tuple(steps["mean"]), tuple(steps["std"]), path)
    from anomaly_detection.runner import load_model_file
    model, config, state = load_model_file(path, overrides)
    configure_cpu_allocator(config["cpu_allocator"])
    data = config["data"]
    mean, std = data["normalization"]
    runtime = PyTorchRuntime(model, resolve_device(config["device"] if device == "auto" else device))
    return OpenedModel(runtime, config["model"]["name"], usable_threshold(state.get("threshold"), path),
                       data["image_size"], data["center_crop"], tuple(mean), tuple(std), path)
