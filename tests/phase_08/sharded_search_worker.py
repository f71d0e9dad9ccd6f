# tests/phase_08/sharded_search_worker.py
# Run under torchrun by test_distributed.py: PatchCore's sharded search against the one-process search over the
# whole bank, on every process; each writes <output>/sharded_rank<r>.json.
import json
import sys
from pathlib import Path

import torch

from anomaly_detection import distributed
from anomaly_detection.models.patchcore.patchcore import nearest_neighbours
from anomaly_detection.models.patchcore.sharded_search import ShardedBank


def main(output):
    distributed.init_distributed()
    generator = torch.Generator().manual_seed(0)
    bank = torch.randn(53, 8, generator=generator)
    queries = torch.randn(40, 8, generator=generator)
    queries[:5] = bank[[0, 52, 26, 27, 10]]  # queries on bank rows: distance 0, the row itself found
    sharded = ShardedBank(bank, lambda q, block, k: nearest_neighbours(q, block, k, 16))
    report = {"block_rows": int(sharded.block.shape[0]), "offset": sharded.offset}
    for k in (1, 5):
        distances, indices = sharded.search(queries, k)
        expected_distances, expected_indices = nearest_neighbours(queries, bank, k, 16)
        report[f"k{k}_max_distance_difference"] = float((distances - expected_distances).abs().max())
        report[f"k{k}_same_indices"] = bool(torch.equal(indices, expected_indices))
    rows = torch.tensor([[0, 52], [26, 27]])
    report["rows_equal"] = bool(torch.equal(sharded.rows(rows), bank[rows]))
    Path(output, f"sharded_rank{distributed.rank()}.json").write_text(json.dumps(report))
    distributed.shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
