# tests/phase_03/test_activation_checkpointing.py
import contextlib
import copy

import pytest
import torch

from anomaly_detection.config import load_experiment_config
from anomaly_detection.models import checkpointing
from anomaly_detection.models.backbones import FeatureExtractor
from anomaly_detection.models.stfpm import STFPMLoss, STFPMModel, STFPMTrainer
from anomaly_detection.models.stfpm.stfpm import DEFAULT_LAYERS as STFPM_LAYERS

BACKBONES = ["resnet18", "mobilenet_v2", "tf_efficientnet_lite0"]


def train_steps(model, batches):
    model.train()
    optimizer = torch.optim.SGD(model.student.parameters(), lr=0.4, momentum=0.9, weight_decay=1e-4)
    for images in batches:
        optimizer.zero_grad()
        STFPMLoss()(*model(images)).backward()
        optimizer.step()
    return model.student.state_dict()


def random_batches(count=2, size=48):
    generator = torch.Generator().manual_seed(1)
    return [torch.randn(3, 3, size, size, generator=generator) for _ in range(count)]


@pytest.mark.parametrize("backbone", BACKBONES)
def test_segments_run_every_module_once_and_end_at_each_layer(backbone):
    torch.manual_seed(0)
    extractor = FeatureExtractor(backbone, STFPM_LAYERS[backbone], pretrained=False, frozen=False).eval()
    segments = [[extractor.backbone.get_submodule(name) for name in names] for names, _ in extractor._segments]
    parameters = [id(p) for modules in segments for module in modules for p in module.parameters()]
    assert len(parameters) == len(set(parameters)) == len(list(extractor.backbone.parameters()))
    assert [layer for _, layer in extractor._segments if layer is not None] == extractor.layers
    # running the segments one after the other is the plain forward pass through the backbone's steps
    images = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        hidden, expected = images.contiguous(memory_format=torch.channels_last), {}
        for step in extractor._steps:
            hidden = extractor.backbone.get_submodule(step)(hidden)
            if step in extractor.layers:
                expected[step] = hidden
        actual = extractor(images)
        assert all(torch.equal(actual[layer], expected[layer]) for layer in extractor.layers)
        hidden, features = images.contiguous(memory_format=torch.channels_last), {}
        for modules, (_, layer) in zip(segments, extractor._segments):
            for module in modules:
                hidden = module(hidden)
            if layer is not None:
                features[layer] = hidden
    assert all(torch.equal(features[layer], expected[layer]) for layer in extractor.layers)
    # no segment starts with an in-place activation, which would overwrite the input it recomputes from
    for modules in segments:
        assert not getattr(modules[0], "inplace", False)


@pytest.mark.parametrize("backbone", BACKBONES)
def test_checkpointed_training_gives_bitwise_identical_weights_and_statistics(backbone):
    torch.manual_seed(0)
    plain = STFPMModel(backbone, pretrained=False)
    checkpointed = copy.deepcopy(plain)
    checkpointed.student.activation_checkpointing = True
    batches = random_batches()
    expected = train_steps(plain, batches)
    actual = train_steps(checkpointed, batches)
    assert expected.keys() == actual.keys()
    for key in expected:
        assert torch.equal(expected[key], actual[key]), key


def test_recomputation_without_frozen_statistics_would_change_batchnorm(monkeypatch):
    # the control for the test above: a plain checkpoint updates the running statistics twice per step
    torch.manual_seed(0)
    plain = STFPMModel("resnet18", pretrained=False)
    naive = copy.deepcopy(plain)
    naive.student.activation_checkpointing = True
    monkeypatch.setattr(checkpointing, "_frozen_running_stats", lambda norms: contextlib.nullcontext())
    batches = random_batches(count=1)
    expected = train_steps(plain, batches)
    actual = train_steps(naive, batches)
    assert not torch.equal(expected["backbone.bn1.running_mean"], actual["backbone.bn1.running_mean"])
    assert int(actual["backbone.bn1.num_batches_tracked"]) == 2 * int(expected["backbone.bn1.num_batches_tracked"])


def saved_bytes(model, images):
    total = [0]

    def pack(tensor):
        total[0] += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        teacher, student = model(images)
        loss = STFPMLoss()(teacher, student)
    return total[0], loss


@pytest.mark.parametrize("backbone", ["resnet18", "tf_efficientnet_lite0"])
def test_checkpointing_keeps_far_fewer_activations_for_backward(backbone):
    torch.manual_seed(0)
    model = STFPMModel(backbone, pretrained=False).train()
    images = torch.randn(2, 3, 64, 64)
    plain, plain_loss = saved_bytes(model, images)
    model.student.activation_checkpointing = True
    checkpointed, checkpointed_loss = saved_bytes(model, images)
    assert torch.equal(plain_loss.detach(), checkpointed_loss.detach())
    assert checkpointed < 0.5 * plain, (checkpointed, plain)


def test_checkpointing_is_off_in_eval_and_under_no_grad():
    torch.manual_seed(0)
    model = STFPMModel("resnet18", pretrained=False, activation_checkpointing=True).eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        outputs = model(images)
    model.student.activation_checkpointing = False
    with torch.no_grad():
        reference = model(images)
    assert torch.equal(outputs["anomaly_map"], reference["anomaly_map"])


def test_config_key_reaches_the_student_and_bad_values_are_refused():
    config = load_experiment_config("stfpm", "demo", overrides=[
        "model.backbone=resnet18", "model.pretrained=false", "training.activation_checkpointing=true"])
    model = STFPMTrainer.build_model(config)
    assert model.student.activation_checkpointing and not model.teacher.activation_checkpointing
    with pytest.raises(ValueError, match="activation_checkpointing must be true or false, got 'sometimes'"):
        STFPMModel("resnet18", pretrained=False, activation_checkpointing="sometimes")
