# experiments/train_padim.py
import argparse
import sys

from anomaly_detection.cli import resolve_categories, summarize_categories
from anomaly_detection.runner import build_config, train_and_evaluate
from anomaly_detection.utils import setup_logging, to_json


def build_parser():
    parser = argparse.ArgumentParser(description="Fit PaDiM per category (one pass, no gradient training), "
                                                 "then evaluate it on the test split")
    parser.add_argument("--dataset", default="mvtec", help="mvtec, visa, btad, folder or demo")
    parser.add_argument("--category", default=None,
                        help="one category, a comma-separated list, or 'all' (default: the dataset config's)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides, e.g. model.n_features=100 model.backbone=resnet18")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    setup_logging()
    try:
        config = build_config("padim", args.dataset, args.overrides)
        results = [train_and_evaluate(config, category) for category in resolve_categories(config, args.category)]
    except (FileNotFoundError, ValueError, RuntimeError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    # the last line of output is one JSON object, as from the anomaly-detection command
    print(to_json(results[0] if len(results) == 1 else summarize_categories(results)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
