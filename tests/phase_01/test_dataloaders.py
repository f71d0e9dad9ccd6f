# tests/phase_01/test_dataloaders.py
import shutil

import pytest
import torch
from torch.utils.data import Dataset

from anomaly_detection.config import CONFIG_DIR_ENV
from anomaly_detection.data import MVTecDataset, create_dataloader, get_test_transforms, split_train_val
from anomaly_detection.utils import PROJECT_ROOT


class EmptyDataset(Dataset):
    def __len__(self):
        return 0

    def __getitem__(self, index):
        raise IndexError(index)


@pytest.fixture
def small_dataset(mvtec_tree):
    return MVTecDataset(mvtec_tree.root, mvtec_tree.category, "test", transform=get_test_transforms(image_size=32))


@pytest.fixture
def train_tree(tmp_path, tree_builders):
    return tree_builders.mvtec(tmp_path / "many", n_train=20, n_good=2, defects={"broken": 1}, hw=(16, 16),
                               box=(4, 8, 4, 8))


def test_batches_are_collated_in_order(small_dataset):
    loader = create_dataloader(small_dataset, batch_size=2, shuffle=False)
    batches = list(loader)
    assert len(batches) == (len(small_dataset) + 1) // 2
    first = batches[0]
    assert first["image"].shape == (2, 3, 32, 32) and first["mask"].shape == (2, 1, 32, 32)
    assert first["label"].dtype == torch.int64
    assert isinstance(first["image_path"], list) and isinstance(first["image_path"][0], str)
    seen = [path for batch in batches for path in batch["image_path"]]
    assert seen == [str(s["image_path"]) for s in small_dataset.samples]
    labels = torch.cat([batch["label"] for batch in batches]).tolist()
    assert labels == small_dataset.labels


def test_seeded_shuffle_is_reproducible(small_dataset):
    def order(seed):
        loader = create_dataloader(small_dataset, batch_size=2, shuffle=True, seed=seed)
        return [path for batch in loader for path in batch["image_path"]]

    first, again = order(5), order(5)
    assert first == again
    assert sorted(first) == sorted(str(s["image_path"]) for s in small_dataset.samples)
    assert len({tuple(order(seed)) for seed in range(6)}) > 1


def test_worker_processes_give_the_same_batches(small_dataset):
    plain = list(create_dataloader(small_dataset, batch_size=3, num_workers=0))
    parallel = list(create_dataloader(small_dataset, batch_size=3, num_workers=2))
    assert len(plain) == len(parallel)
    for left, right in zip(plain, parallel):
        assert left["image_path"] == right["image_path"]
        assert torch.equal(left["image"], right["image"]) and torch.equal(left["mask"], right["mask"])


def test_drop_last_keeps_a_lone_short_batch(small_dataset):
    count = len(small_dataset)
    assert len(create_dataloader(small_dataset, batch_size=2, drop_last=True)) == count // 2
    assert len(create_dataloader(small_dataset, batch_size=count + 3, drop_last=True)) == 1


def test_bad_loader_arguments():
    with pytest.raises(ValueError, match="empty"):
        create_dataloader(EmptyDataset(), batch_size=2)


def test_zero_batch_size_is_rejected(small_dataset):
    with pytest.raises(ValueError, match="batch_size"):
        create_dataloader(small_dataset, batch_size=0)


def test_split_train_val_is_deterministic_and_disjoint(train_tree):
    dataset = MVTecDataset(train_tree.root, train_tree.category, "train")
    train, val = split_train_val(dataset, val_fraction=0.25, seed=7)
    assert len(val) == round(len(dataset) * 0.25) and len(train) + len(val) == len(dataset)
    assert not set(train.indices) & set(val.indices)
    assert sorted(train.indices + val.indices) == list(range(len(dataset)))
    train_again, val_again = split_train_val(dataset, val_fraction=0.25, seed=7)
    assert train_again.indices == train.indices and val_again.indices == val.indices
    others = {tuple(split_train_val(dataset, val_fraction=0.25, seed=seed)[1].indices) for seed in range(6)}
    assert len(others) > 1
    assert all(val[i]["label"] == 0 for i in range(len(val)))


def test_split_train_val_edge_fractions(train_tree):
    dataset = MVTecDataset(train_tree.root, train_tree.category, "train")
    train, val = split_train_val(dataset, val_fraction=0.0)
    assert val is None and len(train) == len(dataset)
    train, val = split_train_val(dataset, val_fraction=0.001)
    assert len(val) == 1 and len(train) == len(dataset) - 1
    with pytest.raises(ValueError, match="val_fraction"):
        split_train_val(dataset, val_fraction=1.0)
    with pytest.raises(ValueError, match="no training images"):
        split_train_val(dataset, val_fraction=0.99)


def test_split_train_val_refuses_defective_images(train_tree):
    test = MVTecDataset(train_tree.root, train_tree.category, "test")
    with pytest.raises(ValueError, match="test split"):
        split_train_val(test, val_fraction=0.2)


def test_seed_custom_dataset_snippet_runs(tmp_path, tree_builders, monkeypatch):
    tree_builders.mvtec(tmp_path / "datasets" / "mvtec", category="bottle", n_train=34, n_good=1,
                        defects={}, hw=(32, 32))
    config_dir = tmp_path / "configs"
    shutil.copytree(PROJECT_ROOT / "configs", config_dir)
    paths = config_dir / "paths.yaml"
    lines = paths.read_text().splitlines()
    lines = [f"dataset_root: {tmp_path / 'datasets'}" if line.startswith("dataset_root:") else line
             for line in lines]
    paths.write_text("\n".join(lines) + "\n")
    monkeypatch.setenv(CONFIG_DIR_ENV, str(config_dir))
    monkeypatch.chdir(tmp_path)

    # the seed's "custom dataset" example, unchanged up to the DataLoader
    from anomaly_detection.config import load_experiment_config
    from anomaly_detection.data import MVTecDataset, create_dataloader, get_train_transforms
    config = load_experiment_config("stfpm", "mvtec")
    transform = get_train_transforms(image_size=256)
    train_dataset = MVTecDataset(
        root_dir=config["mvtec_dir"],
        category="bottle",
        split="train",
        transform=transform
    )
    train_loader = create_dataloader(train_dataset, batch_size=32, shuffle=True)

    assert config["mvtec_dir"] == str(tmp_path / "datasets" / "mvtec")
    batches = list(train_loader)
    assert [len(batch["label"]) for batch in batches] == [32, 2]
    assert batches[0]["image"].shape == (32, 3, 256, 256)
    assert batches[0]["mask"].shape == (32, 1, 256, 256) and batches[0]["mask"].sum() == 0
    seen = sorted(path for batch in batches for path in batch["image_path"])
    assert seen == sorted(str(s["image_path"]) for s in train_dataset.samples)
