# benchmarks/stfpm_layer_analysis.py
# Diagnosis of a trained STFPM checkpoint on its test split: image AUROC (max and mean of the map) and
# pixel AUROC of each layer's distance map alone, of their product (STFPM's map) and of their sum, with
# and without a Gaussian blur, and image AUROC per defect type. It reads test labels to explain a result;
# it is not a way to choose a model (model selection uses the validation loss only).
import argparse

import numpy as np
import torch
import torch.nn.functional as F

from anomaly_detection.metrics import compute_auroc, compute_pixel_auroc
from anomaly_detection.models.patchcore.patchcore import gaussian_blur
from anomaly_detection.runner import build_loaders, load_model_file
from record import append_record, results_path, typed_command


def layer_maps(model, loader):
    maps = {layer: [] for layer in model.layers}
    labels, masks, defect_types = [], [], []
    with torch.no_grad():
        for batch in loader:
            teacher, student = model.extract(batch["image"])
            size = batch["image"].shape[-2:]
            for layer in model.layers:
                distance = 0.5 * (F.normalize(teacher[layer], dim=1) - F.normalize(student[layer], dim=1)).pow(2)
                distance = distance.sum(1, keepdim=True)
                maps[layer].append(F.interpolate(distance, size=size, mode="bilinear", align_corners=False))
            labels.append(torch.as_tensor(batch["label"]))
            masks.append(batch["mask"])
            defect_types += list(batch["defect_type"])
    maps = {layer: torch.cat(parts)[:, 0] for layer, parts in maps.items()}
    return maps, torch.cat(labels).numpy(), torch.cat(masks)[:, 0].numpy() > 0.5, np.array(defect_types)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--checkpoint", required=True, help="best.pt or model.pt of an STFPM run")
    parser.add_argument("--out", default=str(results_path(__file__)),
                        help="append the record here (default: %(default)s; '' writes none)")
    args = parser.parse_args()
    model, config, _ = load_model_file(args.checkpoint)
    model.eval()
    _, _, loader = build_loaders(config, str(config["dataset"]["category"]))
    maps, labels, masks, defect_types = layer_maps(model, loader)
    combined = dict(maps)
    combined["product"] = torch.stack(list(maps.values())).prod(0)
    combined["sum"] = torch.stack(list(maps.values())).sum(0)
    record = {"checkpoint": args.checkpoint, "layers": model.layers, "maps": {}}
    for name, values in combined.items():
        for sigma in (0.0, 4.0):
            blurred = gaussian_blur(values[:, None], sigma)[:, 0] if sigma else values
            scores = blurred.flatten(1).amax(1).numpy()
            per_type = {str(defect): compute_auroc(scores[(defect_types == defect) | (labels == 0)],
                                                   labels[(defect_types == defect) | (labels == 0)])
                        for defect in sorted(set(defect_types[labels == 1]))}
            record["maps"][f"{name} sigma {sigma:g}"] = {
                "image_auroc_max": compute_auroc(scores, labels),
                "image_auroc_mean": compute_auroc(blurred.flatten(1).mean(1).numpy(), labels),
                "pixel_auroc": compute_pixel_auroc(blurred.numpy(), masks),
                "image_auroc_per_defect_type": per_type}
    for name, values in record["maps"].items():
        types = " ".join(f"{k} {v:.2f}" for k, v in values["image_auroc_per_defect_type"].items())
        print(f"{name:<22} image(max) {values['image_auroc_max']:.3f}  image(mean) {values['image_auroc_mean']:.3f}  "
              f"pixel {values['pixel_auroc']:.3f}  | {types}")
    if args.out:
        append_record(__file__, typed_command(), record["maps"], out=args.out, variant="/".join(model.layers),
                      checkpoint=args.checkpoint, layers=model.layers)


if __name__ == "__main__":
    main()
