# src/anomaly_detection/models/patchcore/patchcore.py
"""PatchCore: Roth et al., "Towards Total Recall in Industrial Anomaly Detection" (CVPR 2022)."""
import logging
import time
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from anomaly_detection import distributed
from anomaly_detection.config import FROM_YAML, fill_from_yaml
from anomaly_detection.models.backbones import FeatureExtractor, layers_or_default
from anomaly_detection.models.components import FittedBuffersMixin, gaussian_blur, upsample_map
from anomaly_detection.models.patchcore.coreset import greedy_coreset_indices
from anomaly_detection.models.patchcore.search import PreparedBank, nearest_neighbours
from anomaly_detection.models.patchcore.sharded_search import ShardedBank
from anomaly_detection.utils import cpu_has_native_bf16

logger = logging.getLogger(__name__)

# model.layers: null takes these: the two middle stages, as in the paper (wide_resnet50_2 layer2, layer3)
RESNET_LAYERS = ["layer2", "layer3"]
DEFAULT_LAYERS = dict.fromkeys(("resnet18", "resnet50", "wide_resnet50_2"), RESNET_LAYERS)
DEFAULT_LAYERS.update(mobilenet_v2=["features.6", "features.13"],
                      tf_efficientnet_lite0=["blocks.2", "blocks.4"])

FEATURE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
SEARCH_BACKENDS = ("auto", "torch", "faiss")
SEARCH_PRECISIONS = {"float32": None, "bfloat16": torch.bfloat16}


class PatchCoreModel(FittedBuffersMixin, nn.Module):
    default_layers = DEFAULT_LAYERS
    # the bank's size is only known after fitting
    fitted_buffers = ("memory_bank",)

    def __init__(self, backbone=FROM_YAML, layers=FROM_YAML, pretrained=FROM_YAML, weights=FROM_YAML,
                 backbone_root=None, pretrain_dim=FROM_YAML, target_dim=FROM_YAML, coreset_ratio=FROM_YAML,
                 num_neighbors=FROM_YAML, projection_dim=FROM_YAML, memory_budget_mb=FROM_YAML,
                 feature_dtype=FROM_YAML, search_backend=FROM_YAML, seed=0, blur_sigma=FROM_YAML,
                 sharded_search=FROM_YAML, search_precision=FROM_YAML):
        super().__init__()
        args = fill_from_yaml("patchcore", "model", {
            "backbone": backbone, "layers": layers, "pretrained": pretrained, "weights": weights,
            "pretrain_dim": pretrain_dim, "target_dim": target_dim, "coreset_ratio": coreset_ratio,
            "num_neighbors": num_neighbors, "projection_dim": projection_dim, "memory_budget_mb": memory_budget_mb,
            "feature_dtype": feature_dtype, "search_backend": search_backend, "blur_sigma": blur_sigma,
            "sharded_search": sharded_search, "search_precision": search_precision})
        backbone, pretrain_dim, target_dim = args["backbone"], args["pretrain_dim"], args["target_dim"]
        coreset_ratio, num_neighbors = args["coreset_ratio"], args["num_neighbors"]
        projection_dim = args["projection_dim"]
        memory_budget_mb, feature_dtype = args["memory_budget_mb"], args["feature_dtype"]
        search_backend = args["search_backend"]
        if not 0.0 < float(coreset_ratio) <= 1.0:
            raise ValueError(f"model.coreset_ratio must be in (0, 1], got {coreset_ratio}")
        if int(num_neighbors) < 1:
            raise ValueError(f"model.num_neighbors must be >= 1, got {num_neighbors}")
        if not float(memory_budget_mb) > 0:
            raise ValueError(f"model.memory_budget_mb must be > 0, got {memory_budget_mb}")
        for key, value in (("pretrain_dim", pretrain_dim), ("target_dim", target_dim),
                           ("projection_dim", projection_dim)):
            if value is not None and int(value) < 1:
                raise ValueError(f"model.{key} must be a positive integer or null, got {value}")
        if feature_dtype not in FEATURE_DTYPES:
            raise ValueError(f"model.feature_dtype must be one of {', '.join(FEATURE_DTYPES)}, got {feature_dtype}")
        if search_backend not in SEARCH_BACKENDS:
            raise ValueError(f"model.search_backend must be one of {', '.join(SEARCH_BACKENDS)}, got {search_backend}")
        if args["search_precision"] not in SEARCH_PRECISIONS:
            raise ValueError(f"model.search_precision must be one of {', '.join(SEARCH_PRECISIONS)}, "
                             f"got {args['search_precision']!r}")
        if args["search_precision"] != "float32" and search_backend == "faiss":
            raise ValueError(f"model.search_precision={args['search_precision']} is the torch search's: "
                             "use model.search_backend torch or auto, or search_precision float32")
        if not isinstance(args["sharded_search"], bool):
            raise ValueError(f"model.sharded_search must be true or false, got {args['sharded_search']!r}")
        if args["sharded_search"] and search_backend == "faiss":
            raise ValueError("model.sharded_search=true searches each process's block with torch: "
                             "use model.search_backend torch or auto")
        self.feature_extractor = FeatureExtractor(
            backbone, layers_or_default(backbone, args["layers"], DEFAULT_LAYERS, "PatchCore"),
            pretrained=args["pretrained"], weights=args["weights"], backbone_root=backbone_root, frozen=True)
        self.backbone_name = backbone
        self.layers = list(self.feature_extractor.layers)
        self.mean, self.std = self.feature_extractor.mean, self.feature_extractor.std
        self.pretrain_dim = None if pretrain_dim is None else int(pretrain_dim)
        self.target_dim = None if target_dim is None else int(target_dim)
        self.coreset_ratio = float(coreset_ratio)
        self.num_neighbors = int(num_neighbors)
        self.projection_dim = None if projection_dim is None else int(projection_dim)
        self.memory_budget_mb = float(memory_budget_mb)
        self.feature_dtype = FEATURE_DTYPES[feature_dtype]
        self.sharded_search = args["sharded_search"]
        self.search_backend = "torch" if self.sharded_search else resolve_search_backend(search_backend)
        self.search_precision = args["search_precision"]
        self.seed = int(seed)
        self.blur_sigma = float(args["blur_sigma"])
        self.embedding_dim = self._embedding_dim()
        self.register_buffer("memory_bank", torch.empty(0, self.embedding_dim))
        self.store = None
        self.fit_timings = {}
        self._faiss_index = None
        self._sharded = None
        self._prepared = None
        self._warned_precision = False

    def _embedding_dim(self):
        if self.target_dim is not None:
            return self.target_dim
        if self.pretrain_dim is not None:
            return self.pretrain_dim * len(self.layers)
        return sum(self.feature_extractor.channels.values())

    # ---- patch embedding -------------------------------------------------------------------------
    def embed(self, images):
        with torch.no_grad():
            features = self.feature_extractor(images)
            maps = [self.local_features(features[layer].float()) for layer in self.layers]
            size = maps[0].shape[-2:]
            # deeper maps are upsampled to the first (finest) layer's patch grid, as the official code does
            maps = [maps[0]] + [upsample_map(m, size) for m in maps[1:]]
            return pool_channels(torch.cat(maps, dim=1), self.target_dim)

    def local_features(self, feature):
        # the official "MeanMapper": each 3x3 neighbourhood, flattened in (channel, row, column) order,
        # adaptive-average-pooled to pretrain_dim values; without pretrain_dim a plain 3x3 average
        batch, channels, height, width = feature.shape
        if self.pretrain_dim is None:
            return F.avg_pool2d(feature, 3, stride=1, padding=1)
        if channels % self.pretrain_dim == 0:
            # each bin then holds whole neighbourhoods of channels // pretrain_dim channels: same result, 9x less memory
            pooled = F.avg_pool2d(feature, 3, stride=1, padding=1)
            return pool_channels(pooled, self.pretrain_dim)
        per_image = channels * 9 * height * width * 4
        step = max(1, int(self.memory_budget_mb * 1024 * 1024 // (2 * per_image)))
        parts = []
        for start in range(0, batch, step):
            patches = F.unfold(feature[start:start + step], 3, padding=1)
            pooled = F.adaptive_avg_pool2d(patches.unsqueeze(1), (self.pretrain_dim, height * width))
            parts.append(pooled.reshape(-1, self.pretrain_dim, height, width))
        return torch.cat(parts) if len(parts) > 1 else parts[0]

    # ---- fitting: one pass over the training images ---------------------------------------------
    def begin_fit(self, expected_images=None):
        self.store = FeatureStore(self.embedding_dim, self.feature_dtype, self.memory_bank.device, expected_images)
        self.fit_timings = {"extract_s": 0.0}

    def accumulate(self, images):
        if self.store is None:
            self.begin_fit()
        started = time.perf_counter()
        embedding = self.embed(images)
        self.store.append(embedding)
        synchronize(embedding.device)
        self.fit_timings["extract_s"] += time.perf_counter() - started

    def coreset_size(self, num_patches):
        size = int(num_patches * self.coreset_ratio)
        if num_patches < self.num_neighbors:
            raise ValueError(f"PatchCore has {num_patches} training patches, fewer than model.num_neighbors="
                             f"{self.num_neighbors}: use more or larger training images, or lower num_neighbors")
        if size < self.num_neighbors:
            warnings.warn(f"coreset_ratio {self.coreset_ratio} of {num_patches} patches gives {size}, fewer than "
                          f"num_neighbors={self.num_neighbors}: keeping {self.num_neighbors} patches")
            size = self.num_neighbors
        return size

    def finalize_fit(self):
        if self.store is None or self.store.size == 0:
            raise RuntimeError("PatchCore saw no training images: call accumulate(images) before finalize_fit()")
        started = time.perf_counter()
        features, images = self.gathered_features()
        bank = None
        if features is not None:
            size = self.coreset_size(features.shape[0])
            if size < features.shape[0]:
                indices = greedy_coreset_indices(features, size, self.projection_dim, self.seed,
                                                 self.memory_budget_mb)
                bank = features.index_select(0, indices).float()
            else:
                bank = features.to(torch.float32, copy=True)
        # under torchrun the first process selected the coreset; every process gets the bank
        bank = distributed.broadcast_tensor(bank).to(self.memory_bank.device)
        synchronize(bank.device)
        coreset_s = time.perf_counter() - started
        self.memory_bank = bank
        self._faiss_index = None
        self._sharded = None
        self._prepared = None
        self.fit_timings.update({"num_images": images, "num_patches": distributed.broadcast_object(
            None if features is None else int(features.shape[0])), "memory_bank_size": int(bank.shape[0]),
            "coreset_s": coreset_s})
        self.store = None
        return self.fit_timings

    def gathered_features(self):
        # One process: its patches. Under torchrun: every process's patches on the first one (None elsewhere), put
        # back in the images' order (process r read the dataset's batches r, r + N, ...: distributed.ShardSampler),
        # so the coreset is selected once, from the features one process would have stored. The first process
        # then holds every training patch, as one process would (twice over while the shares are merged): its
        # memory, not the number of processes, bounds the training set; the bank itself is coreset_ratio of it.
        features, images = self.store.features(), self.store.images
        if not distributed.active():
            return features, images
        batch_images = distributed.all_gather_objects(self.store.batch_images)
        parts = distributed.gather_rows(features)
        if parts is None:
            return None, sum(map(sum, batch_images))
        per_image = features.shape[0] // max(1, images)
        batches = []
        for part, counts in zip(parts, batch_images):
            batches.append(list(part.split([count * per_image for count in counts])))
        merged = torch.cat(distributed.interleave_batches(batches))
        return merged, sum(map(sum, batch_images))

    def on_fitted_buffers_loaded(self):
        self._faiss_index = None
        self._sharded = None
        self._prepared = None

    @property
    def collective_forward(self):
        # under torchrun with model.sharded_search every process takes part in every search: the evaluator must
        # then run every process over the same images
        return self.sharded_search and distributed.active()

    def sharded_bank(self):
        # built at the first search after a fit or a load: this process keeps its block of the bank and, unless
        # it is the first (which saves the checkpoints), frees the whole one
        if self._sharded is None:
            self._sharded = ShardedBank(self.memory_bank, self.search_block)
            if not distributed.is_main():
                self.memory_bank = self.memory_bank[:0].clone()
        return self._sharded

    # ---- scoring -----------------------------------------------------------------------------------
    def forward(self, images):
        embedding = self.embed(images)
        if self.training:
            return embedding
        if self.bank_size() == 0:
            raise RuntimeError("PatchCore has an empty memory bank: fit it on normal images first")
        batch, dim, height, width = embedding.shape
        queries = embedding.permute(0, 2, 3, 1).reshape(-1, dim)
        distances, locations = self.search(queries, 1)
        patch_scores = distances[:, 0].view(batch, height * width)
        pred_score = self.image_scores(patch_scores, locations[:, 0].view(batch, -1), queries.view(batch, -1, dim))
        anomaly_map = upsample_map(patch_scores.view(batch, 1, height, width), images.shape[-2:])
        return {"anomaly_map": gaussian_blur(anomaly_map, self.blur_sigma), "pred_score": pred_score}

    def image_scores(self, patch_scores, locations, queries):
        best_score, best_patch = patch_scores.max(dim=1)
        if self.num_neighbors == 1:
            return best_score
        rows = torch.arange(patch_scores.shape[0], device=patch_scores.device)
        test_patch = queries[rows, best_patch]
        nearest = self.bank_rows(locations[rows, best_patch])
        # the paper's re-weighting: w = 1 - exp|m_test - m*| / sum over N_b(m*) of exp|m_test - m|;
        # N_b(m*) holds m* itself first, and softmax keeps the exponentials finite
        _, support = self.search(nearest, min(self.num_neighbors, self.bank_size()))
        distances = torch.linalg.vector_norm(self.bank_rows(support) - test_patch[:, None], dim=2)
        weights = 1.0 - torch.softmax(distances, dim=1)[:, 0]
        return weights * best_score

    def search(self, queries, k):
        if self.collective_forward:
            return self.sharded_bank().search(queries, k)
        if self.search_backend == "faiss":
            return self._faiss_search(queries, k)
        return self.search_block(queries, self.memory_bank, k)

    def search_block(self, queries, bank, k):
        # the bank's search form is made once, at the first search after a fit, a load or a move
        if self._prepared is None or not self._prepared.matches(bank):
            self._prepared = PreparedBank(bank)
        return nearest_neighbours(queries, bank, k, self.memory_budget_mb, self.candidates_dtype(queries.device),
                                  self._prepared)

    def candidates_dtype(self, device):
        # bfloat16 candidates pay only where the hardware multiplies bfloat16 natively; elsewhere the exact search
        dtype = SEARCH_PRECISIONS[self.search_precision]
        if dtype is None or device.type == "cuda" or (device.type == "cpu" and cpu_has_native_bf16()):
            return dtype
        if not self._warned_precision:
            logger.warning("model.search_precision=%s: this %s has no native bfloat16 support, searching in float32",
                           self.search_precision, device.type)
            self._warned_precision = True
        return None

    def bank_size(self):
        return self.sharded_bank().total if self.collective_forward else self.memory_bank.shape[0]

    def bank_rows(self, indices):
        return self.sharded_bank().rows(indices) if self.collective_forward else self.memory_bank[indices]

    def _faiss_search(self, queries, k):
        import faiss
        if self._faiss_index is None:
            self._faiss_index = faiss.IndexFlatL2(self.embedding_dim)
            self._faiss_index.add(self.memory_bank.detach().float().cpu().contiguous().numpy())
        squared, indices = self._faiss_index.search(queries.detach().float().cpu().contiguous().numpy(), k)
        squared = torch.from_numpy(squared).to(queries.device)
        return squared.clamp_min(0).sqrt(), torch.from_numpy(indices).to(queries.device)


class FeatureStore:
    # One preallocated buffer for the patch embeddings of the whole training set: sized from the first
    # batch and the expected number of images, doubled only if more images arrive than expected.
    def __init__(self, dim, dtype, device, expected_images=None):
        self.dim, self.dtype, self.device = dim, dtype, device
        self.expected_images = expected_images
        self.buffer = None
        self.size = 0
        self.images = 0
        self.batch_images = []  # images per appended batch, to put the shares of N processes back in order

    def append(self, embedding):
        batch, dim, height, width = embedding.shape
        rows = batch * height * width
        self._reserve(rows, height * width)
        target = self.buffer[self.size:self.size + rows].view(batch, height, width, dim)
        target.copy_(embedding.permute(0, 2, 3, 1))
        self.size += rows
        self.images += batch
        self.batch_images.append(batch)

    def _reserve(self, rows, per_image):
        needed = self.size + rows
        capacity = 0 if self.buffer is None else self.buffer.shape[0]
        if needed <= capacity:
            return
        if self.buffer is None and self.expected_images:
            capacity = max(needed, per_image * int(self.expected_images))
        else:
            capacity = max(needed, 2 * capacity)
        grown = torch.empty(capacity, self.dim, dtype=self.dtype, device=self.device)
        if self.size:
            grown[:self.size].copy_(self.buffer[:self.size])
        self.buffer = grown

    def features(self):
        return self.buffer[:self.size]


def pool_channels(feature, out_dim):
    # adaptive average pooling over the channel axis of a BxCxHxW map (the official "Aggregator")
    if out_dim is None:
        return feature
    batch, channels, height, width = feature.shape
    if channels == out_dim:
        return feature
    if channels % out_dim == 0:
        return feature.reshape(batch, out_dim, channels // out_dim, height, width).mean(2)
    pooled = F.adaptive_avg_pool2d(feature.reshape(batch, 1, channels, height * width), (out_dim, height * width))
    return pooled.view(batch, out_dim, height, width)


def resolve_search_backend(name):
    if name == "torch":
        return "torch"
    try:
        import faiss  # noqa: F401
    except ImportError:
        if name == "faiss":
            raise ValueError("model.search_backend=faiss but faiss is not installed: "
                             "pip install faiss-cpu, or use search_backend: torch") from None
        return "torch"
    return "faiss"


def synchronize(device):
    # timings only: CUDA work is asynchronous, so the clock must wait for it
    if device.type == "cuda":
        torch.cuda.synchronize(device)
