# benchmarks/efficientad_map_sources.py
# Diagnosis of trained EfficientAD checkpoints on their test split: image and pixel AUROC of the student-teacher
# map alone, the autoencoder map alone, and their combination normalised with (a) the checkpoint's quantiles,
# fitted on normal validation images as shipped, (b) quantiles fitted on the test images themselves, which is
# what Anomalib does by default (its validation set is the test set), and (c) no normalisation at all: the raw
# maps averaged, which is what Anomalib scores when max_steps ends its training inside the first epoch (it fits
# its quantiles when a validation starts, and none does; efficientad_peer_map_sources.py shows them unset). It
# reads test labels to explain a difference between the frameworks; (b) is a leak of the test set, never a way
# to score a model.
#   python benchmarks/efficientad_map_sources.py --checkpoints a/model.pt,b/model.pt
import torch

from anomaly_detection.metrics import compute_auroc, compute_pixel_auroc
from anomaly_detection.models.components import upsample_map
from anomaly_detection.models.efficientad.efficientad import QUANTILE_LIMIT
from diagnosis import model_and_test_loader, run_diagnosis


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
    model, loader = model_and_test_loader(checkpoint)
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
    with torch.no_grad():
        # (0, target) leaves each raw map as it is (quantile_normalization)
        for quantiles in (model.st_quantiles, model.ae_quantiles):
            quantiles.copy_(torch.tensor([0.0, model.map_target]))
    figures["unnormalised"] = scored(model.combine_maps(map_st, map_ae, size), labels, masks)
    return {"checkpoint": str(checkpoint), "quantile_limit": QUANTILE_LIMIT, "sources": figures}


def main():
    run_diagnosis(__file__, analyse, "EfficientAD")


if __name__ == "__main__":
    main()
