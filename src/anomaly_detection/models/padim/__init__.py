# src/anomaly_detection/models/padim/__init__.py
from anomaly_detection.models.padim.padim import PaDiMModel
from anomaly_detection.models.padim.trainer import PaDiMTrainer

__all__ = ["PaDiMModel", "PaDiMTrainer"]
