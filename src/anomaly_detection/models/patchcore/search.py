# src/anomaly_detection/models/patchcore/search.py
import torch

from anomaly_detection.models.components import tensor_version
from anomaly_detection.models.patchcore.coreset import rows_per_chunk

# Rows of queries per block of distances: the block (rows x bank) is written by the matrix product and read
# once more for the minimum, so it is kept small enough to stay in the processor's cache between the two
# (645,120 patches against 7,311 rows: 6.4 s in blocks of 8 MB, 12.3 s in blocks of 256 MB) but never under
# MIN_BLOCK_ROWS rows, below which the product would re-read a large bank for too few patches.
SEARCH_BLOCK_BYTES = 8 * 1024 * 1024
MIN_BLOCK_ROWS = 256
# The bfloat16 pass keeps this many candidates per query for the exact float32 re-ranking. On magnetic_tile
# (645,120 test patches against 7,311 bank rows) the nearest row was missing from the 4 for 1 patch, whose
# distance came out 3e-5 relative too large (benchmarks/RESULTS.md, "Deployment (issue 12)").
CANDIDATES = 4


class PreparedBank:
    # The bank as the search reads it, made once per fitted bank: centred on its mean (so that the expansion
    # below loses less precision to cancellation) and widened by its squared norms, transposed, in the dtype
    # of each product that reads it. |x - y|^2 = |x|^2 + (|y|^2 - 2 x.y), and the bracket is one product.
    def __init__(self, bank):
        self.bank, self.version = bank, tensor_version(bank)
        self.centre = bank.float().mean(0)
        self._widened = {}

    def matches(self, bank):
        return self.bank is bank and self.version == tensor_version(bank)

    def widened(self, dtype):
        if dtype not in self._widened:
            centred = self.bank.float() - self.centre
            widened = torch.cat([-2.0 * centred, centred.pow(2).sum(1, keepdim=True)], 1)
            self._widened[dtype] = widened.to(dtype).t().contiguous()
        return self._widened[dtype]


def nearest_neighbours(queries, bank, k, memory_budget_mb, candidates_dtype=None, prepared=None):
    # The k nearest bank rows of each query (Euclidean), nearest first, as (distances, indices). Exact in
    # float32 by default. With candidates_dtype=torch.bfloat16 and k=1, a bfloat16 product (2-3x the float32
    # rate where the processor has bfloat16 units) picks CANDIDATES rows per query and their exact float32
    # distances decide: the result differs from the exact one only when the nearest row is not among them.
    # prepared: a PreparedBank of this bank, kept by the caller across calls.
    count, dim = bank.shape
    candidates = min(CANDIDATES, count)
    approximate = candidates_dtype is not None and k == 1 and candidates > 1
    kept = candidates if approximate else k
    per_row = 4 * (count + dim + 4 * kept) + (4 * candidates * dim if approximate else 0)
    limit = rows_per_chunk(memory_budget_mb, per_row, "the nearest-neighbour search")
    chunk = min(limit, max(MIN_BLOCK_ROWS, SEARCH_BLOCK_BYTES // (4 * count)))
    prepared = prepared if prepared is not None and prepared.matches(bank) else PreparedBank(bank)
    centre = prepared.centre
    widened = prepared.widened(candidates_dtype if approximate else torch.float32)
    distances = torch.empty(queries.shape[0], k, dtype=torch.float32, device=queries.device)
    indices = torch.empty(queries.shape[0], k, dtype=torch.long, device=queries.device)
    ones = torch.ones(chunk, 1, dtype=widened.dtype, device=queries.device)
    for start in range(0, queries.shape[0], chunk):
        block = queries[start:start + chunk].float() - centre
        rows = block.shape[0]
        scores = torch.cat([block.to(widened.dtype), ones[:rows]], 1) @ widened
        if approximate:
            nearest = scores.topk(candidates, dim=1, largest=False).indices
            exact = (bank[nearest].float() - centre - block[:, None]).pow(2).sum(2)
            values, best = exact.min(dim=1, keepdim=True)
            distances[start:start + rows] = values.sqrt_()
            indices[start:start + rows] = nearest.gather(1, best)
            continue
        if k == 1:
            values, found = scores.min(dim=1, keepdim=True)
        else:
            values, found = scores.topk(k, dim=1, largest=False)
        values.add_(block.pow(2).sum(1, keepdim=True))
        distances[start:start + rows] = values.clamp_min_(0).sqrt_()
        indices[start:start + rows] = found
    return distances, indices
