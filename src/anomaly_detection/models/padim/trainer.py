# src/anomaly_detection/models/padim/trainer.py
from anomaly_detection.trainer import OnePassTrainer, base_trainer_options


class PaDiMTrainer(OnePassTrainer):
    @staticmethod
    def build_model(config, pretrained=None):
        from anomaly_detection.models.padim.padim import PaDiMModel
        options = config["model"]
        pretrained = options.get("pretrained", True) if pretrained is None else pretrained
        return PaDiMModel(backbone=options.get("backbone", "resnet18"), layers=options.get("layers"),
                          pretrained=pretrained, weights=options.get("weights") if pretrained else None,
                          backbone_root=config.get("backbone_root"), n_features=options.get("n_features"),
                          epsilon=options.get("epsilon", 0.01), seed=config.get("seed", 0),
                          blur_sigma=options.get("blur_sigma", 4.0))

    @classmethod
    def from_config(cls, config, model=None, **trainer_options):
        model = model if model is not None else cls.build_model(config)
        return cls(model, **base_trainer_options(config), **trainer_options)
