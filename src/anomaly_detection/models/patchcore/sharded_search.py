# src/anomaly_detection/models/patchcore/sharded_search.py
# Nearest-neighbour search over a memory bank split across the processes of a torchrun job
# (model.sharded_search: true). Each process keeps one contiguous block of the bank's rows on its device and
# frees the rest; every process searches the same queries against its block, and the k nearest of all blocks are
# merged (a stable sort of the candidates, so equal distances keep the lower row, as one process's search
# does). The distance blocks, the search's memory and its work are divided by the number of processes; the
# result is the one-process search to float rounding (a product over part of the bank may round differently).
# Every process must call search with the same queries at the same time: the evaluator then scores the whole
# test split on every process (see PatchCoreTrainer.scores_whole_splits).
import torch

from anomaly_detection import distributed


def block_bounds(total, shards, shard_rank):
    # rows [start, stop) of block shard_rank when `total` rows are cut into `shards` near-equal contiguous blocks
    base, extra = divmod(total, shards)
    start = shard_rank * base + min(shard_rank, extra)
    return start, start + base + (1 if shard_rank < extra else 0)


class ShardedBank:
    def __init__(self, bank, search):
        # bank: the whole bank, as every process holds it after the fit's broadcast or a checkpoint's load;
        # search(queries, block, k) -> (distances, indices) is the model's own one-block search
        self.total, self.dim = int(bank.shape[0]), int(bank.shape[1])
        self.offset, stop = block_bounds(self.total, distributed.world_size(), distributed.rank())
        self.block = bank[self.offset:stop].clone()
        self.search_block = search

    def search(self, queries, k):
        count = queries.shape[0]
        local_k = min(k, self.block.shape[0])
        distances = torch.full((count, k), float("inf"), dtype=torch.float32, device=queries.device)
        indices = torch.full((count, k), -1, dtype=torch.long, device=queries.device)
        if local_k:
            found_distances, found = self.search_block(queries, self.block, local_k)
            distances[:, :local_k] = found_distances
            indices[:, :local_k] = found + self.offset
        # every process's k candidates per query, in rank order (so in row order for equal distances)
        all_distances = torch.cat(distributed.all_gather_tensor(distances), dim=1)
        all_indices = torch.cat(distributed.all_gather_tensor(indices), dim=1)
        order = torch.sort(all_distances, dim=1, stable=True).indices[:, :k]
        return all_distances.gather(1, order), all_indices.gather(1, order)

    def rows(self, indices):
        # the bank rows at global indices: the process holding each row supplies it, the others add zeros
        owned = (indices >= self.offset) & (indices < self.offset + self.block.shape[0])
        rows = torch.zeros(tuple(indices.shape) + (self.dim,), dtype=self.block.dtype, device=self.block.device)
        rows[owned] = self.block[indices[owned] - self.offset]
        return distributed.all_reduce_sum(rows)
