# benchmarks/pixel_resolution.py
# Pixel metrics of one trained PaDiM at the model input size and at each test image's own size
# (evaluation.pixel_resolution input | native, MVTec's protocol) on Magnetic Tile. One training, then each
# resolution is scored in a fresh process, so that each peak RSS is that of one test pass (model, test
# loader, maps and metrics) and not of the training before it.
import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from record import append_record, typed_command

OVERRIDES = ("model.backbone=tf_efficientnet_lite0", "model.n_features=100", "data.val_fraction=0",
             "training.progress_bar=false", "evaluation.figures=false")
RESOLUTIONS = ("input", "native")


def status_mb(field):
    # VmHWM, not getrusage's ru_maxrss: a child keeps its parent's ru_maxrss when that is the larger, so
    # a scoring process started after the training would report the training's peak
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024.0
    return None


def train(args):
    from anomaly_detection.runner import build_config, train_and_evaluate

    overrides = [f"dataset.root_dir={args.root}", f"dataset.category={args.category}", *OVERRIDES,
                 f"output_dir={args.output_dir}"]
    config = build_config("padim", "mvtec", overrides)
    summary = train_and_evaluate(config)
    return {"checkpoint": summary["checkpoint"], "fit_s": summary["fit_s"],
            "fit_peak_rss_mb": summary["fit_peak_rss_mb"]}


def score(checkpoint, resolution):
    from anomaly_detection.allocator import configure_cpu_allocator
    from anomaly_detection.evaluator import Evaluator
    from anomaly_detection.runner import build_test_loader, load_model_file

    model, config, state = load_model_file(checkpoint)
    configure_cpu_allocator(config["cpu_allocator"])
    loader = build_test_loader(config, str(config["dataset"]["category"]))
    mean, std = config["data"]["normalization"]
    evaluator = Evaluator(model, device="cpu", mean=mean, std=std, figures=False, progress_bar=False,
                          pixel_resolution=resolution)
    rss_before_mb = status_mb("VmRSS")
    started = time.perf_counter()
    metrics = evaluator.evaluate(loader, state.get("threshold"))
    test_s = time.perf_counter() - started
    keys = ("pixel_auroc", "pixel_ap", "pixel_f1_max", "aupro", "image_auroc", "image_ap", "num_images",
            "num_pixels", "num_defect_pixels", "num_defect_regions", "num_normal_pixels")
    return dict({key: metrics.get(key) for key in keys}, pixel_resolution=resolution, test_s=round(test_s, 2),
                rss_before_test_mb=round(rss_before_mb, 1),
                peak_rss_mb=round(status_mb("VmHWM"), 1))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--root", default="/work/shared/data")
    parser.add_argument("--category", default="magnetic_tile")
    parser.add_argument("--output-dir", default="/tmp/native_runs")
    parser.add_argument("--checkpoint", default=None, help="model.pt of a trained run: skip the training")
    parser.add_argument("--score", choices=RESOLUTIONS, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help="append the JSON line here")
    parser.add_argument("--git-commit", default=None, help="record this commit (e.g. when run from a worktree)")
    args = parser.parse_args()
    if args.score:
        print(json.dumps(score(args.checkpoint, args.score)))
        return

    training = train(args) if args.checkpoint is None else {"checkpoint": args.checkpoint}
    figures = {}
    for resolution in RESOLUTIONS:
        child = subprocess.run([sys.executable, __file__, "--checkpoint", training["checkpoint"],
                                "--score", resolution], capture_output=True, text=True, check=True)
        figures[resolution] = json.loads(child.stdout.strip().splitlines()[-1])
    figures["training"] = training
    command = typed_command()
    record = append_record(__file__, command, figures, out=args.out, git_commit=args.git_commit, model="padim",
                          dataset="mvtec", category=args.category, overrides=list(OVERRIDES),
                          cli_equivalent=("anomaly-detection train --model padim --dataset mvtec --category "
                                          f"{args.category} dataset.root_dir={args.root} " + " ".join(OVERRIDES)
                                          + " evaluation.pixel_resolution={input,native}"))
    print(json.dumps(record))


if __name__ == "__main__":
    main()
