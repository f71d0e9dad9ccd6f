# src/anomaly_detection/models/reverse_distillation/trainer.py
import torch

from anomaly_detection.config import FROM_YAML, fill_from_yaml
from anomaly_detection.models.components import WholeBatchScore
from anomaly_detection.models.reverse_distillation.reverse_distillation import (ReverseDistillationLoss,
                                                                                ReverseDistillationModel)
from anomaly_detection.trainer import BaseTrainer, model_arguments, trainer_arguments


class ReverseDistillationTrainer(BaseTrainer):
    def __init__(self, model, loss_fn=None, device="auto", learning_rate=FROM_YAML, betas=FROM_YAML, **kwargs):
        args = fill_from_yaml("reverse_distillation", "training", {"learning_rate": learning_rate, "betas": betas})
        betas = args["betas"]
        if not isinstance(betas, (list, tuple)) or len(betas) != 2 or not all(0 <= float(b) < 1 for b in betas):
            raise ValueError(f"training.betas must be two numbers in [0, 1), got {betas!r}")
        super().__init__(model, loss_fn if loss_fn is not None else ReverseDistillationLoss(), device=device,
                         learning_rate=float(args["learning_rate"]), **kwargs)
        self.betas = (float(betas[0]), float(betas[1]))

    @classmethod
    def build_model(cls, config, pretrained=None):
        return ReverseDistillationModel(**model_arguments(config, pretrained),
                                        activation_checkpointing=config["training"]["activation_checkpointing"])

    @classmethod
    def exportable_model(cls, model):
        return WholeBatchScore(model)

    @classmethod
    def from_config(cls, config, model=None, **options):
        training = config["training"]
        return cls(model if model is not None else cls.build_model(config), ReverseDistillationLoss(),
                   learning_rate=training["learning_rate"], betas=training["betas"], **trainer_arguments(config),
                   **options)

    def configure_optimizers(self):
        # the encoder stays frozen: only the one-class bottleneck and the decoder learn, as in the paper
        parameters = list(self.model.bottleneck.parameters()) + list(self.model.decoder.parameters())
        optimizer = torch.optim.Adam(parameters, lr=self.learning_rate, betas=self.betas)
        return {"optimizer": optimizer, "scheduler": None}

    def training_step(self, batch, batch_idx):
        images = batch["image"].to(self.device, non_blocking=True)
        encoder_features, decoder_features = self.model(images)
        return {"loss": self.loss_fn(encoder_features, decoder_features)}

    def validation_step(self, batch, batch_idx):
        images = batch["image"].to(self.device, non_blocking=True)
        # already a mean over the images: val_loss weights it by the batch size
        loss = self.model.validation_loss(images, self.loss_fn)
        return {"loss": loss.detach(), "batch_size": images.shape[0]}
