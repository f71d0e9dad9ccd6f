# src/anomaly_detection/models/reverse_distillation/__init__.py
from anomaly_detection.models.reverse_distillation.reverse_distillation import (ReverseDistillationLoss,
                                                                                ReverseDistillationModel,
                                                                                compute_anomaly_map)
from anomaly_detection.models.reverse_distillation.trainer import ReverseDistillationTrainer

__all__ = ["ReverseDistillationLoss", "ReverseDistillationModel", "ReverseDistillationTrainer", "compute_anomaly_map"]
