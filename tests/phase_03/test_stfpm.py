# tests/phase_03/test_stfpm.py
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import anomaly_detection
from anomaly_detection.config import load_experiment_config
from anomaly_detection.data import MVTecDataset, create_dataloader, get_train_transforms, split_train_val
from anomaly_detection.data.synthetic import generate_synthetic_category
from anomaly_detection.evaluator import Evaluator
from anomaly_detection.models.stfpm import STFPMLoss, STFPMModel, STFPMTrainer, compute_anomaly_map
from anomaly_detection.runner import build_loaders, load_model_file
from helpers import fixed_batch_losses

LAYERS = ["layer1", "layer2", "layer3"]


def random_model(seed=0, backbone="resnet18"):
    torch.manual_seed(seed)
    return STFPMModel(backbone=backbone, layers=LAYERS, pretrained=False)


def fixed_batch(size=(32, 32), count=2, seed=0):
    return torch.rand(count, 3, *size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("size", [(64, 64), (64, 48)])
def test_output_shapes_in_train_and_eval_mode(size):
    model = random_model()
    images = fixed_batch(size)
    model.train()
    teacher, student = model(images)
    assert list(teacher) == list(student) == LAYERS
    for layer, stride, channels in zip(LAYERS, (4, 8, 16), (64, 128, 256)):
        expected = (2, channels, math.ceil(size[0] / stride), math.ceil(size[1] / stride))
        assert tuple(teacher[layer].shape) == tuple(student[layer].shape) == expected
    assert student["layer1"].requires_grad and not teacher["layer1"].requires_grad

    model.eval()
    with torch.no_grad():
        outputs = model(images)
    assert tuple(outputs["anomaly_map"].shape) == (2, 1) + size
    assert tuple(outputs["pred_score"].shape) == (2,)
    assert torch.equal(outputs["pred_score"], outputs["anomaly_map"].flatten(1).amax(dim=1))
    assert (outputs["anomaly_map"] >= 0).all()


def test_teacher_frozen_student_trainable():
    model = random_model()
    teacher_before = {k: v.clone() for k, v in model.teacher.state_dict().items()}
    student_before = {k: v.clone() for k, v in model.student.state_dict().items()}
    assert all(not p.requires_grad for p in model.teacher.parameters())
    assert all(p.requires_grad for p in model.student.parameters())

    trainer = STFPMTrainer(model, STFPMLoss(), device="cpu", learning_rate=0.4, progress_bar=False)
    loader = create_dataloader([{"image": image} for image in fixed_batch(count=4)], batch_size=2)
    trainer.fit(loader, num_epochs=1)
    assert model.training and not model.teacher.training and model.student.training
    assert {id(p) for group in trainer.optimizer.param_groups for p in group["params"]} == \
        {id(p) for p in model.student.parameters()}
    for key, value in model.teacher.state_dict().items():
        assert torch.equal(value, teacher_before[key]), key
    assert all(p.grad is None for p in model.teacher.parameters())
    student_after = model.student.state_dict()
    changed = [k for k in student_before if not torch.equal(student_before[k], student_after[k])]
    assert "backbone.conv1.weight" in changed
    assert "backbone.bn1.running_mean" in changed


def test_loss_decreases_on_a_fixed_batch():
    model = random_model(seed=1)
    trainer = STFPMTrainer(model, STFPMLoss(), device="cpu", learning_rate=0.4, progress_bar=False)
    losses = fixed_batch_losses(trainer, {"image": fixed_batch(count=4, seed=2)})
    assert losses[-1] < 0.8 * losses[0]
    assert all(math.isfinite(value) for value in losses)


def resnet_features(backbone, images):
    hidden = backbone.maxpool(backbone.relu(backbone.bn1(backbone.conv1(images))))
    features = {}
    for layer in LAYERS:
        hidden = getattr(backbone, layer)(hidden)
        features[layer] = hidden
    return features


def test_anomaly_map_is_the_product_of_upsampled_layer_distances():
    model = random_model(seed=3).eval()
    images = fixed_batch((64, 48), seed=4)
    with torch.no_grad():
        outputs = model(images)
        teacher = resnet_features(model.teacher.backbone, images)
        student = resnet_features(model.student.backbone, images)
    expected = torch.ones(2, 1, 64, 48)
    for layer in LAYERS:
        t = teacher[layer] / teacher[layer].norm(dim=1, keepdim=True)
        s = student[layer] / student[layer].norm(dim=1, keepdim=True)
        distance = 0.5 * ((t - s) ** 2).sum(dim=1, keepdim=True)
        expected = expected * F.interpolate(distance, size=(64, 48), mode="bilinear", align_corners=False)
    assert torch.allclose(outputs["anomaly_map"], expected, rtol=1e-4, atol=1e-7)
    assert torch.allclose(outputs["pred_score"], expected.flatten(1).amax(dim=1), rtol=1e-4)
    direct = compute_anomaly_map(teacher, student, (64, 48))
    assert torch.allclose(direct, expected, rtol=1e-4, atol=1e-7)


def test_loss_matches_the_paper_formula():
    generator = torch.Generator().manual_seed(5)
    teacher = {"a": torch.randn(3, 8, 6, 5, generator=generator), "b": torch.randn(3, 16, 3, 2, generator=generator)}
    student = {"a": torch.randn(3, 8, 6, 5, generator=generator), "b": torch.randn(3, 16, 3, 2, generator=generator)}
    expected = 0.0
    for layer in teacher:
        t = teacher[layer] / teacher[layer].norm(dim=1, keepdim=True)
        s = student[layer] / student[layer].norm(dim=1, keepdim=True)
        expected += float(0.5 * ((t - s) ** 2).sum()) / (teacher[layer].shape[2] * teacher[layer].shape[3])
    assert float(STFPMLoss()(teacher, student)) == pytest.approx(expected, rel=1e-5)
    assert float(STFPMLoss()(teacher, teacher)) == pytest.approx(0.0, abs=1e-6)


def test_missing_backbone_file_names_the_path(tmp_path):
    empty = tmp_path / "no_weights_here"
    empty.mkdir()
    with pytest.raises(FileNotFoundError) as caught:
        STFPMModel(backbone="resnet18", layers=LAYERS, pretrained=True, backbone_root=empty)
    message = str(caught.value)
    assert str(empty / "resnet18.pth") in message
    assert "torch.save" in message and "pretrained: false" in message


@pytest.mark.parametrize("options, match", [({"backbone": "resnet19"}, "Unknown backbone 'resnet19'"),
                                            ({"layers": ["layer1", "layer9"]}, "Unknown layer 'layer9'")])
def test_unknown_backbone_or_layer_is_a_value_error(options, match):
    arguments = {"backbone": "resnet18", "layers": LAYERS, "pretrained": False, **options}
    with pytest.raises(ValueError, match=match):
        STFPMModel(**arguments)


def test_seed_readme_snippet_runs_as_written(tmp_path, monkeypatch, random_backbone_root):
    monkeypatch.setenv("ANOMALY_DETECTION_BACKBONE_ROOT", str(random_backbone_root))
    generate_synthetic_category(tmp_path / "datasets" / "mvtec", category="bottle", kind="object",
                                image_size=64, num_train=8, num_test_good=1, num_test_defect=1)

    config = load_experiment_config("stfpm", "mvtec", [f"dataset_root={tmp_path / 'datasets'}"])
    transform = get_train_transforms(image_size=64)
    train_dataset = MVTecDataset(
        root_dir=config["mvtec_dir"],
        category="bottle",
        split="train",
        transform=transform
    )
    train_dataset, val_dataset = split_train_val(train_dataset, 0.25)
    train_loader = create_dataloader(train_dataset, batch_size=32, shuffle=True)
    val_loader = create_dataloader(val_dataset, batch_size=32)

    model = STFPMModel(backbone="resnet18", layers=["layer1", "layer2", "layer3"])
    loss_fn = STFPMLoss()
    trainer = STFPMTrainer(model, loss_fn, device="cuda", learning_rate=0.4)
    trainer.fit(train_loader, val_loader, num_epochs=2)

    saved = torch.load(random_backbone_root / "resnet18.pth", weights_only=True)
    assert torch.equal(model.teacher.backbone.conv1.weight.cpu(), saved["conv1.weight"])
    assert torch.equal(model.teacher.backbone.layer3[0].bn1.running_var.cpu(), saved["layer3.0.bn1.running_var"])
    assert not torch.equal(model.student.backbone.conv1.weight.cpu(), saved["conv1.weight"])
    assert trainer.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert [record["epoch"] for record in trainer.history] == [0, 1]
    assert all(math.isfinite(r["train_loss"]) and math.isfinite(r["val_loss"]) for r in trainer.history)


def test_end_to_end_runner_summary_and_outputs(tiny_run):
    summary = tiny_run.summary
    for key in ("image_auroc", "pixel_auroc", "aupro", "f1_max"):
        assert 0.0 <= summary[key] <= 1.0, key
    assert summary["fit_s"] > 0 and summary["test_s"] > 0 and summary["peak_rss_mb"] > 10
    assert (summary["model"], summary["dataset"], summary["category"]) == ("stfpm", "demo", "demo")
    assert summary["num_test_images"] == 4 + 3 * 2

    results, checkpoints, logs = tiny_run.dirs["results"], tiny_run.dirs["checkpoints"], tiny_run.dirs["logs"]
    assert results == tiny_run.root / "results" / "stfpm" / "demo" / "demo"
    metrics = json.loads((results / "metrics.json").read_text())
    assert metrics["image_auroc"] == pytest.approx(summary["image_auroc"])
    assert metrics["aupro"] == pytest.approx(summary["aupro"])
    assert tiny_run.written_summary["checkpoint"] == str(tiny_run.model_path)
    assert tiny_run.written_summary["image_auroc"] == summary["image_auroc"]
    for name in ("scores.csv", "config.yaml", "figures/roc_curve.png", "figures/score_histogram.png"):
        assert (results / name).is_file(), name
    assert list((results / "figures" / "panels").glob("*.png"))
    assert {p.name for p in checkpoints.iterdir()} >= {"last.pt", "best.pt", "model.pt", "config.yaml"}
    assert not list(checkpoints.glob("*.tmp"))
    events = list(logs.glob("events.out.tfevents.*"))
    assert events and all(path.stat().st_mode & 0o777 == 0o600 for path in events)

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    accumulator = EventAccumulator(str(logs))
    accumulator.Reload()
    assert len(accumulator.Scalars("epoch/train_loss")) == 2
    assert len(accumulator.Scalars("epoch/val_loss")) == 2


def test_end_to_end_run_separates_the_generated_defects(tiny_run, separation):
    separation.check(tiny_run.summary)


def test_threshold_from_validation_is_saved_in_model_file(tiny_run):
    state = torch.load(tiny_run.model_path, map_location="cpu", weights_only=True)
    best = torch.load(tiny_run.dirs["checkpoints"] / "best.pt", map_location="cpu", weights_only=True)
    assert state["model_class"] == "STFPMModel" and state["config"]["model"]["name"] == "stfpm"
    assert state["kind"] == "model" and "optimizer" not in state and state["version"] == anomaly_detection.__version__
    assert state["normalization"] == {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    assert state["epoch"] == best["epoch"]
    for key, value in best["model"].items():
        assert torch.equal(state["model"][key], value), key

    threshold = state["threshold"]
    assert threshold["quantile"] == 0.99 and threshold["num_images"] == 3
    model, config, _ = load_model_file(tiny_run.model_path)
    _, val_loader, _ = build_loaders(config, "demo")
    recomputed = Evaluator(model, device="cpu", progress_bar=False).calibrate_threshold(val_loader, 0.99)
    assert recomputed["image_threshold"] == pytest.approx(threshold["image_threshold"], rel=1e-5)
    assert recomputed["pixel_threshold"] == pytest.approx(threshold["pixel_threshold"], rel=1e-5)
    predictions = Evaluator(model, device="cpu", progress_bar=False).predict(val_loader)
    assert np.all(predictions["labels"] == 0)
