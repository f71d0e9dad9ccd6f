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
import argparse
import contextlib
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

    def __init__(self, backbone, input_size, layers, anomaly_map_mode, pre_trained=True):
        super().__init__()
        from anomaly_detection.models.reverse_distillation import ReverseDistillationModel
        if backbone != "resnet18":
            raise SystemExit(f"this diagnosis builds resnet18 only, got {backbone}")
        self.network = ReverseDistillationModel(backbone="resnet18", pretrained=True, weights=self.weights)
        self.bottleneck, self.decoder = self.network.bottleneck, self.network.decoder

    def forward(self, images):
        self.network.train(self.training)
        if self.training:
            encoded, decoded = self.network(images)
            return [f.contiguous() for f in encoded], [f.contiguous() for f in decoded]
        from anomalib.data import InferenceBatch
        out = self.network(images)
        return InferenceBatch(pred_score=out["pred_score"], anomaly_map=out["anomaly_map"])


def main():
    parser = argparse.ArgumentParser(description="Anomalib's harness training our Reverse Distillation network")
    parser.add_argument("--ours-weights", required=True, help="the resnet18 file run_anomalib.py gets as --weights")
    parser.add_argument("--out", default=None)
    parser.add_argument("harness", nargs=argparse.REMAINDER, help="-- then run_anomalib.py's options")
    args = parser.parse_args()
    harness_args = args.harness[1:] if args.harness[:1] == ["--"] else args.harness

    import anomalib.models.image.reverse_distillation.lightning_model as lightning_model
    OursInAnomalib.weights = args.ours_weights
    lightning_model.ReverseDistillationModel = OursInAnomalib
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
    print(json.dumps(figures))
    append_record(__file__, typed_command(), figures, out=args.out, harness=harness_args)


if __name__ == "__main__":
    main()
