# src/anomaly_detection/models/patchcore/__init__.py
from anomaly_detection.models.patchcore.coreset import greedy_coreset_indices
from anomaly_detection.models.patchcore.patchcore import PatchCoreModel, nearest_neighbours
from anomaly_detection.models.patchcore.trainer import PatchCoreTrainer

__all__ = ["PatchCoreModel", "PatchCoreTrainer", "greedy_coreset_indices", "nearest_neighbours"]
