# benchmarks/training_step.py
# The cost of one optimizer step (forward, backward, Adam) of the step-heavy models, to size their runs on
# this machine: EfficientAD at batch 1 (the paper's), Reverse Distillation and FastFlow at batch 32, 256 px,
# float32 unless the model's yaml says else, random inputs. The first step is warm-up and not counted.
#   python benchmarks/training_step.py [--models efficientad,efficientad_penalty,reverse_distillation,fastflow]
#   python benchmarks/training_step.py --models reverse_distillation --backbone resnet18 --batch-size 8 \
#       --overrides training.mixed_precision=true training.activation_checkpointing=false
import argparse
import statistics
import time

import torch

from anomaly_detection.allocator import configure_cpu_allocator
from anomaly_detection.models import get_trainer_class
from anomaly_detection.run_config import resolve_normalization_config
from anomaly_detection.runner import build_config
from record import SHARED, append_record, results_path, typed_command

SETTINGS = {
    # random teacher: the step costs the same with trained weights
    "efficientad": ("efficientad", 1, ["model.pretrained=false"]),
    "efficientad_penalty": ("efficientad", 1, ["model.pretrained=false",
                                               f"model.imagenet_dir={SHARED / 'data' / 'imagenet_sample' / 'images'}"]),
    "reverse_distillation": ("reverse_distillation", 32, ["model.backbone=tf_efficientnet_lite0"]),
    "fastflow": ("fastflow", 32, ["model.backbone=tf_efficientnet_lite0"]),
}


def step_times(name, steps, image_size, batch_size=None, backbone=None, extra=()):
    model_name, default_batch, overrides = SETTINGS[name]
    batch_size = batch_size or default_batch
    if backbone:
        overrides = [o for o in overrides if not o.startswith("model.backbone=")] + [f"model.backbone={backbone}",
                                                                                     "model.pretrained=false"]
    config = build_config(model_name, "mvtec", overrides + list(extra) + [f"data.image_size={image_size}",
                                                            f"training.batch_size={batch_size}",
                                                            "training.progress_bar=false", "device=cpu"])
    config = resolve_normalization_config(config)
    trainer = get_trainer_class(model_name).from_config(config)
    trainer._set_optimizers(trainer.configure_optimizers())
    trainer.model.train()
    batch = {"image": torch.randn(batch_size, 3, image_size, image_size)}
    times = []
    for step in range(steps + 1):
        started = time.perf_counter()
        trainer.training_batch(batch, step, epoch=0)
        times.append(time.perf_counter() - started)
    return batch_size, times[1:]


def main():
    parser = argparse.ArgumentParser(description="seconds per training step of the step-heavy models")
    parser.add_argument("--models", default=",".join(SETTINGS))
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=None, help="default: the model's row in SETTINGS")
    parser.add_argument("--backbone", default=None, help="Reverse Distillation and FastFlow (random weights)")
    parser.add_argument("--overrides", nargs="*", default=[], metavar="key=value", help="config overrides for all")
    parser.add_argument("--out", default=str(results_path(__file__)))
    args = parser.parse_args()
    configure_cpu_allocator("keep")
    torch.manual_seed(0)
    rows = []
    for name in args.models.split(","):
        batch_size, times = step_times(name, args.steps, args.image_size, args.batch_size, args.backbone,
                                       args.overrides)
        row = {"run": name, "batch": batch_size, "image_size": args.image_size, "threads": torch.get_num_threads(),
               "backbone": args.backbone, "overrides": list(args.overrides),
               "step_s": [round(t, 3) for t in times], "median_s": round(statistics.median(times), 3),
               "fastest_s": round(min(times), 3)}
        rows.append(row)
        print(row, flush=True)
    if args.out:
        append_record(__file__, typed_command(), {"runs": rows}, out=args.out)


if __name__ == "__main__":
    main()
