# src/anomaly_detection/data/__init__.py
from anomaly_detection.data.dataloaders import create_dataloader, split_train_val
from anomaly_detection.data.datasets import (
    BTAD_CATEGORIES, DATASETS, MVTEC_CATEGORIES, VISA_CATEGORIES, AnomalyDataset, BTADDataset, DatasetError,
    FolderDataset, ImageReadError, MVTecDataset, VisADataset, ViSADataset, build_dataset, check_dataset_files,
    get_dataset_class,
)
from anomaly_detection.data.transforms import get_test_transforms, get_train_transforms

__all__ = [
    "AnomalyDataset", "BTADDataset", "BTAD_CATEGORIES", "DATASETS", "DatasetError", "FolderDataset",
    "ImageReadError", "MVTEC_CATEGORIES", "MVTecDataset", "VISA_CATEGORIES", "ViSADataset", "VisADataset",
    "build_dataset", "check_dataset_files", "create_dataloader", "get_dataset_class", "get_test_transforms",
    "get_train_transforms", "split_train_val",
]
