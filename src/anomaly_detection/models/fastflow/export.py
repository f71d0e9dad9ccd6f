# src/anomaly_detection/models/fastflow/export.py
# FastFlow's scoring for export: the whole batch in one pass. The model scores a few images at a time
# (INFERENCE_CHUNK) to bound memory; a traced graph would freeze that split at the example batch size.
from torch import nn


class ExportableFastFlow(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, images):
        anomaly_map = self.model.score(images)
        return {"anomaly_map": anomaly_map, "pred_score": anomaly_map.flatten(1).amax(dim=1)}
