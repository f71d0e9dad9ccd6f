# tests/phase_02/test_evaluator.py
import json
import math
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from anomaly_detection.data import MVTecDataset, get_test_transforms
from anomaly_detection.data.synthetic import generate_synthetic_category
from anomaly_detection.evaluator import Evaluator

SUMMARY_KEYS = ("image_auroc", "pixel_auroc", "aupro", "f1_max", "pixel_f1_max", "image_ap", "pixel_ap")


def loader_of(dataset, batch_size=4):
    return DataLoader(dataset, batch_size=batch_size, shuffle=False)


def test_evaluate_writes_metrics_scores_and_figures(tiny, tmp_path):
    dataset = tiny.defect_dataset()
    evaluator = Evaluator(tiny.BrightnessModel(), device="cpu", output_dir=tmp_path, max_panels=4,
                          progress_bar=False)
    metrics = evaluator.evaluate(loader_of(dataset))

    # defect pixels are brighter than every normal pixel, so every metric is perfect
    for key in ("image_auroc", "pixel_auroc", "aupro", "f1_max", "pixel_f1_max", "image_ap", "pixel_ap"):
        assert metrics[key] == pytest.approx(1.0), key
    assert (metrics["num_images"], metrics["num_good"], metrics["num_defective"]) == (12, 6, 6)
    assert metrics["image_auroc_per_defect_type"] == {"scratch": 1.0, "stain": 1.0}
    assert metrics["notes"] == []

    written = json.loads((tmp_path / "metrics.json").read_text())
    assert written["image_auroc"] == pytest.approx(1.0) and written["aupro"] == pytest.approx(1.0)

    table = pd.read_csv(tmp_path / "scores.csv")
    assert list(table.columns) == ["image_path", "defect_type", "label", "score"]
    assert len(table) == 12
    assert table["label"].tolist() == dataset.labels
    assert table["defect_type"].tolist() == dataset.defect_types
    expected = [float(img.mean(dim=0).max()) for img in dataset.images]
    assert table["score"].to_numpy() == pytest.approx(expected, rel=1e-6)

    figures = tmp_path / "figures"
    for name in ("roc_curve.png", "pr_curve.png", "score_histogram.png"):
        assert (figures / name).stat().st_size > 1000, name
    panels = sorted(p.name for p in (figures / "panels").glob("*.png"))
    assert 3 <= len(panels) <= 4
    assert {name.split("_")[0] for name in panels} == {"good", "scratch", "stain"}


def test_metrics_are_computed_on_raw_scores(tiny, tmp_path):
    dataset = tiny.defect_dataset(seed=4)
    # bright spots in good images make the metrics imperfect, so a change of ranking would show
    for index in (1, 2):
        dataset.images[index][:, :2, :2] = 1.0
    small = Evaluator(tiny.BrightnessModel(1.0), device="cpu", output_dir=tmp_path / "small", figures=False,
                      progress_bar=False)
    large = Evaluator(tiny.BrightnessModel(100.0), device="cpu", output_dir=tmp_path / "large", figures=False,
                      progress_bar=False)
    small_metrics = small.evaluate(loader_of(dataset))
    large_metrics = large.evaluate(loader_of(dataset))
    assert small_metrics["image_auroc"] < 1.0 and small_metrics["pixel_auroc"] < 1.0
    for key in SUMMARY_KEYS:
        assert large_metrics[key] == pytest.approx(small_metrics[key], abs=1e-9), key
    small_scores = pd.read_csv(tmp_path / "small" / "scores.csv")["score"].to_numpy()
    large_scores = pd.read_csv(tmp_path / "large" / "scores.csv")["score"].to_numpy()
    assert large_scores == pytest.approx(100.0 * small_scores, rel=1e-5)
    assert large_scores.max() > 1.0


def test_calibrate_threshold_is_the_quantile_of_normal_validation_scores(tiny):
    dataset = tiny.DictDataset(tiny.random_images(10, size=16, seed=5))
    model = tiny.BrightnessModel()
    threshold = Evaluator(model, device="cpu", progress_bar=False).calibrate_threshold(loader_of(dataset), 0.9)
    maps = torch.stack(dataset.images).mean(dim=1)
    scores = maps.flatten(1).amax(dim=1).numpy()
    assert threshold["image_threshold"] == pytest.approx(float(np.quantile(scores, 0.9)))
    assert threshold["pixel_threshold"] == pytest.approx(float(np.quantile(maps.numpy(), 0.9)))
    assert threshold["quantile"] == 0.9 and threshold["num_images"] == 10
    assert scores.min() < threshold["image_threshold"] < scores.max()


def test_calibrate_threshold_refuses_defective_images(tiny):
    evaluator = Evaluator(tiny.BrightnessModel(), device="cpu", progress_bar=False)
    with pytest.raises(ValueError, match="normal validation images only"):
        evaluator.calibrate_threshold(loader_of(tiny.defect_dataset()))
    with pytest.raises(ValueError, match="quantile"):
        evaluator.calibrate_threshold(loader_of(tiny.DictDataset(tiny.random_images(2))), 1.5)


def test_threshold_is_applied_and_reported(tiny, tmp_path):
    dataset = tiny.defect_dataset()
    threshold = {"image_threshold": 0.7, "pixel_threshold": 0.7, "quantile": 0.99, "num_images": 5}
    evaluator = Evaluator(tiny.BrightnessModel(), device="cpu", output_dir=tmp_path, max_panels=0,
                          progress_bar=False)
    metrics = evaluator.evaluate(loader_of(dataset), threshold)
    assert metrics["threshold"] == threshold
    assert metrics["at_threshold"] == {"true_positive_rate": 1.0, "false_positive_rate": 0.0}
    table = pd.read_csv(tmp_path / "scores.csv")
    assert table["predicted_anomalous"].tolist() == dataset.labels
    assert not (tmp_path / "figures" / "panels").exists()


def test_test_set_without_defective_images_reports_undefined_auroc(tiny, tmp_path):
    dataset = tiny.DictDataset(tiny.random_images(5, size=16, seed=2), has_masks=True)
    evaluator = Evaluator(tiny.BrightnessModel(), device="cpu", output_dir=tmp_path, max_panels=2,
                          progress_bar=False)
    metrics = evaluator.evaluate(loader_of(dataset))
    assert math.isnan(metrics["image_auroc"]) and math.isnan(metrics["f1_max"])
    assert any("AUROC is undefined" in note and "no defective images" in note for note in metrics["notes"])
    written = json.loads((tmp_path / "metrics.json").read_text())
    assert written["image_auroc"] is None and written["f1_max"] is None
    assert written["num_defective"] == 0
    assert (tmp_path / "figures" / "roc_curve.png").is_file()
    assert len(list((tmp_path / "figures" / "panels").glob("*.png"))) >= 1


def test_test_set_without_masks_skips_pixel_metrics(tiny, tmp_path):
    folder = generate_synthetic_category(tmp_path / "data", category="labels_only", kind="texture",
                                         image_size=32, num_train=2, num_test_good=3, num_test_defect=1)
    shutil.rmtree(folder / "ground_truth")
    dataset = MVTecDataset(tmp_path / "data", "labels_only", "test", get_test_transforms(image_size=32))
    evaluator = Evaluator(tiny.BrightnessModel(), device="cpu", output_dir=tmp_path / "results", max_panels=2,
                          progress_bar=False)
    loader = loader_of(dataset)
    assert evaluator.predict(loader)["has_masks"] is False
    metrics = evaluator.evaluate(loader)
    for key in ("pixel_auroc", "aupro", "pixel_f1_max", "pixel_ap"):
        assert math.isnan(metrics[key]), key
    assert 0.0 <= metrics["image_auroc"] <= 1.0
    assert any("pixel metrics skipped" in note for note in metrics["notes"])
    written = json.loads((tmp_path / "results" / "metrics.json").read_text())
    assert written["pixel_auroc"] is None and written["aupro"] is None
    assert written["image_auroc"] == pytest.approx(metrics["image_auroc"])


def test_model_outputs_are_checked(tiny):
    class WrongShape(nn.Module):
        def forward(self, images):
            return {"anomaly_map": images[:, :1, ::2, ::2], "pred_score": images.flatten(1).amax(1)}

    class NoDict(nn.Module):
        def forward(self, images):
            return images.mean(dim=(1, 2, 3))

    loader = loader_of(tiny.DictDataset(tiny.random_images(2, size=16)))
    with pytest.raises(ValueError, match="input resolution"):
        Evaluator(WrongShape(), device="cpu", progress_bar=False).predict(loader)
    with pytest.raises(TypeError, match="anomaly_map"):
        Evaluator(NoDict(), device="cpu", progress_bar=False).predict(loader)


def test_scoring_without_figures_does_not_load_matplotlib_or_pandas():
    # both are imported on first use: a run with figures and results off, or `predict`, does without them
    import subprocess
    import sys

    code = ("import sys; import anomaly_detection.cli, anomaly_detection.runner, anomaly_detection.evaluator; "
            "from anomaly_detection.metrics import compute_auroc; "
            "print(sorted(m for m in ('matplotlib', 'pandas') if m in sys.modules)); "
            "from anomaly_detection.metrics import plot_roc_curve; print(plot_roc_curve.__module__)")
    lines = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert lines == ["[]", "anomaly_detection.metrics.visualization"]
