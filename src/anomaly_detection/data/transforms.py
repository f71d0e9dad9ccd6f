# src/anomaly_detection/data/transforms.py
import torch
import torch.nn.functional as F
from torchvision.transforms.v2 import functional as TF

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HALF_MEAN = (0.5, 0.5, 0.5)
HALF_STD = (0.5, 0.5, 0.5)
NORMALIZATIONS = {"imagenet": (IMAGENET_MEAN, IMAGENET_STD), "half": (HALF_MEAN, HALF_STD)}


def resolve_normalization(normalization="imagenet"):
    # data.normalization: backbone is resolved to the model's own (mean, std) by the runner before the
    # transforms are built, so the data package never needs to know about models
    if isinstance(normalization, str):
        if normalization not in NORMALIZATIONS:
            raise ValueError(f"Unknown normalization '{normalization}': expected one of "
                             f"{', '.join(NORMALIZATIONS)} or a (mean, std) pair")
        return NORMALIZATIONS[normalization]
    try:
        mean, std = normalization
        mean, std = tuple(float(v) for v in mean), tuple(float(v) for v in std)
    except (TypeError, ValueError):
        raise ValueError(f"normalization must be one of {', '.join(NORMALIZATIONS)} or a (mean, std) pair of "
                         f"3 values each, got {normalization!r}") from None
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise ValueError(f"normalization (mean, std) needs 3 values each and std > 0, got {normalization!r}")
    return mean, std


def size_pair(size, name):
    if size is None:
        return None
    if isinstance(size, int):
        pair = (size, size)
    else:
        pair = tuple(int(v) for v in size)
    if len(pair) != 2 or min(pair) < 1:
        raise ValueError(f"{name} must be a positive int or (height, width), got {size}")
    return pair


class PairedTransform:
    handles_masks = True

    def __init__(self, image_size=256, center_crop=None, mean=IMAGENET_MEAN, std=IMAGENET_STD, hflip=0.0):
        self.image_size = size_pair(image_size, "image_size")
        self.center_crop = size_pair(center_crop, "center_crop")
        if self.center_crop and (self.center_crop[0] > self.image_size[0] or self.center_crop[1] > self.image_size[1]):
            raise ValueError(f"center_crop {center_crop} is larger than image_size {image_size}")
        self.mean = tuple(mean)
        self.std = tuple(std)
        self.hflip = float(hflip)

    def __call__(self, image, mask=None):
        image = TF.resize(image, list(self.image_size), antialias=True)
        if mask is not None:
            # nearest keeps the mask binary and aligned with the resized image
            mask = F.interpolate(mask[None], size=self.image_size, mode="nearest")[0]
        if self.center_crop:
            image = TF.center_crop(image, list(self.center_crop))
            mask = TF.center_crop(mask, list(self.center_crop)) if mask is not None else None
        if self.hflip and torch.rand(()) < self.hflip:
            image = image.flip(-1)
            mask = mask.flip(-1) if mask is not None else None
        image = image.float().div_(255.0) if image.dtype == torch.uint8 else image.clamp(0.0, 1.0)
        image = TF.normalize(image, list(self.mean), list(self.std))
        return (image, mask) if mask is not None else image

    def __repr__(self):
        return (f"PairedTransform(image_size={self.image_size}, center_crop={self.center_crop}, "
                f"mean={self.mean}, std={self.std}, hflip={self.hflip})")


def get_train_transforms(image_size=256, center_crop=None, normalization="imagenet", hflip=0.0):
    mean, std = resolve_normalization(normalization)
    return PairedTransform(image_size, center_crop, mean, std, hflip=hflip)


def get_test_transforms(image_size=256, center_crop=None, normalization="imagenet"):
    mean, std = resolve_normalization(normalization)
    return PairedTransform(image_size, center_crop, mean, std)


def denormalize(images, mean, std):
    mean = torch.as_tensor(mean, dtype=images.dtype, device=images.device).view(-1, 1, 1)
    std = torch.as_tensor(std, dtype=images.dtype, device=images.device).view(-1, 1, 1)
    return (images * std + mean).clamp(0.0, 1.0)
