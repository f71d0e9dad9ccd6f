# src/anomaly_detection/models/fastflow/trainer.py
import torch

from anomaly_detection.config import FROM_YAML, fill_from_yaml
from anomaly_detection.models.components import WholeBatchScore
from anomaly_detection.models.fastflow.fastflow import FastFlowLoss, FastFlowModel
from anomaly_detection.trainer import BaseTrainer, model_arguments, trainer_arguments


def model_input_size(config):
    # what the model sees (its LayerNorms are built for one size): the center crop when there is one,
    # else the resized image
    data = config["data"]
    return data["center_crop"] if data["center_crop"] is not None else data["image_size"]


class FastFlowTrainer(BaseTrainer):
    def __init__(self, model, loss_fn=None, device="auto", learning_rate=FROM_YAML, weight_decay=FROM_YAML, **kwargs):
        args = fill_from_yaml("fastflow", "training", {"learning_rate": learning_rate, "weight_decay": weight_decay})
        super().__init__(model, loss_fn if loss_fn is not None else FastFlowLoss(), device=device,
                         learning_rate=float(args["learning_rate"]), **kwargs)
        self.weight_decay = float(args["weight_decay"])

    @classmethod
    def build_model(cls, config, pretrained=None):
        return FastFlowModel(**model_arguments(config, pretrained), input_size=model_input_size(config))

    @classmethod
    def exportable_model(cls, model):
        return WholeBatchScore(model)

    @classmethod
    def from_config(cls, config, model=None, **options):
        training = config["training"]
        return cls(model if model is not None else cls.build_model(config), FastFlowLoss(),
                   learning_rate=training["learning_rate"], weight_decay=training["weight_decay"],
                   **trainer_arguments(config), **options)

    def configure_optimizers(self):
        # the backbone is frozen: the LayerNorms and the flows learn
        parameters = list(self.model.norms.parameters()) + list(self.model.flows.parameters())
        optimizer = torch.optim.Adam(parameters, lr=self.learning_rate, weight_decay=self.weight_decay)
        return {"optimizer": optimizer, "scheduler": None}

    def training_step(self, batch, batch_idx):
        images = batch["image"].to(self.device, non_blocking=True)
        hidden_variables, log_jacobians = self.model(images)
        return {"loss": self.loss_fn(hidden_variables, log_jacobians)}

    def validation_step(self, batch, batch_idx):
        images = batch["image"].to(self.device, non_blocking=True)
        # already a mean over the images: val_loss weights it by the batch size
        loss = self.model.validation_loss(images, self.loss_fn)
        return {"loss": loss.detach(), "batch_size": images.shape[0]}
