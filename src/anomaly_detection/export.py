# src/anomaly_detection/export.py
# `anomaly-detection export`: a model.pt as ONNX, OpenVINO IR or TorchScript, with the file a deployment needs.
#
# The exported graph takes `images`, a float32 batch (B x 3 x H x W, RGB) preprocessed exactly as the test
# transform does (resize, optional centre crop, /255, mean/std), and `threshold`, a float32 tensor of shape [1].
# It returns `anomaly_map` (B x 1 x H x W), `pred_score` (B) and `pred_label` (B, bool: pred_score >= threshold).
# The threshold is an input, not a constant: `metadata.json` beside the model holds the calibrated one with the
# preprocessing recipe, so changing it is an edit of that file, not a re-export.
#
# Every export is checked before it is declared done: the exported file is loaded in its own runtime and scored
# against the PyTorch model on generated images at batch sizes other than the traced one; a score further than
# 1e-4 relative or a different label is an error and no metadata is written.
import datetime
import hashlib
import os
import shutil
import warnings
from pathlib import Path

import torch
from torch import nn

from anomaly_detection import __version__
from anomaly_detection.data.transforms import size_pair
from anomaly_detection.models import get_trainer_class
from anomaly_detection.runtimes import METADATA_FILE, import_optional, load_runtime
from anomaly_detection.utils import OUTPUT_FILE_MODE, atomic_write_json, logger

FORMATS = ("onnx", "openvino", "torchscript")
MODEL_FILES = {"onnx": "model.onnx", "openvino": "model.xml", "torchscript": "model.torchscript"}
INPUT_NAMES = ("images", "threshold")
OUTPUT_NAMES = ("anomaly_map", "pred_score", "pred_label")
ONNX_OPSET = 17
# the traced example batch, and the batches the parity check runs: others than the traced one, so a graph
# that froze the example's batch size fails the check
TRACE_BATCH = 2
PARITY_BATCHES = (1, 3)
PARITY_TOLERANCE = 1e-4


class DeployableModel(nn.Module):
    # what every exported graph computes: the model's map and score, and the label against `threshold`
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, images, threshold):
        outputs = self.model(images)
        score = outputs["pred_score"]
        return outputs["anomaly_map"], score, score >= threshold


def deployable_model(model, model_name):
    # each model folder says how its scoring exports (trainer.exportable_model); most need nothing
    exportable = get_trainer_class(model_name).exportable_model(model.eval())
    return DeployableModel(exportable).eval()


def example_images(config, batch, seed=0):
    # generated images, preprocessed as the test transform does: uniform noise in [0, 1] with smooth blobs,
    # so maps and scores vary over the image
    height, width = input_size(config)
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(batch, 3, height, width, generator=generator)
    images = torch.nn.functional.avg_pool2d(images, 5, stride=1, padding=2)
    mean, std = config["data"]["normalization"]
    mean = torch.tensor(mean).view(1, 3, 1, 1)
    std = torch.tensor(std).view(1, 3, 1, 1)
    return (images - mean) / std


def input_size(config):
    data = config["data"]
    return size_pair(data["center_crop"] or data["image_size"], "data.image_size")


# ---- writers: one per format, each writes its files into `folder` ---------------------------------------
def write_onnx(deployable, example, folder):
    path = folder / MODEL_FILES["onnx"]
    dynamic = {"images": {0: "batch"}, "anomaly_map": {0: "batch"}, "pred_score": {0: "batch"},
               "pred_label": {0: "batch"}}
    with torch.no_grad():
        # the TorchScript-based exporter: it traces the scoring as run, and the parity check below proves the
        # trace; the torch.export-based one (dynamo=True) refuses data-dependent indexing PaDiM's blur needs
        torch.onnx.export(deployable, example, str(path), input_names=list(INPUT_NAMES),
                          output_names=list(OUTPUT_NAMES), dynamic_axes=dynamic, opset_version=ONNX_OPSET,
                          dynamo=False)
    return [path]


def write_openvino(deployable, example, folder):
    import openvino
    onnx_path = write_onnx(deployable, example, folder)[0]
    converted = openvino.convert_model(str(onnx_path))
    path = folder / MODEL_FILES["openvino"]
    # OpenVINO halves the weights to float16 unless told otherwise: the scores would move by about 1e-3
    openvino.save_model(converted, str(path), compress_to_fp16=False)
    onnx_path.unlink()
    return [path, path.with_suffix(".bin")]


def write_torchscript(deployable, example, folder):
    path = folder / MODEL_FILES["torchscript"]
    with torch.no_grad():
        traced = torch.jit.trace(deployable, example, check_trace=False)
    torch.jit.save(traced, str(path))
    return [path]


WRITERS = {"onnx": write_onnx, "openvino": write_openvino, "torchscript": write_torchscript}


def require_format_packages(fmt):
    needed = {"onnx": ("onnx", "onnxruntime"), "openvino": ("onnx", "openvino"), "torchscript": ()}[fmt]
    for package in needed:
        import_optional(package, f"--format {fmt}")


# ---- the command -------------------------------------------------------------------------------------------
def export_checkpoint(checkpoint, fmt, output_dir, overrides=None):
    from anomaly_detection.runner import load_model_file

    if fmt not in FORMATS:
        raise ValueError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    require_format_packages(fmt)
    model, config, state = load_model_file(checkpoint, overrides)
    threshold = state.get("threshold")
    if not threshold:
        logger.warning("%s has no threshold: the export carries threshold null, and pred_label is only meaningful "
                       "once a threshold is written into %s", checkpoint, METADATA_FILE)
    model = model.cpu().eval()
    deployable = deployable_model(model, config["model"]["name"])
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    # the files are written into a scratch folder and moved into place once checked, so a failed export
    # leaves an earlier good one in output_dir as it was
    scratch = output_dir / f".export-{fmt}-{os.getpid()}"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir()
    try:
        example = (example_images(config, TRACE_BATCH), torch.tensor([0.0]))
        with warnings.catch_warnings():
            # the tracer warns at every shape it reads as a constant (the image size, the bank size): those are
            # fixed by design, and the parity check below, at batch sizes other than the traced one, is the proof
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            warnings.filterwarnings("ignore", message="Constant folding")
            files = WRITERS[fmt](deployable, example, scratch)
        metadata = build_metadata(fmt, config, state, checkpoint, files[0].name)
        parity = check_parity(model, load_runtime(files[0]), config, metadata["threshold"])
        metadata["parity"] = parity
        final = []
        for path in files:
            os.chmod(path, OUTPUT_FILE_MODE)
            os.replace(path, output_dir / path.name)
            final.append(output_dir / path.name)
        atomic_write_json(output_dir / METADATA_FILE, metadata)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return {"format": fmt, "model_file": str(final[0]), "metadata": str(output_dir / METADATA_FILE),
            "worst_relative_score_difference": parity["worst_relative_score_difference"],
            "label_agreement": parity["label_agreement"]}


def build_metadata(fmt, config, state, checkpoint, model_file):
    data = config["data"]
    mean, std = data["normalization"]
    height, width = input_size(config)
    resize = size_pair(data["image_size"], "data.image_size")
    threshold = state.get("threshold") or {}
    return {
        "format": fmt,
        "model_file": model_file,
        "model": config["model"]["name"],
        "anomaly_detection_version": __version__,
        "exported_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "source_checkpoint": str(Path(checkpoint).resolve()),
        "source_sha256": file_sha256(checkpoint),
        "input": {"name": "images", "shape": ["batch", 3, height, width], "dtype": "float32", "layout": "NCHW",
                  "color_order": "RGB"},
        "threshold_input": {"name": "threshold", "shape": [1], "dtype": "float32",
                            "value": "threshold.image_threshold below"},
        "outputs": {"anomaly_map": ["batch", 1, height, width], "pred_score": ["batch"],
                    "pred_label": ["batch", "bool: pred_score >= threshold"]},
        "preprocessing": {
            "image_size": list(resize),
            "center_crop": list(size_pair(data["center_crop"], "data.center_crop")) if data["center_crop"] else None,
            "mean": list(mean), "std": list(std),
            "recipe": ["read the image as RGB, 8 bits per channel (grey images: the grey value in all three)",
                       f"resize to {resize[0]} x {resize[1]} (height x width), "
                       "bilinear with antialiasing (torchvision resize, antialias=True)",
                       "centre-crop to center_crop when it is not null",
                       "divide by 255 to float32 in [0, 1]",
                       "subtract mean and divide by std, per channel (R, G, B)",
                       "lay out as NCHW"],
        },
        "threshold": {"image_threshold": threshold.get("image_threshold"),
                      "pixel_threshold": threshold.get("pixel_threshold"),
                      "quantile": threshold.get("quantile"), "num_images": threshold.get("num_images"),
                      "source": "quantile of the scores of normal validation images"},
        "runtime_settings": {"openvino": {"INFERENCE_PRECISION_HINT": "f32"},
                             "why": "OpenVINO runs bfloat16 on CPUs that have it unless told f32; the parity "
                                    "check holds for f32"},
    }


def file_sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_parity(model, runtime, config, threshold):
    # the exported file against the checkpoint's own PyTorch model (not the export form it was traced from) on
    # generated images; without a saved threshold one is put between the scores, so both labels occur
    worst, worst_map, agree, total = 0.0, 0.0, 0, 0
    for seed, batch in enumerate(PARITY_BATCHES):
        images = example_images(config, batch, seed=seed + 1)
        with torch.no_grad():
            outputs = model(images)
        expected_map, expected = outputs["anomaly_map"].float(), outputs["pred_score"].float()
        level = level_between(expected) if threshold.get("image_threshold") is None else \
            float(threshold["image_threshold"])
        outputs = runtime.run(images, level)
        score = torch.as_tensor(outputs["pred_score"]).float()
        difference = ((score - expected).abs() / expected.abs().clamp_min(1e-12)).max().item()
        map_difference = (torch.as_tensor(outputs["anomaly_map"]).float() - expected_map).abs().max().item() / \
            max(expected_map.abs().max().item(), 1e-12)
        labels = torch.as_tensor(outputs["pred_label"]).bool()
        agree += int((labels == (expected >= level)).sum())
        total += batch
        worst, worst_map = max(worst, difference), max(worst_map, map_difference)
    if max(worst, worst_map) > PARITY_TOLERANCE or agree != total:
        raise RuntimeError(f"the exported model does not reproduce the PyTorch model: worst relative score "
                           f"difference {worst:.3g}, map difference {worst_map:.3g} of the map's maximum "
                           f"(tolerance {PARITY_TOLERANCE}), {agree} of {total} labels agree. "
                           "Nothing was written; please report this with the model's config")
    return {"worst_relative_score_difference": worst, "worst_map_difference_of_max": worst_map,
            "label_agreement": f"{agree}/{total}",
            "batches": list(PARITY_BATCHES), "tolerance": PARITY_TOLERANCE}


def level_between(scores):
    # a threshold between the scores (the middle gap), never equal to one: at an exact tie a difference of
    # float rounding flips a label, which says nothing about the export
    ordered = scores.sort().values
    if len(ordered) == 1:
        return float(ordered[0] - 0.01 * ordered[0].abs().clamp_min(1e-6))
    middle = len(ordered) // 2
    return float(0.5 * (ordered[middle - 1] + ordered[middle]))


# ---- CLI ---------------------------------------------------------------------------------------------------
HELP = "export a model.pt to ONNX, OpenVINO or TorchScript, checked against the PyTorch scores"


def add_arguments(parser):
    parser.add_argument("--checkpoint", required=True, help="a model.pt written by train")
    parser.add_argument("--format", required=True, choices=FORMATS)
    parser.add_argument("--output", required=True, help="folder for the model file(s) and metadata.json")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="only keys that do not change the model")


def run(args):
    return export_checkpoint(args.checkpoint, args.format, args.output, args.overrides)
