# src/anomaly_detection/run_config.py
from anomaly_detection.config import (
    PATH_KEY_SUFFIXES, ConfigError, check_override, default_config_dir, finalize_config, load_experiment_config,
    merge_configs, nest_items, override_items,
)
from anomaly_detection.data.transforms import resolve_normalization
from anomaly_detection.utils import logger

# Settings a trained model is bound to: changing them for test, predict or --resume would score images
# with a model (and a threshold) made for other inputs, so they are refused rather than warned about.
BINDING_KEYS = ("model.", "data.image_size", "data.center_crop", "data.normalization", "experiment.model")
# ...except these model keys, which choose how a fitted PatchCore searches its bank (where, in what chunks, with
# which arithmetic), not what it learned: the scores stay the exact search's (bfloat16: see the phase 4 guide)
SEARCH_KEYS = ("model.search_backend", "model.search_precision", "model.memory_budget_mb", "model.sharded_search")
# bookkeeping, not settings
IGNORED_KEYS = ("experiment.overrides",)


def resolve_normalization_config(config):
    # data.normalization: backbone becomes the backbone's own [mean, std], so the resolved config (and the
    # checkpoint) says exactly what the transforms do, and data/ never has to ask a model
    normalization = config["data"]["normalization"]
    if normalization == "backbone":
        from anomaly_detection.models.backbones import get_backbone_normalization
        if "backbone" not in config["model"]:
            raise ConfigError("data.normalization: backbone, but this model has no model.backbone: set "
                              "data.normalization to imagenet, half or [[mean x3], [std x3]]")
        normalization = get_backbone_normalization(config["model"]["backbone"])
    mean, std = resolve_normalization(normalization)
    return dict(config, data=dict(config["data"], normalization=[list(mean), list(std)]))


def flatten(config, prefix=""):
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def differences(old, new):
    old, new = flatten(old), flatten(new)
    for key in sorted(set(old) | set(new)):
        if key.startswith(IGNORED_KEYS):
            continue
        if old.get(key, "<absent>") != new.get(key, "<absent>"):
            yield key, old.get(key, "<absent>"), new.get(key, "<absent>")


def is_binding(key):
    # "model." binds every key under model; the others are single keys
    if key in SEARCH_KEYS:
        return False
    return any(key.startswith(prefix) if prefix.endswith(".") else key == prefix for prefix in BINDING_KEYS)


def check_resume_config(saved, config, path):
    saved = resolve_normalization_config(saved)
    changed = list(differences(saved, config))
    refused = [(key, old, new) for key, old, new in changed if is_binding(key)]
    if refused:
        listed = "; ".join(f"{key} was {old!r}, now {new!r}" for key, old, new in refused)
        raise ConfigError(f"--resume from {path}: {listed}. A run cannot continue with another model or input "
                          "size: restore the setting, or start a new run without --resume")
    for key, old, new in changed:
        logger.warning("--resume from %s: %s changed from %r to %r; continuing with the new value", path, key, old, new)


def current_files_config(saved, config_dir):
    experiment = saved.get("experiment") or {}
    if not experiment.get("model") or not experiment.get("dataset"):
        return None
    try:
        current = load_experiment_config(experiment["model"], experiment["dataset"],
                                         list(experiment.get("overrides") or []), config_dir)
        return resolve_normalization_config(current)
    except (FileNotFoundError, ConfigError, ValueError) as error:
        logger.warning("the config files cannot be read (%s): using the checkpoint's config as it is", error)
        return None


def checkpoint_config(state, overrides=None, config_dir=None, path="the checkpoint"):
    # test, predict and export use the config the model was trained with, not today's YAML files
    saved = state.get("config")
    if not isinstance(saved, dict) or "model" not in saved:
        raise ConfigError(f"{path} holds no training config: it was not written by anomaly_detection's trainer")
    saved = resolve_normalization_config(saved)
    current = current_files_config(saved, config_dir)
    config = saved
    if current is not None:
        for key, old, new in differences(saved, current):
            if old == "<absent>" or key.endswith(PATH_KEY_SUFFIXES):
                # a key added since training takes its current default; folders are where things are,
                # not how the model was made (the checkpoint's are used, and a missing one is named)
                continue
            logger.warning("%s: the config files now say %s=%r, the model was trained with %r: using the "
                           "checkpoint's value", path, key, new, old)
        # keys added since the checkpoint was written take their current defaults
        config = merge_configs(current, saved)
    checked = []
    for key, value, raw in override_items(overrides):
        value = check_override(config, key, value, raw, str(path))
        old = flatten(config).get(key, "<absent>")
        if is_binding(key) and value != old:
            raise ConfigError(f"{key}={value!r} differs from the checkpoint's {old!r}: {path} was trained "
                              "(and its threshold calibrated) with that value; retrain to change it")
        if value != old:
            logger.warning("%s: %s overridden, %r -> %r", path, key, old, value)
        checked.append((key, value, raw))
    config = merge_configs(config, nest_items(checked))
    return finalize_config(config, str(path), config_dir or default_config_dir())
