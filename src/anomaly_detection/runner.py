# src/anomaly_detection/runner.py
import json
import time
from pathlib import Path

import torch

from anomaly_detection.config import load_experiment_config, parse_overrides, save_config
from anomaly_detection.data import build_dataset, create_dataloader, get_test_transforms, get_train_transforms
from anomaly_detection.data.dataloaders import split_train_val
from anomaly_detection.evaluator import Evaluator
from anomaly_detection.models import get_trainer_class
from anomaly_detection.trainer import CHECKPOINT_FORMAT, load_checkpoint_file
from anomaly_detection.allocator import configure_cpu_allocator
from anomaly_detection.utils import atomic_torch_save, atomic_write_json, logger, peak_rss_mb, seed_everything

SUMMARY_KEYS = ("image_auroc", "pixel_auroc", "aupro", "f1_max", "pixel_f1_max", "image_ap", "pixel_ap")


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
    synthetic = config["dataset"].get("synthetic")
    if synthetic:
        from anomaly_detection.data.synthetic import generate_synthetic_category
        generate_synthetic_category(config["dataset"]["root_dir"], category=category, **synthetic)


def build_transforms(config):
    data = config["data"]
    backbone = config["model"].get("backbone")
    options = {"image_size": data.get("image_size", 256), "center_crop": data.get("center_crop"),
               "normalization": data.get("normalization", "backbone"), "backbone": backbone}
    return get_train_transforms(**options), get_test_transforms(**options)


def build_loaders(config, category):
    train_transform, test_transform = build_transforms(config)
    data, training = config["data"], config["training"]
    train_full = build_dataset(config["dataset"], "train", train_transform, category=category)
    train_set, val_set = split_train_val(train_full, data.get("val_fraction", 0.1), seed=config.get("seed", 0))
    if val_set is not None:
        # validation images are scored like test images: no training augmentation
        val_set.dataset = build_dataset(config["dataset"], "train", test_transform, category=category)
    workers = int(data.get("num_workers", 0))
    train_loader = create_dataloader(train_set, int(training.get("batch_size", 32)), shuffle=True,
                                     num_workers=workers, drop_last=bool(training.get("drop_last", False)))
    val_loader = create_dataloader(val_set, eval_batch_size(config), num_workers=workers) if val_set is not None else None
    return train_loader, val_loader, build_test_loader(config, category, test_transform)


def eval_batch_size(config):
    return int(config["data"].get("eval_batch_size", config["training"].get("batch_size", 32)))


def build_test_loader(config, category, test_transform=None):
    test_transform = test_transform or build_transforms(config)[1]
    test_set = build_dataset(config["dataset"], "test", test_transform, category=category)
    return create_dataloader(test_set, eval_batch_size(config), num_workers=int(config["data"].get("num_workers", 0)))


def make_evaluator(config, model, results_dir):
    evaluation = config.get("evaluation", {})
    return Evaluator(model, device=config.get("device", "auto"), output_dir=results_dir,
                     max_panels=evaluation.get("max_panels", 40), figures=evaluation.get("figures", True),
                     progress_bar=config["training"].get("progress_bar", True))


def save_model_file(path, trainer, config, threshold, epoch):
    state = {"format": CHECKPOINT_FORMAT, "model_class": type(trainer.model).__name__,
             "model_name": config["model"]["name"], "model": trainer.model.state_dict(),
             "config": config, "threshold": threshold, "epoch": epoch}
    return atomic_torch_save(state, path)


def train_and_evaluate(config, category=None, resume=False):
    category = str(category if category is not None else config["dataset"]["category"])
    # the category is part of how the run's config is rebuilt later (test, predict): quoted so "01" stays a string
    experiment = dict(config["experiment"], overrides=list(config["experiment"].get("overrides") or [])
                      + [f"dataset.category={json.dumps(category)}"])
    config = dict(config, dataset=dict(config["dataset"], category=category), experiment=experiment)
    seed_everything(int(config.get("seed", 0)))
    configure_cpu_allocator(config.get("cpu_allocator"))
    ensure_dataset(config, category)
    dirs = output_dirs(config, category)
    save_config(config, dirs["results"] / "config.yaml")
    save_config(config, dirs["checkpoints"] / "config.yaml")
    train_loader, val_loader, test_loader = build_loaders(config, category)
    trainer = get_trainer_class(config["model"]["name"]).from_config(
        config, checkpoint_dir=dirs["checkpoints"], log_dir=dirs["logs"])
    last = dirs["checkpoints"] / "last.pt"
    resume_from = last if resume and last.is_file() else None
    if resume and resume_from is None:
        logger.warning("--resume: no checkpoint at %s, starting from scratch", last)

    started = time.perf_counter()
    trainer.fit(train_loader, val_loader, num_epochs=int(config["training"]["num_epochs"]), resume_from=resume_from)
    best = dirs["checkpoints"] / "best.pt"
    epoch = trainer.load_checkpoint(best) if best.is_file() else trainer.current_epoch
    evaluator = make_evaluator(config, trainer.model, dirs["results"])
    quantile = float(config.get("evaluation", {}).get("threshold_quantile", 0.99))
    threshold_loader = val_loader
    if threshold_loader is None:
        logger.warning("no validation images (data.val_fraction=0): the threshold comes from the training images")
        threshold_loader = create_dataloader(train_loader.dataset, train_loader.batch_size)
    threshold = evaluator.calibrate_threshold(threshold_loader, quantile)
    fit_s = time.perf_counter() - started
    fit_peak_rss_mb = peak_rss_mb()
    model_path = save_model_file(dirs["checkpoints"] / "model.pt", trainer, config, threshold, epoch)

    started = time.perf_counter()
    metrics = evaluator.evaluate(test_loader, threshold)
    test_s = time.perf_counter() - started
    epochs = [record for record in trainer.history if "train_s" in record]
    return summarize(config, category, metrics, dirs["results"], model_path, fit_s=fit_s, test_s=test_s,
                     num_test_images=len(test_loader.dataset), num_train_images=len(train_loader.dataset),
                     epochs_run=len(epochs), best_epoch=epoch, fit_peak_rss_mb=fit_peak_rss_mb,
                     train_s_per_epoch=sum(r["train_s"] for r in epochs) / len(epochs) if epochs else None,
                     epoch_s=[round(r["epoch_s"], 3) for r in epochs])


def summarize(config, category, metrics, results_dir, model_path, **figures):
    summary = {"model": config["model"]["name"], "dataset": config["experiment"]["dataset"], "category": category}
    summary.update({key: metrics.get(key) for key in SUMMARY_KEYS})
    summary.update(figures)
    summary["test_s_per_image"] = figures["test_s"] / max(1, figures.get("num_test_images", 1))
    summary["peak_rss_mb"] = peak_rss_mb()
    summary["results_dir"] = str(results_dir)
    summary["checkpoint"] = str(model_path)
    atomic_write_json(Path(results_dir) / "summary.json", summary)
    return summary


def config_from_checkpoint(state, overrides=None, config_dir=None):
    saved = state.get("config") or {}
    experiment = saved.get("experiment") or {}
    extra = overrides if isinstance(overrides, list) else [f"{k}={v}" for k, v in (overrides or {}).items()]
    if experiment.get("model") and experiment.get("dataset"):
        try:
            return build_config(experiment["model"], experiment["dataset"],
                                list(experiment.get("overrides") or []) + extra, config_dir)
        except FileNotFoundError:
            logger.warning("the config folder is not available: using the config saved in the checkpoint")
    from anomaly_detection.config import merge_configs
    return merge_configs(saved, parse_overrides(extra))


def load_trained_model(checkpoint_path, config):
    trainer_class = get_trainer_class(config["model"]["name"])
    # the checkpoint holds every weight, the backbone's too, so no backbone file is needed here
    model = trainer_class.build_model(config, pretrained=False)
    state = load_checkpoint_file(checkpoint_path, expected_model_class=type(model).__name__)
    model.load_state_dict(state["model"])
    return model, state


def test_checkpoint(checkpoint_path, overrides=None, config_dir=None):
    state = load_checkpoint_file(checkpoint_path)
    config = config_from_checkpoint(state, overrides, config_dir)
    configure_cpu_allocator(config.get("cpu_allocator"))
    category = str(config["dataset"]["category"])
    ensure_dataset(config, category)
    model, state = load_trained_model(checkpoint_path, config)
    dirs = output_dirs(config, category)
    test_loader = build_test_loader(config, category)
    evaluator = make_evaluator(config, model, dirs["results"])
    started = time.perf_counter()
    metrics = evaluator.evaluate(test_loader, state.get("threshold"))
    test_s = time.perf_counter() - started
    return summarize(config, category, metrics, dirs["results"], checkpoint_path, fit_s=0.0, test_s=test_s,
                     num_test_images=len(test_loader.dataset))


def predict_images(checkpoint_path, image_paths, output_dir=None, overrides=None, config_dir=None):
    from anomaly_detection.data.datasets import load_image_raw
    from anomaly_detection.metrics import denormalize_image, plot_anomaly_panel
    state = load_checkpoint_file(checkpoint_path)
    config = config_from_checkpoint(state, overrides, config_dir)
    configure_cpu_allocator(config.get("cpu_allocator"))
    model, state = load_trained_model(checkpoint_path, config)
    _, transform = build_transforms(config)
    evaluator = Evaluator(model, device=config.get("device", "auto"), progress_bar=False)
    threshold = state.get("threshold") or {}
    results = []
    model.eval()
    for path in image_paths:
        image = transform(load_image_raw(path))
        with torch.no_grad():
            outputs = evaluator.model(image[None].to(evaluator.device))
        score = float(outputs["pred_score"][0])
        record = {"image_path": str(path), "score": score}
        if "image_threshold" in threshold:
            record["anomalous"] = bool(score >= threshold["image_threshold"])
        if output_dir is not None:
            anomaly_map = outputs["anomaly_map"][0, 0].cpu().numpy()
            figure_path = Path(output_dir) / f"{Path(path).stem}_prediction.png"
            plot_anomaly_panel(denormalize_image(image, model.mean, model.std), anomaly_map * 0, anomaly_map,
                               threshold.get("pixel_threshold", float(anomaly_map.max())),
                               f"{Path(path).name} score {score:.4g}", figure_path)
            record["figure"] = str(figure_path)
        results.append(record)
    return results
