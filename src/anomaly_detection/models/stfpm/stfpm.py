# src/anomaly_detection/models/stfpm/stfpm.py
"""STFPM: Wang et al., "Student-Teacher Feature Pyramid Matching for Anomaly Detection" (BMVC 2021)."""
import torch
import torch.nn.functional as F
from torch import nn

from anomaly_detection.config import FROM_YAML, fill_from_yaml
from anomaly_detection.models.backbones import FeatureExtractor, layers_or_default
from anomaly_detection.models.components import map_output, upsample_map

# model.layers: null takes these: three stages of increasing depth, as in the paper (resnet18 layer1-3)
RESNET_LAYERS = ["layer1", "layer2", "layer3"]
DEFAULT_LAYERS = dict.fromkeys(("resnet18", "resnet50", "wide_resnet50_2"), RESNET_LAYERS)
DEFAULT_LAYERS.update(mobilenet_v2=["features.3", "features.6", "features.13"],
                      tf_efficientnet_lite0=["blocks.1", "blocks.2", "blocks.4"])


class STFPMModel(nn.Module):
    default_layers = DEFAULT_LAYERS

    def __init__(self, backbone=FROM_YAML, layers=FROM_YAML, pretrained=FROM_YAML, weights=FROM_YAML,
                 backbone_root=None, activation_checkpointing=False):
        super().__init__()
        args = fill_from_yaml("stfpm", "model", {"backbone": backbone, "layers": layers, "pretrained": pretrained,
                                                 "weights": weights})
        backbone = args["backbone"]
        self.backbone_name = backbone
        self.layers = layers_or_default(backbone, args["layers"], DEFAULT_LAYERS, "STFPM")
        self.teacher = FeatureExtractor(backbone, self.layers, pretrained=args["pretrained"], weights=args["weights"],
                                        backbone_root=backbone_root, frozen=True)
        # the student has the teacher's architecture and starts from random weights, as in the paper
        self.student = FeatureExtractor(backbone, self.layers, pretrained=False, frozen=False,
                                        activation_checkpointing=activation_checkpointing)
        self.mean, self.std = self.teacher.mean, self.teacher.std

    def extract(self, images):
        with torch.no_grad():
            teacher_features = self.teacher(images)
        return teacher_features, self.student(images)

    def forward(self, images):
        teacher_features, student_features = self.extract(images)
        if self.training:
            return teacher_features, student_features
        anomaly_map = compute_anomaly_map(teacher_features, student_features, images.shape[-2:])
        return map_output(anomaly_map)


def compute_anomaly_map(teacher_features, student_features, image_size):
    anomaly_map = None
    for layer, teacher in teacher_features.items():
        student = student_features[layer]
        difference = F.normalize(teacher.float(), dim=1) - F.normalize(student.float(), dim=1)
        distance = 0.5 * difference.pow(2).sum(1, keepdim=True)
        distance = upsample_map(distance, image_size)
        anomaly_map = distance if anomaly_map is None else anomaly_map * distance
    return anomaly_map


class STFPMLoss(nn.Module):
    def forward(self, teacher_features, student_features):
        loss = 0.0
        for layer, teacher in teacher_features.items():
            student = student_features[layer]
            height, width = teacher.shape[-2:]
            difference = F.normalize(teacher.float(), dim=1) - F.normalize(student.float(), dim=1)
            # summed over the batch, as in the paper's and the official code's loss
            loss = loss + 0.5 * difference.pow(2).sum() / (height * width)
        return loss
