# src/anomaly_detection/models/stfpm/__init__.py
from anomaly_detection.models.stfpm.stfpm import STFPMLoss, STFPMModel, compute_anomaly_map
from anomaly_detection.models.stfpm.trainer import STFPMTrainer

__all__ = ["STFPMLoss", "STFPMModel", "STFPMTrainer", "compute_anomaly_map"]
