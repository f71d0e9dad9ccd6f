# src/anomaly_detection/models/patchcore/export.py
# PatchCore's scoring written with operations that export exactly (ONNX, OpenVINO, TorchScript tracing).
#
# The model's own scoring takes its chunk sizes from the batch (a Python loop over query rows, sized by
# model.memory_budget_mb) and pools channels with adaptive average pooling whose output size a traced graph
# cannot keep constant. A traced graph freezes such loops at the example batch size. Here the same numbers come
# from shapes fixed at export time: the loop runs over the memory bank (its size is fixed once fitted), keeping
# each query's running minimum, and the adaptive pooling is a product with its averaging matrix. The result
# equals the model's to float rounding (the export parity test holds it to 1e-4 relative on the scores).
import math

import torch
import torch.nn.functional as F
from torch import nn

from anomaly_detection.models.components import gaussian_blur, upsample_map

# bank rows per distance block: a block of 32 images x 1024 patches x 2048 rows is 256 MB of float32
BANK_CHUNK = 2048


def adaptive_pool_matrix(in_size, out_size):
    # adaptive average pooling of a length in_size axis to out_size, as a (out_size, in_size) matrix: bin i
    # averages [floor(i * in / out), ceil((i + 1) * in / out)), PyTorch's own bins
    matrix = torch.zeros(out_size, in_size)
    for i in range(out_size):
        start, end = (i * in_size) // out_size, math.ceil((i + 1) * in_size / out_size)
        matrix[i, start:end] = 1.0 / (end - start)
    return matrix


class ExportablePatchCore(nn.Module):
    def __init__(self, model, bank_chunk=BANK_CHUNK):
        super().__init__()
        if model.memory_bank.shape[0] == 0:
            raise RuntimeError("PatchCore has an empty memory bank: fit it before exporting")
        self.model = model
        self.bank_chunk = int(bank_chunk)
        # a Python int: the bank's size is fixed in the graph (its blocks are unrolled), not read from a shape
        self.bank_size = int(model.memory_bank.shape[0])
        self.register_buffer("bank_norms", model.memory_bank.pow(2).sum(1))
        channels = model.feature_extractor.channels
        self.patch_pools = nn.ParameterDict()
        if model.pretrain_dim is not None:
            for index, layer in enumerate(model.layers):
                if channels[layer] % model.pretrain_dim:
                    self.patch_pools[str(index)] = nn.Parameter(
                        adaptive_pool_matrix(channels[layer] * 9, model.pretrain_dim), requires_grad=False)
        concatenated = model.pretrain_dim * len(model.layers) if model.pretrain_dim is not None \
            else sum(channels[layer] for layer in model.layers)
        self.channel_pool = None
        if model.target_dim is not None and concatenated % model.target_dim:
            self.channel_pool = nn.Parameter(adaptive_pool_matrix(concatenated, model.target_dim),
                                             requires_grad=False)

    def embed(self, images):
        model = self.model
        features = model.feature_extractor(images)
        maps = [self.local_features(features[layer].float(), index) for index, layer in enumerate(model.layers)]
        size = maps[0].shape[-2:]
        maps = [maps[0]] + [upsample_map(m, size) for m in maps[1:]]
        return self.pool(torch.cat(maps, dim=1), model.target_dim, self.channel_pool)

    def local_features(self, feature, index):
        # the model's MeanMapper: each 3x3 neighbourhood pooled to pretrain_dim values
        if self.model.pretrain_dim is None:
            return F.avg_pool2d(feature, 3, stride=1, padding=1)
        if str(index) not in self.patch_pools:
            return self.pool(F.avg_pool2d(feature, 3, stride=1, padding=1), self.model.pretrain_dim, None)
        batch, _, height, width = feature.shape
        patches = F.unfold(feature, 3, padding=1)
        pooled = torch.matmul(self.patch_pools[str(index)], patches)
        return pooled.reshape(batch, self.model.pretrain_dim, height, width)

    @staticmethod
    def pool(feature, out_dim, matrix):
        batch, channels, height, width = feature.shape
        if out_dim is None or channels == out_dim:
            return feature
        if matrix is None:
            return feature.reshape(batch, out_dim, channels // out_dim, height, width).mean(2)
        return torch.matmul(matrix, feature.reshape(batch, channels, height * width)).reshape(
            batch, out_dim, height, width)

    def nearest(self, queries):
        # the nearest bank row of each query: blocks of the bank, a running minimum (first index on ties)
        bank = self.model.memory_bank
        query_norms = queries.pow(2).sum(1, keepdim=True)
        best, where = None, None
        for start in range(0, self.bank_size, self.bank_chunk):
            block = bank[start:start + self.bank_chunk]
            squared = torch.addmm(self.bank_norms[start:start + self.bank_chunk], queries, block.t(), alpha=-2.0)
            values, found = (squared + query_norms).min(dim=1)
            found = found + start
            if best is None:
                best, where = values, found
            else:
                better = values < best
                best, where = torch.where(better, values, best), torch.where(better, found, where)
        return best.clamp_min(0).sqrt(), where

    def forward(self, images):
        model = self.model
        embedding = self.embed(images)
        batch, dim, height, width = embedding.shape
        queries = embedding.permute(0, 2, 3, 1).reshape(-1, dim)
        distances, locations = self.nearest(queries)
        patch_scores = distances.view(batch, height * width)
        best_score, best_patch = patch_scores.max(dim=1)
        anomaly_map = upsample_map(patch_scores.view(batch, 1, height, width), images.shape[-2:])
        anomaly_map = gaussian_blur(anomaly_map, model.blur_sigma)
        if model.num_neighbors == 1:
            return {"anomaly_map": anomaly_map, "pred_score": best_score}
        # the paper's re-weighting, as PatchCoreModel.image_scores: the bank's num_neighbors rows nearest
        # to the best patch's nearest row (that row first), and the softmax of the test patch's distances to them
        test_patch = torch.gather(queries.view(batch, height * width, dim), 1,
                                  best_patch.view(batch, 1, 1).expand(batch, 1, dim)).squeeze(1)
        nearest_row = torch.gather(locations.view(batch, height * width), 1, best_patch.view(batch, 1)).squeeze(1)
        nearest = model.memory_bank.index_select(0, nearest_row)
        count = min(model.num_neighbors, self.bank_size)
        squared = torch.addmm(self.bank_norms, nearest, model.memory_bank.t(), alpha=-2.0)
        _, support = (squared + nearest.pow(2).sum(1, keepdim=True)).topk(count, dim=1, largest=False)
        neighbours = model.memory_bank.index_select(0, support.reshape(-1)).view(batch, count, dim)
        distances = torch.linalg.vector_norm(neighbours - test_patch[:, None], dim=2)
        weights = 1.0 - torch.softmax(distances, dim=1)[:, 0]
        return {"anomaly_map": anomaly_map, "pred_score": weights * best_score}
