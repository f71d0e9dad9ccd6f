# src/anomaly_detection/models/padim/trainer.py
import time

from anomaly_detection.trainer import BaseTrainer, base_trainer_options
from anomaly_detection.utils import logger, to_json


class PaDiMTrainer(BaseTrainer):
    # no gradient step: one pass accumulates the per-position Gaussian, inverted at the end of the epoch
    def __init__(self, model, device="auto", **kwargs):
        super().__init__(model, None, device=device, **kwargs)
        self.fit_timings = {}
        self._epoch_started = None
        self._extract_s = 0.0

    def configure_optimizers(self):
        return None

    def on_train_epoch_start(self, epoch):
        super().on_train_epoch_start(epoch)
        self.model.begin_fit()
        self._epoch_started = time.perf_counter()
        self._extract_s = 0.0

    def training_step(self, batch, batch_idx):
        started = time.perf_counter()
        self.model.accumulate(batch["image"].to(self.device, non_blocking=True))
        self._extract_s += time.perf_counter() - started
        return {}

    def on_train_epoch_end(self, epoch, train_loss):
        super().on_train_epoch_end(epoch, train_loss)
        loop_s = time.perf_counter() - self._epoch_started
        timings = dict(self.model.finalize_fit())
        total_s = time.perf_counter() - self._epoch_started
        timings.update({"accumulate_s": self._extract_s, "data_s": max(0.0, loop_s - self._extract_s),
                        "inverse_s": total_s - loop_s, "total_s": total_s})
        self.fit_timings = timings
        logger.info("padim fit_timings %s", to_json(timings))

    def validation_step(self, batch, batch_idx):
        return {}

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
