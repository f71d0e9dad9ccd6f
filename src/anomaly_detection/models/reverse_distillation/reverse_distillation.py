# src/anomaly_detection/models/reverse_distillation/reverse_distillation.py
"""Reverse Distillation: Deng and Li, "Anomaly Detection via Reverse Distillation from One-Class Embedding"
(CVPR 2022)."""
import torch
import torch.nn.functional as F
from torch import nn

from anomaly_detection.config import FROM_YAML, fill_from_yaml
from anomaly_detection.models.backbones import FeatureExtractor, layers_or_default
from anomaly_detection.models.checkpointing import run_checkpointed
from anomaly_detection.models.components import gaussian_blur, map_in_chunks, map_output, mean_in_chunks

# model.layers: null takes these: three stages of increasing stride (4, 8, 16), as the paper's layer1-3
RESNET_LAYERS = ["layer1", "layer2", "layer3"]
DEFAULT_LAYERS = dict.fromkeys(("resnet18", "resnet50", "wide_resnet50_2"), RESNET_LAYERS)
DEFAULT_LAYERS.update(mobilenet_v2=["features.3", "features.6", "features.13"],
                      tf_efficientnet_lite0=["blocks.1", "blocks.2", "blocks.4"])

# images scored at once in eval mode: the encoder's stem map alone is 64 x 128 x 128 floats per image at 256 px,
# so a test batch of 32 rose 340 MB above the model (resnet18) against 120 MB in chunks of 8; the test pass took
# as long (benchmarks/RESULTS.md, "Reverse Distillation and FastFlow: like-for-like training time")
INFERENCE_CHUNK = 8

# residual block, width per group, blocks per decoder stage (deepest first) and blocks of the bottleneck's
# residual stage: the official code's de_resnet / BN_layer for each ResNet; the light backbones get resnet18's
BASIC = ("basic", 64, (2, 2, 2), 2)
BOTTLENECK = ("bottleneck", 64, (3, 4, 6), 3)
DECODER_BLOCKS = {"resnet18": BASIC, "resnet50": BOTTLENECK, "wide_resnet50_2": ("bottleneck", 128, (3, 4, 6), 3),
                  "mobilenet_v2": BASIC, "tf_efficientnet_lite0": BASIC}


def conv3x3(in_channels, out_channels, stride=1):
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)


def resampling_conv(in_channels, out_channels, scale, up, kernel_size):
    # up: a transposed convolution of kernel and stride `scale` (the official decoder's deconv2x2 at scale 2)
    if up and scale > 1:
        return nn.ConvTranspose2d(in_channels, out_channels, scale, stride=scale, bias=False)
    if kernel_size == 1:
        return nn.Conv2d(in_channels, out_channels, 1, stride=scale, bias=False)
    return conv3x3(in_channels, out_channels, scale)


def shortcut(in_channels, out_channels, scale, up):
    if scale == 1 and in_channels == out_channels:
        return None
    return nn.Sequential(resampling_conv(in_channels, out_channels, scale, up, 1), nn.BatchNorm2d(out_channels))


class BasicBlock(nn.Module):
    def __init__(self, in_channels, out_channels, scale=1, up=False):
        super().__init__()
        self.conv1 = resampling_conv(in_channels, out_channels, scale, up, 3)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = conv3x3(out_channels, out_channels)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut = shortcut(in_channels, out_channels, scale, up)

    def forward(self, x):
        # in place where autograd allows it (batch norm's backward reads its input, not its output), as
        # torchvision's blocks: a decoder stage at stride 4 keeps 3 fewer full-size maps per block
        out = F.relu_(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += x if self.shortcut is None else self.shortcut(x)
        return F.relu_(out)


class Bottleneck(nn.Module):
    def __init__(self, in_channels, out_channels, width, scale=1, up=False):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = resampling_conv(width, width, scale, up, 3)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.shortcut = shortcut(in_channels, out_channels, scale, up)

    def forward(self, x):
        out = F.relu_(self.bn1(self.conv1(x)))
        out = F.relu_(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out += x if self.shortcut is None else self.shortcut(x)
        return F.relu_(out)


def residual_stage(kind, width_per_group, in_channels, out_channels, num_blocks, scale, up):
    def block(block_in, block_scale):
        if kind == "basic":
            return BasicBlock(block_in, out_channels, block_scale, up)
        # as torchvision's Bottleneck: out_channels = 4 * planes, width = planes * width_per_group / 64
        return Bottleneck(block_in, out_channels, out_channels // 4 * width_per_group // 64, block_scale, up)

    return nn.Sequential(block(in_channels, scale), *[block(out_channels, 1) for _ in range(num_blocks - 1)])


def kaiming_init(module):
    # the official code's initialisation of its bottleneck and decoder convolutions
    for layer in module.modules():
        if type(layer) is nn.Conv2d:
            nn.init.kaiming_normal_(layer.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(layer, nn.BatchNorm2d):
            nn.init.ones_(layer.weight)
            nn.init.zeros_(layer.bias)


class OneClassBottleneck(nn.Module):
    # Multi-scale feature fusion: strided 3x3 convolutions bring every shallower stage to the deepest stage's
    # resolution (the channels of the stage at each stride on the way), the stages are concatenated and one
    # residual stage of stride 2 embeds them (official BN_layer: 3 x 256 -> 512 channels for resnet18).
    def __init__(self, channels, strides, kind, width_per_group, num_blocks):
        super().__init__()
        target_channels, target_stride = channels[-1], strides[-1]
        self.fusions = nn.ModuleList()
        for index, (stage_channels, stride) in enumerate(zip(channels[:-1], strides[:-1])):
            steps, current_channels = [], stage_channels
            # equal strides (lite0 blocks.3 and blocks.4): one stride-1 convolution matches the channels
            while stride < target_stride or not steps:
                scale = 2 if stride < target_stride else 1
                stride *= scale
                later = [c for c, s in zip(channels[index + 1:], strides[index + 1:]) if s >= stride]
                out_channels = target_channels if stride == target_stride else later[0]
                steps += [conv3x3(current_channels, out_channels, scale), nn.BatchNorm2d(out_channels),
                          nn.ReLU(inplace=True)]
                current_channels = out_channels
            self.fusions.append(nn.Sequential(*steps))
        fused_channels = target_channels * len(channels)
        self.out_channels = 2 * target_channels
        self.embedding = residual_stage(kind, width_per_group, fused_channels, self.out_channels, num_blocks, 2, False)
        kaiming_init(self)

    def forward(self, features):
        fused = [fusion(feature) for fusion, feature in zip(self.fusions, features[:-1])] + [features[-1]]
        return self.embedding(torch.cat(fused, dim=1))


class Decoder(nn.Module):
    # Mirrors the encoder: one upsampling residual stage per encoder stage, deepest first, each producing that
    # stage's channels at its resolution.
    def __init__(self, in_channels, in_stride, channels, strides, kind, width_per_group, stage_blocks):
        super().__init__()
        self.stages = nn.ModuleList()
        current_channels, current_stride = in_channels, in_stride
        for index, (out_channels, stride) in enumerate(zip(reversed(channels), reversed(strides))):
            num_blocks = stage_blocks[min(index, len(stage_blocks) - 1)]
            self.stages.append(residual_stage(kind, width_per_group, current_channels, out_channels, num_blocks,
                                              current_stride // stride, True))
            current_channels, current_stride = out_channels, stride
        kaiming_init(self)

    def forward(self, embedding, sizes, activation_checkpointing=False):
        # sizes: the encoder's feature sizes, deepest first; a stride-2 stage of the encoder rounds odd sizes
        # up, so doubling gives at most one row or column more, which is cropped. With activation
        # checkpointing each stage keeps only its input for the backward pass and runs its forward again there
        # (run_checkpointed: the batch-norm statistics are updated once, as without it).
        outputs, hidden = [], embedding
        checkpointed = activation_checkpointing and torch.is_grad_enabled()
        for stage, (height, width) in zip(self.stages, sizes):
            hidden = run_checkpointed((stage,), hidden) if checkpointed else stage(hidden)
            hidden = hidden[..., :height, :width]
            outputs.append(hidden)
        return outputs[::-1]


class ReverseDistillationModel(nn.Module):
    default_layers = DEFAULT_LAYERS

    def __init__(self, backbone=FROM_YAML, layers=FROM_YAML, pretrained=FROM_YAML, weights=FROM_YAML,
                 blur_sigma=FROM_YAML, backbone_root=None, activation_checkpointing=False):
        super().__init__()
        args = fill_from_yaml("reverse_distillation", "model", {
            "backbone": backbone, "layers": layers, "pretrained": pretrained, "weights": weights,
            "blur_sigma": blur_sigma})
        backbone = args["backbone"]
        if activation_checkpointing not in (True, False):
            raise ValueError(f"activation_checkpointing must be true or false, got {activation_checkpointing!r}")
        self.activation_checkpointing = bool(activation_checkpointing)
        if not isinstance(args["blur_sigma"], (int, float)) or isinstance(args["blur_sigma"], bool) \
                or args["blur_sigma"] < 0:
            raise ValueError(f"model.blur_sigma must be a number >= 0 (0: no blur), got {args['blur_sigma']!r}")
        self.blur_sigma = float(args["blur_sigma"])
        self.backbone_name = backbone
        self.layers = layers_or_default(backbone, args["layers"], DEFAULT_LAYERS, "ReverseDistillation")
        self.encoder = FeatureExtractor(backbone, self.layers, pretrained=args["pretrained"], weights=args["weights"],
                                        backbone_root=backbone_root, frozen=True)
        self.mean, self.std = self.encoder.mean, self.encoder.std
        channels = [self.encoder.channels[layer] for layer in self.layers]
        strides = [self.encoder.strides[layer] for layer in self.layers]
        if strides != sorted(strides):
            raise ValueError(f"model.layers must go from shallow to deep (non-decreasing stride), got "
                             f"{self.layers} with strides {strides}")
        kind, width_per_group, stage_blocks, bottleneck_blocks = DECODER_BLOCKS[backbone]
        self.bottleneck = OneClassBottleneck(channels, strides, kind, width_per_group, bottleneck_blocks)
        self.decoder = Decoder(self.bottleneck.out_channels, 2 * strides[-1], channels, strides, kind,
                               width_per_group, stage_blocks)
        # channels-last: oneDNN's convolutions on CPU run faster in NHWC (a resnet18 training step 1.15x);
        # load_state_dict copies into these tensors and keeps their layout
        self.to(memory_format=torch.channels_last)

    def extract(self, images):
        # the encoder (FeatureExtractor) takes the images channels-last itself
        with torch.no_grad():
            encoded = self.encoder(images)
        encoder_features = [encoded[layer].float() for layer in self.layers]
        embedding = self.bottleneck(encoder_features)
        sizes = [tuple(feature.shape[-2:]) for feature in reversed(encoder_features)]
        return encoder_features, self.decoder(embedding, sizes, self.activation_checkpointing)

    def forward(self, images):
        if self.training:
            return self.extract(images)
        # the export traces score() on the whole batch instead (components.WholeBatchScore)
        return map_output(map_in_chunks(self.score, images, INFERENCE_CHUNK))

    def score(self, images):
        encoder_features, decoder_features = self.extract(images)
        return gaussian_blur(compute_anomaly_map(encoder_features, decoder_features, images.shape[-2:]),
                             self.blur_sigma)

    def validation_loss(self, images, loss_fn):
        # the mean over the images of loss_fn, in the chunks forward() scores in (eval mode: each image's loss is
        # its own)
        return mean_in_chunks(lambda chunk: loss_fn(*self.extract(chunk)), images, INFERENCE_CHUNK)


def compute_anomaly_map(encoder_features, decoder_features, image_size):
    anomaly_map = None
    for encoded, decoded in zip(encoder_features, decoder_features):
        distance = 1.0 - F.cosine_similarity(encoded.float(), decoded.float(), dim=1).unsqueeze(1)
        # corner-aligned, as the official code (RD4AD test.py, cal_anomaly_map) and Anomalib upsample here
        distance = F.interpolate(distance, size=tuple(image_size), mode="bilinear", align_corners=True)
        anomaly_map = distance if anomaly_map is None else anomaly_map + distance
    return anomaly_map


class ReverseDistillationLoss(nn.Module):
    def forward(self, encoder_features, decoder_features):
        loss = 0.0
        for encoded, decoded in zip(encoder_features, decoder_features):
            # the official code compares each image's whole feature map as one vector (the paper's equation
            # averages per-position distances); the mean is over the images of the batch
            similarity = F.cosine_similarity(as_vectors(encoded), as_vectors(decoded), dim=1)
            loss = loss + (1.0 - similarity).mean()
        return loss


def as_vectors(features):
    # each image's map as one vector, in the order of its memory layout, so that a channels-last map is a view
    # and not a copy: a cosine is the same for any order both vectors share
    features = features.float()
    if features.is_contiguous(memory_format=torch.channels_last) and not features.is_contiguous():
        return features.permute(0, 2, 3, 1).flatten(1)
    return features.flatten(1)
