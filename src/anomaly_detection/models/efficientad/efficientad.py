# src/anomaly_detection/models/efficientad/efficientad.py
"""EfficientAD: Batzner et al., "EfficientAD: Accurate Visual Anomaly Detection at Millisecond-Level Latencies"
(WACV 2024)."""
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from anomaly_detection import distributed
from anomaly_detection.config import FROM_YAML, fill_from_yaml
from anomaly_detection.data.transforms import IMAGENET_MEAN, IMAGENET_STD, size_pair
from anomaly_detection.models.components import map_output, quantile_normalization, quantiles, upsample_map

MODEL_SIZES = ("small", "medium")
# torch.quantile's limit: larger tensors are sampled (components.quantiles)
QUANTILE_LIMIT = 2 ** 24
# without padding the PDN's map lacks 4 positions on each side (its 33 px receptive field at stride 4); the
# reference pads them with zeros, i.e. with the normalised map's value at the q_low quantile
MAP_PADDING = 4
# images per forward pass at inference and validation (see EfficientADModel.raw_maps)
INFERENCE_CHUNK = 4

# (name, in, out, kernel, padding when model.padding is true, relu after, avgpool after); the last out is
# the PDN's output width
PDN_LAYERS = {
    "small": [("conv1", 3, 128, 4, 3, True, True), ("conv2", 128, 256, 4, 3, True, True),
              ("conv3", 256, 256, 3, 1, True, False), ("conv4", 256, None, 4, 0, False, False)],
    "medium": [("conv1", 3, 256, 4, 3, True, True), ("conv2", 256, 512, 4, 3, True, True),
               ("conv3", 512, 512, 1, 0, True, False), ("conv4", 512, 512, 3, 1, True, False),
               ("conv5", 512, None, 4, 0, True, False), ("conv6", None, None, 1, 0, False, False)],
}
# the reference implementation's nn.Sequential positions of the convolutions
SEQUENTIAL_INDICES = {"small": (0, 3, 6, 8), "medium": (0, 3, 6, 8, 10, 12)}
DISTILL_COMMAND = ("anomaly-detection distill-teacher --backbone tf_efficientnet_lite0 --images DIR "
                   "--model-size {size} --output {path}")


def pdn_output_size(size, model_size, padding):
    # the PDN's output length along one axis for an input of `size` pixels (0 or less: too small)
    for _, _, _, kernel, pad, _, pool in PDN_LAYERS[model_size]:
        size = size + 2 * (pad if padding else 0) - kernel + 1
        if pool:
            size = (size + 2 * (1 if padding else 0) - 2) // 2 + 1
        if size < 1:
            return 0
    return size


class PDN(nn.Module):
    def __init__(self, model_size, out_channels, padding=False):
        super().__init__()
        self.layers = []
        for name, in_channels, channels, kernel, pad, relu, pool in PDN_LAYERS[model_size]:
            conv = nn.Conv2d(in_channels or out_channels, channels or out_channels, kernel,
                             padding=pad if padding else 0)
            setattr(self, name, conv)
            self.layers.append((name, relu, pool))
        self.pool = nn.AvgPool2d(2, stride=2, padding=1 if padding else 0)

    def forward(self, x):
        # channels-last: oneDNN's CPU convolutions run faster in NHWC, most of all in bfloat16 (a training
        # step 1.8x faster than contiguous bfloat16 on an AMX Xeon)
        x = x.contiguous(memory_format=torch.channels_last)
        for name, relu, pool in self.layers:
            x = getattr(self, name)(x)
            if relu:
                x = F.relu(x)
            if pool:
                x = self.pool(x)
        return x


class AutoEncoder(nn.Module):
    # encoder: five 4x4 stride-2 convolutions and one that covers what is left (8x8 at 256 px) to a 64-channel
    # latent; decoder: bilinear upsampling + 4x4 convolutions at sizes that follow the input's, as the
    # reference's fixed sizes do at 256 px (3, 8, 15, 32, 63, 127), then to the PDN's output size
    def __init__(self, out_channels, image_size, dropout=0.2):
        super().__init__()
        widths = [3, 32, 32, 64, 64, 64]
        self.encoder = nn.ModuleList(nn.Conv2d(a, b, 4, stride=2, padding=1) for a, b in zip(widths, widths[1:]))
        latent_kernel = tuple(min(8, side // 32) for side in image_size)
        self.latent = nn.Conv2d(64, 64, latent_kernel)
        self.decoder = nn.ModuleList(nn.Conv2d(64, 64, 4, padding=2) for _ in range(6))
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Sequential(nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, out_channels, 3, padding=1))

    @staticmethod
    def decoder_sizes(side):
        return [max(1, side // 64 - 1), max(1, side // 32), max(1, side // 16 - 1), max(1, side // 8),
                max(1, side // 4 - 1), max(1, side // 2 - 1)]

    def forward(self, x, output_size):
        sizes = list(zip(*(self.decoder_sizes(side) for side in x.shape[-2:])))
        for conv in self.encoder:
            x = F.relu(conv(x))
        x = self.latent(x)
        for conv, size in zip(self.decoder, sizes):
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
            x = self.dropout(F.relu(conv(x)))
        x = F.interpolate(x, size=tuple(output_size), mode="bilinear", align_corners=False)
        return self.head(x)


def hard_feature_loss(teacher, student, quantile=0.999):
    # the mean of the squared differences at or above their `quantile`: the student learns where it is worst
    distance = (teacher - student).pow(2)
    with torch.no_grad():
        hard = quantiles(distance, quantile, max_samples=QUANTILE_LIMIT)
    return distance[distance >= hard].mean()


class EfficientADModel(nn.Module):
    def __init__(self, model_size=FROM_YAML, out_channels=FROM_YAML, padding=FROM_YAML, pad_maps=FROM_YAML,
                 pretrained=FROM_YAML, teacher_weights=FROM_YAML, hard_quantile=FROM_YAML, map_quantiles=FROM_YAML,
                 map_target=FROM_YAML, dropout=FROM_YAML, image_size=FROM_YAML, backbone_root=None):
        super().__init__()
        args = fill_from_yaml("efficientad", "model", {
            "model_size": model_size, "out_channels": out_channels, "padding": padding, "pad_maps": pad_maps,
            "pretrained": pretrained, "teacher_weights": teacher_weights, "hard_quantile": hard_quantile,
            "map_quantiles": map_quantiles, "map_target": map_target, "dropout": dropout})
        image_size = fill_from_yaml("efficientad", "data", {"image_size": image_size})["image_size"]
        check_arguments(args)
        self.model_size = args["model_size"]
        self.out_channels = int(args["out_channels"])
        self.padding = bool(args["padding"])
        self.pad_maps = bool(args["pad_maps"]) and not self.padding
        self.hard_quantile = float(args["hard_quantile"])
        self.map_quantiles = tuple(float(q) for q in args["map_quantiles"])
        self.map_target = float(args["map_target"])
        self.image_size = size_pair(image_size, "model.image_size")
        check_image_size(self.image_size, self.model_size, self.padding)
        self.mean, self.std = IMAGENET_MEAN, IMAGENET_STD

        self.teacher = PDN(self.model_size, self.out_channels, self.padding)
        # the student's first half regresses the teacher, its second half the autoencoder
        self.student = PDN(self.model_size, 2 * self.out_channels, self.padding)
        self.autoencoder = AutoEncoder(self.out_channels, self.image_size, float(args["dropout"]))
        if args["pretrained"]:
            path = teacher_path(args["teacher_weights"], backbone_root, self.model_size)
            self.teacher.load_state_dict(load_teacher_state(path, self.teacher, self.model_size))
        self.teacher.requires_grad_(False)
        self.teacher.eval()

        self.to(memory_format=torch.channels_last)  # load_state_dict copies into these and keeps the layout

        self.register_buffer("teacher_mean", torch.zeros(1, self.out_channels, 1, 1))
        self.register_buffer("teacher_std", torch.ones(1, self.out_channels, 1, 1))
        # until fitted, (0, target) for both maps: the normalisation leaves the raw maps as they are
        self.register_buffer("st_quantiles", torch.tensor([0.0, self.map_target]))
        self.register_buffer("ae_quantiles", torch.tensor([0.0, self.map_target]))

    def train(self, mode=True):
        super().train(mode)
        self.teacher.eval()
        return self

    def trainable_parameters(self):
        return list(self.student.parameters()) + list(self.autoencoder.parameters())

    def pdn_output_shape(self, image_hw):
        return tuple(pdn_output_size(side, self.model_size, self.padding) for side in image_hw)

    @torch.no_grad()
    def teacher_features(self, images):
        return (self.teacher(images) - self.teacher_mean) / self.teacher_std

    @torch.no_grad()
    def fit_teacher_statistics(self, batches):
        # per-channel mean and std of the teacher's outputs over the training images, as the reference's two
        # passes (the mean of per-batch channel means, then the mean of per-batch mean squared distances to
        # it) in one pass of float64 sums: mean_b E_b[(x - m)^2] = mean_b E_b[x^2] - m^2 when m = mean_b E_b[x].
        # Keeping the outputs instead took 4.8 MB per 256 px image (2.7 GB for magnetic_tile).
        sums, squares, count = 0.0, 0.0, 0
        for images in batches:
            out = self.teacher(images).double()
            sums = sums + out.mean(dim=(0, 2, 3))
            squares = squares + out.pow(2).mean(dim=(0, 2, 3))
            count += 1
        if distributed.active():
            # under torchrun each process saw its share of the training images: the sums of all of them
            channels = self.teacher_mean.shape[1]
            totals = torch.zeros(2 * channels + 1, dtype=torch.float64, device=self.teacher_mean.device)
            if count:
                totals[:channels], totals[channels:-1] = sums, squares
            totals[-1] = count
            distributed.all_reduce_sum(totals)
            sums, squares, count = totals[:channels], totals[channels:-1], int(totals[-1])
        if count == 0:
            raise ValueError("EfficientAD needs training images to normalise the teacher's features: got none")
        mean = sums / count
        var = (squares / count - mean.pow(2)).clamp_min(0)
        self.teacher_mean.copy_(mean.float().view(1, -1, 1, 1))
        self.teacher_std.copy_(var.sqrt().float().clamp_min(torch.finfo(torch.float32).eps).view(1, -1, 1, 1))

    def training_losses(self, images, ae_images=None, penalty_images=None):
        channels = self.out_channels
        ae_images = images if ae_images is None else ae_images
        same = ae_images is images
        inputs = [images] if same else [images, ae_images]
        teacher = self.teacher_features(torch.cat(inputs))
        # the losses in float32 also under bfloat16 autocast: the hard loss takes a 0.999 quantile of them
        student = self.student(torch.cat(inputs + ([penalty_images] if penalty_images is not None else []))).float()
        count = images.shape[0]
        teacher_st, teacher_ae = teacher[:count], teacher[count:] if not same else teacher
        student_st = student[:count, :channels]
        student_ae = student[:count, channels:] if same else student[count:2 * count, channels:]
        losses = {"hard": hard_feature_loss(teacher_st, student_st, self.hard_quantile)}
        if penalty_images is not None:
            losses["penalty"] = student[-penalty_images.shape[0]:, :channels].pow(2).mean()
        ae = self.autoencoder(ae_images, teacher.shape[-2:]).float()
        losses["ae"] = (teacher_ae - ae).pow(2).mean()
        losses["stae"] = (ae - student_ae).pow(2).mean()
        losses["loss"] = sum(losses.values())
        return losses

    def raw_maps(self, images, with_loss=False):
        # the student-teacher and autoencoder maps at the PDN's resolution, before normalisation; with_loss
        # adds the training loss of the same outputs (no penalty, no augmentation), for validation: per chunk
        # of images, averaged with the chunks' sizes as weights.
        # A few images at a time: the PDNs' first maps are large (128 x 253 x 253 floats per image at 256 px),
        # so a batch of 32 peaked 2 GB above training; per image it runs as fast in chunks.
        parts = [self.chunk_maps(chunk, with_loss) for chunk in images.split(INFERENCE_CHUNK)]
        map_st, map_ae = torch.cat([part[0] for part in parts]), torch.cat([part[1] for part in parts])
        if not with_loss:
            return map_st, map_ae
        loss = sum(part[2] * part[0].shape[0] for part in parts) / images.shape[0]
        return map_st, map_ae, loss

    def chunk_maps(self, images, with_loss):
        teacher = self.teacher_features(images).float()
        student = self.student(images).float()
        ae = self.autoencoder(images, teacher.shape[-2:]).float()
        student_st, student_ae = student[:, :self.out_channels], student[:, self.out_channels:]
        map_st = (teacher - student_st).pow(2).mean(1, keepdim=True)
        map_ae = (ae - student_ae).pow(2).mean(1, keepdim=True)
        if not with_loss:
            return map_st, map_ae
        loss = hard_feature_loss(teacher, student_st, self.hard_quantile) + (teacher - ae).pow(2).mean() \
            + map_ae.mean()
        return map_st, map_ae, loss

    @torch.no_grad()
    def fit_map_quantiles(self, maps_st, maps_ae):
        self.st_quantiles.copy_(quantiles(torch.cat(maps_st), self.map_quantiles, max_samples=QUANTILE_LIMIT))
        self.ae_quantiles.copy_(quantiles(torch.cat(maps_ae), self.map_quantiles, max_samples=QUANTILE_LIMIT))
        return {"st_quantiles": self.st_quantiles.tolist(), "ae_quantiles": self.ae_quantiles.tolist()}

    def combine_maps(self, map_st, map_ae, image_hw):
        map_st = quantile_normalization(map_st, self.st_quantiles[0], self.st_quantiles[1], self.map_target)
        map_ae = quantile_normalization(map_ae, self.ae_quantiles[0], self.ae_quantiles[1], self.map_target)
        combined = 0.5 * map_st + 0.5 * map_ae
        if self.pad_maps:
            combined = F.pad(combined, (MAP_PADDING,) * 4)
        return upsample_map(combined, image_hw)

    def score(self, images):
        # the whole batch in one pass: what the export traces (components.WholeBatchScore), since a traced split
        # would freeze the number of chunks; the quantiles are buffers, so the normalisation needs nothing special
        check_input_size(images.shape[-2:], self.model_size, self.padding)
        return self.combine_maps(*self.chunk_maps(images, with_loss=False), images.shape[-2:])

    def forward(self, images):
        if self.training:
            return self.training_losses(images)
        check_input_size(images.shape[-2:], self.model_size, self.padding)
        return map_output(self.combine_maps(*self.raw_maps(images), images.shape[-2:]))


def check_arguments(args):
    if args["model_size"] not in MODEL_SIZES:
        raise ValueError(f"model.model_size must be small or medium, got {args['model_size']!r}")
    if not isinstance(args["out_channels"], int) or args["out_channels"] < 1:
        raise ValueError(f"model.out_channels must be an integer >= 1, got {args['out_channels']!r}")
    if not 0 < float(args["hard_quantile"]) < 1:
        raise ValueError(f"model.hard_quantile must be in (0, 1), got {args['hard_quantile']!r}")
    levels = args["map_quantiles"]
    if not (isinstance(levels, (list, tuple)) and len(levels) == 2 and 0 <= levels[0] < levels[1] <= 1):
        raise ValueError(f"model.map_quantiles must be [low, high] with 0 <= low < high <= 1, got {levels!r}")
    if not float(args["map_target"]) > 0:
        raise ValueError(f"model.map_target must be > 0, got {args['map_target']!r}")
    if not 0 <= float(args["dropout"]) < 1:
        raise ValueError(f"model.dropout must be in [0, 1), got {args['dropout']!r}")


def smallest_image_size(model_size, padding):
    # the autoencoder's five stride-2 convolutions need 32 px; the PDN may need more
    return next(side for side in range(32, 1024) if pdn_output_size(side, model_size, padding) >= 1)


def check_image_size(image_hw, model_size, padding):
    smallest = smallest_image_size(model_size, padding)
    if min(image_hw) < smallest:
        raise ValueError(f"data.image_size {list(image_hw)} is too small for EfficientAD's PDN "
                         f"(model_size={model_size}, padding={padding}): it needs at least {smallest} px per side "
                         "(the paper uses 256)")


def check_input_size(image_hw, model_size, padding):
    smallest = smallest_image_size(model_size, padding)
    if min(image_hw) < smallest:
        raise ValueError(f"images of {list(image_hw)} px are too small for EfficientAD's PDN: it needs at least "
                         f"{smallest} px per side (data.image_size)")


def teacher_path(teacher_weights, backbone_root, model_size):
    if teacher_weights:
        return Path(teacher_weights)
    if backbone_root is None:
        raise ValueError("EfficientAD with model.pretrained=true needs its teacher: set model.teacher_weights to "
                         "a file or backbone_root to the folder that holds efficientad/teacher_<size>.pth")
    return Path(backbone_root) / "efficientad" / f"teacher_{model_size}.pth"


def describe(state):
    return ", ".join(f"{key} {tuple(value.shape)}" for key, value in state.items())


def load_teacher_state(path, teacher, model_size):
    # the reference implementation's nn.Sequential layout (0.weight, 3.bias, ...) or Anomalib's names
    # (conv1.weight, ...; with or without a "teacher." prefix), onto this PDN's names; a bare state_dict or
    # one under "state_dict" (as distill-teacher writes it)
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"EfficientAD teacher weights not found: {path}. Make them with "
                                f"`{DISTILL_COMMAND.format(size=model_size, path=path)}`, point "
                                "model.teacher_weights at a teacher file, or set model.pretrained=false for a "
                                "random teacher (tests only)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ValueError(f"Cannot read EfficientAD teacher weights {path} as a state_dict "
                         f"({type(error).__name__}: {error})") from None
    expected = teacher.state_dict()
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]  # distill-teacher's file: the weights beside the recipe that made them
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"EfficientAD teacher file {path} does not hold a state_dict of tensors; expected "
                         f"{describe(expected)}")
    names = [name for name, _, _ in teacher.layers]
    sequential = {f"{index}.{kind}": f"{name}.{kind}" for index, name in zip(SEQUENTIAL_INDICES[model_size], names)
                  for kind in ("weight", "bias")}
    if set(state) == set(sequential):
        state = {sequential[key]: value for key, value in state.items()}
    elif all(key.startswith("teacher.") for key in state):
        state = {key[len("teacher."):]: value for key, value in state.items()}
    found = {key: tuple(value.shape) for key, value in state.items()}
    wanted = {key: tuple(value.shape) for key, value in expected.items()}
    if found != wanted:
        raise ValueError(f"EfficientAD teacher file {path} does not fit a PDN-{model_size[0].upper()} with "
                         f"{expected[names[-1] + '.weight'].shape[0]} output channels: "
                         f"expected keys and shapes {describe(expected)} (or the reference's nn.Sequential "
                         f"keys {', '.join(sequential)}), found {describe(state)}")
    return state
