# src/anomaly_detection/models/efficientad/trainer.py
import itertools
import math
import time
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError
from torchvision.transforms import v2 as T
from torchvision.transforms.v2 import functional as TF

from anomaly_detection import distributed
from anomaly_detection.config import FROM_YAML, fill_from_yaml
from anomaly_detection.data.datasets import IMAGE_EXTENSIONS
from anomaly_detection.data.transforms import resolve_normalization, size_pair
from anomaly_detection.models.components import WholeBatchScore
from anomaly_detection.models.efficientad.efficientad import EfficientADModel
from anomaly_detection.trainer import BaseTrainer, model_arguments, trainer_arguments
from anomaly_detection.utils import logger



class EfficientADTrainer(BaseTrainer):
    def __init__(self, model, device="auto", learning_rate=FROM_YAML, weight_decay=FROM_YAML, max_steps=FROM_YAML,
                 lr_drop_fraction=FROM_YAML, lr_drop_factor=FROM_YAML, ae_jitter=FROM_YAML, imagenet_dir=None,
                 normalization="imagenet", **kwargs):
        args = fill_from_yaml("efficientad", "training", {
            "learning_rate": learning_rate, "weight_decay": weight_decay, "max_steps": max_steps,
            "lr_drop_fraction": lr_drop_fraction, "lr_drop_factor": lr_drop_factor, "ae_jitter": ae_jitter})
        max_steps = args["max_steps"]
        if not isinstance(max_steps, int) or isinstance(max_steps, bool) or max_steps < 1:
            raise ValueError(f"training.max_steps must be an integer >= 1 (EfficientAD trains for a number of "
                             f"optimizer steps, the paper 70000), got {max_steps!r}")
        if not 0 < float(args["lr_drop_fraction"]) <= 1:
            raise ValueError(f"training.lr_drop_fraction must be in (0, 1], got {args['lr_drop_fraction']!r}")
        if not 0 <= float(args["ae_jitter"]) < 1:
            raise ValueError(f"training.ae_jitter must be in [0, 1), got {args['ae_jitter']!r}")
        kwargs.setdefault("monitor", None)
        super().__init__(model, None, device=device, learning_rate=float(args["learning_rate"]), **kwargs)
        self.weight_decay = float(args["weight_decay"])
        self.max_steps = max_steps
        # the paper's StepLR: the learning rate drops once, at 95% of the steps
        self.lr_drop_step = int(float(args["lr_drop_fraction"]) * max_steps)
        self.lr_drop_factor = float(args["lr_drop_factor"])
        self.ae_jitter = float(args["ae_jitter"])
        self.data_mean, self.data_std = (torch.tensor(v).view(1, 3, 1, 1) for v in resolve_normalization(normalization))
        self.penalty_images = None
        if imagenet_dir:
            self.penalty_images = PenaltyImages(imagenet_dir, model.image_size, self.data_mean, self.data_std)
            logger.info("EfficientAD penalty: %d generic images from %s", len(self.penalty_images), imagenet_dir)
        else:
            logger.info("EfficientAD penalty off: model.imagenet_dir is null (the paper uses ImageNet images)")
        self._maps = None
        self._train_loader = None
        self._val_loader = None
        self._resuming = False
        self._num_epochs = None

    @classmethod
    def build_model(cls, config, pretrained=None):
        # model.imagenet_dir is the trainer's (the penalty images); the autoencoder's sizes follow the input's
        arguments = model_arguments(config, pretrained)
        arguments.pop("imagenet_dir")
        return EfficientADModel(**arguments, image_size=config["data"]["image_size"])

    @classmethod
    def exportable_model(cls, model):
        return WholeBatchScore(model)

    @classmethod
    def from_config(cls, config, model=None, **options):
        training = config["training"]
        return cls(model if model is not None else cls.build_model(config),
                   learning_rate=training["learning_rate"], weight_decay=training["weight_decay"],
                   max_steps=training["max_steps"], lr_drop_fraction=training["lr_drop_fraction"],
                   lr_drop_factor=training["lr_drop_factor"], ae_jitter=training["ae_jitter"],
                   imagenet_dir=config["model"]["imagenet_dir"], normalization=config["data"]["normalization"],
                   **trainer_arguments(config), **options)

    def configure_optimizers(self):
        optimizer = torch.optim.Adam(self.model.trainable_parameters(), lr=self.learning_rate,
                                     weight_decay=self.weight_decay)
        return {"optimizer": optimizer, "scheduler": None}

    # ---- steps, not epochs -----------------------------------------------------------------------
    def fit(self, train_loader, val_loader=None, num_epochs=None, resume_from=None):
        # the number of epochs follows from training.max_steps and the loader's length; training.num_epochs
        # is not read
        per_epoch = len(train_loader)
        if per_epoch == 0:
            raise ValueError("EfficientAD got an empty training loader: no normal training images")
        self._num_epochs = math.ceil(self.max_steps / per_epoch)
        logger.info("EfficientAD: training.max_steps=%d at %d batches per epoch: %d epoch(s)", self.max_steps,
                    per_epoch, self._num_epochs)
        self._train_loader, self._val_loader = train_loader, val_loader
        self._resuming = resume_from is not None
        try:
            return super().fit(train_loader, val_loader, num_epochs=self._num_epochs, resume_from=resume_from)
        finally:
            self._train_loader = self._val_loader = None

    def train_epoch(self, train_loader, epoch):
        remaining = self.max_steps - self.global_step
        if remaining <= 0:
            return None
        if remaining < len(train_loader):
            train_loader = itertools.islice(train_loader, remaining)
        return super().train_epoch(train_loader, epoch)

    def on_fit_start(self):
        if self._resuming:
            return  # the checkpoint holds the statistics of the images it was trained on
        started = time.perf_counter()
        self.model.eval()
        self.model.fit_teacher_statistics(batch["image"].to(self.device) for batch in self._train_loader)
        logger.info("EfficientAD teacher statistics over the training images: teacher_statistics_s=%.2f",
                    time.perf_counter() - started)

    def on_train_epoch_end(self, epoch, train_loss):
        if self._val_loader is None and epoch == self._num_epochs - 1:
            logger.warning("no validation images (data.val_fraction=0): EfficientAD's map normalisation "
                           "quantiles come from the training images, which the model has seen")
            self.fit_map_quantiles(self._train_loader)

    # ---- the steps ------------------------------------------------------------------------------------
    def current_learning_rate(self):
        factor = self.lr_drop_factor if self.global_step >= self.lr_drop_step else 1.0
        return self.learning_rate * factor

    def training_step(self, batch, batch_idx):
        for group in self.optimizer.param_groups:
            group["lr"] = self.current_learning_rate()
        images = batch["image"].to(self.device, non_blocking=True)
        ae_images = self.jitter(images) if self.ae_jitter > 0 else None
        penalty = self.penalty_images.next_batch(images.shape[0]).to(self.device) if self.penalty_images else None
        losses = self.model.training_losses(images, ae_images, penalty)
        return {key: value if key == "loss" else value.detach() for key, value in losses.items()}

    def jitter(self, images):
        # the reference's input to the autoencoder branch: one of brightness, contrast or saturation changed by
        # a factor in [1 - j, 1 + j], on the image before normalisation
        mean, std = self.data_mean.to(images.device), self.data_std.to(images.device)
        pixels = (images * std + mean).clamp(0, 1)
        adjust = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation)
        jittered = []
        for image in pixels:
            choice = int(torch.randint(3, ()))
            factor = 1.0 + self.ae_jitter * (2 * float(torch.rand(())) - 1)
            jittered.append(adjust[choice](image, factor))
        return (torch.stack(jittered) - mean) / std

    def on_validation_epoch_start(self, epoch):
        self._maps = ([], [])

    def validation_step(self, batch, batch_idx):
        images = batch["image"].to(self.device, non_blocking=True)
        # float32 as at inference (the evaluator does not autocast): the quantiles must describe the maps
        # they will normalise, also when training runs in bfloat16
        with torch.autocast(self.device.type, enabled=False):
            map_st, map_ae, loss = self.model.raw_maps(images, with_loss=True)
        self._maps[0].append(map_st.float().cpu())
        self._maps[1].append(map_ae.float().cpu())
        return {"loss": loss.detach(), "batch_size": images.shape[0]}

    def on_validation_epoch_end(self, epoch, val_metrics):
        # the map normalisation comes from the normal validation images, before this epoch's checkpoint is
        # written, so every checkpoint (and the threshold calibrated on it) carries the quantiles of its weights
        # under torchrun: every process's validation maps, in the images' order, so the quantiles (and their
        # sampling of large maps) are those of one process
        maps = [torch.cat(distributed.gather_batches_to_all(part)) for part in self._maps]
        values = self.model.fit_map_quantiles(*([m] for m in maps))
        self._maps = None
        logger.info("EfficientAD map quantiles %s from the validation images", values)

    @torch.no_grad()
    def fit_map_quantiles(self, loader):
        self.model.eval()
        maps_st, maps_ae = [], []
        for batch in loader:
            map_st, map_ae = self.model.raw_maps(batch["image"].to(self.device))
            maps_st.append(map_st.float().cpu())
            maps_ae.append(map_ae.float().cpu())
        values = self.model.fit_map_quantiles(maps_st, maps_ae)
        self.model.train()
        return values


def readable_images(folder):
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"model.imagenet_dir {folder} is not a folder of images")
    paths = []
    for path in sorted(folder.rglob("*")):
        if path.suffix.lower() not in IMAGE_EXTENSIONS or not path.is_file():
            continue
        try:
            with Image.open(path) as image:
                image.verify()
        except (OSError, UnidentifiedImageError, SyntaxError, ValueError):
            continue
        paths.append(path)
    if not paths:
        raise ValueError(f"model.imagenet_dir {folder} holds no readable image (looked for "
                         f"{', '.join(sorted(IMAGE_EXTENSIONS))}, recursively)")
    return paths


class PenaltyImages:
    # generic images for the penalty, cycled in a random order: the reference's recipe (resize to twice the
    # input size, grey-scale with probability 0.3, centre crop to the input size)
    def __init__(self, folder, image_size, mean, std):
        self.paths = readable_images(folder)
        height, width = size_pair(image_size, "data.image_size")
        self.transform = T.Compose([T.Resize((2 * height, 2 * width), antialias=True), T.RandomGrayscale(0.3),
                                    T.CenterCrop((height, width))])
        self.mean, self.std = mean, std
        self.order = []

    def __len__(self):
        return len(self.paths)

    def load(self, path):
        with Image.open(path) as image:
            tensor = TF.pil_to_tensor(image.convert("RGB"))
        tensor = TF.to_dtype(self.transform(tensor), torch.float32, scale=True)
        return (tensor - self.mean[0]) / self.std[0]

    def next_batch(self, count):
        images = []
        while len(images) < count:
            if not self.order:
                self.order = torch.randperm(len(self.paths)).tolist()
            images.append(self.load(self.paths[self.order.pop()]))
        return torch.stack(images)
