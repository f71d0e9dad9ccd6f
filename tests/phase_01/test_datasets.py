# tests/phase_01/test_datasets.py
import logging
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from anomaly_detection.data import (
    BTAD_CATEGORIES, DATASETS, MVTEC_CATEGORIES, VISA_CATEGORIES, BTADDataset, DatasetError, FolderDataset,
    ImageReadError, MVTecDataset, ViSADataset, VisADataset, build_dataset, get_dataset_class,
)

ITEM_KEYS = {"image", "mask", "label", "image_path", "mask_path", "defect_type", "category"}
LAYOUTS = ["mvtec", "visa_released", "visa_mvtec", "btad", "folder"]


@pytest.fixture(params=LAYOUTS)
def layout(request):
    name = request.param
    if name == "mvtec":
        tree = request.getfixturevalue("mvtec_tree")
        return tree, MVTecDataset, {}
    if name == "visa_released":
        tree = request.getfixturevalue("visa_released_tree")
        return tree, VisADataset, {}
    if name == "visa_mvtec":
        tree = request.getfixturevalue("visa_mvtec_tree")
        return tree, VisADataset, {}
    if name == "btad":
        tree = request.getfixturevalue("btad_tree")
        return tree, BTADDataset, {}
    tree = request.getfixturevalue("folder_tree")
    return tree, FolderDataset, dict(tree.options)


def open_split(layout, split, transform=None):
    tree, cls, options = layout
    return cls(tree.root, tree.category, split, transform, **options)


def test_train_split_holds_only_normal_images(layout):
    tree = layout[0]
    dataset = open_split(layout, "train")
    assert len(dataset) == tree.n_train
    assert set(dataset.labels) == {0}
    assert {s["defect_type"] for s in dataset.samples} == {"good"}


def test_test_split_counts_per_defect_type(layout):
    tree = layout[0]
    dataset = open_split(layout, "test")
    assert len(dataset) == tree.n_test_good + tree.n_defect
    assert dataset.labels.count(0) == tree.n_test_good
    assert dataset.labels.count(1) == tree.n_defect
    per_type = {}
    for sample in dataset.samples:
        per_type[sample["defect_type"]] = per_type.get(sample["defect_type"], 0) + 1
    assert per_type == {"good": tree.n_test_good, **tree.defects}
    assert dataset.has_masks is True


def test_item_contract(layout):
    tree = layout[0]
    dataset = open_split(layout, "test")
    height, width = tree.hw
    for index in range(len(dataset)):
        item = dataset[index]
        assert set(item) == ITEM_KEYS
        assert item["image"].dtype == torch.float32 and item["image"].shape == (3, height, width)
        assert item["mask"].dtype == torch.float32 and item["mask"].shape == (1, height, width)
        assert set(item["mask"].unique().tolist()) <= {0.0, 1.0}
        assert isinstance(item["label"], int) and item["label"] in (0, 1)
        assert isinstance(item["image_path"], str) and item["image_path"]
        assert isinstance(item["mask_path"], str)
        assert item["category"] == tree.category
        if item["label"] == 0:
            assert item["defect_type"] == "good"
            assert item["mask_path"] == ""
            assert item["mask"].sum() == 0
        else:
            assert item["defect_type"] != "good"
            assert item["mask_path"].endswith(".png")


def test_defect_mask_lands_on_the_drawn_box(layout):
    tree = layout[0]
    dataset = open_split(layout, "test")
    top, bottom, left, right = tree.box
    expected = torch.zeros(tree.hw)
    expected[top:bottom, left:right] = 1
    defective = [i for i, label in enumerate(dataset.labels) if label == 1]
    assert defective
    for index in defective:
        item = dataset[index]
        assert torch.equal(item["mask"][0], expected)
        # the image carries the defect as a white square at the same place
        assert item["image"][:, top:bottom, left:right].min() > 0.9


def test_ordering_is_deterministic_and_sorted(layout):
    first = [s["image_path"] for s in open_split(layout, "test").samples]
    second = [s["image_path"] for s in open_split(layout, "test").samples]
    assert first == second
    normals = [p for p, s in zip(first, open_split(layout, "test").samples) if s["label"] == 0]
    assert normals == sorted(normals)


def test_png_pixels_are_scaled_to_unit_range(mvtec_tree):
    dataset = MVTecDataset(mvtec_tree.root, mvtec_tree.category, "train")
    item = dataset[0]
    raw = np.asarray(Image.open(item["image_path"]).convert("RGB"), dtype=np.float32) / 255.0
    assert torch.allclose(item["image"], torch.from_numpy(raw.transpose(2, 0, 1)))


def _single_image_tree(tmp_path, tree_builders, array, mode=None, palette=None):
    tree = tree_builders.mvtec(tmp_path / "modes", n_train=1, n_good=1, defects={})
    path = tree.folder / "train" / "good" / "000.png"
    image = Image.fromarray(array) if mode is None else Image.fromarray(array, mode=mode)
    if palette is not None:
        image.putpalette(palette)
    image.save(path)
    return MVTecDataset(tree.root, tree.category, "train")[0]


def test_greyscale_image_becomes_three_equal_channels(tmp_path, tree_builders):
    array = np.arange(40 * 48, dtype=np.uint32).reshape(40, 48).__mod__(256).astype(np.uint8)
    item = _single_image_tree(tmp_path, tree_builders, array)
    assert item["image"].shape == (3, 40, 48)
    expected = torch.from_numpy(array.astype(np.float32) / 255.0)
    for channel in range(3):
        assert torch.allclose(item["image"][channel], expected)


def test_palette_image_uses_palette_colours(tmp_path, tree_builders):
    array = np.zeros((40, 48), dtype=np.uint8)
    array[:, 24:] = 1
    palette = [0, 0, 0, 255, 128, 0] + [0] * (256 * 3 - 6)
    item = _single_image_tree(tmp_path, tree_builders, array, mode="P", palette=palette)
    assert item["image"].shape == (3, 40, 48)
    right = item["image"][:, :, 24:]
    assert torch.allclose(right[0], torch.ones_like(right[0]))
    assert torch.allclose(right[1], torch.full_like(right[1], 128 / 255))
    assert item["image"][:, :, :24].abs().sum() == 0


def test_rgba_image_drops_alpha(tmp_path, tree_builders):
    array = np.zeros((40, 48, 4), dtype=np.uint8)
    array[..., 0] = 200
    array[..., 3] = 10
    item = _single_image_tree(tmp_path, tree_builders, array)
    assert item["image"].shape == (3, 40, 48)
    assert torch.allclose(item["image"][0], torch.full((40, 48), 200 / 255))
    assert item["image"][1:].abs().sum() == 0


def test_sixteen_bit_image_keeps_its_range(tmp_path, tree_builders):
    array = np.zeros((40, 48), dtype=np.uint16)
    array[:, 12:24] = 1000
    array[:, 24:36] = 32768
    array[:, 36:] = 65535
    path = tmp_path / "probe16.png"
    Image.fromarray(array).save(path)
    assert Image.open(path).mode.startswith("I")
    item = _single_image_tree(tmp_path, tree_builders, array)
    assert item["image"].shape == (3, 40, 48)
    assert item["image"].max() == pytest.approx(1.0)
    assert item["image"][0, 0, 30] == pytest.approx(32768 / 65535, abs=1e-4)
    # 1000/65535 would read as ~1.0 if 16-bit values were clipped to 8 bits
    assert item["image"][0, 0, 15] == pytest.approx(1000 / 65535, abs=1e-4)


@pytest.mark.parametrize("kind", ["0_255", "0_1", "palette", "rgb"])
def test_mask_encodings_become_binary(tmp_path, tree_builders, kind):
    tree = tree_builders.mvtec(tmp_path / "masks", n_train=1, n_good=0, defects={"broken": 1})
    path = tree.folder / "ground_truth" / "broken" / "000_mask.png"
    array = tree_builders.box_mask(tree.hw, tree.box, value=1 if kind in ("0_1", "palette") else 255)
    if kind == "palette":
        image = Image.fromarray(array, mode="P")
        image.putpalette([0, 0, 0, 255, 0, 0] + [0] * (256 * 3 - 6))
    elif kind == "rgb":
        image = Image.fromarray(np.repeat(array[..., None], 3, axis=2))
    else:
        image = Image.fromarray(array)
    image.save(path)
    mask = MVTecDataset(tree.root, tree.category, "test")[0]["mask"]
    top, bottom, left, right = tree.box
    assert set(mask.unique().tolist()) == {0.0, 1.0}
    assert mask.sum() == (bottom - top) * (right - left)
    assert mask[0, top:bottom, left:right].min() == 1


def test_label_only_category_logs_once(tmp_path, tree_builders, caplog):
    tree = tree_builders.mvtec(tmp_path / "nomasks", masks=False)
    with caplog.at_level(logging.WARNING, logger="anomaly_detection"):
        first = MVTecDataset(tree.root, tree.category, "test")
        second = MVTecDataset(tree.root, tree.category, "test")
    assert first.has_masks is False and second.has_masks is False
    warnings = [r for r in caplog.records if "label-only" in r.getMessage()]
    assert len(warnings) == 1
    assert str(tree.folder / "ground_truth") in warnings[0].getMessage()
    defective = [i for i, label in enumerate(first.labels) if label == 1]
    item = first[defective[0]]
    assert item["mask_path"] == "" and item["mask"].sum() == 0 and item["label"] == 1


def test_defect_without_mask_in_existing_mask_folder_is_named(tmp_path, tree_builders):
    tree = tree_builders.mvtec(tmp_path / "missing_mask")
    (tree.folder / "ground_truth" / "broken" / "001_mask.png").unlink()
    with pytest.raises(DatasetError, match="001.png"):
        MVTecDataset(tree.root, tree.category, "test")


def test_missing_defect_mask_folder_is_an_error(tmp_path, tree_builders):
    tree = tree_builders.mvtec(tmp_path / "missing_folder")
    shutil.rmtree(tree.folder / "ground_truth" / "scratch")
    with pytest.raises(DatasetError, match="scratch"):
        MVTecDataset(tree.root, tree.category, "test")


def test_mask_without_image_is_named(tmp_path, tree_builders):
    tree = tree_builders.mvtec(tmp_path / "orphan")
    tree_builders.write_mask(tree.folder / "ground_truth" / "broken" / "077_mask.png")
    with pytest.raises(DatasetError, match="077_mask.png"):
        MVTecDataset(tree.root, tree.category, "test")


def test_mask_size_mismatch_names_both_files(tmp_path, tree_builders):
    tree = tree_builders.mvtec(tmp_path / "mismatch")
    tree_builders.write_mask(tree.folder / "ground_truth" / "scratch" / "000_mask.png", hw=(20, 24),
                             box=(2, 6, 2, 6))
    image_path = tree.folder / "test" / "scratch" / "000.png"
    # found by the header check when the dataset is built, before any training
    with pytest.raises(DatasetError, match="000_mask.png") as info:
        MVTecDataset(tree.root, tree.category, "test")
    assert str(image_path) in str(info.value) and "24x20" in str(info.value) and "48x40" in str(info.value)
    # and still when an item is read with the check skipped
    dataset = MVTecDataset(tree.root, tree.category, "test", check_files=False)
    index = next(i for i, s in enumerate(dataset.samples) if s["defect_type"] == "scratch")
    with pytest.raises(DatasetError, match="000_mask.png") as info:
        dataset[index]
    assert str(image_path) in str(info.value)


def test_missing_root_names_the_path(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        MVTecDataset(missing, "bottle", "train")


def test_missing_category_lists_the_categories_found(tmp_path, tree_builders):
    root = tmp_path / "cats"
    tree_builders.mvtec(root, category="bottle", n_train=1, n_good=1, defects={})
    tree_builders.mvtec(root, category="cable", n_train=1, n_good=1, defects={})
    with pytest.raises(FileNotFoundError) as info:
        MVTecDataset(root, "zipper", "train")
    message = str(info.value)
    assert "zipper" in message and "bottle" in message and "cable" in message


def test_empty_split_is_an_error(tmp_path, tree_builders):
    tree = tree_builders.mvtec(tmp_path / "empty", n_train=0)
    (tree.folder / "train" / "good").mkdir(parents=True)
    with pytest.raises(DatasetError, match="train"):
        MVTecDataset(tree.root, tree.category, "train")


def test_missing_split_folder_is_an_error(tmp_path, tree_builders):
    tree = tree_builders.mvtec(tmp_path / "nosplit")
    shutil.rmtree(tree.folder / "train")
    with pytest.raises(FileNotFoundError, match="train"):
        MVTecDataset(tree.root, tree.category, "train")


def test_unknown_split_is_rejected(mvtec_tree):
    with pytest.raises(DatasetError, match="validation"):
        MVTecDataset(mvtec_tree.root, mvtec_tree.category, "validation")


def _break_first_train_image(tree, content):
    path = tree.folder / "train" / "good" / "000.png"
    path.write_bytes(content(path.read_bytes()))
    return path


@pytest.mark.parametrize("kind", ["zero_bytes", "not_an_image", "truncated"])
def test_bad_image_file_is_named(mvtec_tree, kind):
    content = {
        "zero_bytes": lambda data: b"",
        "not_an_image": lambda data: b"this is not a png file\n" * 10,
        "truncated": lambda data: data[: len(data) // 2],
    }[kind]
    path = _break_first_train_image(mvtec_tree, content)
    # found when the dataset is built (a truncated PNG fails its chunk check)...
    with pytest.raises(ImageReadError, match=str(path)):
        MVTecDataset(mvtec_tree.root, mvtec_tree.category, "train")
    # ...and, with the check skipped, when the item is read
    dataset = MVTecDataset(mvtec_tree.root, mvtec_tree.category, "train", check_files=False)
    with pytest.raises(ImageReadError, match=str(path)):
        dataset[0]
    # the other images still load
    assert dataset[1]["image"].shape[0] == 3


def test_categories_and_aliases():
    assert MVTecDataset.categories() == list(MVTEC_CATEGORIES)
    assert "bottle" in MVTecDataset.categories() and len(MVTecDataset.categories()) == 15
    assert VisADataset.categories() == list(VISA_CATEGORIES) and len(VISA_CATEGORIES) == 12
    assert BTADDataset.categories() == list(BTAD_CATEGORIES) == ["01", "02", "03"]
    assert ViSADataset is VisADataset
    assert DATASETS == {"mvtec": MVTecDataset, "visa": VisADataset, "btad": BTADDataset, "folder": FolderDataset}
    assert get_dataset_class("btad") is BTADDataset
    with pytest.raises(DatasetError, match="mvtec"):
        get_dataset_class("kolektor")


def test_visa_released_filters_category_and_split(visa_released_tree):
    tree = visa_released_tree
    for category in tree.categories:
        dataset = VisADataset(tree.root, category, "test")
        assert all(f"/{category}/" in str(s["image_path"]) for s in dataset.samples)
        assert all(s["defect_type"] == "anomaly" for s in dataset.samples if s["label"] == 1)
    train = VisADataset(tree.root, "capsules", "train", layout="released")
    assert len(train) == tree.n_train


def test_visa_released_csv_errors(tmp_path, tree_builders):
    tree = tree_builders.visa_released(tmp_path / "visa")
    text = tree.csv_path.read_text()
    mask_file = next(p for p in sorted((tree.root / "candle" / "Data" / "Masks" / "Anomaly").iterdir()))
    mask_file.unlink()
    with pytest.raises(DatasetError, match=mask_file.stem + ".JPG"):
        VisADataset(tree.root, "candle", "test")
    tree.csv_path.write_text(text + "candle,train,normal,candle/Data/Images/Normal/9999.JPG,\n")
    with pytest.raises(DatasetError, match="9999.JPG"):
        VisADataset(tree.root, "candle", "train")
    tree.csv_path.unlink()
    with pytest.raises(FileNotFoundError, match="1cls.csv"):
        VisADataset(tree.root, "candle", "train")


def test_visa_layout_is_detected_and_checked(visa_mvtec_tree, visa_released_tree):
    converted = VisADataset(visa_mvtec_tree.root, "candle", "test")
    released = VisADataset(visa_released_tree.root, "candle", "test")
    assert converted.resolved_layout() == "mvtec"
    assert released.resolved_layout() == "released"
    with pytest.raises(DatasetError, match="layout"):
        VisADataset(visa_mvtec_tree.root, "candle", "test", layout="zip")


def test_folder_split_is_deterministic_and_disjoint(folder_tree):
    tree = folder_tree
    train = FolderDataset(tree.root, tree.category, "train", **tree.options)
    test = FolderDataset(tree.root, tree.category, "test", **tree.options)
    train_paths = {s["image_path"] for s in train.samples}
    test_normal = {s["image_path"] for s in test.samples if s["label"] == 0}
    assert not train_paths & test_normal
    assert len(train_paths | test_normal) == tree.n_normal
    again = FolderDataset(tree.root, tree.category, "test", **tree.options)
    assert [s["image_path"] for s in again.samples] == [s["image_path"] for s in test.samples]
    reseeded = [FolderDataset(tree.root, tree.category, "train", **{**tree.options, "split_seed": seed})
                for seed in range(8)]
    assert len({tuple(s["image_path"] for s in d.samples) for d in reseeded}) > 1


def test_folder_explicit_normal_test_dir_and_label_only(tmp_path, tree_builders):
    tree = tree_builders.folder(tmp_path / "folder")
    tree_builders.write_image(tree.folder / "good_test" / "t0.png", tree_builders.noise_rgb(tree.hw, 7))
    options = dict(tree.options, normal_test_dir="good_test", mask_dirs=None)
    train = FolderDataset(tree.root, tree.category, "train", **options)
    test = FolderDataset(tree.root, tree.category, "test", **options)
    assert len(train) == tree.n_normal
    assert test.labels.count(0) == 1 and test.labels.count(1) == tree.n_defect
    assert test.has_masks is False
    assert all(s["mask_path"] == "" for s in test.samples)


def test_folder_rejects_bad_options(folder_tree):
    tree = folder_tree
    with pytest.raises(DatasetError, match="mask_dirs"):
        FolderDataset(tree.root, tree.category, "test", **dict(tree.options, mask_dirs=["masks_a"]))
    with pytest.raises(DatasetError, match="test_ratio"):
        FolderDataset(tree.root, tree.category, "test", **dict(tree.options, test_ratio=1.0))
    with pytest.raises(FileNotFoundError, match="defect_c"):
        FolderDataset(tree.root, tree.category, "test", **dict(tree.options, abnormal_dirs=["defect_a", "defect_c"]))


def test_build_dataset_from_config_section(folder_tree, mvtec_tree):
    section = {"name": "folder", "root_dir": str(folder_tree.root), "category": folder_tree.category,
               **folder_tree.options}
    dataset = build_dataset(section, "test")
    assert isinstance(dataset, FolderDataset) and len(dataset) == folder_tree.n_test_good + folder_tree.n_defect
    section = {"name": "mvtec", "root_dir": str(mvtec_tree.root), "category": "other", "synthetic": {"seed": 0}}
    dataset = build_dataset(section, "train", category=mvtec_tree.category)
    assert isinstance(dataset, MVTecDataset) and dataset.category == mvtec_tree.category
