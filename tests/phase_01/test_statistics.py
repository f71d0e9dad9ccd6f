# tests/phase_01/test_statistics.py
import pytest

from anomaly_detection.data import FolderDataset, MVTecDataset
from anomaly_detection.data.statistics import dataset_statistics, format_statistics


@pytest.fixture
def varied_tree(tmp_path, tree_builders):
    tree = tree_builders.mvtec(tmp_path / "stats")
    # one wider train image, and one defect whose mask is empty
    tree_builders.write_image(tree.folder / "train" / "good" / "999.png", tree_builders.noise_rgb((40, 96), 1))
    tree_builders.write_mask(tree.folder / "ground_truth" / "scratch" / "000_mask.png", box=(0, 0, 0, 0))
    return tree


def test_counts_sizes_and_mask_area(varied_tree):
    tree = varied_tree
    stats = dataset_statistics(MVTecDataset, tree.root, tree.category)
    assert stats["category"] == tree.category and stats["dataset"] == MVTecDataset.dataset_name
    train, test = stats["train"], stats["test"]
    assert train["images"] == tree.n_train + 1 and train["per_defect_type"] == {"good": tree.n_train + 1}
    assert test["per_defect_type"] == {"good": tree.n_test_good, **tree.defects}
    assert test["good"] == tree.n_test_good and test["defective"] == tree.n_defect
    height, width = tree.hw
    assert train["width"]["min"] == width and train["width"]["max"] == 96
    assert train["height"]["min"] == train["height"]["max"] == height
    assert train["distinct_sizes"] == 2 and test["distinct_sizes"] == 1
    assert train["most_common_sizes"][f"{width}x{height}"] == tree.n_train
    top, bottom, left, right = tree.box
    box_fraction = (bottom - top) * (right - left) / (height * width)
    area = test["mask_area_fraction"]
    assert area["count"] == tree.n_defect
    assert area["max"] == pytest.approx(box_fraction) and area["min"] == 0.0
    assert len(test["empty_masks"]) == 1 and test["empty_masks"][0].endswith("scratch/000.png")
    assert train["mask_area_fraction"] == {"count": 0}
    assert test["has_masks"] is True


def test_format_statistics_reports_the_figures(varied_tree):
    tree = varied_tree
    stats = dataset_statistics(MVTecDataset, tree.root, tree.category)
    text = format_statistics(stats)
    assert tree.category in text and str(tree.root) in text
    for defect, count in tree.defects.items():
        assert any(defect in line and line.split()[-1] == str(count) for line in text.splitlines())
    assert "1 empty" in text
    assert "96" in text


def test_statistics_of_a_label_only_folder_dataset(tmp_path, tree_builders):
    tree = tree_builders.folder(tmp_path / "folder")
    options = dict(tree.options, mask_dirs=None)
    stats = dataset_statistics(FolderDataset, tree.root, tree.category, **options)
    assert stats["test"]["has_masks"] is False
    assert stats["test"]["mask_area_fraction"]["count"] == 0
    assert stats["train"]["images"] + stats["test"]["good"] == tree.n_normal
    assert "label-only" in format_statistics(stats)
