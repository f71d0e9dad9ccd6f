# src/anomaly_detection/models/components.py
import torch
import torch.nn.functional as F


def upsample_map(maps, size):
    # bilinear without corner alignment, as every method here upsamples its patch scores to the input size
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    return F.interpolate(maps, size=tuple(size), mode="bilinear", align_corners=False)


def gaussian_blur(maps, sigma):
    # separable, 4-sigma radius, reflect padding (scipy's mode "mirror": the edge pixel is not repeated);
    # torchvision's gaussian_blur convolves with the full 2-D kernel, 16x the work for sigma 4
    if sigma <= 0:
        return maps
    radius = min(int(4.0 * sigma + 0.5), maps.shape[-2] - 1, maps.shape[-1] - 1)
    if radius < 1:
        return maps
    offsets = torch.arange(-radius, radius + 1, dtype=maps.dtype, device=maps.device)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = kernel / kernel.sum()
    padded = F.pad(maps, (radius, radius, radius, radius), mode="reflect")
    blurred = F.conv2d(padded, kernel.view(1, 1, 1, -1))
    return F.conv2d(blurred, kernel.view(1, 1, -1, 1))


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
