# src/anomaly_detection/models/stfpm/trainer.py
import torch

from anomaly_detection.trainer import BaseTrainer, base_trainer_options


class STFPMTrainer(BaseTrainer):
    def __init__(self, model, loss_fn, device="auto", learning_rate=0.4, momentum=0.9, weight_decay=1e-4, **kwargs):
        # STFPMLoss sums over the images of a batch, as the paper's loss does
        kwargs.setdefault("loss_reduction", "sum")
        super().__init__(model, loss_fn, device=device, learning_rate=learning_rate, **kwargs)
        self.momentum = momentum
        self.weight_decay = weight_decay

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

    def compute_validation_metrics(self, step_outputs):
        total = sum(float(out["loss"]) * out["batch_size"] for out in step_outputs)
        count = sum(out["batch_size"] for out in step_outputs)
        return {"val_loss": total / count} if count else {}

    @staticmethod
    def build_model(config, pretrained=None):
        from anomaly_detection.models.stfpm.stfpm import STFPMModel
        options = config["model"]
        pretrained = options.get("pretrained", True) if pretrained is None else pretrained
        return STFPMModel(backbone=options.get("backbone", "resnet18"), layers=options.get("layers"),
                          pretrained=pretrained, weights=options.get("weights") if pretrained else None,
                          backbone_root=config.get("backbone_root"),
                          activation_checkpointing=config.get("training", {}).get("activation_checkpointing", False))

    @classmethod
    def from_config(cls, config, model=None, **trainer_options):
        from anomaly_detection.models.stfpm.stfpm import STFPMLoss
        training = config["training"]
        model = model if model is not None else cls.build_model(config)
        return cls(model, STFPMLoss(), learning_rate=float(training.get("learning_rate", 0.4)),
                   momentum=float(training.get("momentum", 0.9)),
                   weight_decay=float(training.get("weight_decay", 1e-4)),
                   **base_trainer_options(config), **trainer_options)
