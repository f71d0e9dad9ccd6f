# tests/phase_01/test_real_data.py
import csv
from collections import Counter

import pytest
import torch

from anomaly_detection.data import MVTecDataset, get_test_transforms
from anomaly_detection.data.datasets import image_size, load_mask
from anomaly_detection.data.transforms import IMAGENET_MEAN, IMAGENET_STD

CATEGORY = "magnetic_tile"


@pytest.fixture
def tile_root(shared_data_dir):
    if not (shared_data_dir / CATEGORY).is_dir():
        pytest.skip(f"{shared_data_dir / CATEGORY} is absent")
    return shared_data_dir


@pytest.fixture
def index_rows(tile_root):
    with open(tile_root / CATEGORY / "index.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def test_train_split_has_714_normal_images(tile_root, index_rows):
    dataset = MVTecDataset(root_dir=tile_root, category=CATEGORY, split="train")
    assert len(dataset) == 714
    assert set(dataset.labels) == {0}
    assert len(dataset) == sum(1 for row in index_rows if row["split"] == "train")


def test_test_split_counts_and_masks_at_native_resolution(tile_root, index_rows):
    dataset = MVTecDataset(root_dir=tile_root, category=CATEGORY, split="test")
    assert len(dataset) == 630
    assert dataset.labels.count(0) == 238 and dataset.labels.count(1) == 392
    expected_types = Counter(row["image"].split("/")[1] for row in index_rows if row["split"] == "test")
    assert Counter(s["defect_type"] for s in dataset.samples) == expected_types
    mask_pixels = {row["image"]: int(row["mask_pixels"]) for row in index_rows
                   if row["split"] == "test" and row["mask_pixels"]}
    empty, empty_paths = [], set()
    for sample in dataset.samples:
        if sample["label"] == 0:
            assert sample["mask_path"] == ""
            continue
        mask = load_mask(sample["mask_path"]).numpy()
        assert mask.shape[-2:] == tuple(reversed(image_size(sample["image_path"])))
        relative = sample["image_path"].relative_to(tile_root / CATEGORY).as_posix()
        pixels = int(mask.sum())
        assert pixels == mask_pixels[relative]
        if pixels == 0:
            empty.append(sample["defect_type"])
            empty_paths.add(str(sample["image_path"]))
    assert empty == ["uneven"] * 4
    # decoding every image is the benchmark's job; every 15th item covers all defect types
    sizes = set()
    for index in range(0, len(dataset), 15):
        item = dataset[index]
        assert item["image"].shape[0] == 3 and item["mask"].shape[0] == 1
        assert item["image"].shape[-2:] == item["mask"].shape[-2:]
        assert bool(item["mask"].sum() > 0) == (item["label"] == 1 and item["image_path"] not in empty_paths)
        sizes.add(tuple(item["image"].shape[-2:]))
    assert len(sizes) > 10


def test_real_images_through_the_test_transform(tile_root):
    dataset = MVTecDataset(root_dir=tile_root, category=CATEGORY, split="test",
                           transform=get_test_transforms(image_size=64))
    index = dataset.labels.index(1)
    item = dataset[index]
    assert item["image"].shape == (3, 64, 64) and item["mask"].shape == (1, 64, 64)
    assert set(item["mask"].unique().tolist()) <= {0.0, 1.0} and item["mask"].sum() > 0
    # grey-scale source: the three channels carry the same intensities before normalisation
    restored = item["image"] * torch.tensor(IMAGENET_STD).view(3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    assert (restored[0] - restored[1]).abs().max() < 1e-4

