# tests/phase_04/test_coreset.py
import pytest
import torch

from anomaly_detection.models.patchcore.coreset import (
    greedy_coreset_indices, project_points, random_projection, rows_per_chunk, start_index,
)
from anomaly_detection.models.patchcore.patchcore import nearest_neighbours


def brute_force_greedy(points, num_samples, first):
    distances = torch.cdist(points.double(), points.double())
    chosen = [first]
    nearest = distances[first].clone()
    for _ in range(num_samples - 1):
        index = int(torch.argmax(nearest))
        chosen.append(index)
        nearest = torch.minimum(nearest, distances[index])
    return chosen


def hand_made_points():
    # four tight clusters of very different size and one far outlier: the greedy order is unambiguous
    generator = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 7.0], [-5.0, -9.0], [40.0, 40.0]])
    spread = torch.tensor([1.0, 0.5, 2.0, 0.3, 0.1])
    points = [centres[i] + spread[i] * torch.randn(12, 2, generator=generator) for i in range(5)]
    return torch.cat(points)


def test_hand_made_points_match_brute_force_greedy():
    points = hand_made_points()
    # 2 dims <= projection_dim: no projection, the exact distances are used
    selected = greedy_coreset_indices(points, 20, projection_dim=128, seed=7).tolist()
    assert selected[0] == int(start_index(len(points), 7))
    assert selected == brute_force_greedy(points, 20, selected[0])
    # the first picks cover every cluster, the outlier cluster first of all
    assert 48 <= selected[1] < 60


def test_projected_selection_matches_brute_force_on_projected_points():
    generator = torch.Generator().manual_seed(1)
    features = torch.randn(400, 300, generator=generator)
    selected = greedy_coreset_indices(features, 40, projection_dim=16, seed=3).tolist()
    projected = features @ random_projection(300, 16, 3, features.device)
    assert selected == brute_force_greedy(projected, 40, selected[0])
    assert len(set(selected)) == 40


def test_chunked_selection_equals_one_chunk():
    generator = torch.Generator().manual_seed(2)
    features = torch.randn(3000, 64, generator=generator)
    whole = greedy_coreset_indices(features, 100, projection_dim=32, seed=0, memory_budget_mb=64)
    # 0.002 MB: 524-row chunks for the distance update, 5-row chunks for the projection
    chunked = greedy_coreset_indices(features, 100, projection_dim=32, seed=0, memory_budget_mb=0.002)
    assert torch.equal(whole, chunked)


def test_duplicates_never_selected_twice():
    points = torch.zeros(50, 8)
    points[:5] = torch.arange(5.0)[:, None]
    selected = greedy_coreset_indices(points, 30, seed=0)
    assert len(set(selected.tolist())) == 30


def test_same_seed_same_selection():
    features = torch.randn(500, 200, generator=torch.Generator().manual_seed(4))
    first = greedy_coreset_indices(features, 25, seed=11)
    assert torch.equal(first, greedy_coreset_indices(features, 25, seed=11))
    other = greedy_coreset_indices(features, 25, seed=12)
    assert int(other[0]) == int(start_index(500, 12)) != int(first[0])


def test_projection_layout_holds_squared_norms_and_ones():
    features = torch.randn(10, 4)
    points = project_points(features, 128, 0, 1)
    assert points.shape == (6, 10)
    assert torch.allclose(points[:4], features.t())
    assert torch.allclose(points[4], features.pow(2).sum(1))
    assert torch.equal(points[5], torch.ones(10))


def test_budget_too_small_for_one_chunk_names_the_key_and_minimum():
    with pytest.raises(ValueError, match=r"model.memory_budget_mb=1e-06 .* at least"):
        rows_per_chunk(1e-6, 4096, "a test")
    with pytest.raises(ValueError, match="memory_budget_mb"):
        greedy_coreset_indices(torch.randn(100, 64), 10, projection_dim=32, memory_budget_mb=1e-6)


def test_bad_coreset_size():
    with pytest.raises(ValueError, match="coreset size"):
        greedy_coreset_indices(torch.randn(10, 4), 11)
    with pytest.raises(ValueError, match="coreset size"):
        greedy_coreset_indices(torch.randn(10, 4), 0)


@pytest.mark.parametrize("k", [1, 3])
def test_nearest_neighbours_match_cdist_in_chunks(k):
    generator = torch.Generator().manual_seed(5)
    bank = torch.randn(300, 32, generator=generator)
    queries = torch.randn(257, 32, generator=generator)
    expected = torch.cdist(queries.double(), bank.double()).topk(k, largest=False)
    # 0.01 MB: 7 query rows per chunk against the 300-row bank
    distances, indices = nearest_neighbours(queries, bank, k, memory_budget_mb=0.01)
    assert distances.shape == indices.shape == (257, k)
    assert torch.equal(indices, expected.indices)
    assert torch.allclose(distances.double(), expected.values, atol=1e-4)
    with pytest.raises(ValueError, match="nearest-neighbour search"):
        nearest_neighbours(queries, bank, k, memory_budget_mb=1e-4)


def test_bfloat16_candidates_find_the_exact_nearest_row_and_its_float32_distance():
    # clustered data, as patch features are: many bank rows at similar distances from a query
    generator = torch.Generator().manual_seed(3)
    centres = torch.randn(20, 64, generator=generator) * 3
    bank = centres[torch.randint(0, 20, (2000,), generator=generator)] + torch.randn(2000, 64, generator=generator)
    queries = centres[torch.randint(0, 20, (3000,), generator=generator)] + torch.randn(3000, 64, generator=generator)
    exact_distances, exact_indices = nearest_neighbours(queries, bank, 1, memory_budget_mb=1)
    distances, indices = nearest_neighbours(queries, bank, 1, memory_budget_mb=1, candidates_dtype=torch.bfloat16)
    reference = torch.cdist(queries.double(), bank.double())
    # every reported distance is the float32 distance to the reported row, never a bfloat16 one
    assert torch.allclose(distances[:, 0].double(), reference.gather(1, indices).squeeze(1), rtol=1e-5)
    # an approximate search: here 2 of 3,000 nearest rows were not among the bfloat16 candidates; a missed
    # one is replaced by a row almost as near, so a distance is never below the exact one
    same = indices == exact_indices
    assert same.float().mean() >= 0.995
    assert torch.allclose(distances[same], exact_distances[same], rtol=1e-5)
    assert torch.all(distances >= exact_distances * (1 - 1e-5))
    assert torch.all(distances <= exact_distances * 1.01)
    # k > 1 (the image-score re-weighting) is always the exact search
    top3 = nearest_neighbours(queries[:50], bank, 3, memory_budget_mb=1, candidates_dtype=torch.bfloat16)
    assert torch.equal(top3[1], reference[:50].topk(3, largest=False).indices)
