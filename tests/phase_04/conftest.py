# tests/phase_04/conftest.py
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from anomaly_detection.data import build_dataset, create_dataloader, get_test_transforms
from anomaly_detection.data.synthetic import generate_synthetic_category

IMAGE_SIZE = 64


@pytest.fixture(autouse=True)
def one_torch_thread():
    # on the shared 2-core machine a second intra-op thread mostly waits for a busy core
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


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
def cli_overrides():
    return tiny_overrides


def fit(model, loader):
    model.begin_fit()
    for batch in loader:
        model.accumulate(batch["image"])
    model.finalize_fit()
    return model.eval()


def tiny_overrides(root, model):
    root = Path(root)
    return [f"demo_dir={root / 'data'}", f"results_dir={root / 'results'}", f"checkpoint_dir={root / 'checkpoints'}",
            f"log_dir={root / 'logs'}", f"data.image_size={IMAGE_SIZE}", f"dataset.synthetic.image_size={IMAGE_SIZE}",
            "dataset.synthetic.num_train=8", "dataset.synthetic.num_test_good=3",
            "dataset.synthetic.num_test_defect=1", "training.batch_size=4", "data.eval_batch_size=8",
            "model.pretrained=false", "model.backbone=resnet18", "training.progress_bar=false",
            "evaluation.figures=false", "data.val_fraction=0.25"]
