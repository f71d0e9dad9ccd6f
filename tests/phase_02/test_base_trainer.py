# tests/phase_02/test_base_trainer.py
import math
from pathlib import Path

import pytest
import torch

from anomaly_detection.trainer import BaseTrainer


def expected_hook_sequence(num_epochs, train_batches, val_batches):
    sequence = ["configure_optimizers", "on_fit_start"]
    for epoch in range(num_epochs):
        sequence.append(("on_train_epoch_start", epoch))
        for index in range(train_batches):
            sequence += [("on_train_batch_start", index), ("training_step", index), ("on_train_batch_end", index)]
        sequence.append(("on_train_epoch_end", epoch))
        if val_batches:
            sequence.append(("on_validation_epoch_start", epoch))
            for index in range(val_batches):
                sequence += [("on_validation_batch_start", index), ("validation_step", index),
                             ("on_validation_batch_end", index)]
            sequence.append(("on_validation_epoch_end", epoch))
    sequence.append("on_fit_end")
    return sequence


def make_recording_trainer(base):
    class RecordingTrainer(base):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.calls, self.details = [], []

        def configure_optimizers(self):
            self.calls.append("configure_optimizers")
            return super().configure_optimizers()

        def training_step(self, batch, batch_idx):
            self.calls.append(("training_step", batch_idx))
            self.details.append(("training_mode", self.model.training, torch.is_grad_enabled()))
            return super().training_step(batch, batch_idx)

        def validation_step(self, batch, batch_idx):
            self.calls.append(("validation_step", batch_idx))
            self.details.append(("validation_mode", self.model.training, torch.is_grad_enabled()))
            return super().validation_step(batch, batch_idx)

        def on_fit_start(self):
            self.calls.append("on_fit_start")

        def on_fit_end(self):
            self.calls.append("on_fit_end")

        def on_train_epoch_start(self, epoch):
            self.calls.append(("on_train_epoch_start", epoch))

        def on_train_epoch_end(self, epoch, train_loss):
            self.calls.append(("on_train_epoch_end", epoch))
            self.details.append(("train_loss", epoch, train_loss))

        def on_validation_epoch_start(self, epoch):
            self.calls.append(("on_validation_epoch_start", epoch))

        def on_validation_epoch_end(self, epoch, val_metrics):
            self.calls.append(("on_validation_epoch_end", epoch))
            self.details.append(("val_metrics", epoch, val_metrics))

        def on_train_batch_start(self, batch, batch_idx):
            self.calls.append(("on_train_batch_start", batch_idx))
            self.details.append(("train_batch", batch_idx, tuple(batch["image"].shape)))

        def on_train_batch_end(self, batch, batch_idx, outputs, loss):
            self.calls.append(("on_train_batch_end", batch_idx))
            self.details.append(("train_batch_end", batch_idx, outputs, loss))

        def on_validation_batch_start(self, batch, batch_idx):
            self.calls.append(("on_validation_batch_start", batch_idx))

        def on_validation_batch_end(self, batch, batch_idx, outputs):
            self.calls.append(("on_validation_batch_end", batch_idx))
            self.details.append(("val_batch_end", batch_idx, outputs))

    return RecordingTrainer


def test_hook_order_two_epochs_two_batches_with_validation(tiny):
    trainer = make_recording_trainer(tiny.RegressionTrainer)(tiny.TinyNet(), device="cpu", progress_bar=False)
    history = trainer.fit(tiny.make_loader(4, 2), tiny.make_loader(4, 2, seed=1), num_epochs=2)
    assert trainer.calls == expected_hook_sequence(2, 2, 2)
    assert [record["epoch"] for record in history] == [0, 1]

    train_losses = [d for d in trainer.details if d[0] == "train_loss"]
    batch_ends = [d for d in trainer.details if d[0] == "train_batch_end"]
    assert [d[1] for d in train_losses] == [0, 1]
    for epoch, (_, _, train_loss) in enumerate(train_losses):
        assert isinstance(train_loss, float)
        losses = [float(d[3].detach()) for d in batch_ends[2 * epoch:2 * epoch + 2]]
        assert train_loss == pytest.approx(sum(losses) / 2)
        assert history[epoch]["train_loss"] == train_loss
    for _, batch_idx, outputs, loss in batch_ends:
        assert batch_idx in (0, 1)
        assert outputs["loss"] is loss and torch.is_tensor(loss)

    val_metrics = [d for d in trainer.details if d[0] == "val_metrics"]
    val_outputs = [d[2] for d in trainer.details if d[0] == "val_batch_end"]
    assert len(val_outputs) == 4 and all("loss" in out for out in val_outputs)
    for epoch, (_, seen_epoch, metrics) in enumerate(val_metrics):
        assert seen_epoch == epoch
        assert isinstance(metrics, dict)
        expected = sum(float(out["loss"]) for out in val_outputs[2 * epoch:2 * epoch + 2]) / 2
        assert metrics["val_loss"] == pytest.approx(expected)
        assert history[epoch]["val_loss"] == pytest.approx(expected)
    assert [d[2] for d in trainer.details if d[0] == "train_batch"] == [(2, 3, 8, 8)] * 4

    modes = {d[0]: (d[1], d[2]) for d in trainer.details if d[0].endswith("_mode")}
    assert modes["training_mode"] == (True, True)
    assert modes["validation_mode"] == (False, False)


def test_hook_order_without_validation_loader(tiny):
    trainer = make_recording_trainer(tiny.RegressionTrainer)(tiny.TinyNet(), device="cpu", progress_bar=False)
    history = trainer.fit(tiny.make_loader(6, 2), None, num_epochs=1)
    assert trainer.calls == expected_hook_sequence(1, 3, 0)
    assert "val_loss" not in history[0]


def test_none_optimizer_changes_no_parameter_and_still_checkpoints(tiny, tmp_path):
    class NoOptimizerTrainer(tiny.RegressionTrainer):
        def configure_optimizers(self):
            return None

    model = tiny.TinyNet()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = make_recording_trainer(NoOptimizerTrainer)(model, device="cpu", checkpoint_dir=tmp_path,
                                                         progress_bar=False)
    history = trainer.fit(tiny.make_loader(4, 2), tiny.make_loader(2, 2, seed=1), num_epochs=2)
    assert trainer.calls == expected_hook_sequence(2, 2, 1)
    assert trainer.optimizer is None and trainer.scheduler is None
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert len(history) == 2 and all(math.isfinite(r["train_loss"]) for r in history)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt", "last.pt"]
    state = torch.load(tmp_path / "last.pt", weights_only=True)
    assert state["optimizer"] is None and state["epoch"] == 1


def test_training_step_without_loss_runs_and_reports_no_loss(tiny):
    class FeatureCollector(BaseTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.seen = 0

        def training_step(self, batch, batch_idx):
            self.seen += batch["image"].shape[0]
            return {}

    trainer = FeatureCollector(tiny.TinyNet(), device="cpu", progress_bar=False)
    history = trainer.fit(tiny.make_loader(4, 2), num_epochs=1)
    assert trainer.seen == 4
    # no loss was returned: the record has none, rather than a NaN that reads like a diverged run
    assert "train_loss" not in history[0]


# The seed README's "BaseTrainer 사용법" example, character for character; run with exec so that its
# docstrings (which the project's own code does not use) stay as the user wrote them.
SEED_EXAMPLE = '''
from anomaly_detection.trainer import BaseTrainer

class CustomTrainer(BaseTrainer):
    def training_step(self, batch, batch_idx):
        """학습 단계 구현 (필수)"""
        images, labels = batch["image"], batch["label"]
        images = images.to(self.device)
        
        outputs = self.model(images)
        loss = self.loss_fn(outputs, labels)
        
        return {"loss": loss}
    
    def validation_step(self, batch, batch_idx):
        """검증 단계 구현 (필수)"""
        images = batch["image"].to(self.device)
        outputs = self.model(images)
        
        return {"predictions": outputs, "labels": batch["label"]}
    
    def configure_optimizers(self):
        """Optimizer 설정 (필수)"""
        optimizer = torch.optim.Adam(self.model.parameters(), lr=0.001)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=10)
        
        return {"optimizer": optimizer, "scheduler": scheduler}
    
    # Hook 메서드 (선택적 구현)
    def on_train_epoch_end(self, epoch, train_loss):
        print(f"Epoch {epoch} - Loss: {train_loss:.4f}")
    
    def on_validation_epoch_end(self, epoch, val_metrics):
        print(f"Epoch {epoch} - AUROC: {val_metrics['auroc']:.4f}")
'''
SEED_NAMESPACE = {"torch": torch}
exec(SEED_EXAMPLE, SEED_NAMESPACE)
CustomTrainer = SEED_NAMESPACE["CustomTrainer"]


def test_the_example_is_the_seed_readme_text():
    seed = Path(__file__).resolve().parents[3] / "shared" / "seed" / "README.ko.md"
    if not seed.is_file():
        pytest.skip(f"the seed README is not beside the project ({seed})")
    assert SEED_EXAMPLE.lstrip("\n") in seed.read_text()


def test_seed_readme_custom_trainer_example(tiny, capsys):
    from sklearn.metrics import roc_auc_score

    model = tiny.TinyClassifier()
    before = [p.detach().clone() for p in model.parameters()]
    trainer = CustomTrainer(model, torch.nn.CrossEntropyLoss(), device="cpu", progress_bar=False)
    labels = [0, 1, 0, 1, 1, 0]
    val_loader = tiny.make_loader(6, 4, seed=3, labels=labels)
    trainer.fit(tiny.make_loader(4, 2, labels=[0, 1, 0, 1]), val_loader, num_epochs=2)
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split(" - ")[0] for line in lines] == ["Epoch 0", "Epoch 0", "Epoch 1", "Epoch 1"]
    assert lines[0].startswith("Epoch 0 - Loss: ") and lines[1].startswith("Epoch 0 - AUROC: ")
    assert isinstance(trainer.optimizer, torch.optim.Adam)
    assert isinstance(trainer.scheduler, torch.optim.lr_scheduler.StepLR)
    assert trainer.scheduler.last_epoch == 2
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))
    # the trainer filled val_metrics['auroc'] from the epoch's predictions and labels: the same value
    # scikit-learn gives for the softmax probability of class 1 over the whole validation set
    model.eval()
    with torch.no_grad():
        batches = list(val_loader)
        probability = torch.cat([model(batch["image"]).softmax(dim=1)[:, 1] for batch in batches])
        truth = torch.cat([torch.as_tensor(batch["label"]) for batch in batches])
    expected = roc_auc_score(truth.numpy(), probability.numpy())
    assert trainer.history[-1]["auroc"] == pytest.approx(expected, abs=1e-12)
    assert lines[-1] == f"Epoch 1 - AUROC: {expected:.4f}"


def test_seed_example_with_normal_only_validation_reports_nan_once(tiny, capsys, caplog):
    trainer = CustomTrainer(tiny.TinyClassifier(), torch.nn.CrossEntropyLoss(), device="cpu", progress_bar=False)
    trainer.fit(tiny.make_loader(4, 2, labels=[0, 1, 0, 1]), tiny.make_loader(4, 2, labels=[0, 0, 0, 0]),
                num_epochs=2)
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[1] == "Epoch 0 - AUROC: nan" and lines[3] == "Epoch 1 - AUROC: nan"
    notes = [r.message for r in caplog.records if "val_metrics['auroc'] is NaN" in r.message]
    assert len(notes) == 1 and "all of one class" in notes[0]
    assert all(math.isnan(record["auroc"]) for record in trainer.history)


def test_validation_metrics_weigh_losses_by_batch_size_and_read_score_dicts(tiny):
    trainer = BaseTrainer(tiny.TinyNet(), device="cpu", progress_bar=False)
    metrics = trainer.compute_validation_metrics([
        {"loss": torch.tensor(1.0), "batch_size": 3, "predictions": {"pred_score": torch.tensor([0.1, 0.9, 0.8])},
         "labels": torch.tensor([0, 1, 1])},
        {"loss": torch.tensor(5.0), "batch_size": 1, "predictions": {"pred_score": torch.tensor([0.2])},
         "labels": torch.tensor([0])}])
    assert metrics == {"val_loss": pytest.approx(2.0), "auroc": 1.0}
    with pytest.raises(ValueError, match="predictions.*shape \\(2, 3\\).*one score per image"):
        trainer.compute_validation_metrics([{"predictions": torch.zeros(2, 3), "labels": torch.zeros(2)}])


def test_configure_optimizers_may_return_a_bare_optimizer(tiny):
    class BareOptimizer(tiny.RegressionTrainer):
        def configure_optimizers(self):
            return torch.optim.SGD(self.model.parameters(), lr=0.1)

    trainer = BareOptimizer(tiny.TinyNet(), device="cpu", progress_bar=False)
    trainer.fit(tiny.make_loader(2, 2), num_epochs=1)
    assert isinstance(trainer.optimizer, torch.optim.SGD) and trainer.scheduler is None


def test_configure_optimizers_bad_return_is_rejected(tiny):
    class Broken(tiny.RegressionTrainer):
        def configure_optimizers(self):
            return [torch.optim.SGD(self.model.parameters(), lr=0.1)]

    with pytest.raises(TypeError, match="configure_optimizers"):
        Broken(tiny.TinyNet(), device="cpu", progress_bar=False).fit(tiny.make_loader(2, 2), num_epochs=1)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_loss_stops_naming_epoch_and_batch(tiny, bad):
    class Diverging(tiny.RegressionTrainer):
        def training_step(self, batch, batch_idx):
            outputs = super().training_step(batch, batch_idx)
            if self.current_epoch == 1 and batch_idx == 1:
                outputs["loss"] = outputs["loss"] * bad
            return outputs

    trainer = Diverging(tiny.TinyNet(), device="cpu", progress_bar=False)
    with pytest.raises(FloatingPointError, match=r"epoch 1, batch 1"):
        trainer.fit(tiny.make_loader(4, 2), num_epochs=3)
    assert len(trainer.history) == 1


def test_missing_training_step_names_the_class(tiny):
    class Empty(BaseTrainer):
        pass

    with pytest.raises(NotImplementedError, match="Empty must implement training_step"):
        Empty(tiny.TinyNet(), device="cpu", progress_bar=False).fit(tiny.make_loader(2, 2), num_epochs=1)


def test_bad_monitor_mode_is_rejected(tiny):
    with pytest.raises(ValueError, match="monitor_mode"):
        tiny.RegressionTrainer(tiny.TinyNet(), device="cpu", monitor_mode="lowest")


def test_tensorboard_events_written(tiny, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    trainer = tiny.RegressionTrainer(tiny.TinyNet(), device="cpu", log_dir=tmp_path / "logs", progress_bar=False)
    trainer.fit(tiny.make_loader(4, 2), tiny.make_loader(2, 2, seed=1), num_epochs=2)
    events = list((tmp_path / "logs").glob("events.out.tfevents.*"))
    assert events
    accumulator = EventAccumulator(str(tmp_path / "logs"))
    accumulator.Reload()
    tags = accumulator.Tags()["scalars"]
    assert {"train/loss_step", "epoch/train_loss", "epoch/val_loss", "epoch/learning_rate"} <= set(tags)
    assert len(accumulator.Scalars("train/loss_step")) == 4
    learning_rates = [event.value for event in accumulator.Scalars("epoch/learning_rate")]
    assert learning_rates == pytest.approx([0.25, 0.125])


def test_micro_batches_give_the_same_update_as_the_whole_batch(tiny):
    # a model without BatchNorm: slicing the batch must not change the gradient of a mean loss
    results = []
    for micro_batch_size in (None, 3):
        torch.manual_seed(0)
        model = tiny.TinyNet()
        trainer = tiny.RegressionTrainer(model, device="cpu", progress_bar=False, micro_batch_size=micro_batch_size)
        trainer._set_optimizers(trainer.configure_optimizers())
        batch = {"image": torch.rand(8, 3, 8, 8, generator=torch.Generator().manual_seed(1)),
                 "label": [0] * 8}
        _, loss = trainer.training_batch(batch, 0, epoch=0)
        results.append((float(loss.detach()), model.conv.weight.detach().clone()))
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-5)
    assert torch.allclose(results[0][1], results[1][1], atol=1e-6)
    assert not torch.equal(results[0][1], tiny.TinyNet().conv.weight)


def test_bad_micro_batch_size_is_refused(tiny):
    with pytest.raises(ValueError, match="micro_batch_size"):
        tiny.RegressionTrainer(tiny.TinyNet(), device="cpu", micro_batch_size=0)
