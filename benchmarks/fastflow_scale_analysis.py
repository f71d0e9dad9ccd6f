# benchmarks/fastflow_scale_analysis.py
# Diagnosis of trained FastFlow checkpoints on their test split: image AUROC (maximum of the map) and pixel
# AUROC of each scale's likelihood map alone and of FastFlow's map (the likelihoods averaged over the scales).
# It reads test labels to explain a result; it is not a way to choose a model (the epoch comes from the
# validation loss, the layers from the config).
#   python benchmarks/fastflow_scale_analysis.py --checkpoints a/model.pt,b/model.pt
import torch

from anomaly_detection.metrics import compute_auroc, compute_pixel_auroc
from anomaly_detection.models.fastflow.fastflow import compute_anomaly_map
from diagnosis import model_and_test_loader, run_diagnosis


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
    model, loader = model_and_test_loader(checkpoint)
    maps, labels, masks = scale_maps(model, loader)
    figures = {}
    for name, values in maps.items():
        figures[name] = {
            "image_auroc": compute_auroc(values.flatten(1).amax(1).numpy(), labels.numpy()),
            "pixel_auroc": compute_pixel_auroc(values.numpy(), masks.numpy()),
        }
    return {"checkpoint": str(checkpoint), "layers": list(model.layers), "scales": figures}


def rounded(figures):
    return {name: {key: round(value, 4) for key, value in scores.items()} for name, scores in figures["scales"].items()}


def main():
    run_diagnosis(__file__, analyse, "FastFlow", show=lambda figures: print(rounded(figures)))


if __name__ == "__main__":
    main()
