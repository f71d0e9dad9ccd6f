# tests/phase_01/test_synthetic.py
import json
import os

import numpy as np
import pytest
from PIL import Image

from anomaly_detection.data.synthetic import (
    DEFECT_TYPES,
    SYNTHETIC_KINDS,
    generate_synthetic_category,
    render_sample,
)

SMALL = dict(image_size=32, num_train=4, num_test_good=2, num_test_defect=2)


def _load(path):
    return np.asarray(Image.open(path))


def _all_files(cat_dir):
    return sorted(p.relative_to(cat_dir) for p in cat_dir.rglob("*") if p.is_file())


def test_public_constants():
    assert SYNTHETIC_KINDS == ("texture", "object")
    assert set(DEFECT_TYPES) == set(SYNTHETIC_KINDS)
    assert DEFECT_TYPES["texture"] == ("scratch", "hole", "stain")
    assert DEFECT_TYPES["object"] == ("scratch", "missing_part", "stain")


@pytest.mark.parametrize("kind", SYNTHETIC_KINDS)
def test_layout_counts_and_masks(tmp_path, kind):
    cat_dir = generate_synthetic_category(tmp_path, category="demo", kind=kind, **SMALL)
    assert cat_dir == tmp_path / "demo"
    assert sorted(p.name for p in (cat_dir / "train" / "good").iterdir()) == [f"{i:03d}.png" for i in range(4)]
    assert len(list((cat_dir / "test" / "good").glob("*.png"))) == 2
    assert sorted(p.name for p in (cat_dir / "test").iterdir()) == sorted(("good",) + DEFECT_TYPES[kind])
    # good images never get masks
    assert sorted(p.name for p in (cat_dir / "ground_truth").iterdir()) == sorted(DEFECT_TYPES[kind])
    good_images = list((cat_dir / "train" / "good").glob("*.png")) + list((cat_dir / "test" / "good").glob("*.png"))
    for image_path in good_images:
        image = _load(image_path)
        assert image.shape == (32, 32, 3) and image.dtype == np.uint8
    for defect in DEFECT_TYPES[kind]:
        images = sorted((cat_dir / "test" / defect).glob("*.png"))
        assert len(images) == 2
        for image_path in images:
            mask_path = cat_dir / "ground_truth" / defect / f"{image_path.stem}_mask.png"
            assert mask_path.is_file()
            mask_img = Image.open(mask_path)
            assert mask_img.mode == "L"
            mask = np.asarray(mask_img)
            assert mask.shape == (32, 32)
            assert set(np.unique(mask).tolist()) <= {0, 255}
            assert (mask == 255).sum() >= 0.01 * 32 * 32
            assert Image.open(image_path).size == mask_img.size
    marker = json.loads((cat_dir / "synthetic.json").read_text())
    assert marker["complete"] is True and marker["params"]["kind"] == kind


def test_rectangular_size(tmp_path):
    cat_dir = generate_synthetic_category(tmp_path, kind="object", image_size=(40, 56), num_train=2,
                                          num_test_good=1, num_test_defect=1)
    assert _load(cat_dir / "train" / "good" / "000.png").shape == (40, 56, 3)
    for defect in DEFECT_TYPES["object"]:
        assert _load(cat_dir / "test" / defect / "000.png").shape == (40, 56, 3)
        assert _load(cat_dir / "ground_truth" / defect / "000_mask.png").shape == (40, 56)


def test_determinism(tmp_path):
    a = generate_synthetic_category(tmp_path / "a", kind="object", seed=3, **SMALL)
    b = generate_synthetic_category(tmp_path / "b", kind="object", seed=3, **SMALL)
    c = generate_synthetic_category(tmp_path / "c", kind="object", seed=4, **SMALL)
    files = _all_files(a)
    assert files == _all_files(b)
    for rel in files:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
    for rel in [r for r in files if r.suffix == ".png"]:
        assert not np.array_equal(_load(a / rel), _load(c / rel)), rel


def test_normal_images_vary_but_stay_in_distribution(tmp_path):
    for kind in SYNTHETIC_KINDS:
        cat_dir = generate_synthetic_category(tmp_path, category=kind, kind=kind, image_size=48,
                                              num_train=6, num_test_good=1, num_test_defect=1)
        images = np.stack([_load(p).astype(np.float64) for p in sorted((cat_dir / "train" / "good").glob("*.png"))])
        for i in range(len(images)):
            for j in range(i + 1, len(images)):
                assert np.abs(images[i] - images[j]).mean() > 1.0
        means = images.mean(axis=(1, 2))
        # global colour stays stable from image to image: variation is structure, not a new product
        assert means.std(axis=0).max() < 8.0


@pytest.mark.parametrize("kind", SYNTHETIC_KINDS)
def test_defect_changes_exactly_the_masked_pixels(kind):
    for defect in DEFECT_TYPES[kind]:
        for seed in range(4):
            clean, no_mask = render_sample(kind, 48, [seed, 9], None)
            broken, mask = render_sample(kind, 48, [seed, 9], defect)
            assert no_mask is None
            assert mask.shape == (48, 48) and mask.dtype == bool
            assert mask.sum() >= 0.01 * 48 * 48
            diff = np.abs(clean.astype(np.int16) - broken.astype(np.int16)).max(axis=-1)
            # no changed pixel may lie outside the ground truth
            assert diff[~mask].max() == 0, (kind, defect, seed)
            assert diff[mask].mean() > 20, (kind, defect, seed, diff[mask].mean())


def test_saved_defects_stand_out_from_good_images(tmp_path):
    for kind in SYNTHETIC_KINDS:
        cat_dir = generate_synthetic_category(tmp_path, category=kind, kind=kind, image_size=48,
                                              num_train=10, num_test_good=1, num_test_defect=3)
        mean_good = np.mean([_load(p).astype(np.float64) for p in (cat_dir / "train" / "good").glob("*.png")], axis=0)
        for defect in DEFECT_TYPES[kind]:
            inside, outside = [], []
            for image_path in sorted((cat_dir / "test" / defect).glob("*.png")):
                mask = _load(cat_dir / "ground_truth" / defect / f"{image_path.stem}_mask.png") > 0
                err = np.abs(_load(image_path).astype(np.float64) - mean_good).mean(axis=-1)
                inside.append(err[mask].mean())
                outside.append(err[~mask].mean())
            assert np.mean(inside) > 1.5 * np.mean(outside), (kind, defect, inside, outside)


def test_same_parameters_reuse_without_rewriting(tmp_path):
    cat_dir = generate_synthetic_category(tmp_path, **SMALL)
    stamps = {p: p.stat().st_mtime_ns for p in cat_dir.rglob("*") if p.is_file()}
    # make any rewrite visible even on file systems with coarse timestamps
    for p in stamps:
        os.utime(p, ns=(1_000_000_000, 1_000_000_000))
    again = generate_synthetic_category(tmp_path, **SMALL)
    assert again == cat_dir
    assert all(p.stat().st_mtime_ns == 1_000_000_000 for p in stamps)
    assert set(p for p in cat_dir.rglob("*") if p.is_file()) == set(stamps)


def test_different_parameters_need_overwrite(tmp_path):
    cat_dir = generate_synthetic_category(tmp_path, **SMALL)
    changed = dict(SMALL, num_train=2)
    with pytest.raises(FileExistsError) as info:
        generate_synthetic_category(tmp_path, **changed)
    assert str(cat_dir) in str(info.value) and "overwrite=True" in str(info.value)
    with pytest.raises(FileExistsError):
        generate_synthetic_category(tmp_path, seed=1, **SMALL)
    generate_synthetic_category(tmp_path, overwrite=True, **changed)
    # stale images from the larger run are gone
    assert len(list((cat_dir / "train" / "good").glob("*.png"))) == 2
    assert json.loads((cat_dir / "synthetic.json").read_text())["params"]["num_train"] == 2


def test_foreign_folder_is_protected(tmp_path):
    cat_dir = tmp_path / "bottle"
    (cat_dir / "train" / "good").mkdir(parents=True)
    (cat_dir / "train" / "good" / "real.png").write_bytes(b"not ours")
    with pytest.raises(FileExistsError):
        generate_synthetic_category(tmp_path, category="bottle", **SMALL)
    assert (cat_dir / "train" / "good" / "real.png").read_bytes() == b"not ours"


def test_interrupted_run_is_completed(tmp_path):
    cat_dir = generate_synthetic_category(tmp_path, **SMALL)
    reference = (cat_dir / "test" / "hole" / "001.png").read_bytes()
    marker_path = cat_dir / "synthetic.json"
    marker = json.loads(marker_path.read_text())
    marker["complete"] = False
    marker_path.write_text(json.dumps(marker))
    (cat_dir / "test" / "hole" / "001.png").unlink()
    generate_synthetic_category(tmp_path, **SMALL)
    assert (cat_dir / "test" / "hole" / "001.png").read_bytes() == reference
    assert json.loads(marker_path.read_text())["complete"] is True


@pytest.mark.parametrize("kwargs, name", [
    (dict(kind="fabric"), "kind"),
    (dict(image_size=8), "image_size"),
    (dict(image_size=(32, 15)), "image_size"),
    (dict(image_size=(32, 32, 3)), "image_size"),
    (dict(num_train=-1), "num_train"),
    (dict(num_test_good=-2), "num_test_good"),
    (dict(num_test_defect=-3), "num_test_defect"),
    (dict(seed=-1), "seed"),
])
def test_invalid_arguments(tmp_path, kwargs, name):
    with pytest.raises(ValueError) as info:
        generate_synthetic_category(tmp_path, **kwargs)
    message = str(info.value)
    assert name in message
    value = list(kwargs.values())[0]
    if name == "kind":
        assert "texture" in message and "object" in message and "fabric" in message
    elif not isinstance(value, tuple):
        assert str(value) in message
    assert not (tmp_path / "demo").exists()
