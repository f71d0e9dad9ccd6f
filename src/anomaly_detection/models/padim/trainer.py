# src/anomaly_detection/models/padim/trainer.py
from anomaly_detection.models.padim.padim import PaDiMModel
from anomaly_detection.trainer import OnePassTrainer, model_arguments


class PaDiMTrainer(OnePassTrainer):
    @classmethod
    def build_model(cls, config, pretrained=None):
        return PaDiMModel(**model_arguments(config, pretrained), seed=config["seed"])
