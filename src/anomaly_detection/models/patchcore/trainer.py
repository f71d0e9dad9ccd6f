# src/anomaly_detection/models/patchcore/trainer.py
from anomaly_detection.models.patchcore.export import ExportablePatchCore
from anomaly_detection.models.patchcore.patchcore import PatchCoreModel
from anomaly_detection.trainer import OnePassTrainer, model_arguments


class PatchCoreTrainer(OnePassTrainer):
    @classmethod
    def build_model(cls, config, pretrained=None):
        return PatchCoreModel(**model_arguments(config, pretrained), seed=config["seed"])

    @classmethod
    def scores_whole_splits(cls, config):
        # a search sharded over the processes needs every process on the same images
        return bool(config["model"].get("sharded_search", False))

    @classmethod
    def exportable_model(cls, model):
        return ExportablePatchCore(model)
