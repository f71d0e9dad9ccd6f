# benchmarks/distributed_parity.py
# One process against `torchrun --nproc_per_node N` (gloo on this CPU, NCCL where CUDA is) on real data: the same
# train command, the metrics of both, their largest difference, whether the saved models are equal (PatchCore's
# bank row for row), and the fit and test seconds. Every process of both runs gets cores // N threads (the same
# kernels, so the same rounding, in both runs): on a CPU the fit ratio is then what N processes gain over one
# process with a 1/N share of the machine, and what one process pays for that share is not measured here.
#   python benchmarks/distributed_parity.py --models padim,patchcore [--processes 2] [--sharded-search]
#       [--extra "model.backbone=tf_efficientnet_lite0 ..."]
import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from record import SHARED, append_record, results_path, typed_command

METRICS = ("image_auroc", "pixel_auroc", "aupro", "f1_max")
DEFAULT_EXTRA = ("mvtec_dir={data} model.backbone=tf_efficientnet_lite0 training.progress_bar=false "
                 "evaluation.figures=false")
MODEL_EXTRA = {"patchcore": "model.coreset_ratio=0.01 model.pretrain_dim=null model.target_dim=null "
                            "model.feature_dtype=float16"}


def train(model, processes, root, args):
    extra = shlex.split(args.extra.format(data=args.data)) + shlex.split(MODEL_EXTRA.get(model, ""))
    if args.sharded_search and model == "patchcore" and processes > 1:
        extra.append("model.sharded_search=true")
    command = [sys.executable] + (["-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                                   str(processes)] if processes > 1 else []) + \
        ["-m", "anomaly_detection", "train", "--model", model, "--dataset", "mvtec", "--category", args.category,
         f"results_dir={root}/results", f"checkpoint_dir={root}/checkpoints", f"log_dir={root}/logs", *extra]
    environment = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    finished = subprocess.run(command, capture_output=True, text=True, env=environment)
    if finished.returncode != 0:
        raise SystemExit(f"{model} with {processes} process(es) failed:\n{finished.stderr[-3000:]}")
    summary = [json.loads(line) for line in finished.stdout.splitlines() if line.startswith("{")][-1]
    return summary, command


def saved_models_equal(one, two):
    first = torch.load(one, map_location="cpu", weights_only=False)["model"]
    second = torch.load(two, map_location="cpu", weights_only=False)["model"]
    worst = 0.0
    for key, value in first.items():
        if value.shape != second[key].shape:
            return {"equal": False, "worst_relative": None, "shape_differs": key}
        if value.is_floating_point():
            scale = value.double().abs().max().clamp_min(1e-12)
            worst = max(worst, float((value.double() - second[key].double()).abs().max() / scale))
    return {"equal": all(torch.equal(value, second[key]) for key, value in first.items()), "worst_relative": worst}


def main():
    parser = argparse.ArgumentParser(description="1 process against torchrun N processes: metrics, model, time")
    parser.add_argument("--models", default="padim,patchcore")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--category", default="magnetic_tile")
    parser.add_argument("--data", default=str(SHARED / "data"))
    parser.add_argument("--extra", default=DEFAULT_EXTRA, help="overrides for every run; {data} is --data")
    parser.add_argument("--sharded-search", action="store_true", help="PatchCore: model.sharded_search=true")
    parser.add_argument("--work", default=None)
    parser.add_argument("--out", default=str(results_path(__file__)))
    parser.add_argument("--threads", type=int, default=None, help="threads per process (default: cores // N)")
    args = parser.parse_args()
    args.threads = args.threads or max(1, (os.cpu_count() or 1) // args.processes)
    work = Path(args.work or tempfile.mkdtemp(prefix="distributed_parity_"))
    for model in [m.strip() for m in args.models.split(",") if m.strip()]:
        one, one_command = train(model, 1, work / model / "one", args)
        many, many_command = train(model, args.processes, work / model / f"n{args.processes}", args)
        figures = {"model": model, "processes": args.processes, "threads_per_process": args.threads,
                   "sharded_search": args.sharded_search,
                   "one": {k: one.get(k) for k in METRICS + ("fit_s", "test_s", "peak_rss_mb")},
                   "many": {k: many.get(k) for k in METRICS + ("fit_s", "test_s", "peak_rss_mb")},
                   "largest_metric_difference": max(abs(one[k] - many[k]) for k in METRICS
                                                    if one.get(k) is not None),
                   "saved_model": saved_models_equal(one["checkpoint"], many["checkpoint"]),
                   "fit_ratio": many["fit_s"] / one["fit_s"], "test_ratio": many["test_s"] / one["test_s"],
                   "commands": [shlex.join(one_command), shlex.join(many_command)]}
        print(json.dumps(figures), flush=True)
        if args.out:
            append_record(__file__, typed_command(), figures, out=args.out)


if __name__ == "__main__":
    main()
