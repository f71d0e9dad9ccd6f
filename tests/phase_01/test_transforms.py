# tests/phase_01/test_transforms.py
import pytest
import torch
from torchvision.transforms import v2

from anomaly_detection.data import MVTecDataset, get_test_transforms, get_train_transforms
from anomaly_detection.data.transforms import IMAGENET_MEAN, IMAGENET_STD, denormalize

# input H x W and a square (top, bottom, left, right) chosen so both scale factors are whole numbers
SOURCE_HW = (80, 120)
SQUARE = (20, 40, 30, 60)


def square_pair():
    image = torch.full((3,) + SOURCE_HW, 0.2)
    mask = torch.zeros((1,) + SOURCE_HW)
    top, bottom, left, right = SQUARE
    image[:, top:bottom, left:right] = 1.0
    mask[:, top:bottom, left:right] = 1.0
    return image, mask


def expected_box(size, crop):
    scale_h, scale_w = SOURCE_HW[0] // size, SOURCE_HW[1] // size
    offset = (size - crop) // 2
    top, bottom, left, right = SQUARE
    return (top // scale_h - offset, bottom // scale_h - offset, left // scale_w - offset, right // scale_w - offset)


def test_output_shapes_and_binary_mask():
    image, mask = square_pair()
    out_image, out_mask = get_train_transforms(image_size=64)(image, mask)
    assert out_image.shape == (3, 64, 64) and out_mask.shape == (1, 64, 64)
    assert set(out_mask.unique().tolist()) == {0.0, 1.0}
    rect_image, rect_mask = get_test_transforms(image_size=(32, 48))(image, mask)
    assert rect_image.shape == (3, 32, 48) and rect_mask.shape == (1, 32, 48)


def test_mask_follows_image_through_resize_and_center_crop():
    size, crop = 40, 30
    image, mask = square_pair()
    out_image, out_mask = get_test_transforms(image_size=size, center_crop=crop, normalization="half")(image, mask)
    assert out_mask.shape == (1, crop, crop)
    assert set(out_mask.unique().tolist()) == {0.0, 1.0}
    top, bottom, left, right = expected_box(size, crop)
    expected = torch.zeros(crop, crop)
    expected[top:bottom, left:right] = 1
    assert torch.equal(out_mask[0], expected)
    # inside the square (one pixel away from its edge) the white image reads 1.0 after 0.5/0.5 normalisation
    assert torch.allclose(out_image[:, top + 1:bottom - 1, left + 1:right - 1], torch.tensor(1.0), atol=1e-4)
    assert torch.allclose(out_image[:, 0, :], torch.tensor((0.2 - 0.5) / 0.5), atol=1e-4)


def test_horizontal_flip_moves_image_and_mask_together():
    image, mask = square_pair()
    out_image, out_mask = get_train_transforms(image_size=40, normalization="half", hflip=1.0)(image, mask)
    plain_image, plain_mask = get_test_transforms(image_size=40, normalization="half")(image, mask)
    assert torch.equal(out_mask, plain_mask.flip(-1))
    assert torch.allclose(out_image, plain_image.flip(-1))
    assert not torch.equal(out_mask, plain_mask)


@pytest.mark.parametrize("normalization, mean, std", [
    ("imagenet", IMAGENET_MEAN, IMAGENET_STD),
    ("half", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    (((0.1, 0.2, 0.3), (0.4, 0.5, 0.6)), (0.1, 0.2, 0.3), (0.4, 0.5, 0.6)),
])
def test_normalisation_constants(normalization, mean, std):
    value = 0.25
    image = torch.full((3, 16, 16), value)
    out = get_test_transforms(image_size=16, normalization=normalization)(image)
    for channel in range(3):
        assert torch.allclose(out[channel], torch.tensor((value - mean[channel]) / std[channel]), atol=1e-5)
    restored = denormalize(out, mean, std)
    assert torch.allclose(restored, image, atol=1e-5)


def test_image_only_call_returns_a_tensor():
    out = get_train_transforms(image_size=24)(torch.rand(3, 50, 70))
    assert isinstance(out, torch.Tensor) and out.shape == (3, 24, 24)


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="center_crop"):
        get_train_transforms(image_size=32, center_crop=48)
    with pytest.raises(ValueError, match="zscore"):
        get_test_transforms(image_size=32, normalization="zscore")
    with pytest.raises(ValueError, match="image_size"):
        get_test_transforms(image_size=0)


def test_dataset_applies_paired_transform(mvtec_tree):
    transform = get_test_transforms(image_size=32, center_crop=24)
    dataset = MVTecDataset(mvtec_tree.root, mvtec_tree.category, "test", transform=transform)
    for index in range(len(dataset)):
        item = dataset[index]
        assert item["image"].shape == (3, 24, 24) and item["mask"].shape == (1, 24, 24)
        assert set(item["mask"].unique().tolist()) <= {0.0, 1.0}
        assert (item["mask"].sum() > 0) == (item["label"] == 1)


def test_dataset_resizes_mask_for_image_only_transform(mvtec_tree):
    transform = v2.Resize((20, 24), antialias=True)
    dataset = MVTecDataset(mvtec_tree.root, mvtec_tree.category, "test", transform=transform)
    index = dataset.labels.index(1)
    item = dataset[index]
    assert item["image"].shape == (3, 20, 24) and item["mask"].shape == (1, 20, 24)
    top, bottom, left, right = mvtec_tree.box
    scale_h = mvtec_tree.hw[0] // 20
    scale_w = mvtec_tree.hw[1] // 24
    assert item["mask"].sum() == ((bottom - top) // scale_h) * ((right - left) // scale_w)
