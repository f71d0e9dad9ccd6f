# src/anomaly_detection/data/dataloaders.py
import torch
from torch.utils.data import DataLoader, Subset


def create_dataloader(dataset, batch_size=32, shuffle=False, num_workers=0, drop_last=False, seed=None,
                      pin_memory=None, persistent_workers=None, sampler=None):
    if len(dataset) == 0:
        raise ValueError("create_dataloader: the dataset is empty")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    generator = None
    if seed is not None:
        generator = torch.Generator()
        generator.manual_seed(int(seed))
    if pin_memory is None:
        pin_memory = torch.cuda.is_available()
    if persistent_workers is None:
        persistent_workers = num_workers > 0
    # a sampler (one process's share under torchrun) does its own shuffling
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle and sampler is None, sampler=sampler,
                      num_workers=num_workers,
                      drop_last=drop_last and len(dataset) > batch_size, generator=generator,
                      pin_memory=pin_memory, persistent_workers=persistent_workers)


def split_train_val(dataset, val_fraction=0.1, seed=0, min_val=1):
    labels = getattr(dataset, "labels", None)
    if labels is not None and any(label != 0 for label in labels):
        raise ValueError("split_train_val takes a training split of normal images only; "
                         "validation data is never carved out of the test split")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    count = len(dataset)
    n_val = 0 if val_fraction == 0 else max(min_val, int(round(count * val_fraction)))
    if n_val >= count:
        raise ValueError(f"val_fraction={val_fraction} leaves no training images out of {count}")
    generator = torch.Generator()
    generator.manual_seed(int(seed))
    order = torch.randperm(count, generator=generator).tolist()
    val_ids = sorted(order[:n_val])
    train_ids = sorted(order[n_val:])
    return Subset(dataset, train_ids), (Subset(dataset, val_ids) if n_val else None)
