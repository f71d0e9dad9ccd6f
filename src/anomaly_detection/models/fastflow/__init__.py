# src/anomaly_detection/models/fastflow/__init__.py
from anomaly_detection.models.fastflow.fastflow import (AffineCoupling, FastFlowLoss, FastFlowModel,
                                                        NormalizingFlow2d, compute_anomaly_map)
from anomaly_detection.models.fastflow.trainer import FastFlowTrainer

__all__ = ["AffineCoupling", "FastFlowLoss", "FastFlowModel", "FastFlowTrainer", "NormalizingFlow2d",
           "compute_anomaly_map"]
