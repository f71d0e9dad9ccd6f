# tests/phase_02/test_visualization.py
import threading
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from anomaly_detection.metrics import (
    denormalize_image,
    plot_anomaly_panel,
    plot_pr_curve,
    plot_roc_curve,
    plot_score_histogram,
)

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def png_ratio(path):
    assert path.stat().st_size > 0
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.format == "PNG"
        width, height = image.size
    return width / height


def sample(size=32, defective=True):
    rng = np.random.default_rng(0)
    image = rng.random((size, size, 3))
    mask = np.zeros((size, size))
    if defective:
        mask[8:14, 10:20] = 1
    anomaly_map = rng.random((size, size)) + 2 * mask
    return image, mask, anomaly_map


def test_denormalize_image_inverts_normalization():
    rng = np.random.default_rng(0)
    image = rng.random((8, 6, 3)).astype(np.float32)
    normalized = (image - np.array(MEAN)) / np.array(STD)
    tensor = torch.from_numpy(normalized.transpose(2, 0, 1).astype(np.float32))
    restored = denormalize_image(tensor, MEAN, STD)
    assert restored.shape == (8, 6, 3)
    np.testing.assert_allclose(restored, image, atol=1e-5)
    assert denormalize_image(tensor * 10, MEAN, STD).max() <= 1.0
    assert denormalize_image(np.zeros((1, 4, 5)), [0.5], [0.5]).shape == (4, 5, 3)


@pytest.mark.parametrize("defective", [True, False])
def test_anomaly_panel_writes_png(tmp_path, defective):
    image, mask, anomaly_map = sample(defective=defective)
    target = tmp_path / "a" / "panel.png"
    path = plot_anomaly_panel(image, mask, anomaly_map, 1.5, "bottle / broken_large / 000", target, vmin=0, vmax=3)
    assert path == target
    assert 3.0 < png_ratio(path) < 4.5


def test_anomaly_panel_accepts_tensors_lower_resolution_map_and_no_threshold(tmp_path):
    image, mask, anomaly_map = sample(size=64)
    low_res_map = torch.from_numpy(anomaly_map[::4, ::4]).unsqueeze(0)
    mask = torch.from_numpy(mask)[None]
    path = plot_anomaly_panel(torch.from_numpy(image), mask, low_res_map, None, "t", tmp_path / "p.png")
    assert 3.0 < png_ratio(path) < 4.5
    path = plot_anomaly_panel((image * 255).astype(np.uint8), None, anomaly_map, 100.0, "t", tmp_path / "q.png")
    assert 3.0 < png_ratio(path) < 4.5


def test_curves_and_histogram_write_png(tmp_path):
    rng = np.random.default_rng(1)
    labels = rng.random(50) < 0.5
    scores = rng.normal(size=50) * 100 + 300 + 80 * labels
    assert 0.8 < png_ratio(plot_roc_curve(scores, labels, tmp_path / "roc.png", "ROC")) < 1.25
    path = plot_pr_curve(torch.from_numpy(scores), torch.from_numpy(labels), tmp_path / "pr.png", "PR")
    assert 0.8 < png_ratio(path) < 1.25
    path = plot_score_histogram(scores, labels, tmp_path / "hist.png", threshold=320.0, title="scores")
    assert 1.4 < png_ratio(path) < 2.1


@pytest.mark.parametrize("labels", [np.zeros(10), np.ones(10), np.zeros(0)])
def test_single_class_does_not_crash(tmp_path, labels):
    scores = np.linspace(0, 1, labels.size)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for name, function in (("roc", plot_roc_curve), ("pr", plot_pr_curve)):
            assert png_ratio(function(scores, labels, tmp_path / f"{name}.png", name)) > 0
        assert png_ratio(plot_score_histogram(scores, labels, tmp_path / "hist.png", threshold=0.5)) > 0


def test_plots_are_thread_safe(tmp_path):
    image, mask, anomaly_map = sample()
    errors = []

    def work(index):
        try:
            plot_anomaly_panel(image, mask, anomaly_map, 1.0, str(index), tmp_path / f"{index}.png")
            plot_roc_curve(anomaly_map.ravel(), mask.ravel(), tmp_path / f"roc{index}.png", str(index))
        except Exception as error:
            errors.append(error)

    threads = [threading.Thread(target=work, args=(index,)) for index in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert len(list(tmp_path.glob("*.png"))) == 8
