# benchmarks/reverse_distillation_runner_draws.py
# Our runner (anomaly-detection train, in this process) on the generated data of step_models_compare.py, with
# one of its draws replaced by the Anomalib harness's: --subset harness trains on the images run_anomalib.py
# --max-train draws for the seed (a seeded numpy choice over the name-ordered training images) and validates on
# the rest, instead of our own seeded split. The order of the batches and the initial weights stay the runner's;
# --no-fit-reseed keeps fit from seeding torch a second time, so the order is drawn from the stream the initial
# weights came from, not from a stream restarted at the same seed. --initial-states DIR starts each seed from the
# initial weights Anomalib's harness drew for it (reverse_distillation_in_anomalib.py --save-initial-state), so
# with --subset harness only the batch order is still the runner's own.
# --save-initial-states DIR writes the weights the runner draws, for reverse_distillation_in_anomalib.py
# --initial-states. --precise-bn (a diagnosis of the epoch choice) re-estimates the trainable BatchNorm statistics
# over the training images after each epoch, before the validation loss is taken.
# Beside the runner's own 20-seed figures it tells whether the choice of images is where the runner and the
# harness part. A diagnosis, not a score:
#
#   python benchmarks/reverse_distillation_runner_draws.py --work /tmp/bw/synth --seeds 0,1,2
import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from record import append_record, typed_command  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Reverse Distillation: our runner with the harness's image subset")
    parser.add_argument("--work", required=True, help="step_models_compare.py's --work folder (synthetic data, "
                                                      "resnet18_random.pth)")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--train-images", type=int, default=48)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--val-fraction", type=float, default=0.1,
                        help="with --subset ours: data.val_fraction (step_models_compare.py carves 0.2)")
    parser.add_argument("--subset", choices=("harness", "ours"), default="harness",
                        help="harness: the images run_anomalib.py --max-train draws; ours: the runner's own split")
    parser.add_argument("--no-fit-reseed", action="store_true",
                        help="fit does not seed torch again (the runner seeds it once, before building the model), "
                             "so the batch order continues the stream the initial weights came from")
    parser.add_argument("--initial-states", default=None,
                        help="a folder of initial_<seed>.pt (reverse_distillation_in_anomalib.py "
                             "--save-initial-state): the runner starts from the harness's initial weights instead "
                             "of drawing its own")
    parser.add_argument("--save-initial-states", default=None,
                        help="a folder: the runner's own initial weights for each seed go there as initial_<seed>.pt "
                             "(for reverse_distillation_in_anomalib.py --initial-states)")
    parser.add_argument("--precise-bn", action="store_true",
                        help="before each validation, re-estimate the trainable BatchNorm statistics as the mean over "
                             "the epoch's training images (detectron2's PreciseBN), so the validation loss and the "
                             "checkpoint judge the weights, not statistics that lag them by a few steps")
    parser.add_argument("--out", default=None)
    return parser.parse_args(argv)


def harness_split(train_images):
    from torch.utils.data import Subset

    from reverse_distillation_parity import harness_subset

    def split(dataset, val_fraction=0.1, seed=0, min_val=1):
        chosen = harness_subset(len(dataset), train_images, seed)
        left_out = sorted(set(range(len(dataset))) - set(chosen))
        return Subset(dataset, chosen), Subset(dataset, left_out)
    return split


def patch_initial_states(load_from=None, save_to=None):
    # the trainer builds the model after the runner seeded torch with the run's seed. load_from: the state saved
    # for that seed replaces what the constructor drew (the frozen encoder comes from the same file on both
    # sides); save_to: what the constructor drew is written there, for reverse_distillation_in_anomalib.py
    import torch

    from anomaly_detection.models.reverse_distillation.trainer import ReverseDistillationTrainer
    build = ReverseDistillationTrainer.build_model.__func__

    def build_and_swap(cls, config, pretrained=None):
        model = build(cls, config, pretrained)
        name = f"initial_{config['seed']}.pt"
        if save_to is not None:
            save_to.mkdir(parents=True, exist_ok=True)
            torch.save(model.state_dict(), save_to / name)
        if load_from is not None:
            model.load_state_dict(torch.load(load_from / name, map_location="cpu", weights_only=True))
        return model
    ReverseDistillationTrainer.build_model = classmethod(build_and_swap)


def patch_precise_batch_norm():
    # after each training epoch: reset the bottleneck's and decoder's BatchNorm statistics and average them over
    # one more pass of the training images (no gradients, in order, so torch's generator is not touched)
    import torch
    from torch import nn
    from torch.utils.data import DataLoader

    from anomaly_detection.models.reverse_distillation.trainer import ReverseDistillationTrainer
    train_epoch = ReverseDistillationTrainer.train_epoch

    def train_epoch_then_recalibrate(self, train_loader, epoch):
        loss = train_epoch(self, train_loader, epoch)
        norms = [m for part in (self.model.bottleneck, self.model.decoder) for m in part.modules()
                 if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        momenta = [norm.momentum for norm in norms]
        for norm in norms:
            norm.reset_running_stats()
            norm.momentum = None  # a cumulative mean over the pass
        self.model.train()
        with torch.no_grad():
            for batch in DataLoader(train_loader.dataset, batch_size=train_loader.batch_size):
                self.model.extract(batch["image"].to(self.device))
        for norm, momentum in zip(norms, momenta):
            norm.momentum = momentum
        return loss
    ReverseDistillationTrainer.train_epoch = train_epoch_then_recalibrate


def main(argv=None):
    args = parse_args(argv)
    import anomaly_detection.runner as runner
    from anomaly_detection import cli
    if args.subset == "harness":
        runner.split_train_val = harness_split(args.train_images)
    if args.no_fit_reseed:
        import anomaly_detection.trainer as trainer_module
        trainer_module.seed_everything = lambda seed: None
    if args.initial_states or args.save_initial_states:
        patch_initial_states(Path(args.initial_states) if args.initial_states else None,
                             Path(args.save_initial_states) if args.save_initial_states else None)
    if args.precise_bn:
        patch_precise_batch_norm()
    work = Path(args.work)
    for seed in [int(s) for s in args.seeds.split(",")]:
        out = work / f"runner_draws_{seed}"
        cli.main(["train", "--model", "reverse_distillation", "--dataset", "mvtec", "--category", "texture",
                  f"dataset.root_dir={work / 'synthetic'}", "data.image_size=256", f"results_dir={out / 'results'}",
                  f"checkpoint_dir={out / 'checkpoints'}", f"log_dir={out / 'logs'}", f"seed={seed}",
                  "data.num_workers=0", "data.eval_batch_size=32", "training.progress_bar=false",
                  "evaluation.figures=false", "model.backbone=resnet18", f"training.num_epochs={args.epochs}",
                  "training.batch_size=32", "model.pretrained=true", f"model.weights={work / 'resnet18_random.pth'}",
                  f"data.val_fraction={args.val_fraction}"])
        summary = json.loads(next((out / "results").rglob("summary.json")).read_text())
        figures = {key: summary.get(key) for key in ("image_auroc", "pixel_auroc", "aupro", "best_epoch",
                                                      "num_train_images")}
        figures.update(seed=seed, subset=args.subset, fit_reseed=not args.no_fit_reseed,
                       initial_weights="harness" if args.initial_states else "runner", precise_bn=args.precise_bn,
                       val_fraction=args.val_fraction if args.subset == "ours" else None)
        print(json.dumps(figures), flush=True)
        append_record(__file__, typed_command(), figures, out=args.out)


if __name__ == "__main__":
    main()
