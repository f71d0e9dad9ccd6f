# tests/phase_07/test_export.py
# Export parity: every model in MODELS, exported to every format, scores generated images as its model.pt does
# (1e-4 relative, identical labels) at batch sizes other than the traced one; and the metadata, the threshold
# as an input, and the refusals around them.
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from anomaly_detection import export as export_module
from anomaly_detection.data.datasets import load_image_raw
from anomaly_detection.export import FORMATS, MODEL_FILES, export_checkpoint, level_between
from anomaly_detection.models import MODELS, get_trainer_class
from anomaly_detection.models.patchcore.export import ExportablePatchCore, adaptive_pool_matrix
from anomaly_detection.runtimes import open_model
from helpers import json_lines, run_cli

pytest.importorskip("onnxruntime", reason='the export extra: pip install -e ".[export]"')
pytest.importorskip("openvino", reason='the export extra: pip install -e ".[export]"')

EXTRA_OVERRIDES = {"efficientad": ["training.max_steps=6", "model.padding=true"]}


@pytest.fixture(scope="session")
def trained_models(tmp_path_factory, separation, one_thread):
    # one tiny trained model.pt per model in MODELS (a new model is covered without touching this file)
    from anomaly_detection.runner import build_config, train_and_evaluate
    models = {}
    with one_thread():
        for name in MODELS:
            root = tmp_path_factory.mktemp(f"export_{name}")
            overrides = separation.overrides(root, image_size=64, num_train=8, num_test_good=3, num_test_defect=1,
                                             backbone=None if name == "efficientad" else "resnet18")
            summary = train_and_evaluate(build_config(name, "demo", overrides + EXTRA_OVERRIDES.get(name, [])))
            images = sorted((root / "data" / "demo" / "test").rglob("*.png"))
            models[name] = SimpleNamespace(checkpoint=Path(summary["checkpoint"]), images=images, root=root)
    return models


def preprocessed(opened, paths):
    transform = opened.transform()
    return torch.stack([transform(load_image_raw(path)) for path in paths])


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("name", list(MODELS))
def test_exported_model_scores_as_the_checkpoint(trained_models, name, fmt, tmp_path):
    model = trained_models[name]
    result = export_checkpoint(model.checkpoint, fmt, tmp_path / fmt)
    assert result["worst_relative_score_difference"] <= 1e-4
    reference, exported = open_model(model.checkpoint), open_model(tmp_path / fmt / MODEL_FILES[fmt])
    assert exported.runtime.name != "pytorch" and exported.threshold == reference.threshold
    images = preprocessed(reference, model.images)
    assert torch.equal(images, preprocessed(exported, model.images))
    expected = reference.runtime.run(images, reference.threshold["image_threshold"])
    # batch 1 and the whole set: neither is the traced example's size (2)
    for batch in (images[:1], images):
        scores = expected["pred_score"][:len(batch)]
        # the saved threshold, and one between the scores, so both labels occur and a flip would show
        for level in (reference.threshold["image_threshold"], level_between(expected["pred_score"])):
            got = exported.runtime.run(batch, level)
            assert torch.allclose(got["pred_score"].float(), scores, rtol=1e-4, atol=0), (name, fmt)
            assert torch.equal(got["pred_label"].bool(), scores >= level), (name, fmt)
            assert got["anomaly_map"].shape == (len(batch), 1, 64, 64)
            difference = (got["anomaly_map"].float() - expected["anomaly_map"][:len(batch)]).abs().max()
            assert difference <= 1e-4 * expected["anomaly_map"].abs().max()


def test_metadata_holds_what_a_deployment_needs(trained_models, tmp_path):
    model = trained_models["stfpm"]
    export_checkpoint(model.checkpoint, "onnx", tmp_path)
    metadata = json.loads((tmp_path / "metadata.json").read_text())
    state = torch.load(model.checkpoint, weights_only=True)
    assert metadata["model"] == "stfpm" and metadata["model_file"] == "model.onnx"
    assert metadata["threshold"]["image_threshold"] == state["threshold"]["image_threshold"]
    assert metadata["input"]["shape"] == ["batch", 3, 64, 64] and metadata["input"]["layout"] == "NCHW"
    mean, std = state["config"]["data"]["normalization"]
    assert metadata["preprocessing"]["mean"] == list(mean) and metadata["preprocessing"]["std"] == list(std)
    assert metadata["preprocessing"]["image_size"] == [64, 64]
    assert metadata["anomaly_detection_version"] and metadata["source_sha256"]
    assert metadata["parity"]["label_agreement"] == "4/4"
    assert (tmp_path / "model.onnx").stat().st_mode & 0o777 == 0o600


def test_a_changed_threshold_needs_no_reexport(trained_models, tmp_path):
    model = trained_models["padim"]
    export_checkpoint(model.checkpoint, "onnx", tmp_path)
    run = run_cli(["predict", "--checkpoint", str(tmp_path / "model.onnx"), "--input", str(model.images[0].parent)])
    scores = [r["pred_score"] for r in json_lines(run.out)[:-1]]
    metadata_path = tmp_path / "metadata.json"
    metadata = json.loads(metadata_path.read_text())
    for level in (min(scores) - 1.0, max(scores) + 1.0):
        metadata["threshold"]["image_threshold"] = level
        metadata_path.write_text(json.dumps(metadata))
        run = run_cli(["predict", "--checkpoint", str(tmp_path / "model.onnx"), "--input",
                       str(model.images[0].parent)])
        assert run.code == 0, run.err
        labels = [r["pred_label"] for r in json_lines(run.out)[:-1]]
        assert labels == [int(level < max(scores))] * len(scores)


@pytest.mark.parametrize("fmt", FORMATS)
def test_predict_with_an_exported_model_writes_the_same_table(trained_models, tmp_path, fmt):
    model = trained_models["patchcore"]
    export_checkpoint(model.checkpoint, fmt, tmp_path / "export")
    folder = model.root / "data" / "demo" / "test"
    tables = {}
    for name, checkpoint in (("pt", model.checkpoint), ("exported", tmp_path / "export" / MODEL_FILES[fmt])):
        run = run_cli(["predict", "--checkpoint", str(checkpoint), "--input", str(folder), "--output",
                       str(tmp_path / name), "--batch-size", "4"])
        assert run.code == 0, run.err
        import pandas as pd
        tables[name] = pd.read_csv(tmp_path / name / "predictions.csv")
    assert list(tables["pt"]["image_path"]) == [str(p) for p in model.images]  # recursive, in order
    assert list(tables["exported"]["image_path"]) == list(tables["pt"]["image_path"])
    assert (tables["exported"]["pred_label"] == tables["pt"]["pred_label"]).all()
    assert ((tables["exported"]["pred_score"] / tables["pt"]["pred_score"] - 1).abs() <= 1e-4).all()


def test_exported_model_with_a_nan_threshold_is_refused(trained_models, tmp_path):
    model = trained_models["stfpm"]
    export_checkpoint(model.checkpoint, "torchscript", tmp_path)
    metadata = json.loads((tmp_path / "metadata.json").read_text())
    metadata["threshold"]["image_threshold"] = float("nan")
    (tmp_path / "metadata.json").write_text(json.dumps(metadata))
    run = run_cli(["predict", "--checkpoint", str(tmp_path / "model.torchscript"), "--input", str(model.images[0])])
    assert run.code == 2 and "image_threshold=nan" in run.err and "metadata.json" in run.err


def test_exported_model_without_its_metadata_is_refused(trained_models, tmp_path):
    model = trained_models["stfpm"]
    export_checkpoint(model.checkpoint, "onnx", tmp_path)
    (tmp_path / "metadata.json").unlink()
    run = run_cli(["predict", "--checkpoint", str(tmp_path / "model.onnx"), "--input", str(model.images[0])])
    assert run.code == 2 and str(tmp_path / "metadata.json") in run.err and "export" in run.err


def test_overrides_are_refused_for_an_exported_model(trained_models, tmp_path):
    model = trained_models["stfpm"]
    export_checkpoint(model.checkpoint, "onnx", tmp_path)
    run = run_cli(["predict", "--checkpoint", str(tmp_path / "model.onnx"), "--input", str(model.images[0]),
                   "data.image_size=128"])
    assert run.code == 2 and "data.image_size=128" in run.err and "metadata.json" in run.err


def test_an_export_that_does_not_reproduce_the_scores_writes_nothing(trained_models, tmp_path, monkeypatch):
    model = trained_models["stfpm"]
    real = export_module.load_runtime

    class Drifting:
        def __init__(self, runtime):
            self.runtime = runtime

        def run(self, images, threshold):
            outputs = self.runtime.run(images, threshold)
            return dict(outputs, pred_score=outputs["pred_score"] * 1.01)

    monkeypatch.setattr(export_module, "load_runtime", lambda *args: Drifting(real(*args)))
    run = run_cli(["export", "--checkpoint", str(model.checkpoint), "--format", "onnx", "--output", str(tmp_path)])
    assert run.code == 2 and "does not reproduce" in run.err and "tolerance" in run.err
    assert list(tmp_path.iterdir()) == []


def test_missing_runtime_package_names_the_extra(trained_models, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "openvino", None)
    run = run_cli(["export", "--checkpoint", str(trained_models["stfpm"].checkpoint), "--format", "openvino",
                   "--output", str(tmp_path)])
    assert run.code == 2 and "'openvino'" in run.err and '.[export]' in run.err


def test_export_cli_prints_the_parity_it_checked(trained_models, tmp_path):
    run = run_cli(["export", "--checkpoint", str(trained_models["fastflow"].checkpoint), "--format", "torchscript",
                   "--output", str(tmp_path)])
    assert run.code == 0, run.err
    summary = json.loads(run.out.strip().splitlines()[-1])
    assert summary["label_agreement"] == "4/4" and summary["worst_relative_score_difference"] <= 1e-4
    assert Path(summary["model_file"]) == tmp_path / "model.torchscript"


# ---- the export forms of the model folders -------------------------------------------------------------------
@pytest.mark.parametrize("in_size,out_size", [(1152, 1024), (10, 3), (7, 7), (5, 9)])
def test_adaptive_pool_matrix_is_adaptive_average_pooling(in_size, out_size):
    values = torch.randn(2, 4, in_size)
    expected = F.adaptive_avg_pool1d(values, out_size)
    assert torch.allclose(values @ adaptive_pool_matrix(in_size, out_size).t(), expected, atol=1e-5)


def test_patchcore_export_form_equals_the_model_across_bank_blocks(trained_models):
    model = open_model(trained_models["patchcore"].checkpoint).runtime.model
    images = torch.randn(3, 3, 64, 64)
    # blocks of 7 rows: the running minimum crosses many block boundaries
    exportable = ExportablePatchCore(model, bank_chunk=7).eval()
    with torch.no_grad():
        expected, got = model(images), exportable(images)
    assert torch.allclose(got["pred_score"], expected["pred_score"], rtol=1e-5)
    assert torch.allclose(got["anomaly_map"], expected["anomaly_map"], rtol=1e-5, atol=1e-6)


def test_models_without_an_export_form_export_themselves():
    model = torch.nn.Linear(2, 2)
    assert get_trainer_class("stfpm").exportable_model(model) is model
    assert get_trainer_class("patchcore").exportable_model is not get_trainer_class("stfpm").exportable_model
