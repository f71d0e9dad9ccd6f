# benchmarks/reverse_distillation_trainer_loop.py
# Our trainer loop against a plain one around the same Reverse Distillation network: one initial state (copied),
# one list of batches (the same images, the same order every epoch), the same Adam. BaseTrainer.fit trains one
# copy, a loop of a few lines (train mode, forward, loss, zero_grad, backward, step) the other; the script
# records the largest relative gap between the two state_dicts (weights and BatchNorm statistics) and both
# loss histories. A gap of 0 says that the trainer's loop (hooks, checkpointing of activations, its optimizer
# step) adds nothing to the optimisation, so a difference between our runner and another framework's lies in
# what feeds the loop (which images, their order, the initial weights). A diagnosis, not a score:
#
#   python benchmarks/reverse_distillation_trainer_loop.py --data /tmp/bw/synth/synthetic/texture \
#       --weights /tmp/bw/synth/resnet18_random.pth --seeds 0,1,2
import argparse
import copy
import json
import sys
from pathlib import Path

import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from record import append_record, typed_command  # noqa: E402

from anomaly_detection.data.transforms import get_test_transforms  # noqa: E402
from anomaly_detection.models.reverse_distillation import (ReverseDistillationLoss,  # noqa: E402
                                                           ReverseDistillationModel)
from anomaly_detection.models.reverse_distillation.trainer import ReverseDistillationTrainer  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Reverse Distillation: BaseTrainer.fit against a plain loop")
    parser.add_argument("--data", required=True, help="an MVTec-layout category folder (train/good)")
    parser.add_argument("--weights", required=True, help="resnet18 state_dict for the encoder")
    parser.add_argument("--train-images", type=int, default=48, help="the first N training images by name")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seeds", default="0", help="comma-separated: initial weights and batch order")
    parser.add_argument("--out", default=None)
    return parser.parse_args(argv)


class IndexedImages(Dataset):
    def __init__(self, images):
        self.images = images

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        return {"image": self.images[index]}


class FixedBatches:
    # the given batches of each epoch in turn: the trainer's loader reads exactly what the plain loop reads. The
    # next epoch's batches come once this epoch's are all read (a loader looked into and left does not count)
    def __init__(self, epochs):
        self.epochs, self.epoch = epochs, 0

    def __iter__(self):
        yield from self.epochs[self.epoch]
        self.epoch += 1

    def __len__(self):
        return len(self.epochs[0])


def relative_gaps(state, reference):
    # per floating-point entry of two state_dicts: the largest difference over the reference's largest magnitude
    return {key: ((state[key].double() - value.double()).abs().max()
                  / value.double().abs().max().clamp_min(1e-12)).item()
            for key, value in reference.items() if value.is_floating_point()}


def compare(args, images, seed):
    generator = torch.Generator().manual_seed(seed)
    epochs = []
    for _ in range(args.epochs):
        order = torch.randperm(len(images), generator=generator).tolist()
        epochs.append([order[start:start + args.batch_size] for start in range(0, len(order), args.batch_size)])

    torch.manual_seed(seed)
    model = ReverseDistillationModel(backbone="resnet18", pretrained=True, weights=args.weights,
                                     activation_checkpointing=True)
    plain = copy.deepcopy(model)

    loader = DataLoader(IndexedImages(images), batch_sampler=FixedBatches(epochs))
    trainer = ReverseDistillationTrainer(model, device="cpu", progress_bar=False, learning_rate=0.005,
                                         betas=(0.5, 0.999))
    trainer.fit(loader, None, num_epochs=args.epochs)

    optimizer = torch.optim.Adam(list(plain.bottleneck.parameters()) + list(plain.decoder.parameters()), lr=0.005,
                                 betas=(0.5, 0.999))
    loss_fn, plain_losses = ReverseDistillationLoss(), []
    for batches in epochs:
        total = 0.0
        for batch in batches:
            plain.train()
            loss = loss_fn(*plain(images[batch]))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item()
        plain_losses.append(total / len(batches))

    gaps = relative_gaps(trainer.model.state_dict(), plain.state_dict())
    worst = max(gaps, key=gaps.get)
    record = {"seed": seed, "steps": trainer.global_step, "largest_relative_gap": gaps[worst], "at": worst,
              "trainer_losses": [entry["train_loss"] for entry in trainer.history], "plain_losses": plain_losses}
    print(json.dumps(record))
    append_record(__file__, typed_command(), record, out=args.out)


def main(argv=None):
    args = parse_args(argv)
    transform = get_test_transforms(256, None, "imagenet")
    paths = sorted(Path(args.data, "train", "good").glob("*.png"))[:args.train_images]
    if not paths:
        raise SystemExit(f"no .png images in {Path(args.data, 'train', 'good')}")
    images = torch.stack([transform(TF.pil_to_tensor(Image.open(path).convert("RGB"))) for path in paths])
    for seed in [int(s) for s in args.seeds.split(",")]:
        compare(args, images, seed)


if __name__ == "__main__":
    main()
