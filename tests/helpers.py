# tests/helpers.py
import io
import json
from contextlib import redirect_stderr, redirect_stdout
from types import SimpleNamespace

import pytest
import torch

from anomaly_detection.cli import main


def run_cli(argv, entry=main):
    # the CLI (or an experiment script's main) in this process, its stdout, stderr and exit code captured
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = entry(argv)
    return SimpleNamespace(code=code, out=out.getvalue(), err=err.getvalue())


def json_lines(stdout):
    return [json.loads(line) for line in stdout.strip().splitlines() if line.startswith("{")]


def assert_model_file_reproduces(summary, image):
    # test and predict rebuild the model from model.pt alone: the same figures as the training run, and a score
    result = run_cli(["test", "--checkpoint", summary["checkpoint"]])
    assert result.code == 0, result.err
    tested = json.loads(result.out.strip().splitlines()[-1])
    assert tested["image_auroc"] == summary["image_auroc"] and tested["pixel_auroc"] == summary["pixel_auroc"]
    result = run_cli(["predict", "--checkpoint", summary["checkpoint"], "--input", str(image)])
    assert result.code == 0, result.err
    assert json.loads(result.out.strip().splitlines()[0])["image_path"] == str(image)


def fixed_batch_losses(trainer, batch, steps=6):
    # the training loss of `steps` optimizer steps on one fixed batch, through the trainer's own step
    trainer._set_optimizers(trainer.configure_optimizers())
    trainer.model.train()
    losses = []
    for step in range(steps):
        _, loss = trainer.training_batch(batch, step, epoch=0)
        losses.append(float(loss.detach()))
    return losses


def assert_rebuilt_model_scores_the_same(trainer_class, config, model, images):
    # build_model(config, pretrained=False) + the saved state_dict is the whole trained model
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    rebuilt = trainer_class.build_model(config, pretrained=False)
    rebuilt.load_state_dict(torch.load(buffer, weights_only=True))
    with torch.no_grad():
        expected, actual = model.eval()(images), rebuilt.eval()(images)
    assert torch.equal(expected["pred_score"], actual["pred_score"])
    assert torch.equal(expected["anomaly_map"], actual["anomaly_map"])


def assert_chunked_scoring_equals_the_whole_batch(monkeypatch, model_module, model, trainer_class, loss_fn,
                                                  whole_loss, images):
    # eval mode scores INFERENCE_CHUNK images at a time (memory) and the validation loss follows the same chunks;
    # a chunk of 2 over 5 images (sizes 2, 2, 1) must give the whole batch's maps, scores and mean loss, and the
    # export form (the whole batch in one pass) the same maps
    assert images.shape[0] == 5
    model.eval()
    with torch.no_grad():
        whole_map = model.score(images)
        monkeypatch.setattr(model_module, "INFERENCE_CHUNK", 2)
        chunked = model(images)
        chunked_loss = model.validation_loss(images, loss_fn)
        exported_map = trainer_class.exportable_model(model)(images)["anomaly_map"]
    assert chunked["anomaly_map"].shape == (5, 1) + tuple(images.shape[-2:])
    assert torch.allclose(chunked["anomaly_map"], whole_map, atol=1e-6)
    assert torch.allclose(chunked["pred_score"], whole_map.flatten(1).amax(1), atol=1e-6)
    assert float(chunked_loss) == pytest.approx(float(whole_loss), rel=1e-5)
    assert torch.allclose(exported_map, whole_map, atol=1e-6)
