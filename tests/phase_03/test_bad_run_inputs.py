# tests/phase_03/test_bad_run_inputs.py
import logging
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from anomaly_detection.trainer import BaseTrainer, check_validation_metrics
from anomaly_detection.utils import PROJECT_ROOT
from helpers import json_lines, run_cli

# The run-level half of the bad-input corpus (the data half is tests/phase_01/test_bad_inputs.py): diverging
# runs, checkpoints, configs that drifted since training, predict inputs and command-line values. Each case
# asserts that the message names the culprit and says what was expected, or that no wrong number comes out.


@pytest.fixture
def model_file(tiny_run, tmp_path):
    # a private copy of the trained STFPM model.pt, to edit
    path = tmp_path / "model.pt"
    shutil.copy(tiny_run.model_path, path)
    return path


def edit_checkpoint(path, change):
    state = torch.load(path, map_location="cpu", weights_only=True)
    change(state)
    torch.save(state, path)
    return path


def good_images(tiny_run, count=3):
    return sorted((tiny_run.data_root / "demo" / "test" / "good").glob("*.png"))[:count]


# ---- diverging runs ------------------------------------------------------------------------------------
def test_diverged_stfpm_run_stops_with_the_epoch_and_writes_no_model(tmp_path, make_overrides):
    overrides = make_overrides(tmp_path, epochs=2) + ["training.learning_rate=1e6"]
    result = run_cli(["train", "--model", "stfpm", "--dataset", "demo"] + overrides)
    assert result.code == 2
    assert "val_loss is nan at epoch 0" in result.err and "training.learning_rate" in result.err
    assert not list(tmp_path.rglob("model.pt"))


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_validation_loss_names_the_epoch(value):
    with pytest.raises(FloatingPointError, match=f"val_loss is {value} at epoch 3.*learning_rate"):
        check_validation_metrics({"val_loss": value, "auroc": float("nan")}, 3)


def test_nan_auroc_alone_is_not_a_divergence():
    check_validation_metrics({"val_loss": 0.5, "auroc": float("nan")}, 0)


@pytest.mark.parametrize("key", ["image_threshold", "pixel_threshold"])
def test_model_file_with_a_non_finite_threshold_is_never_written(tmp_path, key):
    trainer = BaseTrainer(torch.nn.Linear(2, 1), device="cpu", progress_bar=False)
    threshold = {"image_threshold": 1.0, "pixel_threshold": 1.0, key: float("nan")}
    with pytest.raises(FloatingPointError, match=f"not writing .*model.pt: {key} is nan"):
        trainer.save_model(tmp_path / "model.pt", threshold)
    assert not (tmp_path / "model.pt").exists()


def test_predict_refuses_a_model_with_a_nan_threshold(model_file, tiny_run):
    edit_checkpoint(model_file, lambda state: state["threshold"].update(image_threshold=float("nan")))
    result = run_cli(["predict", "--checkpoint", str(model_file), "--input", str(good_images(tiny_run)[0])])
    assert result.code == 2 and "image_threshold=nan" in result.err and "Retrain" in result.err
    assert not json_lines(result.out)


# ---- checkpoints -----------------------------------------------------------------------------------------
def test_checkpoint_without_threshold_says_so_once_and_gives_no_verdict(model_file, tiny_run, caplog):
    edit_checkpoint(model_file, lambda state: state.update(threshold=None))
    with caplog.at_level(logging.WARNING, logger="anomaly_detection"):
        result = run_cli(["predict", "--checkpoint", str(model_file), "--input",
                          str(good_images(tiny_run)[0].parent)])
    assert result.code == 0
    records = json_lines(result.out)[:-1]
    assert records and all("pred_label" not in record and record["pred_score"] >= 0 for record in records)
    notes = [r.message for r in caplog.records if "has no threshold" in r.message]
    assert len(notes) == 1


def test_checkpoint_without_config_is_refused(model_file):
    edit_checkpoint(model_file, lambda state: state.pop("config"))
    result = run_cli(["test", "--checkpoint", str(model_file)])
    assert result.code == 2 and "holds no training config" in result.err and str(model_file) in result.err


def test_checkpoint_whose_weights_belong_to_another_model_is_refused(model_file):
    edit_checkpoint(model_file, lambda state: state.update(model_class="PatchCoreModel"))
    result = run_cli(["test", "--checkpoint", str(model_file)])
    assert result.code == 2 and "holds a PatchCoreModel" in result.err and "STFPMModel" in result.err


def test_checkpoint_holding_a_pickled_object_is_not_loaded(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"model": {}, "model_class": "STFPMModel", "payload": SimpleNamespace(a=1)}, path)
    result = run_cli(["test", "--checkpoint", str(path)])
    assert result.code == 2 and "corrupt or not a checkpoint" in result.err and str(path) in result.err


def test_truncated_checkpoint_names_the_file(model_file):
    data = model_file.read_bytes()
    model_file.write_bytes(data[: len(data) // 2])
    result = run_cli(["predict", "--checkpoint", str(model_file), "--input", str(model_file)])
    assert result.code == 2 and f"Cannot read checkpoint {model_file}" in result.err


# ---- configs that drifted since training -----------------------------------------------------------------
@pytest.fixture
def drifted_configs(tmp_path, monkeypatch):
    configs = tmp_path / "configs"
    shutil.copytree(PROJECT_ROOT / "configs", configs)
    default = configs / "default.yaml"
    default.write_text(default.read_text().replace("  image_size: 256", "  image_size: 128"))
    monkeypatch.setenv("ANOMALY_DETECTION_CONFIG_DIR", str(configs))
    return configs


def test_image_size_changed_in_the_yaml_after_training_is_warned_and_not_used(tiny_run, model_file,
                                                                              drifted_configs, caplog):
    # as if the run's 64 px had come from the YAML files, which now say 128
    edit_checkpoint(model_file, lambda state: state["config"]["experiment"].update(overrides=[
        item for item in state["config"]["experiment"]["overrides"] if not item.startswith("data.image_size=")]))
    with caplog.at_level(logging.WARNING, logger="anomaly_detection"):
        result = run_cli(["test", "--checkpoint", str(model_file), "evaluation.figures=false"])
    assert result.code == 0, result.err
    summary = json_lines(result.out)[-1]
    # the checkpoint's own size (64 in the tiny run's overrides) is used: the same figures as training
    assert summary["image_auroc"] == tiny_run.summary["image_auroc"]
    assert summary["pixel_auroc"] == tiny_run.summary["pixel_auroc"]
    notes = [r.message for r in caplog.records if "data.image_size" in r.message]
    assert notes and "128" in notes[0] and "64" in notes[0] and "using the checkpoint's value" in notes[0]


@pytest.mark.parametrize("override, key", [
    ("data.image_size=128", "data.image_size"),
    ("model.backbone=mobilenet_v2", "model.backbone"),
    ("model.layers=[layer1]", "model.layers"),
    ("data.normalization=half", "data.normalization"),
])
def test_overrides_that_change_what_the_model_was_trained_on_are_refused(tiny_run, override, key):
    for command in (["test", "--checkpoint", str(tiny_run.model_path)],
                    ["predict", "--checkpoint", str(tiny_run.model_path), "--input", str(good_images(tiny_run)[0])]):
        result = run_cli(command + [override])
        assert result.code == 2 and f"{key}=" in result.err and "differs from the checkpoint's" in result.err


def test_unknown_override_at_test_time_names_the_closest_key(tiny_run):
    result = run_cli(["test", "--checkpoint", str(tiny_run.model_path), "evaluation.figurs=false"])
    assert result.code == 2 and "'evaluation.figurs'" in result.err and "evaluation.figures" in result.err


def test_resume_with_another_backbone_is_refused_naming_the_key(tmp_path, make_overrides):
    overrides = make_overrides(tmp_path, epochs=1)
    assert run_cli(["train", "--model", "stfpm", "--dataset", "demo"] + overrides).code == 0
    result = run_cli(["train", "--model", "stfpm", "--dataset", "demo", "--resume"] + overrides
                     + ["model.backbone=mobilenet_v2", "training.num_epochs=2"])
    assert result.code == 2
    assert "model.backbone was 'resnet18', now 'mobilenet_v2'" in result.err and "--resume" in result.err


def test_resume_with_another_image_size_is_refused(tmp_path, make_overrides):
    overrides = make_overrides(tmp_path, epochs=1)
    assert run_cli(["train", "--model", "stfpm", "--dataset", "demo"] + overrides).code == 0
    result = run_cli(["train", "--model", "stfpm", "--dataset", "demo", "--resume"] + overrides
                     + ["data.image_size=32", "training.num_epochs=2"])
    assert result.code == 2 and "data.image_size was 64, now 32" in result.err


# ---- predict inputs ----------------------------------------------------------------------------------------
def test_one_truncated_image_among_good_ones_is_skipped_and_the_rest_are_scored(tiny_run, tmp_path, caplog):
    folder = tmp_path / "incoming"
    folder.mkdir()
    for path in good_images(tiny_run, 3):
        shutil.copy(path, folder / path.name)
    broken = folder / "zz_truncated.png"
    data = good_images(tiny_run, 1)[0].read_bytes()
    broken.write_bytes(data[: len(data) // 2])
    output = tmp_path / "out"
    with caplog.at_level(logging.WARNING, logger="anomaly_detection"):
        result = run_cli(["predict", "--checkpoint", str(tiny_run.model_path), "--input", str(folder),
                          "--output", str(output)])
    assert result.code == 1
    records = json_lines(result.out)
    summary = records.pop()
    assert summary["scored"] == 3 and summary["skipped"] == 1 and summary["images"] == 4
    assert [r for r in records if "error" in r][0]["image_path"] == str(broken)
    assert all(isinstance(r["pred_score"], float) for r in records if "error" not in r)
    assert any(str(broken) in r.message for r in caplog.records)
    rows = (output / "predictions.csv").read_text().splitlines()
    assert len(rows) == 5 and str(broken) in rows[-1]
    assert (output / "predictions.csv").stat().st_mode & 0o777 == 0o600


@pytest.mark.parametrize("content", [b"", b"not an image at all", b"\x89PNG\r\n\x1a\n"])
def test_unreadable_single_image_is_skipped_with_its_name(tiny_run, tmp_path, content):
    path = tmp_path / "bad.png"
    path.write_bytes(content)
    result = run_cli(["predict", "--checkpoint", str(tiny_run.model_path), "--input", str(path)])
    assert result.code == 1
    record, summary = json_lines(result.out)
    assert record["image_path"] == str(path) and str(path) in record["error"]
    assert summary["skipped"] == 1 and summary["scored"] == 0


def test_predict_input_that_does_not_exist(tiny_run, tmp_path):
    result = run_cli(["predict", "--checkpoint", str(tiny_run.model_path), "--input", str(tmp_path / "nope")])
    assert result.code == 2 and "--input" in result.err and "does not exist" in result.err


def test_predict_input_folder_without_images(tiny_run, tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    result = run_cli(["predict", "--checkpoint", str(tiny_run.model_path), "--input", str(tmp_path)])
    assert result.code == 2 and "No images found" in result.err


def test_unwritable_output_is_found_before_any_image_is_scored(tiny_run, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    result = run_cli(["predict", "--checkpoint", str(tiny_run.model_path), "--input",
                      str(good_images(tiny_run)[0]), "--output", str(blocker / "figures")])
    assert result.code == 2 and "--output folder" in result.err and str(blocker / "figures") in result.err
    assert not json_lines(result.out)


def test_grey_and_rgba_images_are_scored_like_rgb(tiny_run, tmp_path):
    array = np.asarray(Image.open(good_images(tiny_run)[0]).convert("RGB"))
    Image.fromarray(array).convert("L").save(tmp_path / "grey.png")
    Image.fromarray(array).convert("RGBA").save(tmp_path / "rgba.png")
    result = run_cli(["predict", "--checkpoint", str(tiny_run.model_path), "--input", str(tmp_path)])
    assert result.code == 0
    assert all(np.isfinite(r["pred_score"]) for r in json_lines(result.out)[:-1])


# ---- command-line values -------------------------------------------------------------------------------------
@pytest.mark.parametrize("category", [",", " , ,", ""])
def test_category_list_that_names_nothing(category):
    result = run_cli(["train", "--model", "stfpm", "--dataset", "demo", "--category", category])
    assert result.code == 2 and "names no category" in result.err


def test_threshold_quantile_out_of_range_stops_before_any_work(tmp_path, make_overrides):
    result = run_cli(["train", "--model", "stfpm", "--dataset", "demo"] + make_overrides(tmp_path)
                     + ["evaluation.threshold_quantile=0"])
    assert result.code == 2 and "'evaluation.threshold_quantile' must be a number in (0, 1]" in result.err
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "data").exists()


def test_threshold_from_one_validation_image_is_warned_with_the_count(tmp_path, make_overrides, caplog):
    overrides = make_overrides(tmp_path, num_train=4) + ["data.val_fraction=0.1", "evaluation.figures=false"]
    with caplog.at_level(logging.WARNING, logger="anomaly_detection"):
        result = run_cli(["train", "--model", "stfpm", "--dataset", "demo"] + overrides)
    assert result.code == 0, result.err
    notes = [r.message for r in caplog.records if "the threshold" in r.message]
    assert notes and "only 1 normal image(s)" in notes[0] and "data.val_fraction" in notes[0]


def test_unknown_model_and_dataset_list_the_known_ones():
    result = run_cli(["train", "--model", "stfpn", "--dataset", "demo"])
    assert result.code == 2 and "stfpn" in result.err and "stfpm" in result.err
    result = run_cli(["train", "--model", "stfpm", "--dataset", "mvtecc"])
    assert result.code == 2 and "mvtecc" in result.err and "mvtec" in result.err


def test_misspelled_override_on_the_command_line(tmp_path, make_overrides):
    result = run_cli(["train", "--model", "stfpm", "--dataset", "demo"] + make_overrides(tmp_path)
                     + ["traning.num_epochs=3"])
    assert result.code == 2 and "did you mean 'training.num_epochs'" in result.err


@pytest.mark.parametrize("bad", ["score", "map"])
def test_non_finite_scores_stop_evaluation_naming_the_image(bad):
    from anomaly_detection.evaluator import Evaluator

    class Broken(torch.nn.Module):
        def forward(self, images):
            maps = torch.zeros(images.shape[0], 1, *images.shape[-2:])
            scores = torch.ones(images.shape[0])
            if bad == "score":
                scores[1] = float("nan")
            else:
                maps[1, 0, 3, 3] = float("inf")
            return {"anomaly_map": maps, "pred_score": scores}

    batch = {"image": torch.zeros(2, 3, 8, 8), "label": torch.tensor([0, 1]), "mask": torch.zeros(2, 1, 8, 8),
             "image_path": ["a.png", "b.png"], "mask_path": ["", ""], "defect_type": ["good", "x"]}
    evaluator = Evaluator(Broken(), device="cpu", progress_bar=False)
    with pytest.raises(FloatingPointError, match="non-finite scores or maps for 1 image\\(s\\), first b.png"):
        evaluator.predict([batch])


def test_every_file_a_run_writes_is_private(tiny_run):
    # results, checkpoints, TensorBoard events, figures and the generated data: 0600 whatever the umask
    written = [path for path in tiny_run.root.rglob("*") if path.is_file()]
    assert len(written) > 20
    assert [str(path) for path in written if path.stat().st_mode & 0o777 != 0o600] == []
