# src/anomaly_detection/__main__.py
# `python -m anomaly_detection ...`, and so `torchrun --nproc_per_node N -m anomaly_detection train ...`
import sys

from anomaly_detection.cli import main

sys.exit(main())
