# tests/phase_04/test_adding_a_model.py
import json
import shutil

import torch
from torch import nn

from anomaly_detection.models import MODELS
from anomaly_detection.models.backbones import FeatureExtractor, layers_or_default
from anomaly_detection.models.components import FittedBuffersMixin, upsample_map
from anomaly_detection.trainer import OnePassTrainer, model_arguments
from anomaly_detection.utils import PROJECT_ROOT
from helpers import assert_model_file_reproduces, run_cli

# The worked example of docs/adding_a_model.md, registered through the same path a real model uses:
# a YAML file in the config folder, one entry in MODELS, and the CLI's train / test / predict.
DEFAULT_LAYERS = {"resnet18": ["layer2"], "resnet50": ["layer2"], "wide_resnet50_2": ["layer2"],
                  "mobilenet_v2": ["features.6"], "tf_efficientnet_lite0": ["blocks.2"]}

MEANDIST_YAML = """\
model:
  name: meandist
  backbone: resnet18
  layers: null
  pretrained: true
  weights: null
"""


class MeanDistanceModel(FittedBuffersMixin, nn.Module):
    default_layers = DEFAULT_LAYERS
    fitted_buffers = ("feature_mean",)

    def __init__(self, backbone, layers=None, pretrained=True, weights=None, backbone_root=None):
        super().__init__()
        layers = layers_or_default(backbone, layers, DEFAULT_LAYERS, "MeanDistance")
        self.feature_extractor = FeatureExtractor(backbone, layers, pretrained=pretrained, weights=weights,
                                                  backbone_root=backbone_root)
        self.mean, self.std = self.feature_extractor.mean, self.feature_extractor.std
        self.register_buffer("feature_mean", torch.empty(0, 0, 0))

    def embed(self, images):
        with torch.no_grad():
            return self.feature_extractor(images)[self.feature_extractor.layers[-1]].float()

    def begin_fit(self, expected_images=None):
        self._sum, self._count = None, 0

    def accumulate(self, images):
        features = self.embed(images).sum(0)
        self._sum = features if self._sum is None else self._sum + features
        self._count += images.shape[0]

    def finalize_fit(self):
        self.feature_mean = self._sum / self._count
        return {"num_images": self._count}

    def forward(self, images):
        distance = (self.embed(images) - self.feature_mean).pow(2).sum(1, keepdim=True).sqrt()
        anomaly_map = upsample_map(distance, images.shape[-2:])
        return {"anomaly_map": anomaly_map, "pred_score": anomaly_map.flatten(1).amax(1)}


class MeanDistanceTrainer(OnePassTrainer):
    @classmethod
    def build_model(cls, config, pretrained=None):
        return MeanDistanceModel(**model_arguments(config, pretrained))


def test_a_new_model_trains_tests_and_predicts_through_the_cli(tmp_path, monkeypatch, separation):
    configs = tmp_path / "configs"
    shutil.copytree(PROJECT_ROOT / "configs", configs)
    (configs / "models" / "meandist.yaml").write_text(MEANDIST_YAML)
    monkeypatch.setenv("ANOMALY_DETECTION_CONFIG_DIR", str(configs))
    monkeypatch.setitem(MODELS, "meandist", MeanDistanceTrainer)

    result = run_cli(["train", "--model", "meandist", "--dataset", "demo"] + separation.overrides(tmp_path / "run"))
    assert result.code == 0, result.err
    summary = json.loads(result.out.strip().splitlines()[-1])
    separation.check(summary)
    state = torch.load(summary["checkpoint"], map_location="cpu", weights_only=True)
    assert state["model_class"] == "MeanDistanceModel" and state["threshold"]["num_images"] == 3
    assert state["model"]["feature_mean"].shape == (128, 8, 8)

    first_good = sorted((tmp_path / "run" / "data" / "demo" / "test" / "good").glob("*.png"))[0]
    assert_model_file_reproduces(summary, first_good)
