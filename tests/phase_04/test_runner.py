# tests/phase_04/test_runner.py
import json
import runpy

import pytest
import torch

from anomaly_detection.models import MODELS, get_trainer_class
from anomaly_detection.models.padim import PaDiMModel, PaDiMTrainer
from anomaly_detection.models.patchcore import PatchCoreTrainer
from anomaly_detection.runner import build_config, load_model_file, train_and_evaluate
from anomaly_detection.utils import PROJECT_ROOT
from helpers import run_cli


def run(argv, entry=None):
    result = run_cli(argv) if entry is None else run_cli(argv, entry)
    return result.code, result.out, result.err


def test_registered():
    assert MODELS["patchcore"] is PatchCoreTrainer and get_trainer_class("padim") is PaDiMTrainer


def test_yaml_defaults():
    patchcore = build_config("patchcore", "mvtec")
    assert patchcore["training"]["num_epochs"] == 1
    assert patchcore["model"]["coreset_ratio"] == 0.1 and patchcore["model"]["target_dim"] == 1024
    assert patchcore["model"]["num_neighbors"] == 9 and patchcore["model"]["memory_budget_mb"] > 0
    padim = build_config("padim", "mvtec")
    assert padim["training"]["num_epochs"] == 1 and padim["model"]["epsilon"] == 0.01


@pytest.mark.parametrize("model", ["patchcore", "padim"])
def test_cli_train_writes_metrics_and_a_loadable_model(model, tmp_path, cli_overrides, caplog, separation):
    overrides = cli_overrides(tmp_path, model)
    code, out, err = run(["train", "--model", model, "--dataset", "demo"] + overrides)
    assert code == 0, err
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["model"] == model
    separation.check(summary)
    results = tmp_path / "results" / model / "demo" / "demo"
    metrics = json.loads((results / "metrics.json").read_text())
    assert metrics["num_defective"] == 3 and metrics["pixel_auroc"] is not None
    assert "Model fit_timings" in caplog.text
    trained, _, state = load_model_file(summary["checkpoint"])
    assert state["threshold"]["image_threshold"] > 0
    with torch.no_grad():
        outputs = trained.eval()(torch.rand(2, 3, 64, 64))
    assert outputs["anomaly_map"].shape == (2, 1, 64, 64)
    if model == "patchcore":
        # how a fitted bank is searched is not what the model learned: test may change it, and nothing else
        code, out, err = run(["test", "--checkpoint", summary["checkpoint"], f"results_dir={tmp_path / 'again'}",
                              "model.search_precision=bfloat16", "model.memory_budget_mb=1"])
        assert code == 0, err
        again = json.loads(out.strip().splitlines()[-1])
        for key in ("image_auroc", "pixel_auroc", "aupro"):
            assert again[key] == pytest.approx(summary[key], abs=1e-4), key
        code, _, err = run(["test", "--checkpoint", summary["checkpoint"], "model.coreset_ratio=0.5"])
        assert code == 2 and "model.coreset_ratio=0.5 differs from the checkpoint's" in err


def test_experiment_script_runs_one_category(tmp_path, cli_overrides, monkeypatch):
    script = PROJECT_ROOT / "experiments" / "train_patchcore.py"
    namespace = runpy.run_path(str(script))
    overrides = cli_overrides(tmp_path, "patchcore") + ["model.coreset_ratio=0.25"]
    code, out, err = run(["--dataset", "demo", "--category", "demo"] + overrides, entry=namespace["main"])
    assert code == 0, err
    assert json.loads(out.strip().splitlines()[-1])["category"] == "demo"


def test_cli_reports_bad_coreset_ratio(tmp_path, cli_overrides):
    overrides = cli_overrides(tmp_path, "patchcore") + ["model.coreset_ratio=1.5"]
    code, _, err = run(["train", "--model", "patchcore", "--dataset", "demo"] + overrides)
    assert code == 2 and "coreset_ratio" in err


def test_a_broken_model_fails_the_end_to_end_bar(tmp_path, cli_overrides, separation, monkeypatch):
    # the control for the bars above: the same run with a model whose scores ignore the image
    def constant(self, images):
        zeros = torch.zeros(images.shape[0], 1, *images.shape[-2:])
        return {"anomaly_map": zeros, "pred_score": zeros.flatten(1).amax(1)}

    monkeypatch.setattr(PaDiMModel, "forward", constant)
    config = build_config("padim", "demo", cli_overrides(tmp_path, "padim"))
    summary = train_and_evaluate(config)
    assert summary["image_auroc"] == 0.5
    with pytest.raises(AssertionError, match="image_auroc 0.5 below 0.9"):
        separation.check(summary)
