# tests/phase_02/conftest.py
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from anomaly_detection.trainer import BaseTrainer


class DictDataset(Dataset):
    def __init__(self, images, labels=None, masks=None, defect_types=None, has_masks=None):
        self.images = images
        self.labels = [0] * len(images) if labels is None else [int(v) for v in labels]
        self.masks = masks
        self.defect_types = defect_types or ["good" if v == 0 else "defect" for v in self.labels]
        if has_masks is not None:
            self.has_masks = has_masks

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        image = self.images[index]
        mask = self.masks[index] if self.masks is not None else torch.zeros((1,) + tuple(image.shape[-2:]))
        defect = self.defect_types[index]
        return {"image": image, "mask": mask, "label": self.labels[index],
                "image_path": f"/virtual/{defect}/{index:03d}.png",
                "mask_path": f"/virtual/ground_truth/{defect}/{index:03d}_mask.png"
                if self.masks is not None and self.labels[index] else "",
                "defect_type": defect, "category": "virtual"}


class TinyNet(nn.Module):
    def __init__(self, dropout=0.0):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(4, 1)

    def forward(self, images):
        hidden = torch.relu(self.conv(images)).mean(dim=(2, 3))
        return self.head(self.dropout(hidden)).squeeze(1)


class OtherNet(TinyNet):
    pass


class TinyClassifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.head = nn.Linear(4, 2)

    def forward(self, images):
        return self.head(torch.relu(self.conv(images)).mean(dim=(2, 3)))


class RegressionTrainer(BaseTrainer):
    # learns to predict the mean brightness of an image: a real, tiny regression problem
    def training_step(self, batch, batch_idx):
        images = batch["image"].to(self.device)
        prediction = self.model(images)
        return {"loss": torch.nn.functional.mse_loss(prediction, images.mean(dim=(1, 2, 3)))}

    def validation_step(self, batch, batch_idx):
        images = batch["image"].to(self.device)
        prediction = self.model(images)
        return {"loss": torch.nn.functional.mse_loss(prediction, images.mean(dim=(1, 2, 3)))}

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.model.parameters(), lr=0.5, momentum=0.9)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
        return {"optimizer": optimizer, "scheduler": scheduler}


class BrightnessModel(nn.Module):
    # anomaly map = mean brightness per pixel times a fixed factor: bright squares are the defects
    def __init__(self, scale=1.0):
        super().__init__()
        self.register_buffer("scale", torch.tensor(float(scale)))
        self.mean, self.std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)

    def forward(self, images):
        anomaly_map = images.mean(dim=1, keepdim=True) * self.scale
        return {"anomaly_map": anomaly_map, "pred_score": anomaly_map.flatten(1).amax(dim=1)}


def random_images(count, size=8, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.rand(3, size, size, generator=generator) for _ in range(count)]


def make_loader(count=4, batch_size=2, shuffle=False, size=8, seed=0, labels=None):
    dataset = DictDataset(random_images(count, size, seed), labels=labels)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle)


def defect_dataset(num_good=6, per_type=3, size=32, seed=0, masks=True, types=("scratch", "stain")):
    generator = torch.Generator().manual_seed(seed)
    images, labels, mask_list, defect_types = [], [], [], []
    for _ in range(num_good):
        images.append(torch.rand(3, size, size, generator=generator) * 0.5)
        labels.append(0)
        mask_list.append(torch.zeros(1, size, size))
        defect_types.append("good")
    for index, defect in enumerate(types):
        for number in range(per_type):
            image = torch.rand(3, size, size, generator=generator) * 0.5
            mask = torch.zeros(1, size, size)
            top = 4 + 3 * number + index
            mask[:, top:top + 8, top:top + 6] = 1.0
            image[:, mask[0] > 0] = 0.9 + 0.1 * torch.rand(int(mask.sum()), generator=generator)
            images.append(image)
            labels.append(1)
            mask_list.append(mask)
            defect_types.append(defect)
    return DictDataset(images, labels, mask_list if masks else None, defect_types, has_masks=masks)


@pytest.fixture
def tiny():
    return SimpleNamespace(DictDataset=DictDataset, TinyNet=TinyNet, OtherNet=OtherNet,
                           TinyClassifier=TinyClassifier, RegressionTrainer=RegressionTrainer,
                           BrightnessModel=BrightnessModel, random_images=random_images,
                           make_loader=make_loader, defect_dataset=defect_dataset)
