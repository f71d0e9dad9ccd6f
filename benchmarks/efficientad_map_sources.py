# benchmarks/efficientad_map_sources.py
# Diagnosis of trained EfficientAD checkpoints on their test split: image and pixel AUROC of the student-teacher
# map alone, the autoencoder map alone, and their combination normalised with (a) the checkpoint's quantiles,
# fitted on normal validation images as shipped, and (b) quantiles fitted on the test images themselves, which is
# what Anomalib does by default (its validation set is the test set). It reads test labels to explain a
# difference between the frameworks; (b) is a leak of the test set, never a way to score a model.
#   python benchmarks/efficientad_map_sources.py --checkpoints a/model.pt,b/model.pt
import argparse

import torch

from anomaly_detection.metrics import compute_auroc, compute_pixel_auroc
from anomaly_detection.models.components import quantiles, upsample_map
from anomaly_detection.models.efficientad.efficientad import QUANTILE_LIMIT
from anomaly_detection.runner import build_loaders, load_model_file
from record import append_record, results_path, typed_command


def raw_test_maps(model, loader):
    maps_st, maps_ae, labels, masks = [], [], [], []
    with torch.no_grad():
        for batch in loader:
            map_st, map_ae = model.raw_maps(batch["image"])
            maps_st.append(map_st)
            maps_ae.append(map_ae)
            labels.append(torch.as_tensor(batch["label"]))
            masks.append(batch["mask"] > 0.5)
    return torch.cat(maps_st), torch.cat(maps_ae), torch.cat(labels), torch.cat(masks)[:, 0]


def scored(anomaly_map, labels, masks):
    return {"image_auroc": compute_auroc(anomaly_map.flatten(1).amax(1).numpy(), labels.numpy()),
            "pixel_auroc": compute_pixel_auroc(anomaly_map[:, 0].numpy(), masks.numpy())}


def analyse(checkpoint):
    model, config, _ = load_model_file(checkpoint)
    model.eval()
    _, _, loader = build_loaders(config, str(config["dataset"]["category"]))
    map_st, map_ae, labels, masks = raw_test_maps(model, loader)
    size = masks.shape[-2:]
    figures = {"student_teacher_alone": scored(upsample_map(map_st, size), labels, masks),
               "autoencoder_alone": scored(upsample_map(map_ae, size), labels, masks),
               "validation_quantiles": scored(model.combine_maps(map_st, map_ae, size), labels, masks),
               "saved_quantiles": {"st": model.st_quantiles.tolist(), "ae": model.ae_quantiles.tolist()}}
    with torch.no_grad():
        model.fit_map_quantiles([map_st], [map_ae])
    figures["test_quantiles"] = scored(model.combine_maps(map_st, map_ae, size), labels, masks)
    figures["test_quantile_values"] = {"st": model.st_quantiles.tolist(), "ae": model.ae_quantiles.tolist()}
    return {"checkpoint": str(checkpoint), "quantile_limit": QUANTILE_LIMIT, "sources": figures}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--checkpoints", required=True, help="comma-separated EfficientAD model.pt files")
    parser.add_argument("--label", default="")
    parser.add_argument("--out", default=str(results_path(__file__)))
    args = parser.parse_args()
    for checkpoint in args.checkpoints.split(","):
        figures = analyse(checkpoint)
        print(figures)
        if args.out:
            append_record(__file__, typed_command(), figures, out=args.out, label=args.label)


if __name__ == "__main__":
    main()
