# benchmarks/reverse_distillation_in_anomalib.py
# Anomalib's own training and test (the peer harness, ../shared/peer/run_anomalib.py, Lightning and all) run with
# OUR Reverse Distillation network in place of Anomalib's: its optimizer (Adam, lr 0.005, betas 0.5/0.99), its data
# module, its seeds and its metrics. Beside the harness's runs of Anomalib's own network on the same seeds, it
# separates what the network does from what the framework around it does. A diagnosis, not a score: run it with
# Anomalib's python, our sources on the path, and run_anomalib.py's own options after ours:
#
#   PYTHONPATH=src /tmp/peer-venv/bin/python benchmarks/reverse_distillation_in_anomalib.py \
#       --ours-weights /tmp/bw/synth/resnet18_random.pth -- --root /tmp/bw/synth/synthetic --category texture \
#       --model reverse_distillation --backbone resnet18 --weights /tmp/bw/synth/resnet18_random.pth \
#       --image-size 256 --epochs 3 --max-train 48 --seed 0 --batch-size 32
#
# --replay keeps the network's initial state and every training batch Lightning feeds it, then trains a copy of
# that state on those batches in a plain loop (Adam and loss as Anomalib's) and records how far the two final
# states are apart: 0, Lightning's loop optimises as a plain loop does and a difference between the frameworks
# lies in what each draws (images, order, initial weights); far from 0, in the loop itself. --our-loss trains
# with our loss function instead of Anomalib's: the same cosine, rounded as our runner rounds it.
# --save-state F keeps the trained network (the one Anomalib's test scores) for our `anomaly-detection test`;
# --save-initial-state F keeps the weights the harness drew before training, for reverse_distillation_runner_draws.py
# --initial-states.
import argparse
import contextlib
import copy
import io
import json
import sys
from pathlib import Path

from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from record import PEER_DIR, append_record, typed_command  # noqa: E402


class OursInAnomalib(nn.Module):
    # the constructor Anomalib's ReverseDistillation LightningModule calls, building our network; Anomalib's
    # optimizer takes .bottleneck and .decoder, its loss views the features (so they leave channels-last here)
    weights = None
    replay = False
    keep_initial_state = False
    initial_states = None
    seed = None
    our_loss = False
    built = []

    def __init__(self, backbone, input_size, layers, anomaly_map_mode, pre_trained=True):
        super().__init__()
        from anomaly_detection.models.reverse_distillation import ReverseDistillationModel
        if backbone != "resnet18":
            raise SystemExit(f"this diagnosis builds resnet18 only, got {backbone}")
        self.network = ReverseDistillationModel(backbone="resnet18", pretrained=True, weights=self.weights)
        if self.initial_states is not None:
            import torch
            path = self.initial_states / f"initial_{self.seed}.pt"
            self.network.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        self.bottleneck, self.decoder = self.network.bottleneck, self.network.decoder
        keep = self.replay or self.keep_initial_state
        self.initial_state = copy.deepcopy(self.network.state_dict()) if keep else None
        self.batches = []
        OursInAnomalib.built.append(self)

    def forward(self, images):
        self.network.train(self.training)
        if self.training:
            if self.replay:
                if not self.batches:
                    self.state_at_first_step = copy.deepcopy(self.network.state_dict())
                self.batches.append(images.detach().clone())
            encoded, decoded = self.network(images)
            if self.our_loss:
                return encoded, decoded  # channels-last, as our trainer hands them to our loss
            return [f.contiguous() for f in encoded], [f.contiguous() for f in decoded]
        from anomalib.data import InferenceBatch
        out = self.network(images)
        return InferenceBatch(pred_score=out["pred_score"], anomaly_map=out["anomaly_map"])


def replay_in_plain_loop(trained):
    # the same initial state and batches, Anomalib's optimizer settings and loss on the same contiguous features
    # as the module above returns them, no Lightning
    import torch
    from anomalib.models.image.reverse_distillation.loss import ReverseDistillationLoss
    from anomaly_detection.models.reverse_distillation import ReverseDistillationModel
    from reverse_distillation_trainer_loop import relative_gaps
    plain = ReverseDistillationModel(backbone="resnet18", pretrained=True, weights=OursInAnomalib.weights)
    plain.load_state_dict(trained.initial_state)
    optimizer = torch.optim.Adam(list(plain.decoder.parameters()) + list(plain.bottleneck.parameters()), lr=0.005,
                                 betas=(0.5, 0.99))
    loss_fn = ReverseDistillationLoss()
    for images in trained.batches:
        plain.train()
        encoded, decoded = plain(images)
        loss = loss_fn([f.contiguous() for f in encoded], [f.contiguous() for f in decoded])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    gaps = relative_gaps(trained.network.state_dict(), plain.state_dict())
    worst = max(gaps, key=gaps.get)
    moved = relative_gaps(trained.state_at_first_step, trained.initial_state)
    return {"replayed_steps": len(trained.batches), "replay_largest_relative_gap": gaps[worst], "replay_at": worst,
            "replay_gap_by_part": {part: max(v for k, v in gaps.items() if k.startswith(part))
                                   for part in ("encoder", "bottleneck", "decoder")},
            "changed_before_first_step": {k: v for k, v in moved.items() if v > 0}}


def main():
    parser = argparse.ArgumentParser(description="Anomalib's harness training our Reverse Distillation network")
    parser.add_argument("--ours-weights", required=True, help="the resnet18 file run_anomalib.py gets as --weights")
    parser.add_argument("--replay", action="store_true",
                        help="also train the initial state on Lightning's batches in a plain loop and compare")
    parser.add_argument("--our-loss", action="store_true",
                        help="Anomalib's module trains with our loss function on our channels-last features (the "
                             "same cosine, rounded as our runner rounds it) instead of its own")
    parser.add_argument("--save-state", default=None,
                        help="write the trained network's state_dict (the one Anomalib's test scores) to this file")
    parser.add_argument("--save-initial-state", default=None,
                        help="write the network's state_dict as Anomalib's harness drew it, before training, here")
    parser.add_argument("--initial-states", default=None,
                        help="a folder of initial_<seed>.pt: the network starts from the weights saved for the "
                             "harness's --seed (our runner's own draws, captured with "
                             "reverse_distillation_runner_draws.py --save-initial-states) instead of those the "
                             "harness draws")
    parser.add_argument("--out", default=None)
    parser.add_argument("harness", nargs=argparse.REMAINDER, help="-- then run_anomalib.py's options")
    args = parser.parse_args()
    harness_args = args.harness[1:] if args.harness[:1] == ["--"] else args.harness
    command = typed_command()  # before sys.argv becomes the harness's own command line below

    import anomalib.models.image.reverse_distillation.lightning_model as lightning_model
    OursInAnomalib.weights = args.ours_weights
    OursInAnomalib.replay = args.replay
    OursInAnomalib.keep_initial_state = bool(args.save_initial_state)
    if args.initial_states:
        seed_at = harness_args.index("--seed") if "--seed" in harness_args else None
        if seed_at is None:
            raise SystemExit("--initial-states needs the harness's --seed")
        OursInAnomalib.initial_states = Path(args.initial_states)
        OursInAnomalib.seed = int(harness_args[seed_at + 1])
    if args.replay and args.our_loss:
        raise SystemExit("--replay replays Anomalib's loss; run --our-loss without it")
    OursInAnomalib.our_loss = args.our_loss
    lightning_model.ReverseDistillationModel = OursInAnomalib
    if args.our_loss:
        from anomaly_detection.models.reverse_distillation import ReverseDistillationLoss
        lightning_model.ReverseDistillationLoss = ReverseDistillationLoss
    sys.path.insert(0, str(PEER_DIR))
    import run_anomalib

    sys.argv = ["run_anomalib.py", *harness_args]
    captured = io.StringIO()
    with contextlib.redirect_stdout(captured):
        run_anomalib.main()
    result = json.loads(captured.getvalue().strip().splitlines()[-1])
    figures = {key: result.get(key) for key in ("image_auroc", "pixel_auroc", "pixel_aupro", "train_s",
                                               "peak_rss_mb", "train_images")}
    figures["network"] = "ours in Anomalib's harness"
    figures["loss"] = "ours" if args.our_loss else "Anomalib's"
    figures["initial_weights"] = "saved (--initial-states)" if args.initial_states else "the harness's draw"
    if args.replay:
        figures.update(replay_in_plain_loop(OursInAnomalib.built[-1]))
    if args.save_state or args.save_initial_state:
        import torch
        if args.save_state:
            torch.save(OursInAnomalib.built[-1].network.state_dict(), args.save_state)
            figures["saved_state"] = args.save_state
        if args.save_initial_state:
            torch.save(OursInAnomalib.built[-1].initial_state, args.save_initial_state)
            figures["saved_initial_state"] = args.save_initial_state
    print(json.dumps(figures))
    append_record(__file__, command, figures, out=args.out, harness=harness_args)


if __name__ == "__main__":
    main()
