# benchmarks/reverse_distillation_initial_weights.py
# Two folders of Reverse Distillation initial states, initial_<seed>.pt, as our runner draws them
# (reverse_distillation_runner_draws.py --save-initial-states) and as Anomalib's harness draws them
# (reverse_distillation_in_anomalib.py --save-initial-state): are they draws from one distribution? Per trainable
# tensor, pooled over the seeds both folders hold: a two-sample Kolmogorov-Smirnov test on a sample of the values,
# mean and spread; then the largest correlation between the seeds of one folder, between the two folders, and
# between the tensors of one model. Constant tensors (BatchNorm) and the encoder (loaded from one file) must be
# equal. A diagnosis, not a score:
#
#   python benchmarks/reverse_distillation_initial_weights.py --runner /tmp/rinit --harness /tmp/hinit
import argparse
import itertools
import json
import re
import sys
from pathlib import Path

import torch
from scipy.stats import ks_2samp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from record import append_record, typed_command  # noqa: E402

KS_SAMPLE = 200_000


def load_states(folder):
    states = {}
    for path in Path(folder).glob("initial_*.pt"):
        match = re.fullmatch(r"initial_(\d+)\.pt", path.name)
        if match:
            states[int(match.group(1))] = torch.load(path, map_location="cpu", weights_only=True)
    if not states:
        raise SystemExit(f"{folder}: no initial_<seed>.pt files")
    return states


def largest_correlation(vectors):
    matrix = torch.corrcoef(torch.stack(vectors))
    return float(matrix[~torch.eye(len(vectors), dtype=torch.bool)].abs().max())


def compare(runner, harness, seeds):
    first = runner[seeds[0]]
    trained = [key for key in first if not key.startswith("encoder") and first[key].dtype.is_floating_point]
    drawn = [key for key in trained if any(runner[s][key].std() > 0 for s in seeds if runner[s][key].numel() > 1)]
    generator = torch.Generator().manual_seed(0)
    tensors = {}
    for key in drawn:
        ours = torch.cat([runner[s][key].flatten().float() for s in seeds])
        theirs = torch.cat([harness[s][key].flatten().float() for s in seeds])
        sample = torch.randperm(len(ours), generator=generator)[:KS_SAMPLE]
        tensors[key] = {"ks_p": float(ks_2samp(ours[sample].numpy(), theirs[sample].numpy()).pvalue),
                        "std": [float(ours.std()), float(theirs.std())],
                        "mean": [float(ours.mean()), float(theirs.mean())]}
    constant_differs = [key for key in first if key not in drawn
                        if not all(torch.equal(runner[s][key], harness[s][key]) for s in seeds)]
    convolutions = [key for key in drawn if first[key].dim() == 4]

    def as_vector(state):
        return torch.cat([state[key].flatten().float() for key in convolutions])
    within_model = max(abs(float(torch.corrcoef(torch.stack([first[a].flatten()[:n], first[b].flatten()[:n]]))[0, 1]))
                       for a, b in itertools.combinations(convolutions, 2)
                       for n in [min(first[a].numel(), first[b].numel())])
    runner_vectors = [as_vector(runner[s]) for s in seeds]
    harness_vectors = [as_vector(harness[s]) for s in seeds]
    across = torch.corrcoef(torch.stack(runner_vectors + harness_vectors))[:len(seeds), len(seeds):]
    return {"seeds": seeds, "tensors_tested": len(tensors),
            "ks_p_below_0.01": sorted(key for key, row in tensors.items() if row["ks_p"] < 0.01),
            "smallest_ks_p": min(row["ks_p"] for row in tensors.values()),
            "largest_std_ratio_gap": max(abs(row["std"][0] / row["std"][1] - 1) for row in tensors.values()),
            "not_drawn_and_unequal": constant_differs,
            "largest_correlation": {"between_runner_seeds": largest_correlation(runner_vectors),
                                    "between_harness_seeds": largest_correlation(harness_vectors),
                                    "runner_against_harness": float(across.abs().max()),
                                    "between_tensors_of_one_model": within_model},
            "per_tensor": tensors}


def main():
    parser = argparse.ArgumentParser(description="Reverse Distillation: are two sets of initial weights alike?")
    parser.add_argument("--runner", required=True, help="folder of the runner's initial_<seed>.pt")
    parser.add_argument("--harness", required=True, help="folder of the harness's initial_<seed>.pt")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    runner, harness = load_states(args.runner), load_states(args.harness)
    seeds = sorted(set(runner) & set(harness))
    if not seeds:
        raise SystemExit("the two folders share no seed")
    figures = compare(runner, harness, seeds)
    print(json.dumps({key: value for key, value in figures.items() if key != "per_tensor"}))
    append_record(__file__, typed_command(), figures, out=args.out)


if __name__ == "__main__":
    main()
