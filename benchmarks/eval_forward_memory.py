# benchmarks/eval_forward_memory.py
# How far one eval-mode forward pass raises the process's resident memory above the built model, scored in the
# model's chunks (forward) and as one whole batch (score), for Reverse Distillation and FastFlow: random
# resnet18, 256 px, float32. RSS is sampled every 2 ms by a thread; each (model, batch, way) runs in its own
# process, so one run's freed pages do not hide the next one's.
#   python benchmarks/eval_forward_memory.py [--models reverse_distillation,fastflow] [--batches 8,32]
import argparse
import json
import subprocess
import sys

from record import append_record, results_path, typed_command

ONE_RUN = """
import json, threading, time, torch
from anomaly_detection.models.fastflow import FastFlowModel
from anomaly_detection.models.reverse_distillation import ReverseDistillationModel
def rss_mb():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) / 1024 for line in status if line.startswith("VmRSS"))
torch.set_num_threads(2)
torch.manual_seed(0)
name, batch, way = {name!r}, {batch}, {way!r}
if name == "fastflow":
    model = FastFlowModel(backbone="resnet18", pretrained=False, input_size=256).eval()
else:
    model = ReverseDistillationModel(backbone="resnet18", pretrained=False).eval()
images = torch.randn(batch, 3, 256, 256)
peak, done = [0.0], [False]
def sample():
    while not done[0]:
        peak[0] = max(peak[0], rss_mb())
        time.sleep(0.002)
time.sleep(0.1)
base = rss_mb()
peak[0] = base
thread = threading.Thread(target=sample, daemon=True)
thread.start()
started = time.perf_counter()
with torch.no_grad():
    model(images) if way == "chunks" else model.score(images)
seconds = time.perf_counter() - started
time.sleep(0.05)
done[0] = True
thread.join()
print(json.dumps({{"model": name, "batch": batch, "way": way, "base_mb": round(base, 1),
                  "rise_mb": round(peak[0] - base, 1), "forward_s": round(seconds, 3)}}))
"""


def main():
    parser = argparse.ArgumentParser(description="RSS rise of one eval forward, in chunks and whole")
    parser.add_argument("--models", default="reverse_distillation,fastflow")
    parser.add_argument("--batches", default="8,32")
    parser.add_argument("--out", default=str(results_path(__file__)))
    args = parser.parse_args()
    rows = []
    for name in args.models.split(","):
        for batch in [int(b) for b in args.batches.split(",")]:
            for way in ("chunks", "whole"):
                code = ONE_RUN.format(name=name, batch=batch, way=way)
                result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
                rows.append(json.loads(result.stdout.strip().splitlines()[-1]))
                print(rows[-1], flush=True)
    if args.out:
        append_record(__file__, typed_command(), {"runs": rows}, out=args.out)


if __name__ == "__main__":
    main()
