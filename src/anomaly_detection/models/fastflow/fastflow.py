# src/anomaly_detection/models/fastflow/fastflow.py
"""FastFlow: Yu et al., "FastFlow: Unsupervised Anomaly Detection and Localization via 2D Normalizing Flows" (2021)."""
import math

import torch
from torch import nn

from anomaly_detection.config import FROM_YAML, fill_from_yaml
from anomaly_detection.models.backbones import FeatureExtractor, layers_or_default
from anomaly_detection.models.components import map_in_chunks, map_output, mean_in_chunks, upsample_map

# model.layers: null takes these: three scales (strides 4, 8, 16), as the reference's timm out_indices 1-3
RESNET_LAYERS = ["layer1", "layer2", "layer3"]
DEFAULT_LAYERS = dict.fromkeys(("resnet18", "resnet50", "wide_resnet50_2"), RESNET_LAYERS)
DEFAULT_LAYERS.update(mobilenet_v2=["features.3", "features.6", "features.13"],
                      tf_efficientnet_lite0=["blocks.1", "blocks.2", "blocks.4"])

# images scored at once in eval mode: a test batch of 32 rose 320 MB above the model (resnet18, 256 px) against
# 170 MB in chunks of 8 (benchmarks/RESULTS.md, "Reverse Distillation and FastFlow: like-for-like training time")
INFERENCE_CHUNK = 8


def subnet(in_channels, out_channels, kernel_size, hidden_ratio):
    hidden = int(in_channels * hidden_ratio)
    if hidden < 1:
        raise ValueError(f"model.hidden_ratio={hidden_ratio} leaves no hidden channels for a subnet of "
                         f"{in_channels} input channels: expected a ratio >= {1 / in_channels:.4g}")
    return nn.Sequential(nn.Conv2d(in_channels, hidden, kernel_size, padding=kernel_size // 2), nn.ReLU(),
                         nn.Conv2d(hidden, out_channels, kernel_size, padding=kernel_size // 2))


class PermuteChannels(torch.autograd.Function):
    # x[:, permutation] whose backward gathers with the inverse permutation: autograd's backward of the indexing
    # scatters with accumulation (index_put_), which took 16 % of a FastFlow training step on the CPU (resnet18,
    # batch 32, 256 px); a permutation's gradient is the inverse permutation of the incoming gradient
    @staticmethod
    def forward(ctx, x, permutation, inverse_permutation):
        ctx.save_for_backward(inverse_permutation)
        return x.index_select(1, permutation)

    @staticmethod
    def backward(ctx, grad):
        (inverse_permutation,) = ctx.saved_tensors
        return grad.index_select(1, inverse_permutation), None, None


def permute_channels(x, permutation, inverse_permutation):
    # the plain gather where no gradient flows (inference, export: a traced graph keeps index_select)
    if torch.is_grad_enabled() and x.requires_grad:
        return PermuteChannels.apply(x, permutation, inverse_permutation)
    return x.index_select(1, permutation)


class AffineCoupling(nn.Module):
    # One flow step: the first half of the channels conditions an affine map of the second half, then a fixed
    # channel permutation (seeded, a buffer, so the state_dict holds it) mixes the halves for the next step.
    def __init__(self, channels, kernel_size, hidden_ratio, clamp, seed):
        super().__init__()
        self.split = channels - channels // 2
        self.clamp = clamp
        self.subnet = subnet(self.split, 2 * (channels // 2), kernel_size, hidden_ratio)
        permutation = torch.randperm(channels, generator=torch.Generator().manual_seed(seed))
        self.register_buffer("permutation", permutation)
        self.register_buffer("inverse_permutation", torch.argsort(permutation))

    def scale_and_shift(self, conditioner):
        # the 0.1 is FrEIA's AllInOneBlock's (the reference's flow library): each step starts near the identity;
        # the soft clamp keeps exp(scale) within exp(+-clamp)
        scale, shift = (0.1 * self.subnet(conditioner)).chunk(2, dim=1)
        return self.clamp * torch.tanh(scale / self.clamp), shift

    def forward(self, x):
        conditioner, transformed = x[:, :self.split], x[:, self.split:]
        scale, shift = self.scale_and_shift(conditioner)
        out = torch.cat([conditioner, transformed * torch.exp(scale) + shift], dim=1)
        return permute_channels(out, self.permutation, self.inverse_permutation), scale.sum(dim=(1, 2, 3))

    def inverse(self, z):
        z = permute_channels(z, self.inverse_permutation, self.permutation)
        conditioner, transformed = z[:, :self.split], z[:, self.split:]
        scale, shift = self.scale_and_shift(conditioner)
        return torch.cat([conditioner, (transformed - shift) * torch.exp(-scale)], dim=1)


class NormalizingFlow2d(nn.Module):
    # subnets alternate 3x3 and 1x1 convolutions (3x3 only with conv3x3_only), as the reference's nf_fast_flow
    def __init__(self, channels, flow_steps, hidden_ratio, clamp, conv3x3_only):
        super().__init__()
        self.steps = nn.ModuleList([
            AffineCoupling(channels, 1 if index % 2 == 1 and not conv3x3_only else 3, hidden_ratio, clamp, index)
            for index in range(flow_steps)])

    def forward(self, x):
        log_jacobian = x.new_zeros(x.shape[0])
        for step in self.steps:
            x, step_log_jacobian = step(x)
            log_jacobian = log_jacobian + step_log_jacobian
        return x, log_jacobian

    def inverse(self, z):
        for step in reversed(self.steps):
            z = step.inverse(z)
        return z


def input_size_pair(value):
    pair = list(value) if isinstance(value, (list, tuple)) else [value, value]
    if len(pair) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 8 for v in pair):
        raise ValueError(f"FastFlow input_size must be an integer >= 8 or [height, width], got {value!r}")
    return tuple(pair)


class FastFlowModel(nn.Module):
    default_layers = DEFAULT_LAYERS

    def __init__(self, backbone=FROM_YAML, layers=FROM_YAML, pretrained=FROM_YAML, weights=FROM_YAML,
                 flow_steps=FROM_YAML, hidden_ratio=FROM_YAML, clamp=FROM_YAML, conv3x3_only=FROM_YAML,
                 input_size=FROM_YAML, backbone_root=None):
        super().__init__()
        args = fill_from_yaml("fastflow", "model", {
            "backbone": backbone, "layers": layers, "pretrained": pretrained, "weights": weights,
            "flow_steps": flow_steps, "hidden_ratio": hidden_ratio, "clamp": clamp, "conv3x3_only": conv3x3_only})
        # the per-scale LayerNorm is over (C, H, W): the model is built for one input size, the data's
        input_size = fill_from_yaml("fastflow", "data", {"image_size": input_size})["image_size"]
        check_hyper_parameters(args)
        backbone = args["backbone"]
        self.backbone_name = backbone
        self.input_size = input_size_pair(input_size)
        self.layers = layers_or_default(backbone, args["layers"], DEFAULT_LAYERS, "FastFlow")
        self.feature_extractor = FeatureExtractor(backbone, self.layers, pretrained=args["pretrained"],
                                                  weights=args["weights"], backbone_root=backbone_root, frozen=True)
        self.mean, self.std = self.feature_extractor.mean, self.feature_extractor.std
        self.norms, self.flows = nn.ModuleList(), nn.ModuleList()
        for layer in self.layers:
            channels, stride = self.feature_extractor.channels[layer], self.feature_extractor.strides[layer]
            # every backbone here pads its strided layers so an odd size rounds up
            shape = [channels, math.ceil(self.input_size[0] / stride), math.ceil(self.input_size[1] / stride)]
            self.norms.append(nn.LayerNorm(shape, elementwise_affine=True))
            self.flows.append(NormalizingFlow2d(channels, int(args["flow_steps"]), float(args["hidden_ratio"]),
                                                float(args["clamp"]), bool(args["conv3x3_only"])))

    def encode(self, images):
        if tuple(images.shape[-2:]) != self.input_size:
            raise ValueError(f"FastFlow was built for {self.input_size[0]}x{self.input_size[1]} inputs "
                             f"(its LayerNorms are per position), got {images.shape[-2]}x{images.shape[-1]}")
        with torch.no_grad():
            features = self.feature_extractor(images)
        hidden_variables, log_jacobians = [], []
        for layer, norm, flow in zip(self.layers, self.norms, self.flows):
            hidden, log_jacobian = flow(norm(features[layer].float().contiguous()))
            hidden_variables.append(hidden)
            log_jacobians.append(log_jacobian)
        return hidden_variables, log_jacobians

    def forward(self, images):
        if self.training:
            return self.encode(images)
        # the export traces score() on the whole batch instead (components.WholeBatchScore)
        return map_output(map_in_chunks(self.score, images, INFERENCE_CHUNK))

    def score(self, images):
        return compute_anomaly_map(self.encode(images)[0], images.shape[-2:])

    def validation_loss(self, images, loss_fn):
        # the mean over the images of loss_fn, in the chunks forward() scores in (eval mode: each image's loss is
        # its own)
        return mean_in_chunks(lambda chunk: loss_fn(*self.encode(chunk)), images, INFERENCE_CHUNK)


def check_hyper_parameters(args):
    steps = args["flow_steps"]
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"model.flow_steps must be an integer >= 1, got {steps!r}")
    for key in ("hidden_ratio", "clamp"):
        value = args[key]
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
            raise ValueError(f"model.{key} must be a number > 0, got {value!r}")
    if args["conv3x3_only"] not in (True, False):
        raise ValueError(f"model.conv3x3_only must be true or false, got {args['conv3x3_only']!r}")


def compute_anomaly_map(hidden_variables, image_size):
    # per position: minus the likelihood exp(-0.5 * mean z^2 over the channels), upsampled and averaged over
    # the scales, as the reference code (higher means more anomalous; the values lie in [-1, 0])
    maps = [upsample_map(-torch.exp(-0.5 * hidden.float().pow(2).mean(dim=1, keepdim=True)), image_size)
            for hidden in hidden_variables]
    return torch.stack(maps, dim=-1).mean(dim=-1)


class FastFlowLoss(nn.Module):
    def forward(self, hidden_variables, log_jacobians):
        # the reference's: per image 0.5 * ||z||^2 minus the log-determinant (summed over C, H, W), averaged over
        # the images of the batch and summed over the scales
        loss = 0.0
        for hidden, log_jacobian in zip(hidden_variables, log_jacobians):
            loss = loss + (0.5 * hidden.float().pow(2).sum(dim=(1, 2, 3)) - log_jacobian).mean()
        return loss
