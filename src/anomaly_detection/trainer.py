# src/anomaly_detection/trainer.py
import json
import math
import os
import random
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from anomaly_detection import __version__, distributed
from anomaly_detection.utils import (
    OUTPUT_FILE_MODE, atomic_torch_save, cpu_has_native_bf16, json_safe, logger, resolve_device, seed_everything,
)

CHECKPOINT_FORMAT = 1


class CheckpointError(RuntimeError):
    pass


class BaseTrainer:
    def __init__(self, model, loss_fn=None, device="auto", learning_rate=None, config=None, seed=None,
                 checkpoint_dir=None, log_dir=None, mixed_precision=False, gradient_clip_norm=None,
                 monitor="val_loss", monitor_mode="min", progress_bar=True, micro_batch_size=None,
                 loss_reduction="mean"):
        self.device = resolve_device(device)
        self.model = model.to(self.device)
        self.loss_fn = loss_fn.to(self.device) if isinstance(loss_fn, torch.nn.Module) else loss_fn
        self.learning_rate = learning_rate
        self.config = config or {}
        self.seed = seed
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else None
        self.log_dir = Path(log_dir) if log_dir else None
        self.amp_dtype = resolve_amp_dtype(mixed_precision, self.device)
        self.use_amp = self.amp_dtype is not None
        self.gradient_clip_norm = gradient_clip_norm
        if monitor_mode not in ("min", "max"):
            raise ValueError(f"monitor_mode must be 'min' or 'max', got '{monitor_mode}'")
        self.monitor = monitor
        self.monitor_mode = monitor_mode
        self.progress_bar = progress_bar
        if micro_batch_size is not None and int(micro_batch_size) < 1:
            raise ValueError(f"training.micro_batch_size must be a positive integer or null, got {micro_batch_size}")
        self.micro_batch_size = int(micro_batch_size) if micro_batch_size else None
        if loss_reduction not in ("mean", "sum"):
            raise ValueError(f"loss_reduction must be 'mean' or 'sum', got '{loss_reduction}'")
        self.loss_reduction = loss_reduction
        self.optimizer = None
        self.scheduler = None
        # bfloat16 has float32's exponent range: only float16 needs loss scaling
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        self.current_epoch = 0
        self.global_step = 0
        self.best_value = None
        self.history = []
        self.writer = None
        self._single_class_noted = False
        self._distributed_parts = []

    # ---- what the runner calls on a trainer class (a model folder's trainer provides build_model) ---
    @classmethod
    def build_model(cls, config, pretrained=None):
        # the torch model described by config["model"]; pretrained=False skips the backbone file (the
        # checkpoint being loaded holds every weight)
        raise NotImplementedError(f"{cls.__name__} must implement build_model(config, pretrained=None) "
                                  "to be trained from a config (anomaly_detection.models.MODELS)")

    @classmethod
    def exportable_model(cls, model):
        # the module `anomaly-detection export` traces: the model itself, unless its scoring has loops sized by
        # the batch or operations a traced graph cannot keep; then the model folder's export.py gives one that
        # computes the same scores with shapes fixed at export time
        return model

    @classmethod
    def scores_whole_splits(cls, config):
        # under torchrun validation and test images are split over the processes, unless the model's forward is
        # itself a collective (PatchCore's sharded search), which needs every process on the same images
        return False

    @classmethod
    def from_config(cls, config, model=None, **options):
        model = model if model is not None else cls.build_model(config)
        return cls(model, **trainer_arguments(config), **options)

    # ---- methods a subclass provides -------------------------------------------------------------
    def training_step(self, batch, batch_idx):
        raise NotImplementedError(f"{type(self).__name__} must implement training_step(batch, batch_idx)")

    def validation_step(self, batch, batch_idx):
        raise NotImplementedError(f"{type(self).__name__} must implement validation_step(batch, batch_idx)")

    def configure_optimizers(self):
        return None

    def compute_validation_metrics(self, step_outputs):
        # val_loss: the mean of the steps' "loss", weighted by "batch_size" where a step gives it;
        # auroc: image level, from the steps' "predictions" and "labels" (NaN while one class is present)
        step_outputs = [out for out in step_outputs if isinstance(out, dict)]
        metrics = {}
        losses = [(float(out["loss"]), int(out.get("batch_size", 1))) for out in step_outputs if "loss" in out]
        if losses:
            metrics["val_loss"] = sum(loss * size for loss, size in losses) / sum(size for _, size in losses)
        scored = [out for out in step_outputs if "predictions" in out and "labels" in out]
        if scored:
            scores = np.concatenate([prediction_scores(out["predictions"]) for out in scored])
            labels = np.concatenate([np.asarray(to_cpu(out["labels"])).reshape(-1) for out in scored])
            metrics["auroc"] = validation_auroc(scores, labels)
            if math.isnan(metrics["auroc"]) and not self._single_class_noted:
                # our validation split is normal images only: AUROC is undefined there; saying so once is enough
                self._single_class_noted = True
                logger.warning("val_metrics['auroc'] is NaN: the validation images are all of one class (label %s); "
                               "image AUROC needs good and defective images", np.unique(labels).tolist())
        return metrics

    # ---- hooks (the seed's names and signatures) -------------------------------------------------
    def on_fit_start(self):
        pass

    def on_fit_end(self):
        pass

    def on_train_epoch_start(self, epoch):
        pass

    def on_train_epoch_end(self, epoch, train_loss):
        pass

    def on_validation_epoch_start(self, epoch):
        pass

    def on_validation_epoch_end(self, epoch, val_metrics):
        pass

    def on_train_batch_start(self, batch, batch_idx):
        pass

    def on_train_batch_end(self, batch, batch_idx, outputs, loss):
        pass

    def on_validation_batch_start(self, batch, batch_idx):
        pass

    def on_validation_batch_end(self, batch, batch_idx, outputs):
        pass

    # ---- the loop --------------------------------------------------------------------------------
    def fit(self, train_loader, val_loader=None, num_epochs=1, resume_from=None):
        if self.seed is not None:
            seed_everything(self.seed)
        self._set_optimizers(self.configure_optimizers())
        start_epoch = 0
        if resume_from is not None:
            start_epoch = self.load_checkpoint(resume_from, restore_training_state=True) + 1
        # under torchrun: DistributedDataParallel around the trainable parts (after the resumed weights are in)
        self._distributed_parts = distributed.wrap_trainable_parts(self.model, self.device)
        self._open_writer()
        self.on_fit_start()
        for epoch in range(start_epoch, num_epochs):
            self.current_epoch = epoch
            started = time.perf_counter()
            if hasattr(getattr(train_loader, "sampler", None), "set_epoch"):
                train_loader.sampler.set_epoch(epoch)  # a new shuffle of each process's share every epoch
            self.model.train()
            self.on_train_epoch_start(epoch)
            train_loss = self.train_epoch(train_loader, epoch)
            self.on_train_epoch_end(epoch, train_loss)
            train_s = time.perf_counter() - started
            val_metrics = self.validate(val_loader, epoch) if val_loader is not None else {}
            check_validation_metrics(val_metrics, epoch)
            record = {"epoch": epoch, **({"train_loss": train_loss} if train_loss is not None else {}),
                      **val_metrics, "train_s": train_s, "epoch_s": time.perf_counter() - started}
            self.history.append(record)
            self._log_epoch(record)
            self.save_epoch_checkpoints(epoch, record)
        self.on_fit_end()
        self._close_writer()
        distributed.release_parts(self._distributed_parts)
        return self.history

    def train_epoch(self, train_loader, epoch):
        total, count = 0.0, 0
        bar = tqdm(train_loader, desc=f"epoch {epoch}", disable=not self.show_progress, leave=False)
        for batch_idx, batch in enumerate(bar):
            self.on_train_batch_start(batch, batch_idx)
            outputs, loss = self.training_batch(batch, batch_idx, epoch)
            if loss is not None:
                value = float(loss.detach())
                total += value
                count += 1
                bar.set_postfix(loss=f"{value:.4f}")
                if self.writer is not None:
                    self.writer.add_scalar("train/loss_step", value, self.global_step)
            self.global_step += 1
            self.on_train_batch_end(batch, batch_idx, outputs, loss)
        if self.scheduler is not None:
            self.scheduler.step()
        # no loss was returned (a step that only accumulates): nothing to report rather than NaN
        return total / count if count else None

    def training_batch(self, batch, batch_idx, epoch):
        # With micro_batch_size the batch runs in slices whose gradients add up before one optimizer step:
        # the same update with a fraction of the activation memory (BatchNorm sees the smaller slices).
        # A loss summed over the batch adds up as it is; a mean is weighted by the slice's share.
        parts = split_batch(batch, self.micro_batch_size)
        batch_size = sum(batch_length(part) for part in parts)
        if self.optimizer is not None:
            self.optimizer.zero_grad(set_to_none=True)
        outputs, total = None, None
        for part in parts:
            with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.use_amp):
                outputs = self.training_step(part, batch_idx)
            loss = outputs.get("loss") if isinstance(outputs, dict) else None
            if loss is None:
                continue
            if not torch.isfinite(loss.detach()).all():
                raise FloatingPointError(f"Loss became {loss.item()} at epoch {epoch}, batch {batch_idx}: "
                                         "lower the learning rate or enable gradient clipping")
            if self.loss_reduction == "mean" and len(parts) > 1:
                loss = loss * (batch_length(part) / batch_size)
            if self.optimizer is not None:
                self.scaler.scale(loss).backward()
            if len(parts) == 1:
                total = loss  # the hooks get the training step's own loss tensor
            else:
                total = loss.detach() if total is None else total + loss.detach()
        if total is not None and self.optimizer is not None:
            self.optimization_step()
        return outputs, total

    def optimization_step(self):
        if self.gradient_clip_norm:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), float(self.gradient_clip_norm))
        self.scaler.step(self.optimizer)
        self.scaler.update()

    @torch.no_grad()
    def validate(self, val_loader, epoch):
        self.model.eval()
        self.on_validation_epoch_start(epoch)
        step_outputs = []
        for batch_idx, batch in enumerate(val_loader):
            self.on_validation_batch_start(batch, batch_idx)
            with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.use_amp):
                outputs = self.validation_step(batch, batch_idx)
            step_outputs.append(outputs)
            self.on_validation_batch_end(batch, batch_idx, outputs)
        if distributed.active():
            # every process's validation images count, and every process decides the same best epoch
            local = [{key: to_cpu(value) for key, value in out.items()} if isinstance(out, dict) else out
                     for out in step_outputs]
            step_outputs = [out for part in distributed.all_gather_objects(local) for out in part]
        val_metrics = self.compute_validation_metrics(step_outputs)
        self.on_validation_epoch_end(epoch, val_metrics)
        return val_metrics

    # ---- optimizers, logging ---------------------------------------------------------------------
    def _set_optimizers(self, configured):
        if configured is None:
            self.optimizer, self.scheduler = None, None
        elif isinstance(configured, torch.optim.Optimizer):
            self.optimizer, self.scheduler = configured, None
        elif isinstance(configured, dict) and "optimizer" in configured:
            self.optimizer, self.scheduler = configured["optimizer"], configured.get("scheduler")
        else:
            raise TypeError("configure_optimizers() must return None, an optimizer or "
                            f"{{'optimizer': ..., 'scheduler': ...}}, got {type(configured).__name__}")

    @property
    def show_progress(self):
        return self.progress_bar and distributed.is_main()

    def _open_writer(self):
        # TensorBoard, like every file a run writes, is the first process's alone under torchrun
        if self.log_dir is not None and self.writer is None and distributed.is_main():
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(str(self.log_dir))
            # the event file is created at once, with the umask's mode: 0600 like every other output file
            for path in self.log_dir.glob("events.out.tfevents.*"):
                os.chmod(path, OUTPUT_FILE_MODE)

    def _close_writer(self):
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def _log_epoch(self, record):
        parts = ", ".join(f"{k} {v:.4f}" for k, v in record.items() if k != "epoch" and isinstance(v, float))
        logger.info("epoch %d: %s", record["epoch"], parts)
        if self.writer is not None:
            for key, value in record.items():
                if key != "epoch" and isinstance(value, (int, float)) and math.isfinite(value):
                    self.writer.add_scalar(f"epoch/{key}", value, record["epoch"])
            if self.optimizer is not None:
                self.writer.add_scalar("epoch/learning_rate", self.optimizer.param_groups[0]["lr"], record["epoch"])
            self.writer.flush()

    # ---- checkpoints -----------------------------------------------------------------------------
    def is_better(self, value):
        if value is None or not math.isfinite(value):
            return False
        if self.best_value is None:
            return True
        return value < self.best_value if self.monitor_mode == "min" else value > self.best_value

    def save_epoch_checkpoints(self, epoch, record):
        monitored = record.get(self.monitor)
        improved = self.is_better(monitored)
        if improved:
            self.best_value = float(monitored)
        if self.checkpoint_dir is None or not distributed.is_main():
            return
        self.save_checkpoint(self.checkpoint_dir / "last.pt", epoch)
        # without the monitored value (no validation data) the newest weights are the best we can name
        if improved or monitored is None:
            self.save_checkpoint(self.checkpoint_dir / "best.pt", epoch)

    def checkpoint_state(self, epoch, training_state=True):
        state = {
            "format": CHECKPOINT_FORMAT,
            "version": __version__,
            "model_class": type(self.model).__name__,
            "trainer_class": type(self).__name__,
            "model": self.plain_state_dict(),
            "epoch": epoch,
            "config": self.config,
            "normalization": model_normalization(self.model),
        }
        if training_state:
            state.update({
                "optimizer": self.optimizer.state_dict() if self.optimizer is not None else None,
                "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
                "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
                "global_step": self.global_step,
                "best_value": self.best_value,
                "monitor": self.monitor,
                "history": self.history,
                "rng": capture_rng_state(),
            })
        return state

    def plain_state_dict(self):
        # the weights under the model's own names, also while parts of it are wrapped for torchrun
        distributed.unwrap_parts(self._distributed_parts)
        try:
            return self.model.state_dict()
        finally:
            distributed.rewrap_parts(self._distributed_parts)

    def save_checkpoint(self, path, epoch=None):
        if not distributed.is_main():
            return Path(path)
        return atomic_torch_save(self.checkpoint_state(self.current_epoch if epoch is None else epoch), path)

    def save_model(self, path, threshold, epoch=None):
        # model.pt, the one file test, predict and export rebuild the model from: weights, threshold,
        # normalisation, resolved config and package version; no optimizer state
        check_threshold(threshold, path)
        if not distributed.is_main():
            return Path(path)
        state = self.checkpoint_state(self.current_epoch if epoch is None else epoch, training_state=False)
        state.update({"kind": "model", "threshold": threshold})
        return atomic_torch_save(state, path)

    def load_checkpoint(self, path, restore_training_state=False):
        # under torchrun the first process reads the file and sends it to the others
        state = distributed.broadcast_object(
            load_checkpoint_file(path, expected_model_class=type(self.model).__name__) if distributed.is_main()
            else None)
        self.model.load_state_dict(state["model"])
        if restore_training_state:
            if self.optimizer is not None and state.get("optimizer") is not None:
                self.optimizer.load_state_dict(state["optimizer"])
            if self.scheduler is not None and state.get("scheduler") is not None:
                self.scheduler.load_state_dict(state["scheduler"])
            if self.scaler.is_enabled() and state.get("scaler") is not None:
                self.scaler.load_state_dict(state["scaler"])
            self.global_step = int(state.get("global_step", 0))
            self.best_value = state.get("best_value")
            self.history = list(state.get("history") or [])
            restore_rng_state(state.get("rng"))
        return int(state["epoch"])


def batch_length(batch):
    for value in batch.values():
        if isinstance(value, torch.Tensor):
            return value.shape[0]
        if isinstance(value, (list, tuple)):
            return len(value)
    return 0


def split_batch(batch, micro_batch_size):
    size = batch_length(batch) if isinstance(batch, dict) else 0
    if not micro_batch_size or size <= micro_batch_size:
        return [batch]
    return [{key: value[start:start + micro_batch_size] for key, value in batch.items()}
            for start in range(0, size, micro_batch_size)]


def resolve_amp_dtype(mixed_precision, device):
    if mixed_precision in (None, False, "false", "no", "off"):
        return None
    choices = {True: None, "true": None, "auto": None, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
               "fp16": torch.float16, "float16": torch.float16}
    if mixed_precision not in choices:
        raise ValueError(f"training.mixed_precision must be false, true/auto, bf16 or fp16, got '{mixed_precision}'")
    dtype = choices[mixed_precision]
    if device.type == "cuda":
        return dtype or torch.float16
    if device.type == "cpu":
        if dtype == torch.float16:
            raise ValueError("training.mixed_precision=fp16 needs CUDA; on the CPU use bf16")
        if not cpu_has_native_bf16():
            logger.warning("mixed precision: this CPU has no native bfloat16 support, training in float32")
            return None
        return torch.bfloat16
    logger.warning("mixed precision is not supported on %s: training in float32", device.type)
    return None


def load_checkpoint_file(path, expected_model_class=None, map_location="cpu"):
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:
        raise CheckpointError(f"Cannot read checkpoint {path}: the file is corrupt or not a checkpoint "
                              f"({type(error).__name__}: {error})") from None
    if not isinstance(state, dict) or "model" not in state or "model_class" not in state:
        raise CheckpointError(f"{path} is not an anomaly_detection checkpoint (no 'model'/'model_class' keys)")
    if expected_model_class is not None and state["model_class"] != expected_model_class:
        raise CheckpointError(f"Checkpoint {path} holds a {state['model_class']}, "
                              f"but this trainer's model is a {expected_model_class}")
    return state


def capture_rng_state():
    numpy_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(numpy_state[1].astype(np.int64)), "pos": int(numpy_state[2]),
                  "has_gauss": int(numpy_state[3]), "cached_gaussian": float(numpy_state[4])},
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state):
    if not state:
        return
    torch.set_rng_state(state["torch"])
    numpy_state = state["numpy"]
    np.random.set_state(("MT19937", numpy_state["keys"].numpy().astype(np.uint32), numpy_state["pos"],
                         numpy_state["has_gauss"], numpy_state["cached_gaussian"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def trainer_arguments(config):
    # BaseTrainer's own keyword arguments, from the keys configs/default.yaml defines
    training = config["training"]
    return {
        "device": config["device"],
        "seed": config["seed"],
        "config": config,
        "mixed_precision": training["mixed_precision"],
        "gradient_clip_norm": training["gradient_clip_norm"],
        "monitor": training["monitor"],
        "monitor_mode": training["monitor_mode"],
        "progress_bar": training["progress_bar"],
        "micro_batch_size": training["micro_batch_size"],
    }


def model_arguments(config, pretrained=None):
    # config["model"] as keyword arguments of the model's constructor: the YAML keys are its argument names
    arguments = {key: value for key, value in config["model"].items() if key != "name"}
    if pretrained is not None:
        arguments["pretrained"] = pretrained
    if "weights" in arguments and not arguments.get("pretrained", True):
        arguments["weights"] = None
    arguments["backbone_root"] = config["backbone_root"]
    return arguments


def model_normalization(model):
    mean, std = getattr(model, "mean", None), getattr(model, "std", None)
    return {"mean": list(mean), "std": list(std)} if mean is not None and std is not None else None


def check_validation_metrics(val_metrics, epoch):
    for key, value in val_metrics.items():
        if "loss" in key and not math.isfinite(value):
            raise FloatingPointError(
                f"{key} is {value} at epoch {epoch}: the model diverged (the training loss can stay finite while "
                "validation is not). Lower training.learning_rate, set training.gradient_clip_norm, or turn off "
                "training.mixed_precision; no model.pt was written from this run")


def check_threshold(threshold, path):
    if threshold is None:
        return
    for key in ("image_threshold", "pixel_threshold"):
        value = threshold.get(key)
        if value is None or not math.isfinite(float(value)):
            raise FloatingPointError(
                f"not writing {path}: {key} is {value}, the model scored the normal validation images with "
                "non-finite values (it diverged or its inputs hold NaN). Lower training.learning_rate or check "
                "the data; a model with a non-finite threshold would call every image normal")


def to_cpu(value):
    return value.detach().float().cpu() if isinstance(value, torch.Tensor) else value


def prediction_scores(predictions):
    # one score per image: a model's eval dict ("pred_score"), a tensor with one value per image, or a
    # two-class output (logits or probabilities), scored by z1 - z0, which orders images as softmax's p1 does
    if isinstance(predictions, dict):
        if "pred_score" not in predictions:
            raise ValueError("validation_step 'predictions' is a dict without 'pred_score': "
                             f"expected one score per image, got keys {sorted(predictions)}")
        predictions = predictions["pred_score"]
    values = np.asarray(to_cpu(predictions), dtype=np.float64)
    if values.ndim == 0:
        values = values.reshape(1)
    if values.ndim == 1 or values[0].size == 1:
        return values.reshape(values.shape[0])
    if values.ndim == 2 and values.shape[1] == 2:
        return values[:, 1] - values[:, 0]
    raise ValueError(f"validation_step 'predictions' has shape {values.shape}: expected one score per image "
                     "(B or Bx1), two-class outputs (Bx2) or a dict with 'pred_score'")


def validation_auroc(scores, labels):
    from anomaly_detection.metrics import compute_auroc
    if np.unique(labels).size < 2:
        return float("nan")
    return float(compute_auroc(scores, labels))


class OnePassTrainer(BaseTrainer):
    # Methods without gradient training (a memory bank, Gaussian statistics): an epoch is one pass over the
    # normal images through the model's begin_fit / accumulate / finalize_fit. It is this trainer's
    # train_epoch, not a hook, so a subclass that overrides a hook to log something cannot skip the fit.
    def __init__(self, model, device="auto", **kwargs):
        super().__init__(model, None, device=device, **kwargs)
        self.fit_timings = {}

    def configure_optimizers(self):
        return None

    def fit(self, train_loader, val_loader=None, num_epochs=1, resume_from=None):
        # nothing is learned between epochs, so nothing is validated (no images decoded for it); the runner
        # calibrates the threshold on the validation images after the fit
        return super().fit(train_loader, None, num_epochs=num_epochs, resume_from=resume_from)

    def train_epoch(self, train_loader, epoch):
        started = time.perf_counter()
        extract_s = 0.0
        self.model.begin_fit(len(train_loader.dataset) if hasattr(train_loader, "dataset") else None)
        bar = tqdm(train_loader, desc=f"fit {epoch}", disable=not self.show_progress, leave=False)
        for batch_idx, batch in enumerate(bar):
            self.on_train_batch_start(batch, batch_idx)
            step_started = time.perf_counter()
            self.model.accumulate(batch["image"].to(self.device, non_blocking=True))
            extract_s += time.perf_counter() - step_started
            self.global_step += 1
            self.on_train_batch_end(batch, batch_idx, {}, None)
        loop_s = time.perf_counter() - started
        timings = dict(self.model.finalize_fit())
        total_s = time.perf_counter() - started
        timings.update({"extract_s": extract_s, "data_s": max(0.0, loop_s - extract_s),
                        "finalize_s": total_s - loop_s, "total_s": total_s})
        self.fit_timings = timings
        logger.info("%s fit_timings %s", type(self.model).__name__, json.dumps(json_safe(timings)))
        return None

    def training_step(self, batch, batch_idx):
        raise NotImplementedError("a one-pass trainer fits in train_epoch; it has no training_step")

    def validation_step(self, batch, batch_idx):
        raise NotImplementedError("a one-pass trainer does not validate between epochs")
