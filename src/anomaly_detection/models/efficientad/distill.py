# src/anomaly_detection/models/efficientad/distill.py
"""EfficientAD teacher pretraining (Batzner et al., WACV 2024, appendix: distillation of a pretrained backbone into
the PDN)."""
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.transforms.v2 import functional as TF
from tqdm.auto import tqdm

from anomaly_detection import __version__
from anomaly_detection.data.datasets import ImageReadError, load_image_raw
from anomaly_detection.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from anomaly_detection.models.backbones import BACKBONES, FeatureExtractor, get_backbone_normalization
from anomaly_detection.models.efficientad.efficientad import MODEL_SIZES, PDN, pdn_output_size
from anomaly_detection.models.efficientad.trainer import readable_images
from anomaly_detection.utils import atomic_torch_save, logger, resolve_device, seed_everything

HELP = "distil a backbone's features into an EfficientAD teacher (PDN), offline, from any folder of images"
OUT_CHANNELS = 384
# the paper's recipe: Adam lr 1e-4, weight decay 1e-5, batch 16, grey-scale with probability 0.1, the
# extractor at twice the PDN's input size so that its stride-8 map matches the PDN's 64x64 output at 256 px
LEARNING_RATE = 1e-4
WEIGHT_DECAY = 1e-5
GRAYSCALE_PROBABILITY = 0.1


def add_arguments(parser):
    parser.add_argument("--backbone", default="tf_efficientnet_lite0", choices=list(BACKBONES),
                        help="the pretrained backbone to distil (its weights load offline as for every model)")
    parser.add_argument("--images", required=True, help="a folder of generic images (searched recursively)")
    parser.add_argument("--model-size", default="small", choices=MODEL_SIZES)
    parser.add_argument("--steps", type=int, default=10000, help="optimizer steps (the paper: 60,000 at batch 16)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--image-size", type=int, default=256, help="the PDN's input size")
    parser.add_argument("--stats-images", type=int, default=512,
                        help="images used for the per-channel mean and std of the backbone features")
    parser.add_argument("--output", required=True, help="the teacher file to write (teacher_<size>.pth)")
    parser.add_argument("--checkpoint-every", type=int, default=500,
                        help="steps between resumable checkpoints (<output>.partial.pt)")
    parser.add_argument("--backbone-root", default=None, help="folder of backbone weight files (default: paths.yaml)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true")


def run(args):
    return distill_teacher(backbone=args.backbone, images=args.images, model_size=args.model_size, steps=args.steps,
                           batch_size=args.batch_size, image_size=args.image_size, stats_images=args.stats_images,
                           output=args.output, checkpoint_every=args.checkpoint_every,
                           backbone_root=args.backbone_root, device=args.device, seed=args.seed,
                           progress_bar=not args.no_progress)


def extractor_layers(backbone):
    # The paper distils WideResNet-101's layer2 and layer3 (strides 8 and 16), 3x3-averaged, layer3 upsampled,
    # channel-pooled to 384. The same recipe for any backbone: its stride-8 and stride-16 stages, and deeper
    # ones only while fewer than 384 channels are at hand (tf_efficientnet_lite0 has 232 at strides 8-16).
    spec = BACKBONES[backbone]
    layers = [stage for stage in spec["stages"] if spec["strides"][stage] in (8, 16)]
    for stage in spec["stages"]:
        if sum(spec["channels"][layer] for layer in layers) >= OUT_CHANNELS:
            break
        if spec["strides"][stage] > 16:
            layers.append(stage)
    if sum(spec["channels"][layer] for layer in layers) < OUT_CHANNELS:
        raise ValueError(f"backbone {backbone} has only {sum(spec['channels'][l] for l in layers)} channels at "
                         f"strides 8 and deeper: a teacher needs {OUT_CHANNELS}")
    return layers


def target_features(extractor, images):
    # images at twice the PDN's input size: every stage 3x3-averaged, brought to the stride-8 grid,
    # concatenated and average-pooled over channels to 384 (PatchCore's aggregation, as the reference's)
    with torch.no_grad():
        features = extractor(images)
        size = features[extractor.layers[0]].shape[-2:]
        maps = [F.interpolate(F.avg_pool2d(features[layer].float(), 3, stride=1, padding=1), size=size,
                              mode="bilinear", align_corners=False) for layer in extractor.layers]
        stacked = torch.cat(maps, dim=1)
        batch, channels, height, width = stacked.shape
        pooled = F.adaptive_avg_pool1d(stacked.permute(0, 2, 3, 1).reshape(-1, 1, channels), OUT_CHANNELS)
        return pooled.reshape(batch, height, width, OUT_CHANNELS).permute(0, 3, 1, 2).contiguous()


class DistillationImages:
    # the same image, optionally grey, resized once for the PDN (ImageNet normalisation, as EfficientAD's
    # inputs) and once at twice the size for the backbone (its own normalisation)
    def __init__(self, paths, image_size, backbone, generator):
        self.paths = paths
        self.image_size = image_size
        self.backbone_mean, self.backbone_std = get_backbone_normalization(backbone)
        self.generator = generator
        self.order = []
        self.skipped = set()

    def sample(self):
        while True:
            if not self.order:
                self.order = torch.randperm(len(self.paths), generator=self.generator).tolist()
            path = self.paths[self.order.pop()]
            try:
                return load_image_raw(path)
            except ImageReadError as error:
                if path not in self.skipped:
                    self.skipped.add(path)
                    logger.warning("distill-teacher: skipped %s: %s", path, error)
                if len(self.skipped) == len(self.paths):
                    raise ValueError("distill-teacher: none of the images can be read") from None

    def batch(self, count):
        small, large = [], []
        for _ in range(count):
            image = TF.to_dtype(self.sample(), torch.float32, scale=True)
            if torch.rand((), generator=self.generator) < GRAYSCALE_PROBABILITY:
                image = TF.rgb_to_grayscale(image, num_output_channels=3)
            small.append(TF.resize(image, [self.image_size] * 2, antialias=True))
            large.append(TF.resize(image, [2 * self.image_size] * 2, antialias=True))
        small = TF.normalize(torch.stack(small), list(IMAGENET_MEAN), list(IMAGENET_STD))
        large = TF.normalize(torch.stack(large), list(self.backbone_mean), list(self.backbone_std))
        return small, large


def channel_statistics(extractor, images, count, batch_size, device, progress_bar):
    # per-channel mean and std of the targets over `count` images, in float64 running sums
    total = torch.zeros(OUT_CHANNELS, dtype=torch.float64)
    squares = torch.zeros(OUT_CHANNELS, dtype=torch.float64)
    values = 0
    seen = 0
    bar = tqdm(total=count, desc="feature statistics", disable=not progress_bar, leave=False)
    while seen < count:
        size = min(batch_size, count - seen)
        _, large = images.batch(size)
        target = target_features(extractor, large.to(device)).double().cpu()
        total += target.sum(dim=(0, 2, 3))
        squares += target.pow(2).sum(dim=(0, 2, 3))
        values += target.shape[0] * target.shape[2] * target.shape[3]
        seen += size
        bar.update(size)
    bar.close()
    mean = total / values
    std = (squares / values - mean.pow(2)).clamp_min(0).sqrt()
    return mean.float(), std.float().clamp_min(1e-6)


def check_arguments(model_size, steps, batch_size, image_size, stats_images, checkpoint_every):
    for name, value, minimum in (("--steps", steps, 1), ("--batch-size", batch_size, 1),
                                 ("--stats-images", stats_images, 1), ("--checkpoint-every", checkpoint_every, 1)):
        if value < minimum:
            raise ValueError(f"distill-teacher {name} must be >= {minimum}, got {value}")
    if pdn_output_size(image_size, model_size, True) != image_size // 4 or image_size % 4:
        raise ValueError(f"distill-teacher --image-size must be a multiple of 4 the PDN reduces to a quarter, "
                         f"got {image_size}")


def distill_teacher(backbone, images, model_size="small", steps=10000, batch_size=16, image_size=256,
                    stats_images=512, output="teacher_small.pth", checkpoint_every=500, backbone_root=None,
                    device="auto", seed=0, progress_bar=True):
    check_arguments(model_size, steps, batch_size, image_size, stats_images, checkpoint_every)
    output = Path(output)
    partial = output.with_name(output.name + ".partial.pt")
    device = resolve_device(device)
    seed_everything(seed)
    paths = readable_images(images)
    recipe = {"backbone": backbone, "layers": extractor_layers(backbone), "images": str(Path(images).resolve()),
              "num_images": len(paths), "model_size": model_size, "steps": steps, "batch_size": batch_size,
              "image_size": image_size, "extractor_image_size": 2 * image_size, "stats_images": stats_images,
              "learning_rate": LEARNING_RATE, "weight_decay": WEIGHT_DECAY,
              "grayscale_probability": GRAYSCALE_PROBABILITY, "seed": seed, "out_channels": OUT_CHANNELS,
              "version": __version__}
    extractor = FeatureExtractor(backbone, recipe["layers"], pretrained=True, backbone_root=backbone_root).to(device)
    # the reference trains the PDN with padding so that its output matches the 64x64 target; EfficientAD
    # then runs the same weights without padding
    pdn = PDN(model_size, OUT_CHANNELS, padding=True).to(device)
    optimizer = torch.optim.Adam(pdn.parameters(), lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY)
    generator = torch.Generator().manual_seed(seed)
    data = DistillationImages(paths, image_size, backbone, generator)

    start = 0
    if partial.is_file():
        state = torch.load(partial, map_location="cpu", weights_only=True)
        saved = json.loads(state["recipe"])
        if {k: v for k, v in saved.items() if k != "steps"} != {k: v for k, v in recipe.items() if k != "steps"}:
            changed = sorted(k for k in recipe if saved.get(k) != recipe[k] and k != "steps")
            raise ValueError(f"{partial} was made with another recipe ({', '.join(changed)} differ): remove it to "
                             "start over, or use the same arguments to resume")
        pdn.load_state_dict(state["pdn"])
        optimizer.load_state_dict(state["optimizer"])
        mean, std, start = state["mean"], state["std"], int(state["step"])
        generator.set_state(state["generator"])
        data.order = list(state["order"])
        torch.set_rng_state(state["torch_rng"])
        logger.info("distill-teacher: resuming %s at step %d of %d", partial, start, steps)
    else:
        mean, std = channel_statistics(extractor, data, min(stats_images, len(paths)), batch_size, device,
                                       progress_bar)
    mean_d, std_d = mean.to(device)[None, :, None, None], std.to(device)[None, :, None, None]

    pdn.train()
    started = time.perf_counter()
    losses = []
    bar = tqdm(range(start, steps), desc="distill-teacher", disable=not progress_bar, initial=start, total=steps)
    for step in bar:
        small, large = data.batch(batch_size)
        target = (target_features(extractor, large.to(device)) - mean_d) / std_d
        prediction = pdn(small.to(device))
        if prediction.shape != target.shape:
            raise RuntimeError(f"PDN output {tuple(prediction.shape)} does not match the target {tuple(target.shape)}")
        loss = F.mse_loss(prediction, target)
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"distill-teacher: the loss became {loss.item()} at step {step}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if (step + 1) % checkpoint_every == 0 and step + 1 < steps:
            atomic_torch_save({"pdn": pdn.state_dict(), "optimizer": optimizer.state_dict(), "mean": mean,
                               "std": std, "step": step + 1, "recipe": json.dumps(recipe),
                               "generator": generator.get_state(), "order": list(data.order),
                               "torch_rng": torch.get_rng_state()}, partial)
    recipe.update({"final_loss": float(np.mean(losses[-50:])) if losses else None,
                   "train_s": round(time.perf_counter() - started, 1), "resumed_at_step": start})
    atomic_torch_save({"state_dict": {k: v.cpu() for k, v in pdn.state_dict().items()}, "recipe": recipe}, output)
    if partial.is_file():
        partial.unlink()
    logger.info("distill-teacher: wrote %s (%s)", output, json.dumps(recipe))
    return {"teacher": str(output), **recipe}
