# tests/phase_04/conftest.py
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from anomaly_detection.data import build_dataset, create_dataloader, get_test_transforms
from anomaly_detection.data.synthetic import generate_synthetic_category

IMAGE_SIZE = 64


@pytest.fixture(scope="session")
def texture(tmp_path_factory):
    # texture kind, seed 0, 8 training images: every defect scores above every good image with a
    # random-init resnet18 for both methods (checked for seeds 0-2; the object kind is not reliable)
    root = tmp_path_factory.mktemp("phase04_data")
    generate_synthetic_category(root, category="texture", kind="texture", image_size=IMAGE_SIZE, num_train=8,
                                num_test_good=4, num_test_defect=2, seed=0)
    transform = get_test_transforms(image_size=IMAGE_SIZE, normalization="imagenet")
    options = {"name": "mvtec", "root_dir": str(root)}
    train = build_dataset(options, "train", transform, category="texture")
    test = build_dataset(options, "test", transform, category="texture")
    test_batch = next(iter(create_dataloader(test, len(test))))
    return SimpleNamespace(root=Path(root), train=train, test=test, test_batch=test_batch,
                           train_loader=lambda batch_size=4: create_dataloader(train, batch_size))


@pytest.fixture(scope="session")
def fit_model():
    return fit


@pytest.fixture(scope="session")
def cli_overrides(separation):
    return lambda root, model: separation.overrides(root, num_train=8, num_test_good=3, num_test_defect=1)


def fit(model, loader):
    model.begin_fit()
    for batch in loader:
        model.accumulate(batch["image"])
    model.finalize_fit()
    return model.eval()
