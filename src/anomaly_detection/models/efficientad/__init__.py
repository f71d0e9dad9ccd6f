# src/anomaly_detection/models/efficientad/__init__.py
from anomaly_detection.models.efficientad.efficientad import EfficientADModel, hard_feature_loss, load_teacher_state
from anomaly_detection.models.efficientad.trainer import EfficientADTrainer, PenaltyImages

__all__ = ["EfficientADModel", "EfficientADTrainer", "PenaltyImages", "hard_feature_loss", "load_teacher_state"]
