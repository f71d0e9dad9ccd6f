# src/anomaly_detection/models/padim/padim.py
"""PaDiM: Defard et al., "A Patch Distribution Modeling Framework for Anomaly Detection and Localization" (2020)."""
import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from anomaly_detection import distributed
from anomaly_detection.config import FROM_YAML, fill_from_yaml
from anomaly_detection.models.backbones import FeatureExtractor, layers_or_default
from anomaly_detection.models.components import FittedBuffersMixin, gaussian_blur, map_output, upsample_map

# model.layers: null takes these (the paper's: the first three stages)
RESNET_LAYERS = ["layer1", "layer2", "layer3"]
DEFAULT_LAYERS = dict.fromkeys(("resnet18", "resnet50", "wide_resnet50_2"), RESNET_LAYERS)
DEFAULT_LAYERS.update(mobilenet_v2=["features.3", "features.6", "features.13"],
                      tf_efficientnet_lite0=["blocks.1", "blocks.2", "blocks.4"])
# the paper's random channel subsets; other backbones keep this many unless told otherwise
PAPER_N_FEATURES = {"resnet18": 100, "resnet50": 550, "wide_resnet50_2": 550}
DEFAULT_N_FEATURES = 100
# positions whose covariance is inverted at once: bounds the float64 temporaries of the finalisation
INVERSION_CHUNK = 256


class PaDiMModel(FittedBuffersMixin, nn.Module):
    default_layers = DEFAULT_LAYERS
    # the number of positions is only known after fitting
    fitted_buffers = ("gaussian_mean", "inv_covariance")

    def __init__(self, backbone=FROM_YAML, layers=FROM_YAML, pretrained=FROM_YAML, weights=FROM_YAML,
                 backbone_root=None, n_features=FROM_YAML, epsilon=FROM_YAML, seed=0, blur_sigma=FROM_YAML):
        super().__init__()
        args = fill_from_yaml("padim", "model", {
            "backbone": backbone, "layers": layers, "pretrained": pretrained, "weights": weights,
            "n_features": n_features, "epsilon": epsilon, "blur_sigma": blur_sigma})
        backbone, n_features, epsilon = args["backbone"], args["n_features"], args["epsilon"]
        self.feature_extractor = FeatureExtractor(
            backbone, layers_or_default(backbone, args["layers"], DEFAULT_LAYERS, "PaDiM"),
            pretrained=args["pretrained"], weights=args["weights"], backbone_root=backbone_root, frozen=True)
        self.backbone_name = backbone
        self.layers = list(self.feature_extractor.layers)
        self.mean, self.std = self.feature_extractor.mean, self.feature_extractor.std
        total = sum(self.feature_extractor.channels.values())
        if n_features is None:
            n_features = min(PAPER_N_FEATURES.get(backbone, DEFAULT_N_FEATURES), total)
        if not 1 <= int(n_features) <= total:
            raise ValueError(f"model.n_features={n_features} must be in [1, {total}]: layers {', '.join(self.layers)} "
                             f"of {backbone} have {total} channels in all")
        if not float(epsilon) > 0:
            raise ValueError(f"model.epsilon must be > 0, got {epsilon}")
        self.n_features = int(n_features)
        self.epsilon = float(epsilon)
        self.blur_sigma = float(args["blur_sigma"])
        generator = torch.Generator().manual_seed(int(seed))
        # sorted, so that selecting per layer before upsampling keeps the order of the concatenated map
        chosen = torch.randperm(total, generator=generator)[:self.n_features].sort().values
        self.register_buffer("feature_index", chosen)
        self.register_buffer("gaussian_mean", torch.empty(self.n_features, 0))
        self.register_buffer("inv_covariance", torch.empty(0, self.n_features, self.n_features))
        self._sum, self._outer_sum, self._count, self._grid = None, None, 0, None

    def embed(self, images):
        with torch.no_grad():
            features = self.feature_extractor(images)
            size = features[self.layers[0]].shape[-2:]
            parts, offset = [], 0
            for layer in self.layers:
                feature = features[layer]
                channels = feature.shape[1]
                local = self.feature_index[(self.feature_index >= offset) & (self.feature_index < offset + channels)]
                offset += channels
                if local.numel() == 0:
                    continue
                feature = feature.index_select(1, local - (offset - channels)).float()
                # nearest upsampling of the deeper maps, as the official code's embedding_concat does
                if feature.shape[-2:] != size:
                    feature = F.interpolate(feature, size=size, mode="nearest")
                parts.append(feature)
            return torch.cat(parts, dim=1)

    # ---- fitting: running sums over the training images, in float64 ------------------------------
    def begin_fit(self, expected_images=None):
        self._sum, self._outer_sum, self._count, self._grid = None, None, 0, None

    def accumulate(self, images):
        embedding = self.embed(images)
        batch, channels, height, width = embedding.shape
        # contiguous per position: baddbmm on the strided view was 200x slower with two threads
        vectors = embedding.reshape(batch, channels, height * width).permute(2, 0, 1).double().contiguous()
        if self._sum is None:
            self._sum = torch.zeros(height * width, channels, dtype=torch.float64, device=embedding.device)
            self._outer_sum = torch.zeros(height * width, channels, channels, dtype=torch.float64,
                                          device=embedding.device)
            self._grid = (height, width)
        elif self._grid != (height, width):
            raise ValueError(f"PaDiM needs one image size: got a {height}x{width} feature grid after {self._grid}")
        self._sum += vectors.sum(1)
        self._outer_sum.baddbmm_(vectors.transpose(1, 2), vectors)
        self._count += batch

    def finalize_fit(self):
        if distributed.active():
            # under torchrun each process summed its share of the images: the sums over all of them, so N
            # processes fit the model one process fits (float64 sums, added in another order)
            self._count = distributed.all_reduce_count(self._count)
            self._sum = distributed.all_reduce_sum(self._sum)
            self._outer_sum = distributed.all_reduce_sum(self._outer_sum)
        if self._count < 2:
            raise ValueError(f"PaDiM needs at least 2 training images to estimate a covariance, got {self._count}")
        count = self._count
        mean = self._sum / count
        positions, channels = mean.shape
        identity = torch.eye(channels, dtype=torch.float64, device=mean.device)
        inverse = torch.empty(positions, channels, channels, dtype=torch.float32, device=mean.device)
        with single_cpu_thread(mean.device):
            for start in range(0, positions, INVERSION_CHUNK):
                stop = min(start + INVERSION_CHUNK, positions)
                chunk_mean = mean[start:stop]
                # unbiased, as numpy.cov in the official code, plus the paper's epsilon * I
                covariance = self._outer_sum[start:stop] - count * chunk_mean[:, :, None] * chunk_mean[:, None, :]
                covariance = covariance / (count - 1) + self.epsilon * identity
                inverse[start:stop] = torch.linalg.inv(covariance).float()
        self.gaussian_mean = mean.t().float().contiguous()
        self.inv_covariance = inverse
        self._sum, self._outer_sum = None, None
        return {"num_images": count, "positions": positions, "n_features": channels}

    # ---- scoring -----------------------------------------------------------------------------------
    def forward(self, images):
        embedding = self.embed(images)
        if self.training:
            return embedding
        if self.inv_covariance.shape[0] == 0:
            raise RuntimeError("PaDiM has no Gaussian statistics: fit it on normal images first")
        batch, channels, height, width = embedding.shape
        if self.inv_covariance.shape[0] != height * width:
            raise ValueError(f"PaDiM was fitted on a {self.inv_covariance.shape[0]}-position feature grid, "
                             f"these images give {height}x{width}: use the training image size")
        # contiguous per position: bmm on the strided view was 700x slower with two threads
        delta = (embedding.reshape(batch, channels, -1) - self.gaussian_mean).permute(2, 0, 1).contiguous()
        squared = (torch.bmm(delta, self.inv_covariance) * delta).sum(2)
        distance = squared.clamp_min(0).sqrt().t().reshape(batch, 1, height, width)
        anomaly_map = gaussian_blur(upsample_map(distance, images.shape[-2:]), self.blur_sigma)
        return map_output(anomaly_map)


@contextlib.contextmanager
def single_cpu_thread(device):
    # a batched inverse is one small LAPACK call per position: a second thread gains nothing, and on a busy
    # machine every call waits for a descheduled core (4096 inverses: 1.2 s with one thread, 67 s with two)
    previous = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
