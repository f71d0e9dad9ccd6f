# experiments/train_fastflow.py
# Train fastflow on one category, a comma-separated list or 'all', then evaluate on the test split:
#   python experiments/train_fastflow.py [--dataset mvtec] [--category bottle] [--resume] [key=value ...]
import sys

from anomaly_detection.cli import main as cli_main


def main(argv=None):
    return cli_main(["train", "--model", "fastflow"] + list(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.exit(main())
