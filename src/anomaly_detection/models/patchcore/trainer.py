# src/anomaly_detection/models/patchcore/trainer.py
import time

from anomaly_detection.trainer import BaseTrainer, base_trainer_options
from anomaly_detection.utils import logger, to_json


def dataset_size(loader):
    try:
        return len(loader.dataset)
    except (AttributeError, TypeError):
        return None


class PatchCoreTrainer(BaseTrainer):
    # no gradient step: one pass fills the memory bank, the coreset is chosen at the end of the epoch
    def __init__(self, model, device="auto", **kwargs):
        super().__init__(model, None, device=device, **kwargs)
        self.expected_images = None
        self.fit_timings = {}
        self._epoch_started = None

    def configure_optimizers(self):
        return None

    def fit(self, train_loader, val_loader=None, num_epochs=1, resume_from=None):
        self.expected_images = dataset_size(train_loader)
        return super().fit(train_loader, val_loader, num_epochs=num_epochs, resume_from=resume_from)

    def on_train_epoch_start(self, epoch):
        super().on_train_epoch_start(epoch)
        self.model.begin_fit(self.expected_images)
        self._epoch_started = time.perf_counter()

    def training_step(self, batch, batch_idx):
        self.model.accumulate(batch["image"].to(self.device, non_blocking=True))
        return {}

    def on_train_epoch_end(self, epoch, train_loss):
        super().on_train_epoch_end(epoch, train_loss)
        loop_s = time.perf_counter() - self._epoch_started
        timings = dict(self.model.finalize_fit())
        total_s = time.perf_counter() - self._epoch_started
        timings["data_s"] = max(0.0, loop_s - timings["extract_s"])
        timings["other_s"] = max(0.0, total_s - loop_s - timings["coreset_s"])
        timings["total_s"] = total_s
        self.fit_timings = timings
        logger.info("patchcore fit_timings %s", to_json(timings))

    def validation_step(self, batch, batch_idx):
        return {}

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
