# tests/phase_03/conftest.py
import contextlib
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torchvision


@contextlib.contextmanager
def single_thread():
    # on the shared 2-core test machine a second intra-op thread mostly waits for a busy core
    # (one STFPM step took 40x longer with 2 threads than with 1 under load)
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def tiny_overrides(root, image_size=64, num_train=12, num_test_good=4, num_test_defect=2, epochs=1):
    root = Path(root)
    return [f"demo_dir={root / 'data'}", f"results_dir={root / 'results'}",
            f"checkpoint_dir={root / 'checkpoints'}", f"log_dir={root / 'logs'}",
            f"data.image_size={image_size}", f"dataset.synthetic.image_size={image_size}",
            f"dataset.synthetic.num_train={num_train}", f"dataset.synthetic.num_test_good={num_test_good}",
            f"dataset.synthetic.num_test_defect={num_test_defect}", f"training.num_epochs={epochs}",
            "training.batch_size=4", "data.eval_batch_size=8", "model.pretrained=false",
            "model.backbone=resnet18", "training.progress_bar=false", "evaluation.max_panels=3",
            "data.val_fraction=0.25"]


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    from anomaly_detection.runner import build_config, output_dirs, train_and_evaluate

    root = tmp_path_factory.mktemp("tiny_run")
    overrides = tiny_overrides(root, epochs=2)
    config = build_config("stfpm", "demo", overrides)
    with single_thread():
        summary = train_and_evaluate(config)
    dirs = output_dirs(config, "demo")
    return SimpleNamespace(root=root, overrides=overrides, config=config, summary=summary, dirs=dirs,
                           data_root=root / "data", category="demo",
                           model_path=dirs["checkpoints"] / "model.pt")


@pytest.fixture(scope="session")
def random_backbone_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("backbones")
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), root / "resnet18.pth")
    return root


@pytest.fixture(scope="session")
def make_overrides():
    return tiny_overrides


@pytest.fixture(scope="session")
def one_thread():
    return single_thread
