# tests/phase_01/test_bad_inputs.py
import io
import logging
import math
import os
import re
import stat
import struct
import subprocess
import sys
import warnings
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from anomaly_detection import utils
from anomaly_detection.cli import main as cli_main
from anomaly_detection.data import (
    DatasetError, FolderDataset, ImageReadError, MVTecDataset, check_dataset_files,
)
from anomaly_detection.data import datasets as datasets_module
from anomaly_detection.data import synthetic
from anomaly_detection.data.datasets import binarize_mask, image_size
from anomaly_detection.data.statistics import dataset_statistics, format_statistics
from anomaly_detection.data.synthetic import generate_synthetic_category

BOX_AREA = 16 * 16


@pytest.fixture
def tree(tmp_path, tree_builders):
    return tree_builders.mvtec(tmp_path / "data", n_train=2, n_good=1, defects={"broken": 2})


def train_file(tree, name="000.png"):
    return tree.folder / "train" / "good" / name


def mask_file(tree, index=0, ext=".png"):
    return tree.folder / "ground_truth" / "broken" / f"{index:03d}_mask{ext}"


def open_train(tree, **options):
    return MVTecDataset(tree.root, tree.category, "train", **options)


def open_test(tree, **options):
    return MVTecDataset(tree.root, tree.category, "test", **options)


def defect_items(dataset):
    return [dataset[i] for i, label in enumerate(dataset.labels) if label == 1]


def messages(caplog, text):
    return [r.getMessage() for r in caplog.records if text in r.getMessage()]


def jpeg_bytes(array, quality=90, exif=None):
    buffer = io.BytesIO()
    options = {"exif": exif} if exif is not None else {}
    Image.fromarray(array).save(buffer, format="JPEG", quality=quality, **options)
    return buffer.getvalue()


def png_header(width, height):
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00")) + chunk(b"IEND", b"")


def orientation_exif(value):
    exif = Image.Exif()
    exif[0x0112] = value
    return exif


# ---- images: found when the dataset is built, before any pixel is decoded ----

def _zero_bytes(path):
    path.write_bytes(b"")


def _truncated_png(path):
    path.write_bytes(path.read_bytes()[:300])


def _text_as_png(path):
    path.write_text("this is a text file, not a picture\n" * 20)


def _apple_double(path):
    (path.parent / "._000.png").write_bytes(b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        " + b"\x00" * 60)


def _broken_link(path):
    path.unlink()
    path.symlink_to(path.parent / "gone.png")


def _link_loop(path):
    path.unlink()
    path.symlink_to(path.parent / "001.png.loop")
    (path.parent / "001.png.loop").symlink_to(path)


def _directory(path):
    path.unlink()
    path.mkdir()


def _bomb_header(path):
    path.write_bytes(png_header(30000, 30000))


# between the limit and twice the limit PIL only warns; that must be an error too
OVER_LIMIT_SIDE = math.isqrt(Image.MAX_IMAGE_PIXELS * 3 // 2)


def _over_limit_header(path):
    path.write_bytes(png_header(OVER_LIMIT_SIDE, OVER_LIMIT_SIDE))


BAD_HEADERS = [
    ("zero_bytes", _zero_bytes, "000.png", r"empty \(0 bytes\): expected image data"),
    ("truncated_png", _truncated_png, "000.png", "expected a complete image file"),
    ("text_named_png", _text_as_png, "000.png", "not an image in a format PIL reads: expected PNG, JPEG"),
    ("apple_double", _apple_double, "._000.png", "not an image in a format PIL reads: expected PNG"),
    ("broken_symlink", _broken_link, "000.png", "broken symbolic link .*gone.png.*expected an image file"),
    ("symlink_loop", _link_loop, "000.png", "broken symbolic link .*loop.*expected an image file"),
    ("directory_named_png", _directory, "000.png", "is a directory named like an image: expected an image file"),
    ("decompression_bomb", _bomb_header, "000.png",
     r"30000x30000 = 900000000 pixels, over the limit of \d+ pixels .*MAX_IMAGE_PIXELS.*expected at most"),
    ("over_pixel_limit", _over_limit_header, "000.png",
     rf"{OVER_LIMIT_SIDE}x{OVER_LIMIT_SIDE} = {OVER_LIMIT_SIDE ** 2} pixels, over the limit "
     r".*ANOMALY_DETECTION_MAX_IMAGE_PIXELS=<pixels>"),
]


@pytest.mark.parametrize("name, corrupt, culprit, expected", BAD_HEADERS, ids=[case[0] for case in BAD_HEADERS])
def test_bad_image_is_named_when_the_dataset_is_built(tree, name, corrupt, culprit, expected):
    corrupt(train_file(tree))
    with warnings.catch_warnings():
        # PIL's anonymous DecompressionBombWarning must not leak out either
        warnings.simplefilter("error")
        with pytest.raises(ImageReadError) as info:
            open_train(tree)
    message = str(info.value)
    assert str(train_file(tree, culprit)) in message
    assert re.search(expected, message), message


def test_bad_files_are_counted_and_the_first_is_named(tree):
    for name in ("000.png", "001.png"):
        train_file(tree, name).write_bytes(b"")
    with pytest.raises(ImageReadError) as info:
        open_train(tree)
    assert str(train_file(tree, "000.png")) in str(info.value)
    assert "[2 of the 2 samples of the 'train' split have a bad file; this is the first]" in str(info.value)


def test_pixel_limit_names_size_limit_and_how_to_raise_it(tree, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(ImageReadError) as info:
        open_train(tree)
    message = str(info.value)
    assert str(train_file(tree)) in message and "48x40 = 1920 pixels" in message and "limit of 1000" in message
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 2000)
    assert len(open_train(tree)) == 2


# ---- images: a bad body is found when the pixels are decoded ----

def _truncated_jpeg(tree):
    path = train_file(tree, "000.jpg")
    data = jpeg_bytes(np.asarray(Image.open(train_file(tree)).convert("RGB")))
    # the header is whole, the scan data is cut
    path.write_bytes(data[: len(data) * 2 // 3])
    train_file(tree).unlink()
    return path, "expected a complete image file"


def _float_tiff(value):
    def build(tree):
        array = np.random.default_rng(0).random((40, 48)).astype(np.float32)
        array[5, 7] = value
        path = train_file(tree, "000.tif")
        Image.fromarray(array).save(path)
        train_file(tree).unlink()
        return path, r"1 NaN or infinite pixel\(s\), the first at row 5, column 7: expected finite values"
    return build


BAD_BODIES = [("truncated_jpeg", _truncated_jpeg), ("nan_float_tiff", _float_tiff(np.nan)),
              ("inf_float_tiff", _float_tiff(np.inf)), ("minus_inf_float_tiff", _float_tiff(-np.inf))]


@pytest.mark.parametrize("name, build", BAD_BODIES, ids=[case[0] for case in BAD_BODIES])
def test_bad_pixels_are_named_when_the_image_is_read(tree, name, build):
    path, expected = build(tree)
    dataset = open_train(tree)
    index = [s["image_path"] for s in dataset.samples].index(path)
    with pytest.raises(ImageReadError) as info:
        dataset[index]
    assert str(path) in str(info.value) and re.search(expected, str(info.value)), str(info.value)


# ---- folders ----

def test_files_without_an_image_extension_are_ignored(tree):
    (train_file(tree).parent / "notes.txt").write_text("taken on Monday")
    (train_file(tree).parent / "Thumbs.db").write_bytes(b"\x00" * 10)
    (train_file(tree).parent / ".000.png.123-abcdef12.x1y2.tmp").write_bytes(b"")
    assert len(open_train(tree)) == 2


def test_broken_link_in_a_folder_dataset_is_named(tmp_path, tree_builders):
    folder_tree = tree_builders.folder(tmp_path / "folder")
    link = folder_tree.folder / "defect_a" / "a09.png"
    link.symlink_to(folder_tree.folder / "defect_a" / "missing.png")
    with pytest.raises(ImageReadError, match=re.escape(str(link)) + ".*broken symbolic link"):
        FolderDataset(folder_tree.root, folder_tree.category, "test", **folder_tree.options)


def test_mask_missing_is_named(tree):
    mask_file(tree, 1).unlink()
    with pytest.raises(DatasetError) as info:
        open_test(tree)
    message = str(info.value)
    assert str(tree.folder / "test" / "broken" / "001.png") in message and "expected 001_mask.png" in message


def test_orphan_mask_is_named(tree, tree_builders):
    orphan = tree_builders.write_mask(tree.folder / "ground_truth" / "broken" / "077_mask.png")
    with pytest.raises(DatasetError) as info:
        open_test(tree)
    assert str(orphan) in str(info.value) and "expected an image named 077" in str(info.value)


def test_wrong_size_mask_is_found_before_any_pixel_is_decoded(tree, tree_builders, monkeypatch):
    tree_builders.write_mask(mask_file(tree, 1), hw=(40, 40), box=(2, 6, 2, 6))

    def no_decoding(path):
        raise AssertionError(f"{path} was decoded while the dataset was being built")

    monkeypatch.setattr(datasets_module, "_open_image", no_decoding)
    with pytest.raises(DatasetError) as info:
        open_test(tree)
    message = str(info.value)
    assert str(mask_file(tree, 1)) in message and str(tree.folder / "test" / "broken" / "001.png") in message
    assert "is 40x40 but its image" in message and "is 48x40" in message and "expected the same size" in message


def test_the_check_can_be_skipped_and_run_on_its_own(tree, tree_builders):
    tree_builders.write_mask(mask_file(tree, 1), hw=(40, 40), box=(2, 6, 2, 6))
    dataset = open_test(tree, check_files=False)
    with pytest.raises(DatasetError, match=re.escape(str(mask_file(tree, 1)))):
        check_dataset_files(dataset)
    tree_builders.write_mask(mask_file(tree, 1))
    assert check_dataset_files(dataset) == len(dataset)


# ---- masks: the half-maximum rule ----

@pytest.mark.parametrize("values, expected", [
    (np.array([0, 255], dtype=np.uint8), [0, 1]),
    (np.array([0, 1], dtype=np.uint8), [0, 1]),
    (np.array([1, 255], dtype=np.uint8), [0, 1]),
    (np.array([0, 127, 128, 255], dtype=np.uint8), [0, 0, 1, 1]),
    (np.array([0, 32767, 32768, 65535], dtype=np.uint16), [0, 0, 1, 1]),
    (np.array([0.0, 0.2, 0.25, 0.5], dtype=np.float32), [0, 0, 1, 1]),
    (np.array([0, 0], dtype=np.uint8), [0, 0]),
], ids=["0_255", "0_1", "1_255", "antialiased", "16bit", "float", "all_zero"])
def test_half_maximum_rule(values, expected):
    assert binarize_mask(values).astype(int).tolist() == expected


def _write_mask_array(tree, index, array, ext=".png", **save):
    path = mask_file(tree, index, ext)
    if ext != ".png":
        mask_file(tree, index).unlink()
    image = array if isinstance(array, Image.Image) else Image.fromarray(array)
    image.save(path, **save)
    return path


def _box(value=255, dtype=np.uint8, background=0):
    array = np.full((40, 48), background, dtype=dtype)
    array[8:24, 16:32] = value
    return array


def _palette(background_colour):
    image = Image.fromarray((_box(1)).astype(np.uint8), mode="P")
    image.putpalette(list(background_colour) + [255, 255, 255] + [0] * (256 * 3 - 6))
    return image


ACCEPTED_MASKS = {
    "0_1": lambda: _box(1),
    "background_1_defect_255": lambda: _box(255, background=1),
    "16bit_0_65535": lambda: _box(65535, np.uint16),
    "16bit_0_300": lambda: _box(300, np.uint16),
    "rgb_red": lambda: np.stack([_box(255), _box(0), _box(0)], axis=2),
    "palette_black_white": lambda: _palette((0, 0, 0)),
    "palette_grey_background": lambda: _palette((1, 1, 1)),
    "float_0_1": lambda: _box(1.0, np.float32),
}


@pytest.mark.parametrize("kind", list(ACCEPTED_MASKS))
def test_mask_encodings_give_the_drawn_box_without_warning(tree, kind, caplog):
    ext = ".tiff" if kind.startswith("float") else ".png"
    for index in range(2):
        _write_mask_array(tree, index, ACCEPTED_MASKS[kind](), ext)
    with caplog.at_level(logging.WARNING, logger="anomaly_detection"):
        items = defect_items(open_test(tree))
    for item in items:
        assert item["mask"].sum() == BOX_AREA and item["mask"][0, 8:24, 16:32].min() == 1
    assert not [r for r in caplog.records if "mask" in r.getMessage()]


def test_jpeg_masks_warn_once_and_keep_the_area(tree, caplog):
    paths = [_write_mask_array(tree, index, _box(255), ".jpg", quality=90) for index in range(2)]
    with caplog.at_level(logging.WARNING, logger="anomaly_detection"):
        dataset = open_test(tree)
        items = defect_items(dataset) + defect_items(dataset)
    for item in items:
        assert item["mask"].sum() == BOX_AREA
    warned = messages(caplog, "lossy format")
    assert len(warned) == 1
    assert str(paths[0]) in warned[0] and "JPEG" in warned[0] and "Expected lossless masks (PNG)" in warned[0]
    assert not messages(caplog, "more than two distinct values")


def _antialiased():
    array = _box(255)
    array[8:24, 15] = 128
    array[7, 16:32] = 200
    array[8:24, 32] = 127
    array[24, 16:32] = 60
    return array


def test_antialiased_masks_warn_once_and_use_the_half_maximum(tree, caplog):
    paths = [_write_mask_array(tree, index, _antialiased()) for index in range(2)]
    with caplog.at_level(logging.WARNING, logger="anomaly_detection"):
        items = defect_items(open_test(tree))
    for item in items:
        # the 128 and 200 edges are defect, the 127 and 60 edges are not
        assert item["mask"].sum() == BOX_AREA + 16 + 16
    warned = messages(caplog, "more than two distinct values")
    assert len(warned) == 1
    assert str(paths[0]) in warned[0] and "values 0 to 255" in warned[0] and "Expected two values" in warned[0]


def test_mask_warnings_are_per_category(tmp_path, tree_builders, caplog):
    with caplog.at_level(logging.WARNING, logger="anomaly_detection"):
        for category in ("bottle", "cable"):
            other = tree_builders.mvtec(tmp_path / "two", category=category, n_train=1, n_good=0,
                                        defects={"broken": 1})
            _write_mask_array(other, 0, _antialiased())
            defect_items(open_test(other))
    warned = messages(caplog, "more than two distinct values")
    assert len(warned) == 2 and "'bottle'" in warned[0] and "'cable'" in warned[1]


def test_all_zero_mask_of_a_defective_image_is_kept_and_warned(tree, caplog):
    path = _write_mask_array(tree, 0, _box(0))
    with caplog.at_level(logging.WARNING, logger="anomaly_detection"):
        item = defect_items(open_test(tree))[0]
    assert item["label"] == 1 and item["mask"].sum() == 0
    warned = messages(caplog, "marks no pixel as defect")
    assert len(warned) == 1 and str(path) in warned[0] and "count as normal in pixel metrics" in warned[0]


def test_uniform_nonzero_mask_is_warned_as_covering_the_image(tree, caplog):
    path = _write_mask_array(tree, 0, np.ones((40, 48), dtype=np.uint8))
    with caplog.at_level(logging.WARNING, logger="anomaly_detection"):
        item = defect_items(open_test(tree))[0]
    assert item["mask"].sum() == 40 * 48
    warned = messages(caplog, "marks 100% of the image as defect")
    assert len(warned) == 1 and str(path) in warned[0] and "not inverted" in warned[0]


def test_nan_float_mask_is_named(tree):
    array = _box(1.0, np.float32)
    array[0, 0] = np.nan
    path = _write_mask_array(tree, 0, array, ".tiff")
    dataset = open_test(tree)
    with pytest.raises(ImageReadError, match=re.escape(str(path)) + ".*NaN or infinite.*expected finite"):
        defect_items(dataset)


# ---- EXIF orientation ----

def _displayed_image():
    array = np.random.default_rng(1).integers(0, 120, size=(40, 48, 3), dtype=np.uint8)
    array[8:24, 16:32] = 255
    return Image.fromarray(array)


def _store_rotated(image, path):
    # orientation 6 tells a viewer to turn the stored pixels 90 degrees clockwise
    stored = image.transpose(Image.Transpose.ROTATE_90)
    stored.save(path, exif=orientation_exif(6), **({"quality": 95} if path.suffix == ".jpg" else {}))
    return stored


@pytest.mark.parametrize("rotated_mask", [False, True], ids=["plain_mask", "rotated_mask_too"])
def test_exif_rotated_image_is_read_as_displayed(tree, rotated_mask):
    image_path = tree.folder / "test" / "broken" / "000.jpg"
    (tree.folder / "test" / "broken" / "000.png").unlink()
    stored = _store_rotated(_displayed_image(), image_path)
    assert stored.size == (40, 48)
    if rotated_mask:
        _store_rotated(Image.fromarray(_box(255)), mask_file(tree))
    assert image_size(image_path) == (48, 40)
    assert image_size(mask_file(tree)) == (48, 40)
    dataset = open_test(tree)
    item = dataset[[s["image_path"] for s in dataset.samples].index(image_path)]
    assert item["image"].shape == (3, 40, 48) and item["mask"].shape == (1, 40, 48)
    assert item["mask"].sum() == BOX_AREA
    # the white defect sits where the mask says
    assert item["image"][:, 8:24, 16:32].min() > 0.85 and item["image"][:, item["mask"][0] == 0].max() < 0.7


def test_exif_rotated_image_with_a_mask_of_the_stored_size_is_an_error(tree, tree_builders):
    image_path = tree.folder / "test" / "broken" / "000.jpg"
    (tree.folder / "test" / "broken" / "000.png").unlink()
    _store_rotated(_displayed_image(), image_path)
    tree_builders.write_mask(mask_file(tree), hw=(48, 40), box=(16, 32, 8, 24))
    with pytest.raises(DatasetError) as info:
        open_test(tree)
    message = str(info.value)
    assert str(mask_file(tree)) in message and str(image_path) in message
    assert "EXIF orientation turns it: masks must match the image as displayed" in message


# ---- statistics ----

def test_stats_report_non_binary_masks_and_size_mismatches(tree, tree_builders):
    antialiased = _write_mask_array(tree, 0, _antialiased())
    small = tree_builders.write_mask(mask_file(tree, 1), hw=(20, 24), box=(2, 6, 2, 6))
    stats = dataset_statistics(MVTecDataset, tree.root, tree.category)
    test = stats["test"]
    assert test["non_binary_masks"] == {"count": 1, "example": str(antialiased)}
    assert test["mask_size_mismatches"]["count"] == 1
    assert str(small) in test["mask_size_mismatches"]["example"] and "24x20" in test["mask_size_mismatches"]["example"]
    assert stats["train"]["non_binary_masks"]["count"] == 0
    text = format_statistics(stats)
    assert "1 hold more than two values" in text and "1 differ in size from their image" in text


# ---- generated data ----

@pytest.mark.parametrize("name, value, expected", [
    ("num_train", 0, ">= 2, got 0 (a covariance needs two training images"),
    ("num_train", 1, ">= 2, got 1"),
    ("num_train", -4, ">= 2, got -4"),
    ("num_test_good", 0, ">= 1, got 0"),
    ("num_test_defect", 0, ">= 1, got 0"),
    ("num_test_defect", -1, ">= 1, got -1"),
    ("image_size", 16, ">= 32, got 16"),
    ("image_size", (64, 0), ">= 32, got 0"),
])
def test_generator_refuses_counts_that_make_an_unusable_category(tmp_path, name, value, expected):
    arguments = dict(dict(image_size=32, num_train=2, num_test_good=1, num_test_defect=1), **{name: value})
    with pytest.raises(ValueError) as info:
        generate_synthetic_category(tmp_path, **arguments)
    assert str(info.value).startswith(f"{name} must be") and expected in str(info.value)
    assert not (tmp_path / "demo").exists()


def test_generate_demo_with_no_training_images_exits_2(tmp_path, capsys):
    logger = logging.getLogger("anomaly_detection")
    handlers, level = list(logger.handlers), logger.level
    try:
        code = cli_main(["generate-demo", "--root", str(tmp_path), "--num-train", "0", "--image-size", "32"])
    finally:
        # the CLI's handler writes to this test's captured stderr, which is closed after the test
        logger.handlers[:] = handlers
        logger.setLevel(level)
    assert code == 2
    assert "error: num_train must be >= 2, got 0" in capsys.readouterr().err
    assert not (tmp_path / "demo").exists()


# ---- atomic writes ----

def _mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize("umask", [0o022, 0o000, 0o277], ids=["022", "000", "277"])
def test_written_files_are_0600_whatever_the_umask(tmp_path, umask):
    previous = os.umask(umask)
    try:
        written = [utils.atomic_write_text(tmp_path / "a.txt", "x"),
                   utils.atomic_write_json(tmp_path / "b.json", {"a": 1}),
                   utils.atomic_write_bytes(tmp_path / "sub" / "c.bin", b"x"),
                   utils.atomic_torch_save({"w": torch.zeros(1)}, tmp_path / "d.pt")]
    finally:
        os.umask(previous)
    assert {str(path): _mode(path) for path in written} == {str(path): 0o600 for path in written}


def test_generated_files_are_0600_and_written_by_the_shared_writer(tmp_path):
    assert synthetic.atomic_write_bytes is utils.atomic_write_bytes
    previous = os.umask(0o000)
    try:
        folder = generate_synthetic_category(tmp_path, image_size=32, num_train=2, num_test_good=1, num_test_defect=1)
    finally:
        os.umask(previous)
    files = [p for p in folder.rglob("*") if p.is_file()]
    assert len(files) == 2 + 1 + 3 * 2 + 1
    assert {_mode(p) for p in files} == {0o600}


def _dead_pid():
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_stale_temporary_files_are_removed_but_never_a_live_one(tmp_path):
    host = utils._host_tag()
    dead = _dead_pid()
    stale = [tmp_path / f".out.json.{dead}-{host}.ab12cd.tmp", tmp_path / f".other.png.{dead}-{host}.x9.tmp"]
    kept = [tmp_path / f".out.json.{os.getpid()}-{host}.ef34gh.tmp",
            tmp_path / f".out.json.{dead}-{'0' * 8 if host != '0' * 8 else '1' * 8}.ij56kl.tmp",
            tmp_path / ".out.json.mn78op.tmp", tmp_path / f"out.json.{dead}-{host}.tmp"]
    for path in stale + kept:
        path.write_text("partial")
    seen = []

    def write(handle):
        # the writer's own temporary file is live while it writes: a sweep must leave it alone
        own = [p for p in tmp_path.iterdir() if p.name.startswith(f".out.json.{os.getpid()}-{host}.")
               and p not in kept]
        assert len(own) == 1
        utils.remove_stale_temp_files(tmp_path)
        seen.append(own[0].exists())
        handle.write("{}")

    utils._atomic_write(tmp_path / "out.json", write, "w")
    assert seen == [True]
    assert not any(path.exists() for path in stale)
    assert all(path.exists() for path in kept)
    assert (tmp_path / "out.json").read_text() == "{}"


@pytest.mark.parametrize("value, expected", [("500000", 500000), ("0", None), ("none", None)])
def test_pixel_limit_can_be_raised_from_the_environment(monkeypatch, value, expected):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)
    monkeypatch.setenv(datasets_module.PIXEL_LIMIT_VARIABLE, value)
    datasets_module._apply_pixel_limit_from_environment()
    assert Image.MAX_IMAGE_PIXELS == expected


def test_a_bad_pixel_limit_in_the_environment_is_named(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)
    monkeypatch.setenv(datasets_module.PIXEL_LIMIT_VARIABLE, "lots")
    with pytest.raises(DatasetError, match="ANOMALY_DETECTION_MAX_IMAGE_PIXELS='lots': expected a number"):
        datasets_module._apply_pixel_limit_from_environment()
