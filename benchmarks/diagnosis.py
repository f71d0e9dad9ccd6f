# benchmarks/diagnosis.py
# What the checkpoint diagnoses (fastflow_scale_analysis.py, efficientad_map_sources.py) share: a fitted model
# with its own test split, and a command line that analyses each of several checkpoints and records each one.
import argparse

from anomaly_detection.runner import build_loaders, load_model_file
from record import append_record, results_path, typed_command


def model_and_test_loader(checkpoint):
    model, config, _ = load_model_file(checkpoint)
    model.eval()
    _, _, loader = build_loaders(config, str(config["dataset"]["category"]))
    return model, loader


def run_diagnosis(script, analyse, kind, show=print):
    parser = argparse.ArgumentParser()
    parser.add_argument("--checkpoints", required=True, help=f"comma-separated {kind} model.pt files")
    parser.add_argument("--label", default="")
    parser.add_argument("--out", default=str(results_path(script)))
    args = parser.parse_args()
    for checkpoint in args.checkpoints.split(","):
        figures = analyse(checkpoint)
        show(figures)
        if args.out:
            append_record(script, typed_command(), figures, out=args.out, label=args.label)
