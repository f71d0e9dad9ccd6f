# benchmarks/step_models_summary.py
# Many seeds of step_models_compare.py in one table: for each seed the latest run of ours with exactly the given
# --ours-overrides and the latest Anomalib run of the same model, data, batch size and epochs (and steps, with
# --max-steps); the means, the paired differences ours - Anomalib with their standard errors, and the range of the
# time and peak RSS ratios.
#   python benchmarks/step_models_summary.py --model reverse_distillation --batch-size 8 --seeds 0-39 \
#       --ours-overrides training.mixed_precision=true
#   python benchmarks/step_models_summary.py --model efficientad --data magnetic_tile --batch-size 1 --epochs 1 \
#       --max-steps 571 --seeds 0-2 --teacher-label 'distilled lite0, 120 steps (2026-12-01, AMD)'
# Each pair must have used the same EfficientAD teacher (file digest and label), or the script stops.
import argparse
import json
import shlex
import statistics
import sys

from record import results_path
from step_models_compare import ours_loop_s, peer_loop_s, recorded_batch_size

METRICS = ("image_auroc", "pixel_auroc", "aupro")


def parse_seeds(text):
    seeds = []
    for part in text.split(","):
        first, _, last = part.partition("-")
        seeds += list(range(int(first), int(last or first) + 1))
    return seeds


def option_values(command, option):
    words = shlex.split(command)
    if option not in words:
        return []
    values = []
    for word in words[words.index(option) + 1:]:
        if word.startswith("--"):
            break
        values.append(word)
    return values


def run_seed(command):
    values = option_values(command, "--seed")
    return int(values[0]) if values else 0


def latest_runs(records, args):
    ours, peer = {}, {}
    for record in records:
        result = record.get("result", {})
        if record.get("model") != args.model or record.get("status") == "superseded" or \
                record.get("data") != args.data or recorded_batch_size(record) != args.batch_size or \
                result.get("epochs_run") != args.epochs:
            continue
        if args.max_steps is not None and record.get("figures", {}).get("steps") != args.max_steps:
            continue
        if args.teacher_label is not None and record.get("teacher_label") != args.teacher_label:
            continue
        seed = run_seed(record["command"])
        if record.get("side") == "anomalib":
            peer[seed] = record
        elif record.get("side") == "ours" and option_values(record["command"], "--ours-overrides") == \
                list(args.ours_overrides):
            ours[seed] = record
    return ours, peer


def teacher_of(record):
    # EfficientAD's teacher as the records name it: the file's digest (records from 2026-12-02 04:00) and the label
    return record.get("teacher_sha256"), record.get("teacher_label")


def check_same_teacher(ours, peer, seeds):
    # one path, /tmp/teacher/teacher_small.pth, held a different distilled teacher on each machine: a pair of runs
    # with different teachers would compare the teachers, not the frameworks
    for seed in seeds:
        mine, theirs = teacher_of(ours[seed]), teacher_of(peer[seed])
        if mine != theirs:  # a digest on one side only is a difference too: the other's file is unknown
            raise SystemExit(f"seed {seed}: the latest runs of ours and Anomalib used different teachers (ours: "
                             f"sha256 {mine[0]}, label {mine[1]!r}; Anomalib: sha256 {theirs[0]}, label "
                             f"{theirs[1]!r}); choose the runs with --teacher-label")


def metric(record, key):
    result = record["result"]
    return result.get("pixel_aupro", result.get("aupro")) if key == "aupro" else result.get(key)


def loop_s(record):
    # computed from the run's summary, as step_models_compare.py does: records before 2026-12-01 19:00 lack loop_s
    result = record["result"]
    return (peer_loop_s(result) if record["side"] == "anomalib" else ours_loop_s(result)) or None


def summarize(ours, peer, seeds):
    missing = [seed for seed in seeds if seed not in ours or seed not in peer]
    if missing:
        raise SystemExit(f"no pair of runs for seeds {missing}: run step_models_compare.py for them first")
    check_same_teacher(ours, peer, seeds)
    summary = {"seeds": len(seeds)}
    for key in METRICS:
        mine, theirs = [metric(ours[s], key) for s in seeds], [metric(peer[s], key) for s in seeds]
        differences = [a - b for a, b in zip(mine, theirs)]
        error = statistics.stdev(differences) / len(seeds) ** 0.5 if len(seeds) > 1 else float("nan")
        summary[key] = {"ours": statistics.mean(mine), "anomalib": statistics.mean(theirs),
                        "difference": statistics.mean(differences), "standard_error": error}
    loops = [loop_s(ours[s]) / loop_s(peer[s]) for s in seeds]
    rss = [ours[s]["result"]["peak_rss_mb"] / peer[s]["result"]["peak_rss_mb"] for s in seeds]
    summary["loop_ratio"] = {"mean": statistics.mean(loops), "min": min(loops), "max": max(loops)}
    summary["peak_rss_ratio"] = {"mean": statistics.mean(rss), "min": min(rss), "max": max(rss)}
    summary["best_epochs"] = [ours[s]["result"].get("best_epoch") for s in seeds]
    summary["dates"] = [min(ours[s]["date"] for s in seeds), max(ours[s]["date"] for s in seeds)]
    return summary


def main(argv=None):
    parser = argparse.ArgumentParser(description="step_models_compare.py runs over many seeds, in one table")
    parser.add_argument("--model", default="reverse_distillation")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--data", choices=("synthetic", "magnetic_tile"), default="synthetic")
    parser.add_argument("--max-steps", type=int, default=None, help="EfficientAD: only runs of this many steps")
    parser.add_argument("--seeds", default="0-39", help="e.g. 0-19 or 0,3,5-9")
    parser.add_argument("--teacher-label", default=None,
                        help="EfficientAD: only runs whose teacher has this --teacher-label")
    parser.add_argument("--ours-overrides", nargs="*", default=[], metavar="key=value",
                        help="exactly the --ours-overrides of the runs to take (none: the runs as shipped)")
    parser.add_argument("--results", default=str(results_path("step_models_compare.py")))
    args = parser.parse_args(argv)
    with open(args.results) as handle:
        records = [json.loads(line) for line in handle if line.strip()]
    summary = summarize(*latest_runs(records, args), parse_seeds(args.seeds))
    print("| metric | ours | Anomalib | ours - Anomalib (standard error) |")
    print("|---|---|---|---|")
    for key in METRICS:
        row = summary[key]
        print(f"| {key} | {row['ours']:.3f} | {row['anomalib']:.3f} | {row['difference']:+.3f} "
              f"({row['standard_error']:.3f}) |")
    for key in ("loop_ratio", "peak_rss_ratio"):
        row = summary[key]
        print(f"{key}: mean {row['mean']:.2f}, {row['min']:.2f}-{row['max']:.2f}")
    print(f"kept epochs: {summary['best_epochs']}; runs of ours {summary['dates'][0]} to {summary['dates'][1]}")
    print(json.dumps(summary), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
