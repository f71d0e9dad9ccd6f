# benchmarks/efficientad_inference.py
# EfficientAD inference rate against the bare forward passes it is made of (teacher + student + autoencoder),
# in one process, the same inputs and threads: the goal is a ratio of at least 0.9 (issue 10). Random weights:
# the rate does not depend on them.
#   python benchmarks/efficientad_inference.py [--sizes small,medium] [--batches 1,32] [--image-size 256]
import argparse
import time

import torch

from anomaly_detection.models.efficientad.efficientad import EfficientADModel
from record import append_record, results_path, typed_command


def images_per_second(function, images, repeats):
    with torch.no_grad():
        function(images)
        started = time.perf_counter()
        for _ in range(repeats):
            function(images)
    return repeats * images.shape[0] / (time.perf_counter() - started)


def bare_forward(model):
    # what any EfficientAD must compute: the three networks, nothing else
    def run(images):
        teacher = model.teacher(images)
        model.student(images)
        model.autoencoder(images, teacher.shape[-2:])
    return run


def main():
    parser = argparse.ArgumentParser(description="EfficientAD images/s against its bare forward passes")
    parser.add_argument("--sizes", default="small,medium")
    parser.add_argument("--batches", default="1,32")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--images", type=int, default=64, help="images timed per measurement")
    parser.add_argument("--out", default=str(results_path(__file__)))
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = []
    for size in args.sizes.split(","):
        model = EfficientADModel(model_size=size, pretrained=False, image_size=args.image_size).eval()
        for batch in (int(b) for b in args.batches.split(",")):
            images = torch.randn(batch, 3, args.image_size, args.image_size)
            repeats = max(1, args.images // batch)
            bare = images_per_second(bare_forward(model), images, repeats)
            full = images_per_second(model, images, repeats)
            row = {"model_size": size, "batch": batch, "image_size": args.image_size,
                   "threads": torch.get_num_threads(),
                   "bare_images_per_s": round(bare, 2), "efficientad_images_per_s": round(full, 2),
                   "ratio": round(full / bare, 3)}
            rows.append(row)
            print(row, flush=True)
    if args.out:
        append_record(__file__, typed_command(), {"runs": rows}, out=args.out)


if __name__ == "__main__":
    main()
