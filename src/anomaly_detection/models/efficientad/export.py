# src/anomaly_detection/models/efficientad/export.py
# EfficientAD's scoring for export: the whole batch in one pass.
#
# The model computes its maps a few images at a time (INFERENCE_CHUNK) to bound memory; a traced graph would
# freeze that split at the example batch size. The quantile normalisation needs nothing special: the
# quantiles are buffers fitted on validation images, so in the graph it is a subtraction and a division.
from torch import nn

from anomaly_detection.models.efficientad.efficientad import check_input_size


class ExportableEfficientAD(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, images):
        model = self.model
        check_input_size(images.shape[-2:], model.model_size, model.padding)
        map_st, map_ae = model.chunk_maps(images, with_loss=False)
        anomaly_map = model.combine_maps(map_st, map_ae, images.shape[-2:])
        return {"anomaly_map": anomaly_map, "pred_score": anomaly_map.flatten(1).amax(1)}
