# tests/phase_05/test_distill_teacher.py
import numpy as np
import pytest
import torch
from PIL import Image

from anomaly_detection.models.efficientad import distill
from anomaly_detection.models.efficientad.efficientad import PDN
from helpers import run_cli


@pytest.fixture(scope="module")
def generic_images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("generic")
    rng = np.random.default_rng(0)
    for index in range(6):
        (folder / f"sub{index % 2}").mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (40 + index, 48, 3), dtype=np.uint8)).save(
            folder / f"sub{index % 2}" / f"{index}.png")
    (folder / "notes.txt").write_text("not an image")
    return folder


def distil(images, backbone_root, output, **options):
    arguments = dict(backbone="resnet18", images=images, model_size="small", steps=4, batch_size=2, image_size=32,
                     stats_images=4, output=output, checkpoint_every=2, backbone_root=backbone_root, device="cpu",
                     progress_bar=False)
    arguments.update(options)
    return distill.distill_teacher(**arguments)


def test_distillation_writes_a_pdn_teacher_with_its_recipe(generic_images, random_backbone_root, tmp_path):
    summary = distil(generic_images, random_backbone_root, tmp_path / "teacher_small.pth")
    state = torch.load(tmp_path / "teacher_small.pth", map_location="cpu", weights_only=True)
    expected = PDN("small", 384).state_dict()
    shapes = {k: tuple(v.shape) for k, v in state["state_dict"].items()}
    assert shapes == {k: tuple(v.shape) for k, v in expected.items()}
    recipe = state["recipe"]
    assert recipe["backbone"] == "resnet18" and recipe["layers"] == ["layer2", "layer3"]
    assert recipe["num_images"] == 6 and recipe["steps"] == 4 and recipe["extractor_image_size"] == 64
    assert np.isfinite(recipe["final_loss"]) and summary["teacher"] == str(tmp_path / "teacher_small.pth")
    assert not (tmp_path / "teacher_small.pth.partial.pt").exists()


def test_an_interrupted_distillation_resumes_to_the_same_teacher(generic_images, random_backbone_root, tmp_path,
                                                                 monkeypatch):
    straight = tmp_path / "straight.pth"
    distil(generic_images, random_backbone_root, straight)

    resumed = tmp_path / "resumed.pth"
    save = distill.atomic_torch_save

    def save_then_stop(state, path):
        save(state, path)
        if str(path).endswith(".partial.pt"):
            raise KeyboardInterrupt

    monkeypatch.setattr(distill, "atomic_torch_save", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        distil(generic_images, random_backbone_root, resumed)
    assert (tmp_path / "resumed.pth.partial.pt").is_file() and not resumed.exists()
    monkeypatch.setattr(distill, "atomic_torch_save", save)
    summary = distil(generic_images, random_backbone_root, resumed)
    assert summary["resumed_at_step"] == 2
    one = torch.load(straight, weights_only=True)["state_dict"]
    two = torch.load(resumed, weights_only=True)["state_dict"]
    assert all(torch.equal(one[key], two[key]) for key in one)


def test_a_partial_run_with_another_recipe_is_not_resumed(generic_images, random_backbone_root, tmp_path, monkeypatch):
    save = distill.atomic_torch_save

    def save_then_stop(state, path):
        save(state, path)
        raise KeyboardInterrupt

    monkeypatch.setattr(distill, "atomic_torch_save", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        distil(generic_images, random_backbone_root, tmp_path / "teacher.pth")
    monkeypatch.setattr(distill, "atomic_torch_save", save)
    with pytest.raises(ValueError, match="another recipe \\(batch_size differ\\)"):
        distil(generic_images, random_backbone_root, tmp_path / "teacher.pth", batch_size=3)


@pytest.mark.parametrize("option, value, message", [
    ("steps", 0, "--steps must be >= 1, got 0"),
    ("batch_size", 0, "--batch-size must be >= 1, got 0"),
    ("image_size", 30, "--image-size must be a multiple of 4"),
])
def test_bad_arguments_name_the_option(generic_images, random_backbone_root, tmp_path, option, value, message):
    with pytest.raises(ValueError, match=message):
        distil(generic_images, random_backbone_root, tmp_path / "t.pth", **{option: value})


def test_a_folder_without_images_is_named(random_backbone_root, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="holds no readable image"):
        distil(tmp_path / "empty", random_backbone_root, tmp_path / "t.pth")


def test_the_command_line_runs_it(generic_images, random_backbone_root, tmp_path):
    result = run_cli(["distill-teacher", "--backbone", "resnet18", "--images", str(generic_images), "--steps", "2",
                      "--batch-size", "2", "--image-size", "32", "--stats-images", "2", "--output",
                      str(tmp_path / "t.pth"), "--backbone-root", str(random_backbone_root), "--device", "cpu",
                      "--no-progress"])
    assert result.code == 0, result.err
    assert (tmp_path / "t.pth").is_file()
    result = run_cli(["distill-teacher", "--images", str(tmp_path / "nowhere"), "--output", str(tmp_path / "u.pth")])
    assert result.code == 2 and "nowhere" in result.err
