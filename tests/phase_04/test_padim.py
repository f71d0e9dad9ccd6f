# tests/phase_04/test_padim.py
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from anomaly_detection.config import load_experiment_config
from anomaly_detection.models.padim import PaDiMModel, PaDiMTrainer

IMAGE_SIZE = 64


def build(**options):
    torch.manual_seed(0)
    settings = {"backbone": "resnet18", "pretrained": False}
    settings.update(options)
    return PaDiMModel(**settings)


@pytest.fixture(scope="module")
def fitted(texture, fit_model):
    return fit_model(build(), texture.train_loader())


def test_eval_output_shapes(fitted, texture):
    with torch.no_grad():
        outputs = fitted(texture.test_batch["image"][:3])
    assert outputs["anomaly_map"].shape == (3, 1, IMAGE_SIZE, IMAGE_SIZE)
    assert outputs["pred_score"].shape == (3,)
    assert torch.equal(outputs["pred_score"], outputs["anomaly_map"].flatten(1).amax(1))


def test_buffers_after_fit(fitted):
    positions = (IMAGE_SIZE // 4) ** 2
    assert fitted.feature_index.shape == (100,)
    assert fitted.gaussian_mean.shape == (100, positions)
    assert fitted.inv_covariance.shape == (positions, 100, 100)


def test_every_defect_scores_above_every_good_image(fitted, texture):
    batch = texture.test_batch
    with torch.no_grad():
        outputs = fitted(batch["image"])
    scores, labels = outputs["pred_score"], batch["label"]
    assert scores[labels == 1].min() > scores[labels == 0].max()
    masks = batch["mask"] > 0.5
    for index in torch.nonzero(labels == 1).flatten():
        assert outputs["anomaly_map"][index][masks[index]].mean() > outputs["anomaly_map"][index][~masks[index]].mean()


def test_gaussian_matches_numpy_cov_of_stacked_embeddings(texture):
    model = build(n_features=12)
    images = torch.stack([texture.train[i]["image"] for i in range(len(texture.train))])
    model.begin_fit()
    # uneven batches: the running sums must not depend on how the images are grouped
    for part in (images[:3], images[3:4], images[4:]):
        model.accumulate(part)
    model.finalize_fit()
    embedding = model.embed(images).double().flatten(2).numpy()
    for position in (0, 37, embedding.shape[2] - 1):
        vectors = embedding[:, :, position]
        covariance = np.cov(vectors, rowvar=False) + 0.01 * np.eye(12)
        assert np.allclose(model.gaussian_mean[:, position].numpy(), vectors.mean(0), atol=1e-5)
        assert np.allclose(model.inv_covariance[position].numpy(), np.linalg.inv(covariance), rtol=1e-4, atol=1e-4)


def test_embedding_is_nearest_upsampled_random_channel_subset():
    model = build(n_features=30)
    images = torch.rand(2, 3, 64, 64)
    features = model.feature_extractor(images)
    size = features["layer1"].shape[-2:]
    full = torch.cat([features["layer1"]] + [F.interpolate(features[name], size=size, mode="nearest")
                                             for name in ("layer2", "layer3")], dim=1)
    assert torch.allclose(model.embed(images), full.index_select(1, model.feature_index))


def test_channel_subset_is_seeded_and_saved(fitted):
    assert torch.equal(build(seed=3).feature_index, build(seed=3).feature_index)
    assert not torch.equal(build(seed=3).feature_index, build(seed=4).feature_index)
    assert "feature_index" in fitted.state_dict()


def test_state_dict_round_trip_gives_identical_scores(fitted, texture):
    restored = build()
    restored.load_state_dict(fitted.state_dict())
    restored.eval()
    images = texture.test_batch["image"]
    with torch.no_grad():
        expected, got = fitted(images), restored(images)
    assert torch.equal(got["pred_score"], expected["pred_score"])
    assert torch.equal(got["anomaly_map"], expected["anomaly_map"])


def test_fit_twice_gives_identical_statistics(texture, fit_model):
    first = fit_model(build(seed=9), texture.train_loader())
    second = fit_model(build(seed=9), texture.train_loader(batch_size=3))
    assert torch.allclose(first.inv_covariance, second.inv_covariance, rtol=1e-5, atol=1e-6)
    assert torch.allclose(first.gaussian_mean, second.gaussian_mean)


def test_n_features_larger_than_the_channels_is_rejected():
    # resnet18 layer1-3: 64 + 128 + 256 = 448 channels
    with pytest.raises(ValueError, match=r"model.n_features=449 must be in \[1, 448\]"):
        build(n_features=449)
    assert build(n_features=448).feature_index.tolist() == list(range(448))


def test_default_n_features_follow_the_paper():
    assert build().n_features == 100
    assert build(backbone="tf_efficientnet_lite0").n_features == 100


def test_one_training_image_is_not_enough():
    model = build()
    model.begin_fit()
    model.accumulate(torch.rand(1, 3, 32, 32))
    with pytest.raises(ValueError, match="at least 2 training images"):
        model.finalize_fit()


def test_unfitted_model_refuses_to_score():
    model = build()
    with pytest.raises(RuntimeError, match="no Gaussian statistics"):
        model.eval()(torch.rand(1, 3, 32, 32))


def test_trainer_checkpoint_restores_fitted_model(texture, tmp_path):
    model = build()
    trainer = PaDiMTrainer(model, device="cpu", checkpoint_dir=tmp_path, progress_bar=False)
    assert trainer.configure_optimizers() is None
    trainer.fit(texture.train_loader(), None, num_epochs=1)
    state = torch.load(tmp_path / "best.pt", map_location="cpu", weights_only=True)
    config = load_experiment_config("padim", "mvtec", ["model.backbone=resnet18"])
    restored = PaDiMTrainer.build_model(config, pretrained=False)
    restored.load_state_dict(state["model"])
    assert torch.equal(restored.inv_covariance, model.inv_covariance)
    assert trainer.fit_timings["num_images"] == len(texture.train)
    with pytest.raises(ValueError, match="feature grid"):
        restored.eval()(torch.rand(1, 3, 32, 32))
