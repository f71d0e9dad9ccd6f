# src/anomaly_detection/models/patchcore/trainer.py
from anomaly_detection.trainer import OnePassTrainer, base_trainer_options


class PatchCoreTrainer(OnePassTrainer):
    @staticmethod
    def build_model(config, pretrained=None):
        from anomaly_detection.models.patchcore.patchcore import PatchCoreModel
        options = config["model"]
        pretrained = options.get("pretrained", True) if pretrained is None else pretrained
        return PatchCoreModel(
            backbone=options.get("backbone", "wide_resnet50_2"), layers=options.get("layers"),
            pretrained=pretrained, weights=options.get("weights") if pretrained else None,
            backbone_root=config.get("backbone_root"), pretrain_dim=options.get("pretrain_dim", 1024),
            target_dim=options.get("target_dim", 1024), coreset_ratio=options.get("coreset_ratio", 0.1),
            num_neighbors=options.get("num_neighbors", 9), projection_dim=options.get("projection_dim", 128),
            memory_budget_mb=options.get("memory_budget_mb", 256),
            feature_dtype=options.get("feature_dtype", "float32"),
            search_backend=options.get("search_backend", "torch"), seed=config.get("seed", 0),
            blur_sigma=options.get("blur_sigma", 4.0))

    @classmethod
    def from_config(cls, config, model=None, **trainer_options):
        model = model if model is not None else cls.build_model(config)
        return cls(model, **base_trainer_options(config), **trainer_options)
