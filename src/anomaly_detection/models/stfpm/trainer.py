# src/anomaly_detection/models/stfpm/trainer.py
import torch

from anomaly_detection.config import FROM_YAML, fill_from_yaml
from anomaly_detection.models.stfpm.stfpm import STFPMLoss, STFPMModel
from anomaly_detection.trainer import BaseTrainer, model_arguments, trainer_arguments


class STFPMTrainer(BaseTrainer):
    def __init__(self, model, loss_fn, device="auto", learning_rate=FROM_YAML, momentum=FROM_YAML,
                 weight_decay=FROM_YAML, **kwargs):
        args = fill_from_yaml("stfpm", "training", {"learning_rate": learning_rate, "momentum": momentum,
                                                    "weight_decay": weight_decay})
        # STFPMLoss sums over the images of a batch, as the paper's loss does
        kwargs.setdefault("loss_reduction", "sum")
        super().__init__(model, loss_fn, device=device, learning_rate=float(args["learning_rate"]), **kwargs)
        self.momentum = float(args["momentum"])
        self.weight_decay = float(args["weight_decay"])

    @classmethod
    def build_model(cls, config, pretrained=None):
        return STFPMModel(**model_arguments(config, pretrained),
                          activation_checkpointing=config["training"]["activation_checkpointing"])

    @classmethod
    def from_config(cls, config, model=None, **options):
        training = config["training"]
        return cls(model if model is not None else cls.build_model(config), STFPMLoss(),
                   learning_rate=training["learning_rate"], momentum=training["momentum"],
                   weight_decay=training["weight_decay"], **trainer_arguments(config), **options)

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.model.student.parameters(), lr=self.learning_rate,
                                    momentum=self.momentum, weight_decay=self.weight_decay)
        return {"optimizer": optimizer, "scheduler": None}

    def training_step(self, batch, batch_idx):
        images = batch["image"].to(self.device, non_blocking=True)
        teacher_features, student_features = self.model(images)
        return {"loss": self.loss_fn(teacher_features, student_features)}

    def validation_step(self, batch, batch_idx):
        images = batch["image"].to(self.device, non_blocking=True)
        teacher_features, student_features = self.model.extract(images)
        # per image, so the monitored value does not depend on the batch size
        loss = self.loss_fn(teacher_features, student_features) / images.shape[0]
        return {"loss": loss.detach(), "batch_size": images.shape[0]}
