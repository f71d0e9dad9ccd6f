# benchmarks/patchcore_test_pass.py
# PatchCore's test pass, ours against Anomalib's, from checkpoints both fits saved earlier (the same data,
# backbone weights, layers and coreset ratio: patchcore_padim_compare.py made them), so the pass can be
# timed again without the fits. The runs alternate (Anomalib, then each of our variants, repeated), so a
# change in the machine's speed during the sitting touches every side alike; the ratio uses the medians.
# Each of our variants is `anomaly-detection test --checkpoint` with its overrides; the first variant is the
# reference whose metrics the others must reproduce (the bound: 0.002 on every metric).
# --baseline-src runs the same test with another commit's code (a git worktree's src/), in the same sitting.
import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from record import PEER_PYTHON, SHARED, append_record, git_commit, results_path, typed_command

BENCHMARKS = Path(__file__).resolve().parent
METRICS = ("image_auroc", "pixel_auroc", "aupro", "f1_max", "pixel_f1_max", "image_ap", "pixel_ap")
DEFAULT_VARIANTS = ["exact=model.search_precision=float32", "bfloat16=model.search_precision=bfloat16"]


def run(command, env=None):
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        sys.stderr.write(result.stderr[-4000:])
        raise SystemExit(f"command failed ({result.returncode}): {shlex.join(command)}")
    return result, time.perf_counter() - started


def last_json_line(text):
    lines = [line for line in text.strip().splitlines() if line.strip().startswith("{")]
    return json.loads(lines[-1]) if lines else None


def run_peer(args):
    command = [args.peer_python, str(BENCHMARKS / "peer_test_from_checkpoint.py"), "--checkpoint",
               args.peer_checkpoint, "--root", str(args.root), "--category", args.category, "--model", "patchcore",
               "--backbone", args.backbone, "--image-size", str(args.image_size), "--eval-batch-size", "32",
               "--num-workers", "0", "--coreset-ratio", str(args.coreset_ratio), "--layers", args.layers]
    if args.peer_weights:
        command += ["--weights", args.peer_weights]
    result, _ = run(command)
    return last_json_line(result.stdout)


def run_ours(args, overrides, work, source=None):
    # source: another checkout's src/ folder (a baseline commit), imported ahead of the installed package
    command = [sys.executable, "-m", "anomaly_detection", "test", "--checkpoint", args.ours_checkpoint,
               f"results_dir={work}", "evaluation.figures=false", *overrides]
    env = None if source is None else dict(os.environ, PYTHONPATH=str(source))
    result, wall = run(command, env)
    found = sorted(Path(work).rglob("summary.json"))
    if not found:
        raise SystemExit(f"anomaly-detection test wrote no summary.json under {work}")
    summary = json.loads(found[-1].read_text())
    return dict({key: summary.get(key) for key in METRICS + ("test_s", "peak_rss_mb", "num_test_images")},
                side="ours", wall_s=round(wall, 2))


def parse_variants(texts):
    variants = {}
    for text in texts:
        name, _, overrides = text.partition("=")
        if not name or not overrides:
            raise SystemExit(f"--variant {text!r}: expected NAME=key=value[,key=value...]")
        variants[name] = overrides.split(",")
    return variants


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--ours-checkpoint", required=True, help="our model.pt of the fit")
    parser.add_argument("--peer-checkpoint", required=True, help="Anomalib's model.ckpt of the same fit")
    parser.add_argument("--peer-weights", default=None, help="the timm-keyed backbone weights Anomalib's fit used")
    parser.add_argument("--root", default=str(SHARED / "data"))
    parser.add_argument("--category", default="magnetic_tile")
    parser.add_argument("--backbone", default="tf_efficientnet_lite0")
    parser.add_argument("--layers", default="blocks.2,blocks.4")
    parser.add_argument("--coreset-ratio", type=float, default=0.01)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--variant", action="append", default=None,
                        help="NAME=key=value[,key=value]: one of our configurations (repeatable); the first is "
                             f"the reference (default: {' '.join(DEFAULT_VARIANTS)})")
    parser.add_argument("--baseline-src", default=None,
                        help="the src/ folder of another checkout (e.g. a git worktree of the commit before a change): "
                             "its code runs the reference variant's overrides too, as variant 'baseline'")
    parser.add_argument("--peer-python", default=PEER_PYTHON)
    parser.add_argument("--out", default=str(results_path(__file__)))
    args = parser.parse_args()
    variants = parse_variants(args.variant or DEFAULT_VARIANTS)
    runs = {"anomalib": []} | {name: [] for name in variants} | ({"baseline": []} if args.baseline_src else {})
    with tempfile.TemporaryDirectory(prefix="patchcore_test_pass_") as work:
        for repeat in range(args.repeats):
            runs["anomalib"].append(run_peer(args))
            print(f"repeat {repeat} anomalib: {json.dumps(runs['anomalib'][-1])}", flush=True)
            for name, overrides in variants.items():
                runs[name].append(run_ours(args, overrides, Path(work) / f"{name}_{repeat}"))
                print(f"repeat {repeat} {name}: {json.dumps(runs[name][-1])}", flush=True)
            if args.baseline_src:
                runs["baseline"].append(run_ours(args, [], Path(work) / f"baseline_{repeat}", args.baseline_src))
                print(f"repeat {repeat} baseline: {json.dumps(runs['baseline'][-1])}", flush=True)
    peer_s = statistics.median(record["test_s"] for record in runs["anomalib"])
    reference = list(variants)[0]
    figures = {"anomalib": {"test_s_median": peer_s, "runs": runs["anomalib"]}}
    if args.baseline_src:
        variants = dict(variants, baseline=[f"(code of {args.baseline_src})"])
    for name in variants:
        median = statistics.median(record["test_s"] for record in runs[name])
        last, base = runs[name][-1], runs[reference][-1]
        figures[name] = {"overrides": variants[name], "test_s_median": round(median, 2),
                         "ratio_to_anomalib": round(median / peer_s, 3), "runs": runs[name],
                         "largest_metric_change_vs_" + reference: max(
                             abs(last[key] - base[key]) for key in METRICS if last.get(key) is not None)}
    print(json.dumps({name: {k: v for k, v in value.items() if k != "runs"} for name, value in figures.items()}))
    if args.out:
        append_record(__file__, typed_command(), figures, out=args.out, ours_checkpoint=args.ours_checkpoint,
                      peer_checkpoint=args.peer_checkpoint, baseline_src=args.baseline_src,
                      baseline_commit=git_commit(Path(args.baseline_src).parent) if args.baseline_src else None)


if __name__ == "__main__":
    main()
