# tests/phase_02/test_checkpoints.py
import pytest
import torch
from torch.utils.data import DataLoader

from anomaly_detection import trainer as trainer_module
from anomaly_detection.trainer import CheckpointError, load_checkpoint_file

CONFIG = {"model": {"name": "tiny"}, "training": {"num_epochs": 3}, "seed": 7}


def scripted_trainer(tiny, values, monitor="val_loss", monitor_mode="min"):
    class Scripted(tiny.RegressionTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.snapshots = {}

        def validation_step(self, batch, batch_idx):
            return {"loss": torch.tensor(values[self.current_epoch])}

        def compute_validation_metrics(self, step_outputs):
            return {monitor: float(step_outputs[0]["loss"])}

        def on_validation_epoch_end(self, epoch, val_metrics):
            self.snapshots[epoch] = {k: v.clone() for k, v in self.model.state_dict().items()}

    return Scripted


def assert_same_weights(first, second):
    assert first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key], second[key]), key


def test_last_and_best_are_written_atomically_and_load_weights_only(tiny, tmp_path):
    trainer = scripted_trainer(tiny, [3.0, 1.0, 2.0])(tiny.TinyNet(), device="cpu", config=CONFIG,
                                                      checkpoint_dir=tmp_path, progress_bar=False)
    trainer.fit(tiny.make_loader(4, 2), tiny.make_loader(2, 2, seed=1), num_epochs=3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt", "last.pt"]
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*"))

    last = torch.load(tmp_path / "last.pt", map_location="cpu", weights_only=True)
    best = torch.load(tmp_path / "best.pt", map_location="cpu", weights_only=True)
    for state in (last, best):
        assert {"model", "optimizer", "scheduler", "epoch", "config"} <= set(state)
        assert state["config"] == CONFIG
        assert state["model_class"] == "TinyNet"
        assert state["optimizer"]["state"], "the SGD momentum buffers belong in the checkpoint"
    assert last["epoch"] == 2 and best["epoch"] == 1
    assert best["best_value"] == 1.0 and last["best_value"] == 1.0
    assert last["scheduler"]["last_epoch"] == 3 and best["scheduler"]["last_epoch"] == 2
    assert_same_weights(best["model"], trainer.snapshots[1])
    assert_same_weights(last["model"], trainer.model.state_dict())
    assert not all(torch.equal(best["model"][k], last["model"][k]) for k in best["model"])
    assert [r["epoch"] for r in last["history"]] == [0, 1, 2]


@pytest.mark.parametrize("mode, values, best_epoch", [("min", [2.0, 0.5, 0.7, 0.9], 1),
                                                      ("max", [0.2, 0.9, 0.95, 0.3], 2)])
def test_best_follows_the_monitored_value_and_mode(tiny, tmp_path, mode, values, best_epoch):
    trainer = scripted_trainer(tiny, values, monitor="image_auroc", monitor_mode=mode)(
        tiny.TinyNet(), device="cpu", checkpoint_dir=tmp_path, monitor="image_auroc", monitor_mode=mode,
        progress_bar=False)
    trainer.fit(tiny.make_loader(2, 2), tiny.make_loader(2, 2, seed=1), num_epochs=len(values))
    best = load_checkpoint_file(tmp_path / "best.pt")
    assert best["epoch"] == best_epoch
    assert best["best_value"] == pytest.approx(values[best_epoch])
    assert_same_weights(best["model"], trainer.snapshots[best_epoch])


def test_without_validation_best_is_the_newest(tiny, tmp_path):
    trainer = tiny.RegressionTrainer(tiny.TinyNet(), device="cpu", checkpoint_dir=tmp_path, progress_bar=False)
    trainer.fit(tiny.make_loader(2, 2), None, num_epochs=2)
    assert load_checkpoint_file(tmp_path / "best.pt")["epoch"] == 1


def test_failed_write_keeps_the_previous_checkpoint(tiny, tmp_path, monkeypatch):
    trainer = tiny.RegressionTrainer(tiny.TinyNet(), device="cpu", checkpoint_dir=tmp_path, progress_bar=False)
    trainer.fit(tiny.make_loader(2, 2), None, num_epochs=1)
    before = (tmp_path / "last.pt").read_bytes()

    def broken_save(obj, handle, *args, **kwargs):
        handle.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        trainer.save_checkpoint(tmp_path / "last.pt", epoch=5)
    monkeypatch.undo()
    assert (tmp_path / "last.pt").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt", "last.pt"]


def shuffled_loader(tiny):
    dataset = tiny.DictDataset(tiny.random_images(8, size=8, seed=11))
    return DataLoader(dataset, batch_size=2, shuffle=True)


def initial_model(tiny):
    torch.manual_seed(0)
    return tiny.TinyNet(dropout=0.3)


def resume_run(tiny, folder, split_at):
    first = tiny.RegressionTrainer(initial_model(tiny), device="cpu", seed=123, checkpoint_dir=folder,
                                   progress_bar=False)
    first.fit(shuffled_loader(tiny), shuffled_loader(tiny), num_epochs=split_at)
    # a new process: other initial weights and another RNG state, all replaced by the checkpoint
    torch.manual_seed(999)
    second = tiny.RegressionTrainer(tiny.TinyNet(dropout=0.3), device="cpu", seed=123, checkpoint_dir=folder,
                                    progress_bar=False)
    second.fit(shuffled_loader(tiny), shuffled_loader(tiny), num_epochs=4, resume_from=folder / "last.pt")
    return second


def test_resume_reaches_the_same_weights_as_an_uninterrupted_run(tiny, tmp_path):
    straight = tiny.RegressionTrainer(initial_model(tiny), device="cpu", seed=123,
                                      checkpoint_dir=tmp_path / "straight", progress_bar=False)
    straight.fit(shuffled_loader(tiny), shuffled_loader(tiny), num_epochs=4)

    resumed = resume_run(tiny, tmp_path / "resumed", split_at=2)
    assert_same_weights(resumed.model.state_dict(), straight.model.state_dict())
    assert [r["epoch"] for r in resumed.history] == [0, 1, 2, 3]
    assert [r["train_loss"] for r in resumed.history] == [r["train_loss"] for r in straight.history]
    assert resumed.optimizer.state_dict()["param_groups"][0]["lr"] == straight.optimizer.param_groups[0]["lr"]
    assert resumed.global_step == straight.global_step == 16
    assert load_checkpoint_file(tmp_path / "resumed" / "last.pt")["epoch"] == 3


def test_resume_without_rng_restoration_would_differ(tiny, tmp_path, monkeypatch):
    # guards the test above: with this data and model the RNG state really changes the result
    straight = tiny.RegressionTrainer(initial_model(tiny), device="cpu", seed=123, progress_bar=False)
    straight.fit(shuffled_loader(tiny), shuffled_loader(tiny), num_epochs=4)
    monkeypatch.setattr(trainer_module, "restore_rng_state", lambda state: None)
    resumed = resume_run(tiny, tmp_path, split_at=2)
    weights = straight.model.state_dict()
    assert not all(torch.equal(v, weights[k]) for k, v in resumed.model.state_dict().items())


def test_checkpoint_from_another_model_is_refused(tiny, tmp_path):
    trainer = tiny.RegressionTrainer(tiny.TinyNet(), device="cpu", checkpoint_dir=tmp_path, progress_bar=False)
    trainer.fit(tiny.make_loader(2, 2), None, num_epochs=1)
    other = tiny.RegressionTrainer(tiny.OtherNet(), device="cpu", progress_bar=False)
    with pytest.raises(CheckpointError) as caught:
        other.load_checkpoint(tmp_path / "last.pt")
    message = str(caught.value)
    assert "TinyNet" in message and "OtherNet" in message and "last.pt" in message
    with pytest.raises(CheckpointError, match="OtherNet"):
        other.fit(tiny.make_loader(2, 2), None, num_epochs=2, resume_from=tmp_path / "last.pt")


def test_corrupt_checkpoint_names_the_file(tiny, tmp_path):
    path = tmp_path / "garbage.pt"
    path.write_bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0),
                                   dtype=torch.uint8).numpy().tobytes())
    with pytest.raises(CheckpointError, match="garbage.pt"):
        load_checkpoint_file(path)
    trainer = tiny.RegressionTrainer(tiny.TinyNet(), device="cpu", progress_bar=False)
    with pytest.raises(CheckpointError, match="corrupt"):
        trainer.fit(tiny.make_loader(2, 2), None, num_epochs=1, resume_from=path)


def test_foreign_torch_file_is_not_a_checkpoint(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save({"conv.weight": torch.zeros(2)}, path)
    with pytest.raises(CheckpointError, match="not an anomaly_detection checkpoint"):
        load_checkpoint_file(path)


def test_missing_checkpoint_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.pt"):
        load_checkpoint_file(tmp_path / "nowhere.pt")


@pytest.mark.parametrize("values, warned", [([1.0, 2.0, 3.0], True), ([3.0, 1.0, 2.0], False), ([1.0], False)])
def test_keeping_the_first_of_several_epochs_is_reported(tiny, tmp_path, caplog, values, warned):
    from anomaly_detection.runner import warn_if_first_epoch_kept
    trainer = scripted_trainer(tiny, values)(tiny.TinyNet(), device="cpu", checkpoint_dir=tmp_path,
                                             progress_bar=False)
    trainer.fit(tiny.make_loader(4, 2), tiny.make_loader(2, 2, seed=1), num_epochs=len(values))
    kept = load_checkpoint_file(tmp_path / "best.pt")["epoch"]
    assert warn_if_first_epoch_kept(trainer.history, kept, 2, "val_loss") is warned
    notes = [r.message for r in caplog.records if r.levelname == "WARNING" and "kept epoch" in r.message]
    assert notes == ([f"val_loss kept epoch 0 of {len(values)} (2 optimizer step(s) per epoch): every later epoch "
                      "scored worse on the validation images. In a short run BatchNorm running statistics lag the "
                      "weights and can make this happen to a model that is still learning; check the epochs' "
                      "val_loss in the log, or train longer (more epochs or a smaller training.batch_size)"]
                     if warned else [])
