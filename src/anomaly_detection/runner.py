# src/anomaly_detection/runner.py
import json
import time
from pathlib import Path

from anomaly_detection import distributed
from anomaly_detection.allocator import configure_cpu_allocator
from anomaly_detection.config import load_experiment_config, save_config
from anomaly_detection.data import build_dataset, create_dataloader, get_test_transforms, get_train_transforms
from anomaly_detection.data.dataloaders import split_train_val
from anomaly_detection.evaluator import Evaluator
from anomaly_detection.models import get_trainer_class
from anomaly_detection.run_config import check_resume_config, checkpoint_config, resolve_normalization_config
from anomaly_detection.trainer import OnePassTrainer, load_checkpoint_file
from anomaly_detection.utils import atomic_write_json, logger, peak_rss_mb, seed_everything

SUMMARY_KEYS = ("image_auroc", "pixel_auroc", "aupro", "f1_max", "pixel_f1_max", "image_ap", "pixel_ap")
# below this many normal validation images a 0.99 quantile is little more than their maximum
MIN_THRESHOLD_IMAGES = 10


def build_config(model_name, dataset_name, overrides=None, config_dir=None):
    overrides = list(overrides or []) if not isinstance(overrides, dict) else overrides
    config = load_experiment_config(model_name, dataset_name, overrides, config_dir)
    config["experiment"]["overrides"] = overrides if isinstance(overrides, list) else \
        [f"{k}={v}" for k, v in overrides.items()]
    return config


def output_dirs(config, category):
    parts = (config["model"]["name"], config["experiment"]["dataset"], str(category))
    return {
        "results": Path(config["results_dir"]).joinpath(*parts),
        "checkpoints": Path(config["checkpoint_dir"]).joinpath(*parts),
        "logs": Path(config["log_dir"]).joinpath(*parts),
    }


def ensure_dataset(config, category):
    synthetic = config["dataset"].get("synthetic")  # only the generated demo dataset has this section
    if synthetic and distributed.is_main():
        from anomaly_detection.data.synthetic import generate_synthetic_category
        generate_synthetic_category(config["dataset"]["root_dir"], category=category, **synthetic)
    distributed.barrier()  # under torchrun the other processes read what the first one wrote


def build_transforms(config):
    data = config["data"]
    options = {"image_size": data["image_size"], "center_crop": data["center_crop"],
               "normalization": data["normalization"]}
    return get_train_transforms(**options), get_test_transforms(**options)


def build_loaders(config, category):
    train_transform, test_transform = build_transforms(config)
    data, training = config["data"], config["training"]
    # the test split is read (every header checked) before training, so a bad test file stops the run now
    test_loader = build_test_loader(config, category, test_transform)
    train_full = build_dataset(config["dataset"], "train", train_transform, category=category)
    train_set, val_set = split_train_val(train_full, data["val_fraction"], seed=config["seed"])
    if val_set is not None:
        # validation images are scored like test images: no training augmentation (same files, checked above)
        val_set.dataset = build_dataset(dict(config["dataset"], check_files=False), "train", test_transform,
                                        category=category)
    # a one-pass model reads the training images once, in the dataset's order: its fit (PatchCore's coreset
    # starts from an index into that order) is then the same for one process and for N
    one_pass = issubclass(get_trainer_class(config["model"]["name"]), OnePassTrainer)
    train_loader = create_dataloader(train_set, training["batch_size"], shuffle=not one_pass,
                                     num_workers=data["num_workers"],
                                     sampler=train_sampler(config, train_set, one_pass))
    val_loader = create_dataloader(val_set, data["eval_batch_size"], num_workers=data["num_workers"],
                                   sampler=shard_sampler(config, val_set)) if val_set is not None else None
    return train_loader, val_loader, test_loader


def train_sampler(config, train_set, one_pass):
    # under torchrun each process reads its share of the training images. A gradient-trained model gets
    # PyTorch's DistributedSampler (reshuffled each epoch; it repeats a few images so every process runs as many
    # steps); a one-pass model must see every image exactly once, so it gets disjoint shards of whole batches
    if not distributed.active():
        return None
    if one_pass:
        return distributed.ShardSampler(train_set, config["training"]["batch_size"])
    from torch.utils.data.distributed import DistributedSampler
    return DistributedSampler(train_set, num_replicas=distributed.world_size(), rank=distributed.rank(),
                              shuffle=True, seed=int(config["seed"]))


def shard_sampler(config, dataset):
    # validation and test images: disjoint shards of whole batches, gathered back into the dataset's order
    if not distributed.active() or get_trainer_class(config["model"]["name"]).scores_whole_splits(config):
        return None
    return distributed.ShardSampler(dataset, config["data"]["eval_batch_size"])


def build_test_loader(config, category, test_transform=None):
    test_transform = test_transform or build_transforms(config)[1]
    test_set = build_dataset(config["dataset"], "test", test_transform, category=category)
    # native-resolution pixel metrics read every mask at its own size: the first process scores the whole split
    sharded = config["evaluation"]["pixel_resolution"] == "input"
    return create_dataloader(test_set, config["data"]["eval_batch_size"], num_workers=config["data"]["num_workers"],
                             sampler=shard_sampler(config, test_set) if sharded else None)


def make_evaluator(config, model, results_dir):
    evaluation = config["evaluation"]
    mean, std = config["data"]["normalization"]
    return Evaluator(model, device=config["device"], output_dir=results_dir, mean=mean, std=std,
                     max_panels=evaluation["max_panels"], figures=evaluation["figures"],
                     progress_bar=config["training"]["progress_bar"],
                     pixel_resolution=evaluation["pixel_resolution"])


def prepare_run_config(config, category):
    # the category is part of how the run's config is rebuilt later: quoted so "01" stays a string
    experiment = dict(config["experiment"], overrides=list(config["experiment"].get("overrides") or [])
                      + [f"dataset.category={json.dumps(category)}"])
    config = dict(config, dataset=dict(config["dataset"], category=category), experiment=experiment)
    return resolve_normalization_config(config)


def train_and_evaluate(config, category=None, resume=False):
    category = str(category if category is not None else config["dataset"]["category"])
    config = prepare_run_config(config, category)
    seed_everything(config["seed"])
    configure_cpu_allocator(config["cpu_allocator"])
    ensure_dataset(config, category)
    dirs = output_dirs(config, category)
    last = dirs["checkpoints"] / "last.pt"
    # under torchrun the first process reads the checkpoints and sends them (no shared folder needed)
    resume_from = last if resume and distributed.broadcast_object(last.is_file()) else None
    if resume and resume_from is None:
        logger.warning("--resume: no checkpoint at %s, starting from scratch", last)
    if resume_from is not None and distributed.is_main():
        check_resume_config(load_checkpoint_file(resume_from)["config"], config, resume_from)
    train_loader, val_loader, test_loader = build_loaders(config, category)
    trainer = get_trainer_class(config["model"]["name"]).from_config(
        config, checkpoint_dir=dirs["checkpoints"], log_dir=dirs["logs"])
    if distributed.is_main():
        save_config(config, dirs["results"] / "config.yaml")
        save_config(config, dirs["checkpoints"] / "config.yaml")

    started = time.perf_counter()
    trainer.fit(train_loader, val_loader, num_epochs=config["training"]["num_epochs"], resume_from=resume_from)
    best = dirs["checkpoints"] / "best.pt"
    epoch = trainer.load_checkpoint(best) if distributed.broadcast_object(best.is_file()) else trainer.current_epoch
    warn_if_first_epoch_kept(trainer.history, epoch, len(train_loader), trainer.monitor)
    evaluator = make_evaluator(config, trainer.model, dirs["results"])
    threshold = calibrate_threshold(evaluator, val_loader, train_loader, config["evaluation"]["threshold_quantile"])
    fit_s = time.perf_counter() - started
    fit_peak_rss_mb = peak_rss_mb()
    model_path = trainer.save_model(dirs["checkpoints"] / "model.pt", threshold, epoch)

    started = time.perf_counter()
    metrics = evaluator.evaluate(test_loader, threshold)
    test_s = time.perf_counter() - started
    epochs = [record for record in trainer.history if "train_s" in record]
    return summarize(config, category, metrics, dirs["results"], model_path, fit_s=fit_s, test_s=test_s,
                     num_test_images=len(test_loader.dataset), num_train_images=len(train_loader.dataset),
                     epochs_run=len(epochs), best_epoch=epoch, fit_peak_rss_mb=fit_peak_rss_mb,
                     train_s_per_epoch=sum(r["train_s"] for r in epochs) / len(epochs) if epochs else None,
                     epoch_s=[round(r["epoch_s"], 3) for r in epochs])


def warn_if_first_epoch_kept(history, kept_epoch, steps_per_epoch, monitor):
    # every later epoch scored worse on the validation images. After a few optimizer steps that is often not the
    # weights but BatchNorm statistics lagging them (eval-mode validation): say so, the model kept is nearly untrained
    epochs = [record["epoch"] for record in history if monitor in record]
    if len(epochs) < 2 or kept_epoch != min(epochs):
        return False
    logger.warning("%s kept epoch %d of %d (%d optimizer step(s) per epoch): every later epoch scored worse on the "
                   "validation images. In a short run BatchNorm running statistics lag the weights and can make "
                   "this happen to a model that is still learning; check the epochs' %s in the log, or train "
                   "longer (more epochs or a smaller training.batch_size)",
                   monitor, kept_epoch, len(epochs), steps_per_epoch, monitor)
    return True


def calibrate_threshold(evaluator, val_loader, train_loader, quantile):
    loader = val_loader
    if loader is None:
        logger.warning("no validation images (data.val_fraction=0): the threshold comes from the training images, "
                       "which the model has seen, so it is optimistic")
        loader = create_dataloader(train_loader.dataset, train_loader.batch_size)
    threshold = evaluator.calibrate_threshold(loader, quantile)
    if threshold["num_images"] < MIN_THRESHOLD_IMAGES:
        logger.warning("the threshold (quantile %s) comes from only %d normal image(s), fewer than %d: it is little "
                       "more than their maximum; raise data.val_fraction or add training images",
                       quantile, threshold["num_images"], MIN_THRESHOLD_IMAGES)
    return threshold


def summarize(config, category, metrics, results_dir, model_path, **figures):
    summary = {"model": config["model"]["name"], "dataset": config["experiment"]["dataset"], "category": category}
    summary.update({key: metrics.get(key) for key in SUMMARY_KEYS})
    summary.update(figures)
    summary["test_s_per_image"] = figures["test_s"] / max(1, figures["num_test_images"])
    summary["peak_rss_mb"] = peak_rss_mb()
    summary["results_dir"] = str(results_dir)
    summary["checkpoint"] = str(model_path)
    if distributed.active():
        summary["processes"] = distributed.world_size()
    if distributed.is_main():
        atomic_write_json(Path(results_dir) / "summary.json", summary)
    return summary


def load_model_file(checkpoint_path, overrides=None, config_dir=None):
    # model.pt is read once: its config (the run's own, with overrides checked against it), its weights
    # and its threshold
    state = load_checkpoint_file(checkpoint_path)
    config = checkpoint_config(state, overrides, config_dir, checkpoint_path)
    trainer_class = get_trainer_class(config["model"]["name"])
    # the checkpoint holds every weight, the backbone's too, so no backbone file is needed here
    model = trainer_class.build_model(config, pretrained=False)
    if state["model_class"] != type(model).__name__:
        raise ValueError(f"Checkpoint {checkpoint_path} holds a {state['model_class']}, but its config builds a "
                         f"{type(model).__name__}")
    model.load_state_dict(state["model"])
    return model, config, state


def test_checkpoint(checkpoint_path, overrides=None, config_dir=None):
    model, config, state = load_model_file(checkpoint_path, overrides, config_dir)
    configure_cpu_allocator(config["cpu_allocator"])
    category = str(config["dataset"]["category"])
    ensure_dataset(config, category)
    dirs = output_dirs(config, category)
    test_loader = build_test_loader(config, category)
    evaluator = make_evaluator(config, model, dirs["results"])
    started = time.perf_counter()
    metrics = evaluator.evaluate(test_loader, state.get("threshold"))
    test_s = time.perf_counter() - started
    return summarize(config, category, metrics, dirs["results"], checkpoint_path, fit_s=0.0, test_s=test_s,
                     num_test_images=len(test_loader.dataset))
