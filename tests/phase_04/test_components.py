# tests/phase_04/test_components.py
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from anomaly_detection.models.components import (
    FittedBuffersMixin, gaussian_blur, quantile_normalization, quantiles, upsample_map,
)


def test_upsample_map_is_bilinear_without_corner_alignment_and_a_no_op_at_size():
    maps = torch.rand(2, 1, 4, 6)
    assert torch.equal(upsample_map(maps, (4, 6)), maps)
    expected = F.interpolate(maps, size=(8, 12), mode="bilinear", align_corners=False)
    assert torch.equal(upsample_map(maps, (8, 12)), expected)


def test_gaussian_blur_keeps_mass_and_matches_scipy():
    scipy_ndimage = pytest.importorskip("scipy.ndimage")
    maps = torch.rand(1, 1, 40, 36, dtype=torch.float64)
    blurred = gaussian_blur(maps, 2.0)
    reference = scipy_ndimage.gaussian_filter(maps[0, 0].numpy(), 2.0, mode="reflect", truncate=4.0)
    # scipy's "reflect" repeats the edge pixel (torch's "symmetric"); away from the border they agree
    assert torch.allclose(blurred[0, 0, 9:-9, 9:-9], torch.from_numpy(reference)[9:-9, 9:-9], atol=1e-10)
    assert torch.equal(gaussian_blur(maps, 0), maps)


@pytest.mark.parametrize("size", [(40, 36), (9, 30), (5, 5)])
def test_gaussian_blur_dense_and_convolution_paths_match_scipy_mirror_everywhere(size, monkeypatch):
    # scipy's "mirror" does not repeat the edge pixel, as torch's "reflect" padding: equal up to the borders;
    # (9, 30) and (5, 5) clip the 17-pixel radius to the shorter side
    scipy_ndimage = pytest.importorskip("scipy.ndimage")
    from anomaly_detection.models import components
    maps = torch.rand(2, 1, *size, dtype=torch.float64)
    dense = gaussian_blur(maps, 4.0)
    monkeypatch.setattr(components, "DENSE_BLUR_MAX_SIDE", 0)
    convolved = gaussian_blur(maps, 4.0)
    radius = min(16, size[0] - 1, size[1] - 1)
    reference = scipy_ndimage.gaussian_filter(maps[1, 0].numpy(), 4.0, mode="mirror", radius=radius)
    assert torch.allclose(dense, convolved, atol=1e-12)
    assert torch.allclose(dense[1, 0], torch.from_numpy(reference), atol=1e-10)


class Fitted(FittedBuffersMixin, nn.Module):
    fitted_buffers = ("bank",)

    def __init__(self, width=3):
        super().__init__()
        self.register_buffer("bank", torch.empty(0, width))
        self.loaded = 0

    def on_fitted_buffers_loaded(self):
        self.loaded += 1


def test_fitted_buffers_take_the_checkpoint_length_but_not_another_width():
    source = Fitted()
    source.bank = torch.rand(5, 3)
    target = Fitted()
    target.load_state_dict(source.state_dict())
    assert torch.equal(target.bank, source.bank) and target.loaded == 1
    with pytest.raises(RuntimeError, match="size mismatch for bank"):
        Fitted(width=4).load_state_dict(source.state_dict())


def test_quantile_normalization_maps_the_two_quantiles_to_zero_and_target():
    normal = torch.arange(1001, dtype=torch.float32)
    low, high = quantiles(normal, [0.9, 0.995])
    assert low.item() == pytest.approx(900.0) and high.item() == pytest.approx(995.0)
    scaled = quantile_normalization(torch.tensor([900.0, 995.0, 1090.0]), low, high, target=0.1)
    assert torch.allclose(scaled, torch.tensor([0.0, 0.1, 0.2]))


def test_quantiles_of_a_large_tensor_sample_within_tolerance():
    values = torch.rand(20_000_000, generator=torch.Generator().manual_seed(0))
    low, high = quantiles(values, [0.1, 0.9], max_samples=200_000)
    assert abs(low.item() - 0.1) < 0.005 and abs(high.item() - 0.9) < 0.005
