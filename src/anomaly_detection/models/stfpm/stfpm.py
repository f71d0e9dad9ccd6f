# src/anomaly_detection/models/stfpm/stfpm.py
"""STFPM: Wang et al., "Student-Teacher Feature Pyramid Matching for Anomaly Detection" (BMVC 2021)."""
import torch
import torch.nn.functional as F
from torch import nn

from anomaly_detection.models.backbones import FeatureExtractor


class STFPMModel(nn.Module):
    def __init__(self, backbone="resnet18", layers=None, pretrained=True, weights=None, backbone_root=None,
                 activation_checkpointing=False):
        super().__init__()
        self.backbone_name = backbone
        self.teacher = FeatureExtractor(backbone, layers, pretrained=pretrained, weights=weights,
                                        backbone_root=backbone_root, method="stfpm", frozen=True)
        self.layers = list(self.teacher.layers)
        # the student has the teacher's architecture and starts from random weights, as in the paper
        self.student = FeatureExtractor(backbone, self.layers, pretrained=False, method="stfpm", frozen=False,
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
        return {"anomaly_map": anomaly_map, "pred_score": anomaly_map.flatten(1).amax(dim=1)}


def compute_anomaly_map(teacher_features, student_features, image_size):
    anomaly_map = None
    for layer, teacher in teacher_features.items():
        student = student_features[layer]
        distance = 0.5 * (F.normalize(teacher.float(), dim=1) - F.normalize(student.float(), dim=1)).pow(2).sum(1, keepdim=True)
        distance = F.interpolate(distance, size=tuple(image_size), mode="bilinear", align_corners=False)
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
