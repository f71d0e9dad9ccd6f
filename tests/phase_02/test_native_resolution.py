# tests/phase_02/test_native_resolution.py
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from torch import nn
from torch.utils.data import DataLoader, Subset

import anomaly_detection.evaluator as evaluator_module
from anomaly_detection.data import MVTecDataset, get_test_transforms
from anomaly_detection.data.datasets import image_size
from anomaly_detection.evaluator import Evaluator
from anomaly_detection.metrics import compute_aupro, compute_classification_metrics

INPUT_SIZE = 32
PIXEL_KEYS = ("pixel_auroc", "pixel_ap", "pixel_f1_max", "pixel_f1_threshold", "aupro")


class MaskLookupModel(nn.Module):
    # the perfect model at input size: the map of the i-th test image is its own mask as the transform
    # resized it (nearest), so whatever the input size loses, the model cannot see either
    def __init__(self, dataset):
        super().__init__()
        self.masks = [dataset[index]["mask"] for index in range(len(dataset))]
        self.seen = 0

    def forward(self, images):
        maps = torch.stack(self.masks[self.seen:self.seen + len(images)])
        self.seen += len(images)
        return {"anomaly_map": maps, "pred_score": maps.flatten(1).amax(dim=1)}


class BrightnessModel(nn.Module):
    def forward(self, images):
        anomaly_map = images.mean(dim=1, keepdim=True)
        return {"anomaly_map": anomaly_map, "pred_score": anomaly_map.flatten(1).amax(dim=1)}


def add_image(builders, folder, defect, name, hw, box=None, seed=0):
    builders.write_image(folder / "test" / defect / f"{name}.png", builders.noise_rgb(hw, seed))
    if box is not None:
        builders.write_mask(folder / "ground_truth" / defect / f"{name}_mask.png", hw, box)


def tile_dataset(root, center_crop=None):
    transform = get_test_transforms(image_size=INPUT_SIZE, center_crop=center_crop, normalization="imagenet")
    return MVTecDataset(root, "tile", "test", transform)


def evaluate(dataset, resolution, model=None, batch_size=2):
    model = model if model is not None else MaskLookupModel(dataset)
    evaluator = Evaluator(model, device="cpu", progress_bar=False, pixel_resolution=resolution)
    return evaluator.evaluate(DataLoader(dataset, batch_size=batch_size, shuffle=False))


@pytest.fixture
def two_sizes(tmp_path, tree_builders):
    # sizes are multiples of the input size and boxes sit on even rows and columns, so nearest
    # downsampling keeps every defect and the bilinear upsampling back stays perfectly separable
    folder = tmp_path / "tile"
    add_image(tree_builders, folder, "good", "000", (64, 64), seed=1)
    add_image(tree_builders, folder, "good", "001", (32, 64), seed=2)
    add_image(tree_builders, folder, "crack", "000", (64, 64), box=(16, 40, 8, 24), seed=3)
    add_image(tree_builders, folder, "crack", "001", (64, 32), box=(32, 48, 10, 20), seed=4)
    return tmp_path


def test_native_scores_every_image_at_its_own_size(two_sizes):
    dataset = tile_dataset(two_sizes)
    native = evaluate(dataset, "native")
    at_input = evaluate(dataset, "input")

    assert native["pixel_resolution"] == "native" and at_input["pixel_resolution"] == "input"
    assert native["num_pixels"] == 64 * 64 + 32 * 64 + 64 * 64 + 64 * 32
    assert at_input["num_pixels"] == 4 * INPUT_SIZE * INPUT_SIZE
    assert native["num_defect_pixels"] == 24 * 16 + 16 * 10
    assert at_input["num_defect_pixels"] == 12 * 8 + 8 * 10
    assert native["num_defect_regions"] == at_input["num_defect_regions"] == 2
    for metrics in (native, at_input):
        for key in ("pixel_auroc", "pixel_ap", "pixel_f1_max", "aupro", "image_auroc"):
            assert metrics[key] == pytest.approx(1.0), key
        assert metrics["notes"] == []


def test_native_predictions_hold_one_flat_array_with_offsets(two_sizes):
    dataset = tile_dataset(two_sizes)
    evaluator = Evaluator(MaskLookupModel(dataset), device="cpu", progress_bar=False)
    predictions = evaluator.predict(DataLoader(dataset, batch_size=3), keep_maps=False, pixel_resolution="native")
    native = predictions["native"]
    assert predictions["maps"] is None and predictions["masks"] is None
    shapes = [image_size(path)[::-1] for path in predictions["image_paths"]]
    assert native["shapes"] == shapes
    assert native["offsets"].tolist() == np.cumsum([0] + [h * w for h, w in shapes]).tolist()
    assert native["maps"].dtype == np.float32 and native["maps"].shape == (native["offsets"][-1],)
    assert native["masks"].dtype == bool and native["masks"].shape == native["maps"].shape


def test_a_one_pixel_defect_lost_at_input_size_is_counted_at_native_size(tmp_path, tree_builders, monkeypatch):
    folder = tmp_path / "tile"
    add_image(tree_builders, folder, "good", "000", (64, 64), seed=1)
    add_image(tree_builders, folder, "crack", "000", (64, 64), box=(16, 40, 8, 24), seed=2)
    # an odd row and column: nearest downsampling by 2 reads even ones only, so this defect vanishes
    add_image(tree_builders, folder, "crack", "001", (64, 64), box=(5, 6, 7, 8), seed=3)
    dataset = tile_dataset(tmp_path)
    assert dataset[2]["mask"].sum() == 0

    read = []
    load_mask = evaluator_module.load_mask
    monkeypatch.setattr(evaluator_module, "load_mask",
                        lambda path, *where: read.append(Path(path).name) or load_mask(path, *where))
    native = evaluate(dataset, "native")
    # the masks come from the dataset's own reader, each at its own size
    assert sorted(read) == ["000_mask.png", "001_mask.png"]
    at_input = evaluate(dataset, "input")

    assert at_input["num_defect_regions"] == 1 and native["num_defect_regions"] == 2
    assert at_input["num_defect_pixels"] == 12 * 8 and native["num_defect_pixels"] == 24 * 16 + 1
    # the input-size model never saw the pixel: perfect at input size, the region is missed at native size
    assert at_input["aupro"] == pytest.approx(1.0) and at_input["pixel_auroc"] == pytest.approx(1.0)
    assert native["aupro"] < 0.75 and native["pixel_auroc"] < 1.0


def test_input_resolution_gives_the_numbers_of_the_stacked_maps(tiny):
    dataset = tiny.defect_dataset(seed=4)
    for index in (1, 2):
        dataset.images[index][:, :2, :2] = 1.0
    loader = DataLoader(dataset, batch_size=4)
    default = Evaluator(tiny.BrightnessModel(), device="cpu", progress_bar=False).evaluate(loader)
    explicit = Evaluator(tiny.BrightnessModel(), device="cpu", progress_bar=False,
                         pixel_resolution="input").evaluate(loader)

    maps = torch.stack(dataset.images).mean(dim=1).numpy()
    masks = torch.stack(dataset.masks)[:, 0].numpy() > 0.5
    pixel = compute_classification_metrics(maps, masks, pixel_level=True)
    expected = {"pixel_auroc": pixel["auroc"], "pixel_ap": pixel["average_precision"],
                "pixel_f1_max": pixel["f1_max"], "pixel_f1_threshold": pixel["f1_threshold"],
                "aupro": compute_aupro(maps, masks, fpr_limit=0.3)}
    assert default["pixel_auroc"] < 1.0
    for key, value in expected.items():
        assert default[key] == value == explicit[key], key
    assert default["num_pixels"] == maps.size and default["num_defect_pixels"] == int(masks.sum())


def test_aupro_takes_per_image_maps_of_different_sizes():
    rng = np.random.default_rng(3)
    tall, wide = rng.random((12, 8)), rng.random((8, 12))
    tall_mask, wide_mask = tall > 0.8, wide > 0.85
    # a transposed image has the same 8-connected regions and pixel counts
    ragged = compute_aupro([tall, wide], [tall_mask, wide_mask], return_counts=True)
    stacked = compute_aupro(np.stack([tall, wide.T]), np.stack([tall_mask, wide_mask.T]), return_counts=True)
    assert ragged[0] == pytest.approx(stacked[0], abs=1e-12)
    assert ragged[1] == stacked[1]
    same_size = rng.random((3, 10, 10))
    same_masks = same_size > 0.7
    assert compute_aupro(list(same_size), list(same_masks)) == compute_aupro(same_size, same_masks)
    with pytest.raises(ValueError, match="same"):
        compute_aupro([tall, wide], [tall_mask, wide_mask.T])


def test_an_unknown_pixel_resolution_names_the_key_and_the_choices(tiny):
    with pytest.raises(ValueError, match=r"evaluation\.pixel_resolution.*'input' or 'native'.*'full'"):
        Evaluator(tiny.BrightnessModel(), device="cpu", pixel_resolution="full")


def test_the_default_config_sets_input():
    config = yaml.safe_load((Path(__file__).parents[2] / "configs" / "default.yaml").read_text())
    assert config["evaluation"]["pixel_resolution"] == "input"


def test_native_with_a_center_crop_is_refused_naming_both_keys(two_sizes):
    dataset = tile_dataset(two_sizes, center_crop=24)
    with pytest.raises(ValueError, match=r"evaluation\.pixel_resolution=native.*data\.center_crop"):
        evaluate(dataset, "native")
    assert evaluate(dataset, "input")["pixel_resolution"] == "input"


def test_native_on_a_subset_counts_only_its_images(two_sizes):
    dataset = tile_dataset(two_sizes)
    names = [f"{sample['defect_type']}/{sample['image_path'].name}" for sample in dataset.samples]
    subset = Subset(dataset, [names.index("good/001.png"), names.index("crack/001.png")])
    metrics = evaluate(subset, "native", model=MaskLookupModel(subset))
    assert metrics["num_pixels"] == 32 * 64 + 64 * 32
    assert metrics["num_defect_pixels"] == 16 * 10


def test_a_label_only_dataset_skips_pixel_metrics_at_native_resolution(tmp_path, tree_builders, tiny):
    tree_builders.mvtec(tmp_path, category="tile", masks=False, hw=(40, 48))
    files = evaluate(tile_dataset(tmp_path), "native", model=BrightnessModel())
    generated = Evaluator(tiny.BrightnessModel(), device="cpu", progress_bar=False, pixel_resolution="native")
    in_memory = generated.evaluate(DataLoader(tiny.defect_dataset(masks=False), batch_size=4))
    for metrics in (files, in_memory):
        assert all(math.isnan(metrics[key]) for key in PIXEL_KEYS)
        assert "pixel_resolution" not in metrics
        assert not math.isnan(metrics["image_auroc"])
        assert any("label-only" in note for note in metrics["notes"])


def test_good_images_get_an_all_zero_mask_at_their_own_size(tmp_path, tree_builders):
    folder = tmp_path / "tile"
    add_image(tree_builders, folder, "good", "000", (48, 32), seed=1)
    add_image(tree_builders, folder, "crack", "000", (32, 32), box=(4, 12, 4, 12), seed=2)
    dataset = tile_dataset(tmp_path)
    evaluator = Evaluator(MaskLookupModel(dataset), device="cpu", progress_bar=False)
    predictions = evaluator.predict(DataLoader(dataset, batch_size=2), pixel_resolution="native")
    native = predictions["native"]
    good = predictions["defect_types"].index("good")
    start, end = native["offsets"][good], native["offsets"][good + 1]
    assert native["shapes"][good] == (48, 32) and not native["masks"][start:end].any()
    defect = 1 - good
    start, end = native["offsets"][defect], native["offsets"][defect + 1]
    expected = tree_builders.box_mask((32, 32), (4, 12, 4, 12)) > 0
    assert np.array_equal(native["masks"][start:end].reshape(32, 32), expected)


def test_native_sizes_follow_the_exif_orientation_of_the_image(tmp_path, tree_builders):
    from PIL import Image

    folder = tmp_path / "tile"
    # stored 32 wide and 64 high, displayed turned by a quarter (EXIF orientation 6): 64 wide, 32 high
    (folder / "test" / "crack").mkdir(parents=True)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(tree_builders.noise_rgb((64, 32), 1)).save(folder / "test" / "crack" / "000.jpg", exif=exif)
    tree_builders.write_mask(folder / "ground_truth" / "crack" / "000_mask.png", (32, 64), (8, 24, 16, 48))
    add_image(tree_builders, folder, "good", "000", (64, 64), seed=2)
    dataset = tile_dataset(tmp_path)
    evaluator = Evaluator(MaskLookupModel(dataset), device="cpu", progress_bar=False)
    native = evaluator.predict(DataLoader(dataset, batch_size=2), pixel_resolution="native")["native"]
    assert native["shapes"] == [(32, 64), (64, 64)]
    assert int(native["masks"].sum()) == 16 * 32
