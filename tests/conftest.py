# tests/conftest.py
import contextlib
import csv
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

# Height differs from width so a transposed axis shows up as a shape error.
IMAGE_HW = (40, 48)
# top, bottom, left, right (bottom/right exclusive) of the defect drawn in every defective image and its mask
DEFECT_BOX = (8, 24, 16, 32)


def noise_rgb(hw, seed, box=None):
    rng = np.random.default_rng(seed)
    array = rng.integers(0, 200, size=(hw[0], hw[1], 3), dtype=np.uint8)
    if box is not None:
        top, bottom, left, right = box
        array[top:bottom, left:right] = 255
    return array


def box_mask(hw, box, value=255):
    array = np.zeros(hw, dtype=np.uint8)
    top, bottom, left, right = box
    array[top:bottom, left:right] = value
    return array


def write_image(path, array):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def write_mask(path, hw=IMAGE_HW, box=DEFECT_BOX, value=255):
    return write_image(path, box_mask(hw, box, value))


def build_mvtec_tree(root, category="bottle", n_train=4, n_good=2, defects=None, masks=True,
                     hw=IMAGE_HW, box=DEFECT_BOX, image_ext=".png", mask_suffix="_mask", good_name="good",
                     seed=0):
    defects = {"broken": 2, "scratch": 1} if defects is None else defects
    folder = Path(root) / category
    seed_counter = [seed]

    def next_seed():
        seed_counter[0] += 1
        return seed_counter[0]

    for index in range(n_train):
        write_image(folder / "train" / good_name / f"{index:03d}{image_ext}", noise_rgb(hw, next_seed()))
    for index in range(n_good):
        write_image(folder / "test" / good_name / f"{index:03d}{image_ext}", noise_rgb(hw, next_seed()))
    for defect, count in defects.items():
        for index in range(count):
            write_image(folder / "test" / defect / f"{index:03d}{image_ext}", noise_rgb(hw, next_seed(), box))
            if masks:
                write_mask(folder / "ground_truth" / defect / f"{index:03d}{mask_suffix}.png", hw, box)
    return SimpleNamespace(root=Path(root), category=category, folder=folder, n_train=n_train,
                           n_test_good=n_good, n_defect=sum(defects.values()), defects=dict(defects),
                           hw=hw, box=box, has_masks=masks, good_name=good_name)


def build_visa_released_tree(root, categories=("candle", "capsules"), n_normal=5, n_test_normal=2,
                             n_anomaly=2, hw=IMAGE_HW, box=DEFECT_BOX):
    root = Path(root)
    rows = []
    seed = 100
    for category in categories:
        base = root / category / "Data"
        for index in range(n_normal):
            seed += 1
            image = write_image(base / "Images" / "Normal" / f"{index:04d}.JPG", noise_rgb(hw, seed))
            split = "test" if index >= n_normal - n_test_normal else "train"
            rows.append([category, split, "normal", image.relative_to(root).as_posix(), ""])
        for index in range(n_anomaly):
            seed += 1
            image = write_image(base / "Images" / "Anomaly" / f"{index:03d}.JPG", noise_rgb(hw, seed, box))
            mask = write_mask(base / "Masks" / "Anomaly" / f"{index:03d}.png", hw, box)
            rows.append([category, "test", "anomaly", image.relative_to(root).as_posix(),
                         mask.relative_to(root).as_posix()])
    csv_path = root / "split_csv" / "1cls.csv"
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    with open(csv_path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["object", "split", "label", "image", "mask"])
        writer.writerows(rows)
    return SimpleNamespace(root=root, category=categories[0], categories=tuple(categories), csv_path=csv_path,
                           n_train=n_normal - n_test_normal, n_test_good=n_test_normal, n_defect=n_anomaly,
                           defects={"anomaly": n_anomaly}, hw=hw, box=box, has_masks=True)


def build_folder_tree(root, category="custom", n_normal=6, n_a=2, n_b=1, hw=IMAGE_HW, box=DEFECT_BOX):
    base = Path(root) / category
    seed = 500
    for index in range(n_normal):
        seed += 1
        write_image(base / "good" / f"n{index:02d}.png", noise_rgb(hw, seed))
    for index in range(n_a):
        seed += 1
        write_image(base / "defect_a" / f"a{index:02d}.png", noise_rgb(hw, seed, box))
        write_mask(base / "masks_a" / f"a{index:02d}_mask.png", hw, box)
    for index in range(n_b):
        seed += 1
        write_image(base / "defect_b" / f"b{index:02d}.png", noise_rgb(hw, seed, box))
        write_mask(base / "masks_b" / f"b{index:02d}.png", hw, box)
    options = {"normal_dir": "good", "abnormal_dirs": ["defect_a", "defect_b"],
               "mask_dirs": ["masks_a", "masks_b"], "test_ratio": 0.5, "split_seed": 3}
    n_test_good = int(round(n_normal * options["test_ratio"]))
    return SimpleNamespace(root=Path(root), category=category, folder=base, options=options, n_normal=n_normal,
                           n_train=n_normal - n_test_good, n_test_good=n_test_good, n_defect=n_a + n_b,
                           defects={"defect_a": n_a, "defect_b": n_b}, hw=hw, box=box, has_masks=True)


@pytest.fixture
def mvtec_tree(tmp_path):
    return build_mvtec_tree(tmp_path / "mvtec")


@pytest.fixture
def visa_released_tree(tmp_path):
    return build_visa_released_tree(tmp_path / "visa")


@pytest.fixture
def visa_mvtec_tree(tmp_path):
    # the layout of the common conversion script: ground_truth/bad/<stem>.png, JPEG images
    return build_mvtec_tree(tmp_path / "visa_pytorch", category="candle", defects={"bad": 2},
                            image_ext=".JPG", mask_suffix="")


@pytest.fixture
def btad_tree(tmp_path):
    return build_mvtec_tree(tmp_path / "btad", category="01", defects={"ko": 2}, image_ext=".bmp",
                            mask_suffix="", good_name="ok")


@pytest.fixture
def folder_tree(tmp_path):
    return build_folder_tree(tmp_path / "folder")


@pytest.fixture
def tree_builders():
    return SimpleNamespace(mvtec=build_mvtec_tree, visa_released=build_visa_released_tree,
                           folder=build_folder_tree, write_image=write_image, write_mask=write_mask,
                           noise_rgb=noise_rgb, box_mask=box_mask, hw=IMAGE_HW, box=DEFECT_BOX)


@pytest.fixture
def shared_data_dir():
    path = Path(__file__).resolve().parents[1].parent / "shared" / "data"
    if not path.is_dir():
        pytest.skip(f"shared data folder {path} is absent")
    return path


@contextlib.contextmanager
def single_thread():
    # on a busy 2-core machine a second intra-op thread mostly waits for a core: tiny tensors run many
    # times faster with one (one STFPM step took 40x longer with 2 threads than with 1 under load)
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@pytest.fixture(autouse=True)
def one_torch_thread():
    with single_thread():
        yield


@pytest.fixture(scope="session")
def one_thread():
    # for session-scoped fixtures, which the autouse fixture above does not cover
    return single_thread


# ---- end-to-end runs on a generated category ------------------------------------------------------------
# The generated texture category is one a working model must separate: at 64 px with a random-init
# ResNet18, every model scored image AUROC >= 0.97 and pixel AUROC >= 0.90 on it (seed 0). A model that is
# broken (a constant or random score, a map that ignores the image) scores about 0.5 and fails these bars.
SEPARATION_BARS = {"image_auroc": 0.9, "pixel_auroc": 0.85}


def run_overrides(root, image_size=64, num_train=12, num_test_good=6, num_test_defect=2, epochs=1,
                  figures=False, val_fraction=0.25, backbone="resnet18"):
    root = Path(root)
    return [f"demo_dir={root / 'data'}", f"results_dir={root / 'results'}",
            f"checkpoint_dir={root / 'checkpoints'}", f"log_dir={root / 'logs'}",
            f"data.image_size={image_size}", f"dataset.synthetic.image_size={image_size}",
            f"dataset.synthetic.num_train={num_train}", f"dataset.synthetic.num_test_good={num_test_good}",
            f"dataset.synthetic.num_test_defect={num_test_defect}", f"training.num_epochs={epochs}",
            "training.batch_size=4", "data.eval_batch_size=8", "model.pretrained=false",
            "training.progress_bar=false", "evaluation.max_panels=3",
            f"evaluation.figures={str(bool(figures)).lower()}", f"data.val_fraction={val_fraction}"] + \
        ([f"model.backbone={backbone}"] if backbone else [])


def assert_separates(summary):
    for key, bar in SEPARATION_BARS.items():
        assert summary[key] is not None and summary[key] >= bar, \
            f"{summary['model']}: {key} {summary[key]} below {bar} on a category a working model separates"


@pytest.fixture(scope="session")
def separation():
    return SimpleNamespace(bars=SEPARATION_BARS, check=assert_separates, overrides=run_overrides)


@pytest.fixture(scope="session")
def random_backbone_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("backbones")
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), root / "resnet18.pth")
    return root
