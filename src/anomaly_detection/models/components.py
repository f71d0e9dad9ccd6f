# src/anomaly_detection/models/components.py
import torch
import torch.nn.functional as F
from torch import nn


def upsample_map(maps, size):
    # bilinear without corner alignment, as every method here upsamples its patch scores to the input size
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    return F.interpolate(maps, size=tuple(size), mode="bilinear", align_corners=False)


def map_output(anomaly_map):
    # a model's eval output where each image's score is the maximum of its anomaly map
    return {"anomaly_map": anomaly_map, "pred_score": anomaly_map.flatten(1).amax(dim=1)}


def map_in_chunks(function, images, chunk_size):
    # a model's eval-mode scoring a few images at a time: its backbone's first maps are large, and the peak
    # memory of a test batch follows the chunk, not the batch
    return torch.cat([function(chunk) for chunk in images.split(chunk_size)])


class WholeBatchScore(nn.Module):
    # what `anomaly-detection export` traces for a model that scores in chunks (map_in_chunks): its score() on the
    # whole batch in one pass, since a traced graph would freeze the number of chunks at the example batch size
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, images):
        return map_output(self.model.score(images))


def mean_in_chunks(function, images, chunk_size):
    # the batch mean of a per-image mean (a validation loss in eval mode) computed in chunks: each chunk's mean
    # weighted by its size
    return sum(function(chunk) * chunk.shape[0] for chunk in images.split(chunk_size)) / images.shape[0]


def gaussian_blur(maps, sigma):
    # separable, 4-sigma radius, reflect padding (scipy's mode "mirror": the edge pixel is not repeated)
    if sigma <= 0:
        return maps
    height, width = maps.shape[-2:]
    radius = min(int(4.0 * sigma + 0.5), height - 1, width - 1)
    if radius < 1:
        return maps
    if max(height, width) <= DENSE_BLUR_MAX_SIDE:
        rows = blur_matrix(height, sigma, radius, maps.dtype, maps.device)
        columns = blur_matrix(width, sigma, radius, maps.dtype, maps.device)
        return rows @ maps @ columns.t()
    kernel = gaussian_kernel(sigma, radius, maps.dtype, maps.device)
    padded = F.pad(maps, (radius, radius, radius, radius), mode="reflect")
    blurred = F.conv2d(padded, kernel.view(1, 1, 1, -1))
    return F.conv2d(blurred, kernel.view(1, 1, -1, 1))


# Blurring each axis as a product with a banded n x n matrix (the reflect padding folded into it) does n
# multiply-adds per pixel instead of the kernel's 2 * radius + 1, yet on CPU it measured 0.07x (128 px) to 0.3x
# (1024 px) of the time of the two single-channel convolutions, which oneDNN runs slowly; larger maps convolve.
DENSE_BLUR_MAX_SIDE = 1024


def gaussian_kernel(sigma, radius, dtype, device):
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64, device=device)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    return (kernel / kernel.sum()).to(dtype)


def blur_matrix(size, sigma, radius, dtype, device):
    # row i holds the kernel's weights at the source pixels of output pixel i, the ones beyond an edge
    # reflected back inside it
    sources = torch.arange(size, device=device)[:, None] + torch.arange(-radius, radius + 1, device=device)[None]
    sources = sources.abs()
    sources = torch.where(sources > size - 1, 2 * (size - 1) - sources, sources)
    weights = gaussian_kernel(sigma, radius, torch.float64, device).expand(size, -1)
    matrix = torch.zeros(size, size, dtype=torch.float64, device=device)
    return matrix.scatter_add_(1, sources, weights).to(dtype)


def tensor_version(tensor):
    # the in-place modification counter, which tells a cached derivative of a tensor that the tensor changed;
    # tensors made under torch.inference_mode() have none (and cannot change outside it)
    try:
        return tensor._version
    except RuntimeError:
        return None


def resize_fitted_buffers(module, state_dict, prefix, names):
    # Buffers whose size is only known after fitting (a memory bank, per-position Gaussians) start with a
    # zero-length axis; before load_state_dict copies into them they take the checkpoint's length there.
    # Every other axis must already agree, so a bank of another width still fails as a size mismatch.
    for name in names:
        value = state_dict.get(prefix + name)
        current = getattr(module, name)
        if not isinstance(value, torch.Tensor) or value.dim() != current.dim():
            continue
        if all(have in (0, want) for have, want in zip(current.shape, value.shape)):
            setattr(module, name, torch.empty_like(value, dtype=current.dtype, device=current.device))


class FittedBuffersMixin:
    # For nn.Modules that list such buffers in `fitted_buffers`.
    fitted_buffers = ()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        resize_fitted_buffers(self, state_dict, prefix, self.fitted_buffers)
        self.on_fitted_buffers_loaded()
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def on_fitted_buffers_loaded(self):
        pass


def quantile_normalization(values, low, high, target=1.0):
    # maps the normal data's `low` quantile to 0 and its `high` quantile to `target` (0.9 -> 0 and 0.995 -> 0.1
    # in the millisecond-latency student-teacher paper); values outside stay outside, so an anomaly keeps its margin
    scale = torch.as_tensor(high, dtype=values.dtype, device=values.device) - low
    return target * (values - low) / scale.clamp_min(torch.finfo(values.dtype).eps)


def quantiles(values, q, max_samples=1_000_000, seed=0):
    # torch.quantile refuses inputs over 16M elements: a seeded random sample of that size keeps the
    # estimate within sampling error and the memory bounded
    flat = values.reshape(-1).float()
    if flat.numel() > max_samples:
        generator = torch.Generator(device="cpu").manual_seed(int(seed))
        index = torch.randint(flat.numel(), (int(max_samples),), generator=generator).to(flat.device)
        flat = flat[index]
    q = torch.as_tensor(q, dtype=flat.dtype, device=flat.device)
    return torch.quantile(flat, q)
