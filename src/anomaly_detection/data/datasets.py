# src/anomaly_detection/data/datasets.py
import csv
import logging
import random
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

logger = logging.getLogger("anomaly_detection")

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
SPLITS = ("train", "test")

MVTEC_CATEGORIES = (
    "bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal_nut",
    "pill", "screw", "tile", "toothbrush", "transistor", "wood", "zipper",
)
VISA_CATEGORIES = (
    "candle", "capsules", "cashew", "chewinggum", "fryum", "macaroni1", "macaroni2",
    "pcb1", "pcb2", "pcb3", "pcb4", "pipe_fryum",
)
BTAD_CATEGORIES = ("01", "02", "03")


class DatasetError(ValueError):
    pass


class ImageReadError(OSError):
    pass


def list_images(folder):
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def list_subdirs(folder):
    folder = Path(folder)
    return sorted(p.name for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []


def _open_image(path):
    path = Path(path)
    if not path.is_file():
        raise ImageReadError(f"Image file not found: {path}")
    if path.stat().st_size == 0:
        raise ImageReadError(f"Cannot read image {path}: the file is empty (0 bytes)")
    try:
        image = Image.open(path)
        image.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise ImageReadError(f"Cannot read image {path}: {error}") from None
    return image


def _to_array(image):
    # 8-bit images stay uint8 until after the resize (cheaper); 16-bit and float images keep their range
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        return np.asarray(image, dtype=np.float32) / 65535.0
    if image.mode == "I":
        array = np.asarray(image, dtype=np.float32)
        return array / (65535.0 if array.max() > 255 else 255.0)
    if image.mode == "F":
        array = np.asarray(image, dtype=np.float32)
        low, high = float(array.min()), float(array.max())
        return (array - low) / (high - low) if high > low else np.zeros_like(array)
    if image.mode in ("1", "L", "LA"):
        return np.asarray(image.convert("L"))
    return np.asarray(image.convert("RGB"))


def load_image_raw(path):
    array = _to_array(_open_image(path))
    if array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))


def to_float_image(image):
    return image.float().div_(255.0) if image.dtype == torch.uint8 else image


def load_image(path):
    return to_float_image(load_image_raw(path))


def load_mask(path):
    image = _open_image(path)
    array = np.asarray(image.convert("L") if image.mode not in ("I", "I;16", "F") else image)
    if array.ndim == 3:
        array = array.max(axis=2)
    return torch.from_numpy((array > 0).astype(np.float32))[None]


def image_size(path):
    try:
        with Image.open(path) as image:
            return image.size
    except (UnidentifiedImageError, OSError) as error:
        raise ImageReadError(f"Cannot read image {path}: {error}") from None


class AnomalyDataset(Dataset):
    dataset_name = "custom"
    known_categories = ()

    def __init__(self, root_dir, category, split, transform=None):
        if split not in SPLITS:
            raise DatasetError(f"Unknown split '{split}': expected one of {', '.join(SPLITS)}")
        self.root_dir = Path(root_dir)
        self.category = str(category)
        self.split = split
        self.transform = transform
        if not self.root_dir.is_dir():
            raise FileNotFoundError(f"{self.dataset_name} root folder not found: {self.root_dir}")
        self.samples = self.make_samples()
        if not self.samples:
            raise DatasetError(f"No images in the '{split}' split of {self.dataset_name} category "
                               f"'{self.category}' under {self.root_dir}")
        self.has_masks = any(sample["mask_path"] for sample in self.samples) or self.mask_folder_exists()

    @classmethod
    def categories(cls):
        return list(cls.known_categories)

    def make_samples(self):
        raise NotImplementedError

    def mask_folder_exists(self):
        return False

    def category_dir(self):
        folder = self.root_dir / self.category
        if not folder.is_dir():
            found = ", ".join(list_subdirs(self.root_dir)) or "none"
            raise FileNotFoundError(f"{self.dataset_name} category '{self.category}' not found under "
                                    f"{self.root_dir}. Categories found there: {found}")
        return folder

    def __len__(self):
        return len(self.samples)

    @property
    def labels(self):
        return [sample["label"] for sample in self.samples]

    def __getitem__(self, index):
        sample = self.samples[index]
        image = load_image_raw(sample["image_path"])
        if sample["mask_path"]:
            mask = load_mask(sample["mask_path"])
            if mask.shape[-2:] != image.shape[-2:]:
                raise DatasetError(
                    f"Mask {sample['mask_path']} is {mask.shape[-1]}x{mask.shape[-2]} but its image "
                    f"{sample['image_path']} is {image.shape[-1]}x{image.shape[-2]}: expected the same size")
        else:
            mask = torch.zeros((1,) + tuple(image.shape[-2:]), dtype=torch.float32)
        if self.transform is not None:
            image, mask = apply_transform(self.transform, image, mask)
        image = to_float_image(image)
        return {
            "image": image,
            "mask": mask,
            "label": sample["label"],
            "image_path": str(sample["image_path"]),
            "mask_path": str(sample["mask_path"]) if sample["mask_path"] else "",
            "defect_type": sample["defect_type"],
            "category": self.category,
        }


def apply_transform(transform, image, mask):
    if getattr(transform, "handles_masks", False):
        return transform(image, mask)
    image = transform(to_float_image(image))
    if tuple(mask.shape[-2:]) != tuple(image.shape[-2:]):
        mask = torch.nn.functional.interpolate(mask[None], size=tuple(image.shape[-2:]), mode="nearest")[0]
    return image, mask


def make_sample(image_path, label, defect_type, mask_path=""):
    return {"image_path": Path(image_path), "label": int(label), "defect_type": defect_type,
            "mask_path": Path(mask_path) if mask_path else ""}


def match_masks(images, mask_dir, defect_type, suffixes=("_mask", "")):
    mask_dir = Path(mask_dir)
    masks = {}
    for path in list_images(mask_dir):
        masks.setdefault(path.stem, path)
    matched = {}
    for image in images:
        for suffix in suffixes:
            if image.stem + suffix in masks:
                matched[image] = masks.pop(image.stem + suffix)
                break
        else:
            raise DatasetError(f"Defective image {image} has no mask in {mask_dir} "
                               f"(expected {image.stem}{suffixes[0]}.png or similar)")
    if masks:
        orphan = sorted(masks.values())[0]
        raise DatasetError(f"Mask {orphan} has no matching image in the '{defect_type}' test folder")
    return matched


_label_only_warned = set()


def warn_label_only(name, folder):
    if folder not in _label_only_warned:
        _label_only_warned.add(folder)
        logger.warning("%s: no mask folder at %s; label-only category, pixel metrics will be skipped",
                       name, folder)


class MVTecDataset(AnomalyDataset):
    dataset_name = "MVTec AD"
    known_categories = MVTEC_CATEGORIES
    good_name = "good"
    mask_suffixes = ("_mask", "")

    def mask_folder_exists(self):
        return (self.root_dir / self.category / "ground_truth").is_dir()

    def make_samples(self):
        return scan_mvtec_layout(self.category_dir(), self.split, self.good_name, self.mask_suffixes,
                                 f"{self.dataset_name} {self.category}")


def scan_mvtec_layout(folder, split, good_name="good", mask_suffixes=("_mask", ""), name="MVTec AD"):
    split_dir = folder / split
    if not split_dir.is_dir():
        raise FileNotFoundError(f"Split folder not found: {split_dir} (expected {split}/{good_name} and, "
                                "for test, one folder per defect type)")
    if split == "train":
        return [make_sample(p, 0, "good") for p in list_images(split_dir / good_name)]
    gt_dir = folder / "ground_truth"
    if not gt_dir.is_dir():
        warn_label_only(name, str(gt_dir))
    samples = []
    for defect in list_subdirs(split_dir):
        images = list_images(split_dir / defect)
        if defect == good_name:
            samples += [make_sample(p, 0, "good") for p in images]
            continue
        masks = {}
        if gt_dir.is_dir():
            defect_mask_dir = gt_dir / defect
            if not defect_mask_dir.is_dir():
                raise DatasetError(f"Mask folder {defect_mask_dir} is missing for defect type '{defect}' "
                                   f"while {gt_dir} exists")
            masks = match_masks(images, defect_mask_dir, defect, mask_suffixes)
        samples += [make_sample(p, 1, defect, masks.get(p, "")) for p in images]
    return samples


class VisADataset(AnomalyDataset):
    dataset_name = "VisA"
    known_categories = VISA_CATEGORIES

    def __init__(self, root_dir, category, split, transform=None, layout="auto", split_csv=None):
        self.layout = layout
        self.split_csv = split_csv
        super().__init__(root_dir, category, split, transform)

    def resolved_layout(self):
        folder = self.category_dir()
        if self.layout == "auto":
            return "released" if (folder / "Data" / "Images").is_dir() else "mvtec"
        if self.layout not in ("released", "mvtec"):
            raise DatasetError(f"Unknown VisA layout '{self.layout}': expected auto, released or mvtec")
        return self.layout

    def mask_folder_exists(self):
        folder = self.root_dir / self.category
        return (folder / "Data" / "Masks").is_dir() or (folder / "ground_truth").is_dir()

    def make_samples(self):
        if self.resolved_layout() == "mvtec":
            return scan_mvtec_layout(self.category_dir(), self.split, name=f"VisA {self.category}")
        csv_path = Path(self.split_csv) if self.split_csv else self.root_dir / "split_csv" / "1cls.csv"
        if not csv_path.is_file():
            raise FileNotFoundError(f"VisA split file not found: {csv_path} (the released VisA ships "
                                    "split_csv/1cls.csv beside the category folders)")
        samples = []
        with open(csv_path, newline="") as handle:
            for row_number, row in enumerate(csv.DictReader(handle), start=2):
                missing = {"object", "split", "label", "image"} - set(row)
                if missing:
                    raise DatasetError(f"{csv_path} line {row_number}: missing column(s) {sorted(missing)}")
                if row["object"] != self.category or row["split"] != self.split:
                    continue
                image = self.root_dir / row["image"]
                if not image.is_file():
                    raise DatasetError(f"{csv_path} line {row_number}: image {image} does not exist")
                if row["label"] == "normal":
                    samples.append(make_sample(image, 0, "good"))
                    continue
                mask = self.root_dir / row["mask"] if row.get("mask") else None
                if mask is None or not mask.is_file():
                    raise DatasetError(f"Defective image {image} has no mask (expected {mask}, "
                                       f"from {csv_path} line {row_number})")
                samples.append(make_sample(image, 1, "anomaly", mask))
        return sorted(samples, key=lambda s: (s["label"], str(s["image_path"])))


ViSADataset = VisADataset


class BTADDataset(MVTecDataset):
    dataset_name = "BTAD"
    known_categories = BTAD_CATEGORIES
    good_name = "ok"
    mask_suffixes = ("", "_mask")


class FolderDataset(AnomalyDataset):
    dataset_name = "Folder"

    def __init__(self, root_dir, category=None, split="train", transform=None, normal_dir="good",
                 abnormal_dirs=None, mask_dirs=None, normal_test_dir=None, test_ratio=0.2, split_seed=0):
        self.normal_dir = normal_dir
        self.abnormal_dirs = [abnormal_dirs] if isinstance(abnormal_dirs, str) else list(abnormal_dirs or [])
        if isinstance(mask_dirs, str):
            mask_dirs = [mask_dirs]
        if mask_dirs is not None and len(mask_dirs) != len(self.abnormal_dirs):
            raise DatasetError(f"mask_dirs has {len(mask_dirs)} entries but abnormal_dirs has "
                               f"{len(self.abnormal_dirs)}: give one mask folder per abnormal folder (or null)")
        self.mask_dirs = mask_dirs
        self.normal_test_dir = normal_test_dir
        if not 0.0 <= float(test_ratio) < 1.0:
            raise DatasetError(f"test_ratio must be in [0, 1), got {test_ratio}")
        self.test_ratio = float(test_ratio)
        self.split_seed = split_seed
        super().__init__(root_dir, category if category is not None else "", split, transform)

    def base_dir(self):
        return self.category_dir() if self.category else self.root_dir

    def folder(self, name):
        path = Path(name)
        path = path if path.is_absolute() else self.base_dir() / path
        if not path.is_dir():
            raise FileNotFoundError(f"Folder dataset: directory not found: {path}")
        return path

    def mask_folder_exists(self):
        return bool(self.mask_dirs)

    def normal_split(self):
        normals = list_images(self.folder(self.normal_dir))
        if self.normal_test_dir is not None:
            return normals, list_images(self.folder(self.normal_test_dir))
        order = list(range(len(normals)))
        random.Random(self.split_seed).shuffle(order)
        n_test = int(round(len(normals) * self.test_ratio))
        test_ids = set(order[:n_test])
        return ([p for i, p in enumerate(normals) if i not in test_ids],
                [p for i, p in enumerate(normals) if i in test_ids])

    def make_samples(self):
        train, test_normal = self.normal_split()
        if self.split == "train":
            return [make_sample(p, 0, "good") for p in train]
        samples = [make_sample(p, 0, "good") for p in test_normal]
        if self.abnormal_dirs and not self.mask_dirs:
            warn_label_only(f"Folder dataset {self.base_dir()}", str(self.base_dir()))
        for index, name in enumerate(self.abnormal_dirs):
            folder = self.folder(name)
            images = list_images(folder)
            masks = match_masks(images, self.folder(self.mask_dirs[index]), folder.name) if self.mask_dirs else {}
            samples += [make_sample(p, 1, folder.name, masks.get(p, "")) for p in images]
        return samples


DATASETS = {
    "mvtec": MVTecDataset,
    "visa": VisADataset,
    "btad": BTADDataset,
    "folder": FolderDataset,
}


def get_dataset_class(name):
    if name not in DATASETS:
        raise DatasetError(f"Unknown dataset '{name}': expected one of {', '.join(DATASETS)}")
    return DATASETS[name]


def build_dataset(dataset_config, split, transform=None, category=None):
    options = dict(dataset_config)
    name = options.pop("name")
    cls = get_dataset_class(name)
    root_dir = options.pop("root_dir")
    category = category if category is not None else options.pop("category", None)
    options.pop("category", None)
    options.pop("synthetic", None)
    options.pop("categories", None)
    if cls is VisADataset:
        return cls(root_dir, category, split, transform, layout=options.get("layout", "auto"),
                   split_csv=options.get("split_csv"))
    if cls is FolderDataset:
        return cls(root_dir, category, split, transform, **options)
    return cls(root_dir, category, split, transform)
