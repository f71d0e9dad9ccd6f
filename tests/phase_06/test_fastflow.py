# tests/phase_06/test_fastflow.py
import json
import math
import runpy

import pytest
import torch
import torch.nn.functional as F

from anomaly_detection.config import load_experiment_config
from anomaly_detection.models import MODELS
from anomaly_detection.models.backbones import BACKBONES
from anomaly_detection.models.fastflow import (AffineCoupling, FastFlowLoss, FastFlowModel, FastFlowTrainer,
                                               NormalizingFlow2d)
from anomaly_detection.models.fastflow.fastflow import DEFAULT_LAYERS
from anomaly_detection.utils import PROJECT_ROOT
from helpers import (
    assert_chunked_scoring_equals_the_whole_batch, assert_model_file_reproduces, assert_rebuilt_model_scores_the_same,
    fixed_batch_losses, run_cli,
)


def random_model(backbone="resnet18", input_size=32, seed=0, **options):
    torch.manual_seed(seed)
    return FastFlowModel(backbone=backbone, pretrained=False, input_size=input_size, **options)


def fixed_batch(size=(32, 32), count=2, seed=0):
    return torch.rand(count, 3, *size, generator=torch.Generator().manual_seed(seed))


def tiny_flow(conv3x3_only=False, steps=4, channels=5, seed=0):
    torch.manual_seed(seed)
    flow = NormalizingFlow2d(channels, steps, 1.0, 2.0, conv3x3_only).double()
    # the subnets start near zero (FrEIA's 0.1); larger weights make every step a clearly non-trivial map
    with torch.no_grad():
        for parameter in flow.parameters():
            parameter.mul_(8.0)
    return flow


@pytest.mark.parametrize("backbone", list(BACKBONES))
def test_output_shapes_for_every_backbone(backbone):
    model = random_model(backbone, input_size=[40, 48])
    images = fixed_batch((40, 48))
    model.train()
    hidden_variables, log_jacobians = model(images)
    assert model.layers == DEFAULT_LAYERS[backbone]
    for layer, hidden, log_jacobian, norm in zip(model.layers, hidden_variables, log_jacobians, model.norms):
        stride, channels = BACKBONES[backbone]["strides"][layer], BACKBONES[backbone]["channels"][layer]
        shape = (channels, math.ceil(40 / stride), math.ceil(48 / stride))
        assert tuple(hidden.shape) == (2,) + shape and tuple(norm.normalized_shape) == shape, layer
        assert tuple(log_jacobian.shape) == (2,) and hidden.requires_grad
    model.eval()
    with torch.no_grad():
        outputs = model(images)
    assert tuple(outputs["anomaly_map"].shape) == (2, 1, 40, 48)
    assert torch.equal(outputs["pred_score"], outputs["anomaly_map"].flatten(1).amax(dim=1))
    assert ((outputs["anomaly_map"] >= -1) & (outputs["anomaly_map"] <= 0)).all()


@pytest.mark.parametrize("conv3x3_only", [False, True])
def test_flow_is_exactly_invertible(conv3x3_only):
    flow = tiny_flow(conv3x3_only, steps=8, channels=6)
    kernels = [step.subnet[0].kernel_size for step in flow.steps]
    assert kernels == ([(3, 3)] * 8 if conv3x3_only else [(3, 3), (1, 1)] * 4)
    x = torch.randn(3, 6, 4, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    z, _ = flow(x)
    assert (z - x).abs().max() > 0.1
    assert torch.allclose(flow.inverse(z), x, atol=1e-5, rtol=0)
    single = flow.steps[0].float()
    x32 = x.float()
    assert torch.allclose(single.inverse(single(x32)[0]), x32, atol=1e-5, rtol=0)


def test_log_determinant_matches_a_brute_force_jacobian():
    flow = tiny_flow(steps=4, channels=5)
    x = torch.randn(2, 5, 2, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        _, log_jacobian = flow(x)
    for index in range(2):
        jacobian = torch.autograd.functional.jacobian(
            lambda v: flow(v.view(1, 5, 2, 3))[0].flatten(), x[index].flatten())
        sign, log_abs_det = torch.linalg.slogdet(jacobian)
        assert float(sign) == 1.0
        assert float(log_jacobian[index]) == pytest.approx(float(log_abs_det), abs=1e-8)
        assert abs(float(log_abs_det)) > 0.5


def test_channel_permutation_gradient_is_the_inverse_gather():
    # the permutation's hand-written backward (a gather with the inverse permutation instead of autograd's
    # scatter): numerical gradients agree, and so does autograd's own backward of plain indexing
    from anomaly_detection.models.fastflow.fastflow import PermuteChannels
    permutation = torch.randperm(6, generator=torch.Generator().manual_seed(7))
    inverse = torch.argsort(permutation)
    x = torch.randn(2, 6, 3, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(8), requires_grad=True)
    assert torch.autograd.gradcheck(lambda v: PermuteChannels.apply(v, permutation, inverse), (x,))
    weights = torch.randn(2, 6, 3, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    (ours,) = torch.autograd.grad((PermuteChannels.apply(x, permutation, inverse) * weights).sum(), x)
    (plain,) = torch.autograd.grad((x[:, permutation] * weights).sum(), x)
    assert torch.equal(ours, plain)


def test_scales_are_soft_clamped():
    step = AffineCoupling(4, 3, 1.0, 2.0, seed=0)
    with torch.no_grad():
        for parameter in step.parameters():
            parameter.fill_(5.0)
    scale, _ = step.scale_and_shift(torch.ones(1, 2, 3, 3))
    assert scale.abs().max() <= 2.0 and scale.abs().max() > 1.9


def test_loss_and_map_follow_the_reference_formulas():
    generator = torch.Generator().manual_seed(3)
    hidden = [torch.randn(3, 4, 5, 6, generator=generator), torch.randn(3, 8, 2, 3, generator=generator)]
    log_jacobians = [torch.randn(3, generator=generator), torch.randn(3, generator=generator)]
    expected = sum(float((0.5 * (z ** 2).sum(dim=(1, 2, 3)) - j).mean()) for z, j in zip(hidden, log_jacobians))
    assert float(FastFlowLoss()(hidden, log_jacobians)) == pytest.approx(expected, rel=1e-5)

    model = random_model(seed=4).eval()
    images = fixed_batch(seed=5)
    with torch.no_grad():
        outputs = model(images)
        hidden_variables, _ = model.encode(images)
    maps = [F.interpolate(-torch.exp(-0.5 * (z ** 2).mean(dim=1, keepdim=True)), size=(32, 32), mode="bilinear",
                          align_corners=False) for z in hidden_variables]
    assert torch.allclose(outputs["anomaly_map"], sum(maps) / len(maps), atol=1e-6)


def test_only_norms_and_flows_train_and_the_loss_decreases():
    model = random_model(seed=6)
    backbone_before = {k: v.clone() for k, v in model.feature_extractor.state_dict().items()}
    trainer = FastFlowTrainer(model, device="cpu", progress_bar=False)
    assert trainer.learning_rate == 0.001 and trainer.weight_decay == 1e-5
    trainer._set_optimizers(trainer.configure_optimizers())
    trained = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert trained == {id(p) for p in list(model.norms.parameters()) + list(model.flows.parameters())}
    losses = fixed_batch_losses(trainer, {"image": fixed_batch(count=4, seed=7)})
    assert all(math.isfinite(value) for value in losses) and losses[-1] < losses[0] - 0.05 * abs(losses[0])
    for key, value in model.feature_extractor.state_dict().items():
        assert torch.equal(value, backbone_before[key]), key


def test_state_dict_round_trip_through_build_model():
    config = load_experiment_config("fastflow", "mvtec", ["model.backbone=resnet18", "model.pretrained=false",
                                                          "data.image_size=[32, 40]", "training.progress_bar=false"])
    assert MODELS["fastflow"] is FastFlowTrainer
    model = FastFlowTrainer.build_model(config)
    assert model.input_size == (32, 40)
    trainer = FastFlowTrainer.from_config(config, model=model)
    fixed_batch_losses(trainer, {"image": fixed_batch((32, 40), count=2, seed=8)}, steps=1)
    assert_rebuilt_model_scores_the_same(FastFlowTrainer, config, model, fixed_batch((32, 40), seed=9))
    cropped = load_experiment_config("fastflow", "mvtec", ["model.pretrained=false", "data.image_size=48",
                                                           "data.center_crop=32"])
    assert FastFlowTrainer.build_model(cropped).input_size == (32, 32)


def test_scoring_in_chunks_equals_the_whole_batch(monkeypatch):
    from anomaly_detection.models.fastflow import fastflow
    model = random_model(seed=15).eval()
    images = fixed_batch((32, 32), count=5, seed=16)
    with torch.no_grad():
        whole_loss = FastFlowLoss()(*model.encode(images))
    assert_chunked_scoring_equals_the_whole_batch(monkeypatch, fastflow, model, FastFlowTrainer, FastFlowLoss(),
                                                  whole_loss, images)


def test_python_defaults_come_from_the_yaml():
    model = FastFlowModel(backbone="resnet18", pretrained=False)
    assert model.input_size == (256, 256) and model.layers == ["layer1", "layer2", "layer3"]
    assert all(len(flow.steps) == 8 for flow in model.flows)
    assert model.flows[0].steps[0].subnet[0].out_channels == 32  # hidden ratio 1.0 of the 32 conditioning channels
    assert model.flows[0].steps[0].clamp == 2.0


@pytest.mark.parametrize("options, match", [
    ({"flow_steps": 0}, "model.flow_steps must be an integer >= 1"),
    ({"flow_steps": 2.5}, "model.flow_steps must be an integer >= 1"),
    ({"hidden_ratio": 0}, "model.hidden_ratio must be a number > 0"),
    ({"hidden_ratio": -1.0}, "model.hidden_ratio must be a number > 0"),
    ({"clamp": 0.0}, "model.clamp must be a number > 0"),
    ({"hidden_ratio": 0.01}, "model.hidden_ratio=0.01 leaves no hidden channels"),
    ({"conv3x3_only": "yes"}, "model.conv3x3_only must be true or false"),
    ({"input_size": 4}, "input_size must be an integer >= 8"),
])
def test_bad_values_are_value_errors(options, match):
    with pytest.raises(ValueError, match=match):
        random_model(**options)


def test_input_of_another_size_is_a_clear_error():
    with pytest.raises(ValueError, match="built for 32x32 inputs"):
        random_model().eval()(fixed_batch((40, 40)))


def test_cli_run_separates_the_generated_defects(tmp_path, separation):
    # random-init resnet18 at 64 px: 2 epochs gave image AUROC 1.0 / 0.97 and pixel AUROC 0.96 / 0.94 (seeds 42, 1)
    script = runpy.run_path(str(PROJECT_ROOT / "experiments" / "train_fastflow.py"))
    result = run_cli(["--dataset", "demo"] + separation.overrides(tmp_path, epochs=2), entry=script["main"])
    assert result.code == 0, result.err
    summary = json.loads(result.out.strip().splitlines()[-1])
    assert summary["model"] == "fastflow" and summary["epochs_run"] == 2
    separation.check(summary)

    assert_model_file_reproduces(summary, sorted((tmp_path / "data" / "demo" / "test" / "good").glob("*.png"))[0])
