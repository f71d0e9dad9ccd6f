# src/anomaly_detection/data/datasets.py
import csv
import logging
import os
import random
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError
from torch.utils.data import Dataset

logger = logging.getLogger("anomaly_detection")

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
IMAGE_FORMATS = ("PNG", "JPEG", "BMP", "TIFF", "WebP")
SPLITS = ("train", "test")
LOSSY_FORMATS = ("JPEG", "MPO")
PIXEL_LIMIT_VARIABLE = "ANOMALY_DETECTION_MAX_IMAGE_PIXELS"
# a mask marking this much of its image is more likely inverted than a real defect
MOST_OF_THE_IMAGE = 0.9
_EXIF_KEYS = ("exif", "Raw profile type exif", "XML:com.adobe.xmp")
# EXIF orientations 5-8 turn the image by a quarter, swapping width and height
_SWAPS_AXES = (5, 6, 7, 8)

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


def _not_a_file(path):
    if path.is_symlink() and not path.exists():
        try:
            target = os.readlink(path)
        except OSError:
            target = "?"
        return (f"{path} is a broken symbolic link (to {target}: the target is missing or the links form a "
                "loop): expected an image file; fix or remove the link")
    if path.is_dir():
        return f"{path} is a directory named like an image: expected an image file; rename or move the folder"
    if not path.exists():
        return f"Image file not found: {path}"
    return f"{path} is not a regular file: expected an image file"


def list_images(folder):
    folder = Path(folder)
    if not folder.is_dir():
        return []
    images = []
    for path in sorted(folder.iterdir()):
        if path.suffix.lower() not in IMAGE_EXTENSIONS:
            continue
        # a broken link or a folder named like an image would otherwise drop out of the split unnoticed
        if not path.is_file():
            raise ImageReadError(_not_a_file(path))
        images.append(path)
    return images


def list_subdirs(folder):
    folder = Path(folder)
    return sorted(p.name for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []


def _apply_pixel_limit_from_environment():
    text = os.environ.get(PIXEL_LIMIT_VARIABLE, "").strip().lower()
    if not text:
        return
    if text in ("0", "none"):
        Image.MAX_IMAGE_PIXELS = None
        return
    if not text.isdigit():
        raise DatasetError(f"{PIXEL_LIMIT_VARIABLE}={text!r}: expected a number of pixels, or 0/none for no limit")
    Image.MAX_IMAGE_PIXELS = int(text)


_apply_pixel_limit_from_environment()


def _unchecked_size(path):
    # Image.open refuses to return an image this far over the limit; the format plugin reads the header
    # without that check, which gives the size for the message
    try:
        factory = Image.OPEN[Image.registered_extensions()[path.suffix.lower()]][0]
        with factory(str(path)) as image:
            return image.size
    except Exception:
        return None


def _too_large(path, size):
    limit = Image.MAX_IMAGE_PIXELS
    if size is None:
        found = f"more than {2 * limit} pixels"
    else:
        found = f"{size[0]}x{size[1]} = {size[0] * size[1]} pixels"
    return (f"Image {path} is {found}, over the limit of {limit} pixels (PIL.Image.MAX_IMAGE_PIXELS, a guard "
            f"against decompression bombs): expected at most {limit} pixels. If the image is intended, raise "
            f"the limit: set {PIXEL_LIMIT_VARIABLE}=<pixels> (0 for none) in the environment, or "
            "PIL.Image.MAX_IMAGE_PIXELS in Python")


def _open_header(path):
    path = Path(path)
    if not path.is_file():
        raise ImageReadError(_not_a_file(path))
    if path.stat().st_size == 0:
        raise ImageReadError(f"Cannot read image {path}: the file is empty (0 bytes): expected image data")
    try:
        with warnings.catch_warnings():
            # an over-limit image is refused below with its name; PIL's warning would not name it
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(path)
    except Image.DecompressionBombError:
        raise ImageReadError(_too_large(path, _unchecked_size(path))) from None
    except UnidentifiedImageError:
        raise ImageReadError(f"Cannot read image {path}: not an image in a format PIL reads: expected "
                             f"{', '.join(IMAGE_FORMATS)}") from None
    except (OSError, SyntaxError, ValueError) as error:
        raise ImageReadError(f"Cannot read image {path}: {error}: expected a readable image file") from None
    limit = Image.MAX_IMAGE_PIXELS
    if limit and image.width * image.height > limit:
        image.close()
        raise ImageReadError(_too_large(path, image.size))
    return image


def _orientation(image, path, exact=False):
    # PngImageFile.getexif() decodes the whole image to look for metadata stored after the pixels; the
    # header check reads only metadata stored before them unless asked to be exact
    if image.format == "PNG" and not exact and not any(key in image.info for key in _EXIF_KEYS):
        return 1
    try:
        return int(image.getexif().get(ExifTags.Base.Orientation, 1))
    except Exception as error:
        # Pillow's EXIF parser raises many types on malformed data
        raise ImageReadError(f"Cannot read the EXIF data of {path}: {error}: expected valid EXIF or none") from None


def _oriented_size(image, path, exact=False):
    width, height = image.size
    return (height, width) if _orientation(image, path, exact) in _SWAPS_AXES else (width, height)


def _open_image(path):
    image = _open_header(path)
    try:
        image.load()
    except (OSError, SyntaxError, ValueError) as error:
        raise ImageReadError(f"Cannot read image {path}: {error}: expected a complete image file") from None
    try:
        ImageOps.exif_transpose(image, in_place=True)
    except Exception as error:
        raise ImageReadError(f"Cannot read the EXIF data of {path}: {error}: expected valid EXIF or none") from None
    return image


def _check_finite(array, path):
    bad = ~np.isfinite(array)
    if bad.any():
        row, column = np.argwhere(bad)[0]
        raise ImageReadError(f"Image {path} has {int(bad.sum())} NaN or infinite pixel(s), the first at row {row}, "
                             f"column {column}: expected finite values")


def _to_array(image, path=None):
    # 8-bit images stay uint8 until after the resize (cheaper); 16-bit and float images keep their range
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        return np.asarray(image, dtype=np.float32) / 65535.0
    if image.mode == "I":
        array = np.asarray(image, dtype=np.float32)
        return array / (65535.0 if array.max() > 255 else 255.0)
    if image.mode == "F":
        array = np.asarray(image, dtype=np.float32)
        # a NaN would make the min-max scaling below return an all-zero image
        _check_finite(array, path)
        low, high = float(array.min()), float(array.max())
        return (array - low) / (high - low) if high > low else np.zeros_like(array)
    if image.mode in ("1", "L", "LA"):
        return np.asarray(image.convert("L"))
    return np.asarray(image.convert("RGB"))


def load_image_raw(path):
    array = _to_array(_open_image(path), path)
    if array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))


def to_float_image(image):
    return image.float().div_(255.0) if image.dtype == torch.uint8 else image


def _mask_values(image, path):
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "L"):
        return np.asarray(image)
    if image.mode == "F":
        array = np.asarray(image, dtype=np.float32)
        _check_finite(array, path)
        return array
    if image.mode in ("LA", "La"):
        return np.asarray(image.getchannel(0))
    if image.mode == "1":
        return np.asarray(image.convert("L"))
    # palette and colour masks: a pixel's value is its brightest channel, so a pure red or blue defect
    # counts as much as a white one
    return np.asarray(image.convert("RGB")).max(axis=2)


def binarize_mask(values):
    # The mask rule: defect where the value is >= half of this mask's own maximum; a mask whose maximum
    # is 0 (or below) is empty. 0/1, 0/255 and 0/65535 masks, a background of 1 under a defect of 255,
    # anti-aliased edges and JPEG noise all land on the side a viewer would see.
    high = values.max()
    if not high > 0:
        return np.zeros(values.shape, dtype=bool)
    if np.issubdtype(values.dtype, np.integer):
        return values >= (int(high) + 1) // 2
    return values >= float(high) / 2.0


def read_mask(path):
    image = _open_image(path)
    values = _mask_values(image, path)
    binary = binarize_mask(values)
    low, high = values.min(), values.max()
    info = {
        "format": image.format,
        "lossy": image.format in LOSSY_FORMATS,
        "non_binary": bool(np.any((values != low) & (values != high))),
        "low": low.item(),
        "high": high.item(),
        "fraction": float(binary.mean()),
    }
    return torch.from_numpy(binary.astype(np.float32))[None], info


_mask_warned = set()


def _warn_mask_once(where, kind, message, *args):
    if (where, kind) not in _mask_warned:
        _mask_warned.add((where, kind))
        logger.warning("%s: " + message + " (warned once per category)", where, *args)


def _warn_lossy(where, path, format_name):
    _warn_mask_once(where, "lossy", "masks are stored in a lossy format (%s), e.g. %s: compression turns "
                    "their edges into grey levels; they are binarised by the half-maximum rule (defect where "
                    "value >= half the mask's maximum). Expected lossless masks (PNG) for exact defect areas",
                    format_name, path)


def _warn_about_mask(where, path, info):
    if info["lossy"]:
        _warn_lossy(where, path, info["format"])
    elif info["non_binary"]:
        _warn_mask_once(where, "non_binary", "masks hold more than two distinct values, e.g. %s (values %s to "
                        "%s): binarised by the half-maximum rule (defect where value >= half the mask's "
                        "maximum). Expected two values, background 0 and one defect value", path,
                        info["low"], info["high"])
    if info["fraction"] == 0.0:
        _warn_mask_once(where, "empty", "mask %s of a defective image marks no pixel as defect: its pixels count "
                        "as normal in pixel metrics. Expected a defect region, unless the defect cannot be "
                        "outlined", path)
    elif info["fraction"] >= MOST_OF_THE_IMAGE:
        _warn_mask_once(where, "most", "mask %s marks %.0f%% of the image as defect: expected the defect to be "
                        "the bright value on a darker background; check that the mask is not inverted and its "
                        "background is not its maximum value", path, 100.0 * info["fraction"])


def load_mask(path, where=None):
    mask, info = read_mask(path)
    _warn_about_mask(where or str(Path(path).parent), path, info)
    return mask


def image_size(path, exact=False):
    with _open_header(path) as image:
        return _oriented_size(image, path, exact)


def _header(path):
    with _open_header(path) as image:
        found = image.size, _oriented_size(image, path), image.format
        # PNG's verify() walks the chunks and their checksums without decompressing: it finds a truncated
        # or corrupted PNG now for about the cost of reading the file (other formats' verify() does nothing)
        try:
            image.verify()
        except (OSError, SyntaxError, ValueError) as error:
            raise ImageReadError(f"Cannot read image {path}: {error}: expected a complete image file") from None
        return found


def _check_sample_files(sample, where):
    raw_size, size, _ = _header(sample["image_path"])
    if not sample["mask_path"]:
        return
    _, mask_size, mask_format = _header(sample["mask_path"])
    if mask_format in LOSSY_FORMATS:
        _warn_lossy(where, sample["mask_path"], mask_format)
    if mask_size != size and "PNG" in (mask_format, Image.registered_extensions().get(
            sample["image_path"].suffix.lower())):
        size, mask_size = image_size(sample["image_path"], exact=True), image_size(sample["mask_path"], exact=True)
    if mask_size != size:
        hint = ""
        if mask_size == raw_size and raw_size != size:
            hint = (" (the mask matches the image as stored, but the image's EXIF orientation turns it: "
                    "masks must match the image as displayed)")
        raise DatasetError(f"Mask {sample['mask_path']} is {mask_size[0]}x{mask_size[1]} but its image "
                           f"{sample['image_path']} is {size[0]}x{size[1]} after EXIF orientation{hint}: "
                           "expected the same size")


def check_dataset_files(dataset):
    where = dataset.warning_key()
    problems = []
    for sample in dataset.samples:
        try:
            _check_sample_files(sample, where)
        except (ImageReadError, DatasetError) as error:
            problems.append(error)
    if not problems:
        return len(dataset.samples)
    first = problems[0]
    message = str(first)
    if len(problems) > 1:
        message += (f" [{len(problems)} of the {len(dataset.samples)} samples of the '{dataset.split}' split "
                    "have a bad file; this is the first]")
    raise type(first)(message)


class AnomalyDataset(Dataset):
    dataset_name = "custom"
    known_categories = ()

    def __init__(self, root_dir, category, split, transform=None, check_files=True):
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
        if check_files:
            # headers only: a bad file is reported now, not after training; pixels are decoded lazily
            check_dataset_files(self)

    def warning_key(self):
        return f"{self.dataset_name} category '{self.category}' ({self.root_dir})"

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
            mask = load_mask(sample["mask_path"], self.warning_key())
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
        stem = next(orphan.stem[:len(orphan.stem) - len(s)] for s in suffixes + ("",) if orphan.stem.endswith(s))
        raise DatasetError(f"Mask {orphan} has no matching image in the '{defect_type}' test folder: expected an "
                           f"image named {stem} with an image extension there")
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

    def __init__(self, root_dir, category, split, transform=None, layout="auto", split_csv=None, check_files=True):
        self.layout = layout
        self.split_csv = split_csv
        super().__init__(root_dir, category, split, transform, check_files)

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
                 abnormal_dirs=None, mask_dirs=None, normal_test_dir=None, test_ratio=0.2, split_seed=0,
                 check_files=True):
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
        super().__init__(root_dir, category if category is not None else "", split, transform, check_files)

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
    check_files = options.pop("check_files", True)
    if cls is VisADataset:
        return cls(root_dir, category, split, transform, layout=options.get("layout", "auto"),
                   split_csv=options.get("split_csv"), check_files=check_files)
    if cls is FolderDataset:
        return cls(root_dir, category, split, transform, check_files=check_files, **options)
    return cls(root_dir, category, split, transform, check_files=check_files)
