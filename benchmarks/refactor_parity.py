# benchmarks/refactor_parity.py
# Same seeds, same magnetic_tile figures before and after a refactor of src/: runs three fixed configurations
# (STFPM 3 epochs, PaDiM, PatchCore on the first 100 training images) with the CLI of a chosen source tree
# and appends one record per run to benchmarks/results/refactor_parity.jsonl; then compares the figures
# with the latest runs of another label.
#
#   python benchmarks/refactor_parity.py --src /tmp/before/src --label before   (a worktree of the old commit)
#   python benchmarks/refactor_parity.py --label after                          (this working tree)
import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from patchcore_padim_compare import make_subset
from record import REPO, SHARED, append_record, git_commit, read_records, results_path, typed_command

METRICS = ("image_auroc", "pixel_auroc", "aupro", "f1_max", "pixel_f1_max")
TIMINGS = ("fit_s", "test_s", "train_s_per_epoch", "test_s_per_image", "peak_rss_mb")
COMMON = ["model.backbone=tf_efficientnet_lite0", "data.image_size=256", "training.batch_size=32",
          "data.num_workers=0", "training.progress_bar=false", "evaluation.figures=false"]
# The settings of the runs recorded before (RESULTS.md): STFPM as benchmarks/stfpm_magnetic_tile.py ran it
# (seed 42 from configs/default.yaml), PaDiM and PatchCore as benchmarks/patchcore_padim_compare.py ran them
# (seed 0, every training image fits, Anomalib's layers, PatchCore with Anomalib's embedding).
CONFIGS = {
    "stfpm": {"model": "stfpm", "overrides": ["seed=42", "training.num_epochs=3"],
              "recorded": {"image_auroc": 0.729, "pixel_auroc": 0.597, "aupro": 0.648}},
    "padim": {"model": "padim", "overrides": ["seed=0", "data.val_fraction=0", "data.eval_batch_size=32",
                                              "model.n_features=100", "model.layers=[blocks.1,blocks.2,blocks.4]"],
              "recorded": {"image_auroc": 0.954, "pixel_auroc": 0.752, "aupro": 0.763}},
    "patchcore": {"model": "patchcore", "max_train": 100,
                  "overrides": ["seed=0", "data.val_fraction=0", "data.eval_batch_size=32", "model.coreset_ratio=0.1",
                                "model.pretrain_dim=null", "model.target_dim=null",
                                "model.layers=[blocks.2,blocks.4]"],
                  "recorded": {"image_auroc": 0.852, "pixel_auroc": 0.792, "aupro": 0.685}},
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="magnetic_tile figures of a source tree, for before/after checks")
    parser.add_argument("--label", required=True, help="e.g. before, after")
    parser.add_argument("--src", default=str(REPO / "src"), help="source tree whose anomaly_detection package runs")
    parser.add_argument("--root", default=str(SHARED / "data"), help="MVTec-layout root holding magnetic_tile")
    parser.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated subset of " + ",".join(CONFIGS))
    parser.add_argument("--work", default=None, help="outputs and the PatchCore subset (default /tmp/refactor_parity)")
    parser.add_argument("--compare-to", default=None,
                        help="label to compare with (default: before, or after when --label is before)")
    parser.add_argument("--tolerance", type=float, default=1e-4, help="largest metric difference counted as equal")
    parser.add_argument("--compare-only", action="store_true", help="run nothing, compare recorded runs")
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    parser.add_argument("--out", default=str(results_path(__file__)))
    return parser.parse_args(argv)


def environment(src):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(src)] + [p for p in [env.get("PYTHONPATH")] if p])
    return env


def check_source(src, env):
    # an editable install elsewhere must not shadow the tree under test
    found = subprocess.run([sys.executable, "-c", "import anomaly_detection; print(anomaly_detection.__file__)"],
                           capture_output=True, text=True, env=env, check=True).stdout.strip()
    if not Path(found).resolve().is_relative_to(Path(src).resolve()):
        raise SystemExit(f"anomaly_detection imports from {found}, not from {src}")
    return found


def last_json_line(text):
    for line in reversed(text.strip().splitlines()):
        if line.strip().startswith("{"):
            return json.loads(line)
    return None


def cli_command(name, root, work):
    config = CONFIGS[name]
    command = [sys.executable, "-m", "anomaly_detection.cli", "train", "--model", config["model"], "--dataset",
               "mvtec", "--category", "magnetic_tile", f"dataset.root_dir={root}",
               f"output_dir={work / name}"] + COMMON + config["overrides"]
    return command


def run(name, args, src, env, work):
    root = Path(args.root)
    if CONFIGS[name].get("max_train"):
        # the first N sorted training images and the whole test split, hard-linked outside the repository
        root, _ = make_subset(root, "magnetic_tile", work / f"subset_{CONFIGS[name]['max_train']}",
                              CONFIGS[name]["max_train"])
    command = cli_command(name, root, work)
    shown = f"PYTHONPATH={shlex.quote(str(src))} python " + shlex.join(command[1:])
    print("+", shown, file=sys.stderr, flush=True)
    if args.dry_run:
        return None
    started = time.perf_counter()
    load = os.getloadavg()[0]
    # the source tree's own project root, so its configs/ are the ones read
    result = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            cwd=str(Path(src).resolve().parent))
    wall = time.perf_counter() - started
    if result.returncode != 0:
        sys.stderr.write(result.stderr[-4000:])
        raise SystemExit(f"{name} failed with exit code {result.returncode}")
    summary = last_json_line(result.stdout)
    figures = {key: summary.get(key) for key in METRICS}
    timings = {key: summary.get(key) for key in TIMINGS if summary.get(key) is not None}
    timings.update(wall_s=round(wall, 1), loadavg_start=round(load, 2), loadavg_end=round(os.getloadavg()[0], 2))
    return append_record(__file__, typed_command(), figures, out=args.out, label=args.label, variant=name,
                         git_commit=git_commit(Path(src).resolve().parent), src=str(src), run_command=shown,
                         recorded_before=CONFIGS[name]["recorded"], timings=timings,
                         note="timings are not comparable between runs: other jobs shared the 2 cores",
                         result={k: v for k, v in summary.items() if not str(k).endswith(("_dir", "checkpoint"))})


def latest(records, label):
    found = {}
    for record in records:
        if record.get("label") == label and record.get("status") != "superseded":
            found[record["variant"]] = record
    return found


def compare(path, label, other, tolerance):
    records = read_records(path)
    mine, theirs = latest(records, label), latest(records, other)
    if not mine or not theirs:
        print(f"nothing to compare: runs labelled '{label}': {len(mine)}, '{other}': {len(theirs)}")
        return 0
    worst = 0.0
    print(f"{'config':<10}{'metric':<14}{other:>12}{label:>12}{'difference':>12}")
    for name in CONFIGS:
        if (name in mine) != (name in theirs):
            print(f"{name:<10}run under one label only")
            worst = float("inf")
        if name not in mine or name not in theirs:
            continue
        for key in METRICS:
            a, b = theirs[name]["figures"].get(key), mine[name]["figures"].get(key)
            if a is None or b is None:
                # a metric that one side no longer reports is a difference, not a pass
                print(f"{name:<10}{key:<14}{a!s:>12}{b!s:>12}{'missing':>12}")
                worst = float("inf") if a != b else worst
                continue
            worst = max(worst, abs(a - b))
            print(f"{name:<10}{key:<14}{a:>12.6f}{b:>12.6f}{b - a:>12.2e}")
    verdict = "same figures" if worst <= tolerance else "figures differ"
    print(f"largest difference {worst:.2e} (tolerance {tolerance:g}): {verdict}")
    return 0 if worst <= tolerance else 1


def main(argv=None):
    args = parse_args(argv)
    other = args.compare_to or ("after" if args.label == "before" else "before")
    if args.compare_only:
        return compare(args.out, args.label, other, args.tolerance)
    src = Path(args.src).resolve()
    env = environment(src)
    print(f"anomaly_detection from {check_source(src, env)}", file=sys.stderr)
    work = Path(args.work or f"/tmp/refactor_parity/{args.label}")
    work.mkdir(parents=True, exist_ok=True)
    for name in [n.strip() for n in args.configs.split(",") if n.strip()]:
        record = run(name, args, src, env, work)
        if record:
            print(json.dumps({"variant": name, **record["figures"], **record["timings"]}), flush=True)
    if args.dry_run:
        return 0
    return compare(args.out, args.label, other, args.tolerance)


if __name__ == "__main__":
    sys.exit(main())
