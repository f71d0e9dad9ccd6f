# src/anomaly_detection/config.py
import copy
import os
import re
from pathlib import Path

import yaml

from anomaly_detection.utils import PROJECT_ROOT, atomic_write_text

CONFIG_DIR_ENV = "ANOMALY_DETECTION_CONFIG_DIR"
PATH_KEY_SUFFIXES = ("_dir", "_root", "_path", "_file")
# relative values of these are folders under the dataset's root_dir/category (configs/datasets/folder.yaml)
DATASET_RELATIVE_KEYS = ("normal_dir", "normal_test_dir")
_REFERENCE = re.compile(r"\$\{([^${}]+)\}")


class ConfigError(ValueError):
    pass


def default_config_dir():
    if os.environ.get(CONFIG_DIR_ENV):
        return Path(os.environ[CONFIG_DIR_ENV])
    if (PROJECT_ROOT / "configs").is_dir():
        return PROJECT_ROOT / "configs"
    return Path.cwd() / "configs"


def read_yaml(path):
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ConfigError(f"Invalid YAML in {path}{where}: {getattr(error, 'problem', error)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"Config file {path} must hold a mapping at the top level, got {type(data).__name__}")
    return data


def merge_configs(base, override):
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge_configs(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def parse_overrides(overrides):
    if overrides is None:
        return {}
    if isinstance(overrides, str):
        overrides = [overrides]
    if isinstance(overrides, dict):
        items = overrides.items()
    else:
        items = []
        for text in overrides:
            if "=" not in text:
                raise ConfigError(f"Override '{text}' must look like key=value (e.g. training.num_epochs=5)")
            key, raw = text.split("=", 1)
            try:
                value = yaml.safe_load(raw) if raw.strip() else ""
            except yaml.YAMLError:
                value = raw
            items.append((key.strip(), value))
    result = {}
    for key, value in items:
        if not key:
            raise ConfigError("Override with an empty key")
        nested = value
        for part in reversed(key.split(".")):
            nested = {part: nested}
        result = merge_configs(result, nested)
    return result


def _lookup(config, name):
    node = config
    for part in name.split("."):
        if isinstance(node, dict) and part in node:
            node = node[part]
        else:
            raise KeyError(name)
    return node


def resolve_references(config, builtins=None, source="config"):
    builtins = dict(builtins or {})
    resolved = {}

    def resolve_name(name, chain, user):
        name = name.strip()
        if name in chain:
            cycle = " -> ".join(chain[chain.index(name):] + [name])
            raise ConfigError(f"Cycle in {source}: {cycle}")
        if name in resolved:
            return resolved[name]
        try:
            value = _lookup(config, name)
        except KeyError:
            if name in builtins:
                return builtins[name]
            if name in os.environ:
                return os.environ[name]
            raise ConfigError(
                f"Unknown variable ${{{name}}} used by key '{user}' in {source}: "
                "not a config key, built-in or environment variable") from None
        value = resolve_value(value, chain, name)
        resolved[name] = value
        return value

    def resolve_value(value, chain, key):
        if isinstance(value, dict):
            return {k: resolve_value(v, chain, f"{key}.{k}" if key else k) for k, v in value.items()}
        if isinstance(value, list):
            return [resolve_value(v, chain, key) for v in value]
        if not isinstance(value, str):
            return value
        if key not in chain:
            chain = chain + [key]
        whole = _REFERENCE.fullmatch(value)
        if whole:
            return resolve_name(whole.group(1), chain, key)
        return _REFERENCE.sub(lambda match: str(resolve_name(match.group(1), chain, key)), value)

    return {key: resolve_value(value, [], key) for key, value in config.items()}


def _absolutize_paths(config, project_root):
    for key, value in config.items():
        if isinstance(value, dict):
            _absolutize_paths(value, project_root)
        elif (isinstance(value, str) and value and key.endswith(PATH_KEY_SUFFIXES)
              and key not in DATASET_RELATIVE_KEYS):
            path = Path(os.path.expanduser(value))
            if not path.is_absolute():
                config[key] = str((Path(project_root) / path).resolve())
            elif value.startswith("~"):
                config[key] = str(path)
    return config


def _finalize(raw, source, config_dir):
    project_root = Path(config_dir).resolve().parent
    config = resolve_references(raw, builtins={"PROJECT_ROOT": str(project_root)}, source=source)
    return _absolutize_paths(config, project_root)


def load_config(path, overrides=None):
    path = Path(path)
    raw = merge_configs(read_yaml(path), parse_overrides(overrides))
    return _finalize(raw, str(path), path.resolve().parent)


def available_names(config_dir, group):
    folder = Path(config_dir) / group
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []


def _named_config(config_dir, group, name, kind):
    path = Path(config_dir) / group / f"{name}.yaml"
    if not path.is_file():
        known = ", ".join(available_names(config_dir, group)) or "none"
        raise ConfigError(f"Unknown {kind} '{name}': no {path}. Known {kind}s: {known}")
    return read_yaml(path)


def load_experiment_config(model_name, dataset_name, overrides=None, config_dir=None):
    config_dir = Path(config_dir) if config_dir is not None else default_config_dir()
    if not config_dir.is_dir():
        raise FileNotFoundError(f"Config file not found: config folder {config_dir} does not exist")
    raw = {}
    for part in (read_yaml(config_dir / "paths.yaml"), read_yaml(config_dir / "default.yaml"),
                 _named_config(config_dir, "datasets", dataset_name, "dataset"),
                 _named_config(config_dir, "models", model_name, "model")):
        raw = merge_configs(raw, part)
    raw = merge_configs(raw, {"experiment": {"model": model_name, "dataset": dataset_name}})
    raw = merge_configs(raw, parse_overrides(overrides))
    source = f"{config_dir} (model={model_name}, dataset={dataset_name})"
    return _finalize(raw, source, config_dir)


def save_config(config, path):
    return atomic_write_text(path, yaml.safe_dump(config, sort_keys=False, default_flow_style=False))


def get_nested(config, dotted, default=None):
    try:
        return _lookup(config, dotted)
    except KeyError:
        return default
