# tests/phase_04/test_patchcore.py
import math

import pytest
import torch
import torch.nn.functional as F

from anomaly_detection.config import load_experiment_config
from anomaly_detection.models.patchcore import PatchCoreModel, PatchCoreTrainer
from anomaly_detection.models.components import gaussian_blur
from anomaly_detection.models.patchcore.patchcore import FeatureStore, pool_channels

IMAGE_SIZE = 64


def build(**options):
    torch.manual_seed(0)
    settings = {"backbone": "resnet18", "pretrained": False}
    settings.update(options)
    return PatchCoreModel(**settings)


@pytest.fixture(scope="module")
def fitted(texture, fit_model):
    return fit_model(build(), texture.train_loader())


def official_mean_mapper(feature, out_dim):
    # the official code's PatchMaker.patchify + MeanMapper, written out plainly
    batch, channels, height, width = feature.shape
    patches = F.unfold(feature, 3, padding=1).reshape(batch, channels, 3, 3, height * width)
    patches = patches.permute(0, 4, 1, 2, 3).reshape(batch * height * width, 1, channels * 9)
    pooled = F.adaptive_avg_pool1d(patches, out_dim).reshape(batch, height, width, out_dim)
    return pooled.permute(0, 3, 1, 2)


def test_eval_output_shapes(fitted, texture):
    images = texture.test_batch["image"][:3]
    with torch.no_grad():
        outputs = fitted(images)
    assert outputs["anomaly_map"].shape == (3, 1, IMAGE_SIZE, IMAGE_SIZE)
    assert outputs["pred_score"].shape == (3,)
    assert torch.isfinite(outputs["anomaly_map"]).all() and (outputs["pred_score"] >= 0).all()


def test_fit_keeps_coreset_ratio_of_the_patches(fitted, texture):
    patches = len(texture.train) * (IMAGE_SIZE // 8) ** 2
    assert fitted.memory_bank.shape == (int(patches * 0.1), 1024)
    assert fitted.fit_timings["num_patches"] == patches


def test_every_defect_scores_above_every_good_image(fitted, texture):
    batch = texture.test_batch
    with torch.no_grad():
        outputs = fitted(batch["image"])
    scores, labels = outputs["pred_score"], batch["label"]
    assert scores[labels == 1].min() > scores[labels == 0].max()
    masks = batch["mask"] > 0.5
    maps = outputs["anomaly_map"]
    # the map points at the defect: higher inside the mask than outside, image by image
    for index in torch.nonzero(labels == 1).flatten():
        assert maps[index][masks[index]].mean() > maps[index][~masks[index]].mean()


def test_state_dict_round_trip_gives_identical_scores(fitted, texture):
    restored = build(pretrained=False)
    torch.manual_seed(123)
    restored.load_state_dict(fitted.state_dict())
    restored.eval()
    images = texture.test_batch["image"]
    with torch.no_grad():
        expected, got = fitted(images), restored(images)
    assert torch.equal(restored.memory_bank, fitted.memory_bank)
    assert torch.equal(got["pred_score"], expected["pred_score"])
    assert torch.equal(got["anomaly_map"], expected["anomaly_map"])


def test_fit_twice_with_same_seed_gives_identical_memory_bank(texture, fit_model):
    first = fit_model(build(seed=5), texture.train_loader())
    second = fit_model(build(seed=5), texture.train_loader(batch_size=3))
    assert torch.equal(first.memory_bank, second.memory_bank)


def test_local_features_follow_the_official_two_stage_projection():
    model = build(pretrain_dim=24, target_dim=20)
    feature = torch.randn(2, 10, 5, 6)
    # 10 channels * 9 = 90 values pooled to 24: bins straddle channels, the general path
    assert torch.allclose(model.local_features(feature), official_mean_mapper(feature, 24), atol=1e-6)
    # 90 values to 120: more bins than values, as for EfficientNet-Lite0's 40-channel blocks.2
    model.pretrain_dim = 120
    assert torch.allclose(model.local_features(feature), official_mean_mapper(feature, 120), atol=1e-6)
    # 10 channels to 5: whole neighbourhoods of two channels per bin, the fast path
    model.pretrain_dim = 5
    assert torch.allclose(model.local_features(feature), official_mean_mapper(feature, 5), atol=1e-6)
    stacked = torch.randn(2, 48, 5, 6)
    expected = F.adaptive_avg_pool1d(stacked.permute(0, 2, 3, 1).reshape(-1, 1, 48), 20)
    assert torch.allclose(pool_channels(stacked, 20), expected.reshape(2, 5, 6, 20).permute(0, 3, 1, 2), atol=1e-6)


def test_embedding_sizes():
    images = torch.rand(2, 3, 64, 64)
    assert build().embed(images).shape == (2, 1024, 8, 8)
    assert build(pretrain_dim=None, target_dim=None).embed(images).shape == (2, 128 + 256, 8, 8)
    plain = build(pretrain_dim=None, target_dim=None).embed(images)
    # without the projections the embedding is the 3x3 average of layer2 and upsampled layer3
    features = build(pretrain_dim=None, target_dim=None).feature_extractor(images)
    layer2 = F.avg_pool2d(features["layer2"], 3, 1, 1)
    assert torch.allclose(plain[:, :128], layer2, atol=1e-6)


def test_image_score_reweighting_matches_the_paper(fitted, texture):
    images = texture.test_batch["image"][:2]
    with torch.no_grad():
        embedding = fitted.embed(images)
        queries = embedding.permute(0, 2, 3, 1).reshape(2, -1, embedding.shape[1])
        scores = fitted(images)["pred_score"]
    bank = fitted.memory_bank.double()
    for image in range(2):
        distances = torch.cdist(queries[image].double(), bank)
        patch_scores, nearest = distances.min(1)
        star = int(patch_scores.argmax())
        m_star = bank[nearest[star]]
        support = torch.cdist(m_star[None], bank)[0].topk(9, largest=False).indices
        to_support = torch.linalg.vector_norm(bank[support] - queries[image, star].double(), dim=1)
        weight = 1 - math.exp(to_support[0].item()) / torch.exp(to_support).sum().item()
        assert scores[image].item() == pytest.approx(weight * patch_scores[star].item(), rel=1e-4)
    plain = build(num_neighbors=1)
    plain.load_state_dict(fitted.state_dict())
    with torch.no_grad():
        maximum = plain.eval()(images)
    assert torch.allclose(maximum["pred_score"], maximum["anomaly_map"].new_tensor(
        [torch.cdist(queries[i].double(), bank).min(1).values.max().item() for i in range(2)]).float(), rtol=1e-4)


def test_feature_store_is_one_buffer_grown_by_doubling():
    store = FeatureStore(4, torch.float32, torch.device("cpu"), expected_images=3)
    store.append(torch.randn(2, 4, 2, 2))
    assert store.buffer.shape == (12, 4)
    buffer = store.buffer
    store.append(torch.randn(1, 4, 2, 2))
    assert store.buffer is buffer and store.size == 12
    rows = torch.randn(2, 4, 2, 2)
    store.append(rows)
    assert store.buffer.shape == (24, 4) and store.size == 20
    assert torch.equal(store.features()[12:], rows.permute(0, 2, 3, 1).reshape(-1, 4))


def test_half_precision_feature_store_fits(texture, fit_model):
    model = fit_model(build(feature_dtype="float16"), texture.train_loader())
    assert model.memory_bank.dtype == torch.float32 and model.memory_bank.shape[0] == 51


def test_blur_kernel_and_small_maps():
    impulse = torch.zeros(1, 1, 41, 41)
    impulse[0, 0, 20, 20] = 1.0
    blurred = gaussian_blur(impulse, 4.0)
    assert blurred.sum().item() == pytest.approx(1.0, abs=1e-5)
    # radius int(4 * 4 + 0.5) = 16: the kernel reaches exactly 16 pixels out
    assert blurred[0, 0, 20, 4] > 0 and blurred[0, 0, 20, 3] == 0
    assert gaussian_blur(torch.rand(1, 1, 8, 8), 4.0).shape == (1, 1, 8, 8)


@pytest.mark.parametrize("ratio", [0.0, -0.1, 1.5])
def test_coreset_ratio_outside_zero_one_is_rejected(ratio):
    with pytest.raises(ValueError, match="coreset_ratio"):
        build(coreset_ratio=ratio)


def test_ratio_one_keeps_every_patch(texture, fit_model):
    model = fit_model(build(coreset_ratio=1.0), texture.train_loader())
    assert model.memory_bank.shape[0] == len(texture.train) * 64


def test_fewer_patches_than_neighbors_is_an_error():
    model = build(num_neighbors=9)
    model.begin_fit()
    model.accumulate(torch.rand(2, 3, 16, 16))
    with pytest.raises(ValueError, match="fewer than model.num_neighbors=9"):
        model.finalize_fit()


def test_coreset_smaller_than_neighbors_is_clamped_with_a_warning():
    model = build(num_neighbors=9, coreset_ratio=0.1)
    model.begin_fit()
    model.accumulate(torch.rand(2, 3, 32, 32))
    with pytest.warns(UserWarning, match="keeping 9 patches"):
        model.finalize_fit()
    assert model.memory_bank.shape[0] == 9


def test_memory_budget_too_small_for_one_chunk(texture):
    model = build(memory_budget_mb=1e-5)
    model.begin_fit()
    model.accumulate(torch.rand(2, 3, 64, 64))
    with pytest.raises(ValueError, match=r"model.memory_budget_mb=1e-05 is too small .* at least"):
        model.finalize_fit()


@pytest.mark.parametrize("key, value", [("memory_budget_mb", 0), ("num_neighbors", 0), ("target_dim", 0),
                                        ("feature_dtype", "int8"), ("search_backend", "annoy")])
def test_bad_options(key, value):
    with pytest.raises(ValueError, match=key):
        build(**{key: value})


def test_faiss_backend_without_faiss_is_a_clear_error():
    try:
        import faiss  # noqa: F401
        pytest.skip("faiss is installed")
    except ImportError:
        pass
    with pytest.raises(ValueError, match="faiss is not installed"):
        build(search_backend="faiss")
    assert build(search_backend="auto").search_backend == "torch"


def test_unfitted_model_refuses_to_score():
    with pytest.raises(RuntimeError, match="empty memory bank"):
        build().eval()(torch.rand(1, 3, 32, 32))


def test_trainer_fills_checkpoint_without_gradient_step(texture, tmp_path):
    model = build()
    trainer = PatchCoreTrainer(model, device="cpu", checkpoint_dir=tmp_path, progress_bar=False)
    assert trainer.configure_optimizers() is None
    history = trainer.fit(texture.train_loader(), None, num_epochs=1)
    assert trainer.optimizer is None and len(history) == 1
    assert set(trainer.fit_timings) >= {"extract_s", "coreset_s", "data_s", "finalize_s", "total_s"}
    state = torch.load(tmp_path / "last.pt", map_location="cpu", weights_only=True)
    assert state["model"]["memory_bank"].shape == model.memory_bank.shape
    assert (tmp_path / "best.pt").is_file()
    config = load_experiment_config("patchcore", "mvtec", ["model.backbone=resnet18"])
    restored = PatchCoreTrainer.build_model(config, pretrained=False)
    restored.load_state_dict(state["model"])
    assert torch.equal(restored.memory_bank, model.memory_bank)


def test_faiss_backend_matches_torch(fitted, texture):
    pytest.importorskip("faiss")
    searcher = build(search_backend="faiss")
    searcher.load_state_dict(fitted.state_dict())
    images = texture.test_batch["image"]
    with torch.no_grad():
        expected, got = fitted(images), searcher.eval()(images)
    assert torch.allclose(got["pred_score"], expected["pred_score"], rtol=1e-4)
    assert torch.allclose(got["anomaly_map"], expected["anomaly_map"], rtol=1e-4, atol=1e-4)


def test_bfloat16_search_precision_scores_as_the_exact_search(fitted, texture):
    images = texture.test_batch["image"]
    approximate = build(search_precision="bfloat16")
    approximate.load_state_dict(fitted.state_dict())
    approximate.eval()
    with torch.no_grad():
        exact_out, approximate_out = fitted(images), approximate(images)
    # where the CPU lacks bfloat16 units the model falls back to the exact search: equal either way here
    assert torch.allclose(approximate_out["pred_score"], exact_out["pred_score"], rtol=1e-4)
    assert torch.allclose(approximate_out["anomaly_map"], exact_out["anomaly_map"], rtol=1e-4, atol=1e-5)


def test_search_precision_is_checked():
    with pytest.raises(ValueError, match="search_precision must be one of float32, bfloat16, got 'float16'"):
        build(search_precision="float16")
    with pytest.raises(ValueError, match="search_precision=bfloat16 is the torch search's"):
        build(search_precision="bfloat16", search_backend="faiss")
