# benchmarks/data_throughput.py
# Data loading rate against a ResNet18 forward pass; appended to benchmarks/results/data_throughput.jsonl
# through record.py.
import argparse
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch
import torchvision

from anomaly_detection.data import MVTecDataset, create_dataloader, get_test_transforms
from anomaly_detection.data.datasets import _open_image, _to_array, load_mask
from anomaly_detection.utils import resolve_device
from record import SHARED, append_record, results_path, typed_command

DEFAULT_ROOT = SHARED / "data"


def loader_rate(dataset, batch_size, num_workers):
    loader = create_dataloader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                               pin_memory=False)
    # the warm-up batch pays for worker start-up, which a training run pays once (persistent workers)
    next(iter(loader))
    start = time.perf_counter()
    images = 0
    for batch in loader:
        images += batch["image"].shape[0]
    seconds = time.perf_counter() - start
    return images / seconds, images, seconds


def forward_rate(device, batch_size, image_size, batches):
    model = torchvision.models.resnet18(weights=None).eval().to(device)
    images = torch.randn(batch_size, 3, image_size, image_size, device=device)
    with torch.no_grad():
        model(images)
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(batches):
            model(images)
        if device.type == "cuda":
            torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return batches * batch_size / seconds, seconds


def stage_breakdown(dataset, image_size, count):
    transform = get_test_transforms(image_size=image_size)
    indices = np.linspace(0, len(dataset) - 1, min(count, len(dataset))).astype(int)
    totals = {"decode": 0.0, "to_tensor": 0.0, "mask": 0.0, "resize+normalise": 0.0}
    for index in indices:
        sample = dataset.samples[index]
        start = time.perf_counter()
        # the loader's own read path (header and pixel-limit checks, EXIF orientation), then its conversion
        image = _open_image(sample["image_path"])
        decoded = time.perf_counter()
        array = _to_array(image, sample["image_path"])
        if array.ndim == 2:
            array = np.repeat(array[:, :, None], 3, axis=2)
        tensor = torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))
        converted = time.perf_counter()
        mask = load_mask(sample["mask_path"]) if sample["mask_path"] else torch.zeros((1,) + tensor.shape[-2:])
        masked = time.perf_counter()
        transform(tensor, mask)
        done = time.perf_counter()
        totals["decode"] += decoded - start
        totals["to_tensor"] += converted - decoded
        totals["mask"] += masked - converted
        totals["resize+normalise"] += done - masked
    return {name: 1000.0 * value / len(indices) for name, value in totals.items()}


def main():
    parser = argparse.ArgumentParser(description="Data loading rate versus ResNet18 forward rate")
    parser.add_argument("--root", default=str(DEFAULT_ROOT), help="folder holding the MVTec-layout category")
    parser.add_argument("--category", default="magnetic_tile")
    parser.add_argument("--split", default="test")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--forward-batches", type=int, default=5)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--out", default=str(results_path(__file__)),
                        help="append the record here (default: %(default)s; '' writes none)")
    args = parser.parse_args()

    root = Path(args.root)
    if not (root / args.category).is_dir():
        raise SystemExit(f"{root / args.category} not found: pass --root pointing at the folder that holds "
                         f"'{args.category}' (the shared data sits at {DEFAULT_ROOT})")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    dataset = MVTecDataset(root, args.category, args.split, transform=get_test_transforms(image_size=args.image_size))

    print(f"machine: {platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"torch {torch.__version__}, {torch.get_num_threads()} intra-op threads, forward device {device}")
    print(f"data: {root / args.category} split={args.split}: {len(dataset)} images at {args.image_size} px, "
          f"batch {args.batch_size}")
    rates = {}
    for workers in args.workers:
        rate, images, seconds = loader_rate(dataset, args.batch_size, workers)
        rates[workers] = rate
        print(f"loader num_workers={workers}: {rate:8.1f} images/s ({images} images after warm-up, {seconds:.2f} s)")
    forward, seconds = forward_rate(device, args.batch_size, args.image_size, args.forward_batches)
    print(f"resnet18 forward (random init, eval, no_grad, {device}): {forward:8.1f} images/s "
          f"({args.forward_batches} batches, {seconds:.2f} s)")
    for workers, rate in rates.items():
        print(f"ratio loader(num_workers={workers}) / forward: {rate / forward:.2f}")
    breakdown = stage_breakdown(dataset, args.image_size, count=100)
    print("per-image cost of the loading stages (ms, mean of 100 images): "
          + ", ".join(f"{name} {value:.2f}" for name, value in breakdown.items()))
    if args.out:
        figures = {f"loader_workers_{workers}_img_s": rate for workers, rate in rates.items()}
        figures.update({f"ratio_workers_{workers}": rate / forward for workers, rate in rates.items()},
                       resnet18_forward_img_s=forward, stage_ms=breakdown)
        append_record(__file__, typed_command(), figures, out=args.out, variant=f"{args.category} {args.split}",
                      images=len(dataset), image_size=args.image_size, batch_size=args.batch_size,
                      threads=torch.get_num_threads(), device=str(device), loadavg=os.getloadavg()[0])


if __name__ == "__main__":
    main()
