# benchmarks/fastflow_scale_analysis.py
# Diagnosis of trained FastFlow checkpoints on their test split: image AUROC (maximum of the map) and pixel
# AUROC of each scale's likelihood map alone and of FastFlow's map (the likelihoods averaged over the scales).
# It reads test labels to explain a result; it is not a way to choose a model (the epoch comes from the
# validation loss, the layers from the config).
#   python benchmarks/fastflow_scale_analysis.py --checkpoints a/model.pt,b/model.pt
import argparse

import torch

from anomaly_detection.metrics import compute_auroc, compute_pixel_auroc
from anomaly_detection.models.components import upsample_map
from anomaly_detection.models.fastflow.fastflow import compute_anomaly_map
from anomaly_detection.runner import build_loaders, load_model_file
from record import append_record, results_path, typed_command


def scale_maps(model, loader):
    names = list(model.layers) + ["fastflow"]
    maps = {name: [] for name in names}
    labels, masks = [], []
    with torch.no_grad():
        for batch in loader:
            hidden_variables, _ = model.encode(batch["image"])
            size = batch["image"].shape[-2:]
            for layer, hidden in zip(model.layers, hidden_variables):
                maps[layer].append(compute_anomaly_map([hidden], size))
            maps["fastflow"].append(compute_anomaly_map(hidden_variables, size))
            labels.append(torch.as_tensor(batch["label"]))
            masks.append(batch["mask"] > 0.5)
    return {name: torch.cat(value)[:, 0] for name, value in maps.items()}, torch.cat(labels), torch.cat(masks)[:, 0]


def analyse(checkpoint):
    model, config, _ = load_model_file(checkpoint)
    model.eval()
    _, _, loader = build_loaders(config, str(config["dataset"]["category"]))
    maps, labels, masks = scale_maps(model, loader)
    figures = {}
    for name, values in maps.items():
        figures[name] = {
            "image_auroc": compute_auroc(values.flatten(1).amax(1).numpy(), labels.numpy()),
            "pixel_auroc": compute_pixel_auroc(values.numpy(), masks.numpy()),
        }
    return {"checkpoint": str(checkpoint), "layers": list(model.layers), "scales": figures}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--checkpoints", required=True, help="comma-separated FastFlow model.pt files")
    parser.add_argument("--label", default="")
    parser.add_argument("--out", default=str(results_path(__file__)))
    args = parser.parse_args()
    for checkpoint in args.checkpoints.split(","):
        figures = analyse(checkpoint)
        print({name: {k: round(v, 4) for k, v in value.items()} for name, value in figures["scales"].items()})
        if args.out:
            append_record(__file__, typed_command(), figures, out=args.out, label=args.label)


if __name__ == "__main__":
    main()
