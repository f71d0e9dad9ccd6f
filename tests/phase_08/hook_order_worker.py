# tests/phase_08/hook_order_worker.py
# Run by test_distributed.py, under torchrun or alone: a tiny regression trainer whose every hook records its
# name (and epoch or batch index); each process writes its record to <output>/hooks_rank<r>.json. The model has
# a trainable part, so under torchrun it trains inside DistributedDataParallel.
import gc
import json
import sys
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler

from anomaly_detection import distributed
from anomaly_detection.trainer import BaseTrainer


class Images(Dataset):
    def __init__(self, count, seed):
        self.images = torch.rand(count, 3, 8, 8, generator=torch.Generator().manual_seed(seed))

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        return {"image": self.images[index]}


class Brightness(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.head = nn.Linear(4, 1)

    def forward(self, images):
        return self.head(self.conv(images).mean(dim=(2, 3))).squeeze(1)


def recorded(name):
    def hook(self, *args):
        if name in ("configure_optimizers", "on_fit_start", "on_fit_end"):
            self.calls.append([name])
        else:
            # epoch hooks take the epoch first, batch hooks and steps the batch index second
            self.calls.append([name, args[1] if "batch" in name or name.endswith("_step") else args[0]])
        return getattr(super(RecordingTrainer, self), name)(*args)
    return hook


class RecordingTrainer(BaseTrainer):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls = []
        self.trained_inside = None

    def training_step(self, batch, batch_idx):
        self.calls.append(["training_step", batch_idx])
        self.trained_inside = type(self.model.conv).__name__
        images = batch["image"].to(self.device)
        return {"loss": nn.functional.mse_loss(self.model(images), images.mean(dim=(1, 2, 3)))}

    def validation_step(self, batch, batch_idx):
        self.calls.append(["validation_step", batch_idx])
        images = batch["image"].to(self.device)
        return {"loss": nn.functional.mse_loss(self.model(images), images.mean(dim=(1, 2, 3)))}


for hook_name in ("configure_optimizers", "on_fit_start", "on_fit_end", "on_train_epoch_start", "on_train_epoch_end",
                  "on_validation_epoch_start", "on_validation_epoch_end", "on_train_batch_start",
                  "on_train_batch_end", "on_validation_batch_start", "on_validation_batch_end"):
    setattr(RecordingTrainer, hook_name, recorded(hook_name))


def main(output):
    distributed.init_distributed()
    train_set, val_set = Images(8, seed=0), Images(4, seed=1)
    sampler = DistributedSampler(train_set, shuffle=True, seed=0) if distributed.active() else None
    train = DataLoader(train_set, batch_size=2, sampler=sampler, shuffle=sampler is None)
    val = DataLoader(val_set, batch_size=2, sampler=distributed.ShardSampler(val_set, 2) if distributed.active()
                     else None)
    torch.manual_seed(0)
    trainer = RecordingTrainer(Brightness(), device="cpu", seed=0, progress_bar=False)
    trainer.fit(train, val, num_epochs=2)
    Path(output, f"hooks_rank{distributed.rank()}.json").write_text(json.dumps(
        {"calls": trainer.calls, "world_size": distributed.world_size(), "train_batches": len(train),
         "val_batches": len(val), "trained_inside": trainer.trained_inside,
         "after_fit": type(trainer.model.conv).__name__,
         # the wrappers fit made, if still in memory, hold the process group into interpreter shutdown
         "wrappers_alive_after_fit": sum(isinstance(item, DistributedDataParallel) for item in gc.get_objects())}))
    distributed.shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
