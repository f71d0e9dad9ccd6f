# benchmarks/stfpm_magnetic_tile.py
# STFPM on the real magnetic_tile category: accuracy, train s/epoch, test s/image and peak RSS, each run
# in its own process (so peak RSS is per run), plus the inference-throughput ratio against the raw
# backbone forward passes, measured in this process. Each run is appended to
# benchmarks/results/stfpm_magnetic_tile.jsonl through record.py as soon as it ends.
#
#   python benchmarks/stfpm_magnetic_tile.py --peer --epochs 3
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from record import PEER_DIR, PEER_PYTHON, SHARED, append_record, results_path, typed_command

METRICS = ("image_auroc", "pixel_auroc", "aupro", "pixel_aupro", "f1_max", "pixel_f1_max", "train_s_per_epoch",
           "train_s_per_image_epoch", "test_s_per_image", "peak_rss_mb")


def run_training(args, backbone, epochs, work, extra):
    overrides = [
        f"mvtec_dir={args.root}", f"output_dir={work}", f"model.backbone={backbone}",
        f"training.num_epochs={epochs}", f"data.image_size={args.image_size}",
        f"training.batch_size={args.batch_size}", f"data.num_workers={args.num_workers}",
        "training.progress_bar=false", f"evaluation.figures={str(args.figures).lower()}",
    ] + extra.split()
    if backbone == "mobilenet_v2":
        overrides.append(f"model.weights={args.mobilenet_weights}")
    command = [sys.executable, "-m", "anomaly_detection.cli", "train", "--model", "stfpm", "--dataset", "mvtec",
               "--category", "magnetic_tile"] + overrides
    print("+", " ".join(command), file=sys.stderr, flush=True)
    completed = subprocess.run(command, stdout=subprocess.PIPE, text=True, env=dict(os.environ))
    if completed.returncode != 0:
        raise SystemExit(f"training failed with exit code {completed.returncode}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def run_peer(args, epochs, work):
    # Anomalib 2.7.0 with the very same ImageNet weights (re-keyed for timm) and layers, in its own venv
    weights = Path(work) / "lite0_timm.pth"
    subprocess.run([sys.executable, str(PEER_DIR / "lite0_for_timm.py"), str(weights)], check=True,
                   stdout=subprocess.DEVNULL)
    command = [args.peer_python, str(PEER_DIR / "run_anomalib.py"), "--root", args.root,
               "--category", "magnetic_tile", "--model", "stfpm", "--backbone", "tf_efficientnet_lite0",
               "--weights", str(weights), "--layers", "blocks.1,blocks.2,blocks.4", "--epochs", str(epochs),
               "--image-size", str(args.image_size), "--batch-size", str(args.batch_size), "--seed", "0"]
    print("+", " ".join(command), file=sys.stderr, flush=True)
    completed = subprocess.run(command, stdout=subprocess.PIPE, text=True,
                               env=dict(os.environ, PEER_WORK=str(Path(work) / "peer")))
    if completed.returncode != 0:
        raise SystemExit(f"Anomalib failed with exit code {completed.returncode}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


@torch.no_grad()
def throughput(backbone, image_size, batch_size, repeats, weights=None):
    from anomaly_detection.models.stfpm import STFPMModel
    model = STFPMModel(backbone, weights=weights).eval()
    images = torch.randn(batch_size, 3, image_size, image_size)

    def rate(function):
        function()
        started = time.perf_counter()
        for _ in range(repeats):
            function()
        return repeats * batch_size / (time.perf_counter() - started)

    teacher = rate(lambda: model.teacher(images))
    both = rate(lambda: (model.teacher(images), model.student(images)))
    full = rate(lambda: model(images))
    return {"backbone": backbone, "teacher_forward_img_s": teacher, "teacher_student_forward_img_s": both,
            "stfpm_inference_img_s": full, "ratio_to_teacher_student": full / both,
            "ratio_to_teacher": full / teacher}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--root", default=str(SHARED / "data"))
    parser.add_argument("--backbones", default="tf_efficientnet_lite0,mobilenet_v2")
    parser.add_argument("--mobilenet-weights", default=str(SHARED / "weights" / "mobilenet_v2_imagenet_coral.pth"))
    parser.add_argument("--epochs", default="3", help="comma-separated list of epoch counts to run")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument("--figures", action="store_true", help="also write the evaluator's figures")
    parser.add_argument("--throughput-only", action="store_true")
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--extra", action="append", default=None,
                        help="extra key=value overrides for our runs, space-separated; give it again for another "
                             "variant (each variant is one more run per backbone and epoch count)")
    parser.add_argument("--peer", action="store_true", help="also run Anomalib 2.7.0 STFPM with the same settings")
    parser.add_argument("--peer-python", default=PEER_PYTHON, help="Anomalib's venv python (env ANOMALIB_VENV)")
    parser.add_argument("--out", default=str(results_path(__file__)),
                        help="append the records here (default: %(default)s; '' writes none)")
    args = parser.parse_args()
    variants = args.extra or [""]
    results = []

    def keep(result, variant):
        results.append(result)
        print(json.dumps(result), flush=True)
        if args.out:
            figures = {key: result[key] for key in METRICS if key in result}
            # a throughput line is all figures; a training run keeps its whole summary beside them
            append_record(__file__, typed_command(), figures or result, out=args.out, variant=variant,
                          batch_size=args.batch_size, **({"result": result} if figures else {}))

    if args.peer:
        for epochs in [int(e) for e in args.epochs.split(",")]:
            with tempfile.TemporaryDirectory(prefix="stfpm-peer-") as work:
                peer = run_peer(args, epochs, work)
            peer.update(framework="anomalib", backbone="tf_efficientnet_lite0", epochs=epochs)
            keep(peer, f"anomalib tf_efficientnet_lite0 {epochs} epochs")
    for backbone in args.backbones.split(","):
        if not args.throughput_only:
            for epochs in [int(e) for e in args.epochs.split(",")]:
                for extra in variants:
                    with tempfile.TemporaryDirectory(prefix="stfpm-bench-") as work:
                        summary = run_training(args, backbone, epochs, work, extra)
                    summary.update(framework="ours", backbone=backbone, epochs=epochs, image_size=args.image_size,
                                   extra=extra)
                    keep(summary, f"{backbone} {epochs} epochs {extra or 'float32'}")
        if not args.skip_throughput:
            weights = args.mobilenet_weights if backbone == "mobilenet_v2" else None
            keep(throughput(backbone, args.image_size, 16, 5, weights), f"throughput {backbone}")
    print(f"\n{'backbone':<24}{'epochs':>7}{'image':>8}{'pixel':>8}{'AU-PRO':>8}{'s/epoch':>9}"
          f"{'test s/img':>11}{'RSS MB':>8}")
    for r in results:
        if r.get("framework") == "anomalib":
            print(f"{'anomalib ' + r['backbone']:<24}{r['epochs']:>7}{r['image_auroc']:>8.3f}{r['pixel_auroc']:>8.3f}"
                  f"{r.get('pixel_aupro', float('nan')):>8.3f}{r['train_s'] / r['epochs']:>9.1f}"
                  f"{r['test_s'] / r['test_images']:>11.3f}{r['peak_rss_mb']:>8.0f}")
        elif "image_auroc" in r:
            print(f"{r['backbone']:<24}{r['epochs']:>7}{r['image_auroc']:>8.3f}{r['pixel_auroc']:>8.3f}"
                  f"{r['aupro']:>8.3f}{r['train_s_per_epoch']:>9.1f}{r['test_s_per_image']:>11.3f}"
                  f"{r['peak_rss_mb']:>8.0f}  {r.get('extra', '')}")
    for r in results:
        if "ratio_to_teacher_student" in r:
            print(f"{r['backbone']}: inference {r['stfpm_inference_img_s']:.1f} img/s = "
                  f"{r['ratio_to_teacher_student']:.2f}x teacher+student forward "
                  f"({r['teacher_student_forward_img_s']:.1f} img/s), "
                  f"teacher alone {r['teacher_forward_img_s']:.1f} img/s")


if __name__ == "__main__":
    main()
