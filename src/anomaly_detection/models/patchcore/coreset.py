# src/anomaly_detection/models/patchcore/coreset.py
import math

import torch

MB = 1024 * 1024


def rows_per_chunk(memory_budget_mb, bytes_per_row, purpose, key="model.memory_budget_mb"):
    budget = float(memory_budget_mb) * MB
    rows = int(budget // bytes_per_row)
    if rows < 1:
        raise ValueError(f"{key}={memory_budget_mb} is too small for one chunk of {purpose}: "
                         f"it needs at least {bytes_per_row / MB:.4f} MB ({bytes_per_row} bytes)")
    return rows


def random_projection(in_dim, out_dim, seed, device):
    # Gaussian Johnson-Lindenstrauss matrix, drawn on the CPU so that every device gets the same one
    generator = torch.Generator().manual_seed(int(seed))
    matrix = torch.randn(in_dim, out_dim, generator=generator) / math.sqrt(out_dim)
    return matrix.to(device)


def project_points(features, projection_dim, seed, memory_budget_mb):
    count, dim = features.shape
    project = projection_dim is not None and dim > projection_dim
    out_dim = projection_dim if project else dim
    matrix = random_projection(dim, out_dim, seed, features.device) if project else None
    # Column-major layout: rows are the coordinates, then |x|^2, then 1. The greedy loop reads it as
    # one gemv, x . w with w = [-2c, 1, |c|^2], which gives |x - c|^2 in a single streaming pass.
    points = torch.empty(out_dim + 2, count, dtype=torch.float32, device=features.device)
    chunk = rows_per_chunk(memory_budget_mb, 4 * (dim + out_dim + 1), "the coreset projection")
    for start in range(0, count, chunk):
        stop = min(start + chunk, count)
        block = features[start:stop].float()
        if project:
            block = block @ matrix
        points[:out_dim, start:stop].copy_(block.t())
        points[out_dim, start:stop] = block.pow(2).sum(1)
    points[out_dim + 1].fill_(1.0)
    return points


def start_index(count, seed):
    generator = torch.Generator().manual_seed(int(seed))
    return torch.randint(count, (1,), generator=generator)


def greedy_coreset_indices(features, num_samples, projection_dim=128, seed=0, memory_budget_mb=256):
    count = features.shape[0]
    if not 1 <= num_samples <= count:
        raise ValueError(f"coreset size must be in [1, {count}] (the number of patches), got {num_samples}")
    device = features.device
    points = project_points(features, projection_dim, seed, memory_budget_mb)
    dim = points.shape[0] - 2
    chunk = rows_per_chunk(memory_budget_mb, 4, "the coreset distance update")

    # everything the loop touches is allocated here: no per-iteration allocation, no .item()
    selected = torch.empty(num_samples, dtype=torch.long, device=device)
    index = start_index(count, seed).to(device)
    selected[0:1].copy_(index)
    min_distance = torch.full((count,), float("inf"), dtype=torch.float32, device=device)
    distance = torch.empty(min(chunk, count), dtype=torch.float32, device=device)
    column = torch.empty(dim + 2, 1, dtype=torch.float32, device=device)
    weights = torch.empty(dim + 2, dtype=torch.float32, device=device)
    order = torch.cat([torch.arange(dim), torch.tensor([dim + 1, dim])]).to(device)
    scale = torch.cat([torch.full((dim,), -2.0), torch.ones(2)]).to(device)

    for position in range(1, num_samples):
        torch.index_select(points, 1, index, out=column)
        torch.index_select(column.view(-1), 0, order, out=weights)
        weights.mul_(scale)
        for start in range(0, count, chunk):
            stop = min(start + chunk, count)
            part = distance[:stop - start]
            torch.mv(points[:, start:stop].t(), weights, out=part)
            min_distance[start:stop].clamp_max_(part)
        # squared distances are >= 0 up to rounding, so -1 keeps a chosen point from being chosen again
        min_distance.index_fill_(0, index, -1.0)
        torch.argmax(min_distance, dim=0, keepdim=True, out=index)
        selected[position:position + 1].copy_(index)
    return selected
