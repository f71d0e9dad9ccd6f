# benchmarks/inference_speed.py
# Inference speed of each model in each runtime (PyTorch eager, ONNX Runtime, OpenVINO): images/s at batch 1 and
# 32, and the ratio to the bare network forward (the networks every implementation of the method must run, no
# scoring) in the same runtime, process, inputs and threads. Each model.pt is exported with
# `anomaly-detection export` (so its parity is checked on the way) and its bare networks are exported the same
# way, so the two rates of a runtime compare the same engine.
# With --parity-images DIR it also scores real images (up to --parity-count, found recursively) with each
# exported file and with the checkpoint through `predict`'s own path, and records the worst relative score
# difference and the label agreement at the saved threshold: the parity table of the deployment issue.
#   python benchmarks/inference_speed.py --checkpoints a/model.pt,b/model.pt [--batches 1,32] [--images 32]
#       [--parity-images ../shared/data/magnetic_tile/test --parity-count 64]
import argparse
import json
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torch import nn

from anomaly_detection.export import MODEL_FILES, example_images, export_checkpoint
from anomaly_detection.predict import find_images, predict_images
from anomaly_detection.runtimes import load_runtime, open_model
from record import append_record, results_path, typed_command

RUNTIMES = {"pytorch": None, "onnxruntime": "onnx", "openvino": "openvino"}


def tensors(value):
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    return [t for item in value for t in tensors(item)]


def efficientad_networks(model, images):
    teacher = model.teacher(images)
    return [teacher, model.student(images), model.autoencoder(images, teacher.shape[-2:])]


# what any implementation of each method computes before scoring
BARE_NETWORKS = {
    "stfpm": lambda model, images: tensors(model.extract(images)),
    "padim": lambda model, images: tensors(model.feature_extractor(images)),
    "patchcore": lambda model, images: tensors(model.feature_extractor(images)),
    "fastflow": lambda model, images: tensors(model.encode(images)),
    "reverse_distillation": lambda model, images: tensors(model.extract(images)),
    "efficientad": efficientad_networks,
}


class BareNetworks(nn.Module):
    def __init__(self, model, name):
        super().__init__()
        self.model, self.name = model, name

    def forward(self, images):
        return tuple(BARE_NETWORKS[self.name](self.model, images))


class BareRuntime:
    # the bare networks in one runtime, called as the full model's runtimes are
    def __init__(self, module, kind, example, folder):
        self.kind = kind
        if kind == "pytorch":
            self.module = module
            return
        path = folder / "bare.onnx"
        outputs = [f"out{i}" for i in range(len(module(example)))]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(module, (example,), str(path), input_names=["images"], output_names=outputs,
                              dynamic_axes={name: {0: "batch"} for name in ["images"] + outputs},
                              opset_version=17, dynamo=False)
        if kind == "onnxruntime":
            import onnxruntime
            self.session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        else:
            import openvino
            self.compiled = openvino.Core().compile_model(openvino.convert_model(str(path)), "CPU",
                                                          {"INFERENCE_PRECISION_HINT": "f32"})
            self.request = self.compiled.create_infer_request()

    def run(self, images, threshold=None):
        if self.kind == "pytorch":
            with torch.no_grad():
                return self.module(images)
        if self.kind == "onnxruntime":
            return self.session.run(None, {"images": images.numpy()})
        return self.request.infer({"images": images.numpy()})


def images_per_second(runtime, images, minimum_images, threshold=0.0):
    runtime.run(images, threshold)  # warm-up: allocations, graph optimisation, oneDNN kernels
    repeats = max(2, -(-minimum_images // images.shape[0]))
    started = time.perf_counter()
    for _ in range(repeats):
        runtime.run(images, threshold)
    return repeats * images.shape[0] / (time.perf_counter() - started)


def spread(paths, count):
    # every k-th file, so a folder sorted by defect type gives some of each
    return paths[::max(1, len(paths) // count)][:count]


def real_image_parity(checkpoint, exported, paths):
    # the checkpoint and the exported file score the same files through predict's path (its transform, batches
    # of 16, the saved threshold)
    expected = list(predict_images(open_model(checkpoint, device="cpu"), paths, batch_size=16, progress=False))
    found = list(predict_images(open_model(exported, device="cpu"), paths, batch_size=16, progress=False))
    worst = max(abs(a["pred_score"] - b["pred_score"]) / max(abs(a["pred_score"]), 1e-12)
                for a, b in zip(expected, found))
    agree = sum(a.get("pred_label") == b.get("pred_label") for a, b in zip(expected, found))
    return {"parity_images": len(paths), "parity_worst_relative_score_difference": worst,
            "parity_label_agreement": f"{agree}/{len(paths)}",
            "parity_positive_labels": sum(a.get("pred_label") == 1 for a in expected)}


def measure(checkpoint, args, work):
    opened = open_model(checkpoint, device="cpu")
    model, name = opened.runtime.model, opened.model_name
    config = torch.load(checkpoint, map_location="cpu", weights_only=True)["config"]
    bare = BareNetworks(model, name).eval()
    example = example_images(config, 2)
    parity_paths = spread(find_images(args.parity_images), args.parity_count) if args.parity_images else []
    rows = []
    for runtime_name, fmt in RUNTIMES.items():
        parity = {}
        if fmt is None:
            full = opened.runtime
        else:
            folder = work / name / fmt
            export_checkpoint(checkpoint, fmt, folder)
            full = load_runtime(folder / MODEL_FILES[fmt])
            parity = json.loads((folder / "metadata.json").read_text())["parity"]
            parity = {"generated_" + key: value for key, value in parity.items()}
            if parity_paths:
                parity.update(real_image_parity(checkpoint, folder / MODEL_FILES[fmt], parity_paths))
        bare_runtime = BareRuntime(bare, runtime_name, example, work / name / (fmt or "pytorch"))
        for batch in args.batches:
            images = example_images(config, batch, seed=batch)
            full_rate = images_per_second(full, images, args.images)
            bare_rate = images_per_second(bare_runtime, images, args.images)
            row = {"model": name, "backbone": config["model"].get("backbone"),
                   "image_size": list(images.shape[-2:]), "runtime": runtime_name, "batch": batch,
                   "images_per_s": round(full_rate, 3), "bare_images_per_s": round(bare_rate, 3),
                   "ratio_to_bare": round(full_rate / bare_rate, 3), "threads": torch.get_num_threads(),
                   **(parity if batch == args.batches[0] else {})}
            print(row, flush=True)
            rows.append(row)
    return rows


def main():
    parser = argparse.ArgumentParser(description="images/s per model and runtime, against the bare networks")
    parser.add_argument("--checkpoints", required=True, help="comma-separated model.pt files")
    parser.add_argument("--batches", default="1,32")
    parser.add_argument("--images", type=int, default=32, help="at least this many images timed per figure")
    parser.add_argument("--parity-images", default=None, help="a folder of real images for the parity check")
    parser.add_argument("--parity-count", type=int, default=64)
    parser.add_argument("--label", default="")
    parser.add_argument("--out", default=str(results_path(__file__)))
    args = parser.parse_args()
    args.batches = [int(b) for b in args.batches.split(",")]
    with tempfile.TemporaryDirectory() as work:
        for checkpoint in args.checkpoints.split(","):
            for row in measure(checkpoint, args, Path(work)):
                if args.out:
                    append_record(__file__, typed_command(), row, out=args.out, checkpoint=checkpoint,
                                  label=args.label)


if __name__ == "__main__":
    main()
