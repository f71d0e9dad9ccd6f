# src/anomaly_detection/config.py
import copy
import difflib
import functools
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


def override_items(overrides):
    # (key, value, raw text) per override; raw is None for programmatic (dict) overrides
    if overrides is None:
        return []
    if isinstance(overrides, str):
        overrides = [overrides]
    if isinstance(overrides, dict):
        # {"training": {"num_epochs": 3}} is checked key by key, as training.num_epochs=3 would be
        def flat(mapping, prefix):
            for key, value in mapping.items():
                dotted = f"{prefix}{str(key).strip()}"
                if isinstance(value, dict) and value:
                    yield from flat(value, dotted + ".")
                else:
                    yield dotted, value, None
        items = list(flat(overrides, ""))
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
            items.append((key.strip(), value, raw.strip()))
    for key, _, _ in items:
        if not key or any(not part for part in key.split(".")):
            raise ConfigError(f"Override with an empty key part: '{key}=...' (expected e.g. training.num_epochs=5)")
    return items


def nest_items(items):
    result = {}
    for key, value, _ in items:
        nested = value
        for part in reversed(key.split(".")):
            nested = {part: nested}
        result = merge_configs(result, nested)
    return result


def parse_overrides(overrides):
    return nest_items(override_items(overrides))


TYPE_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string", list: "a list",
              dict: "a mapping"}


def leaf_keys(config, prefix=""):
    keys = []
    for key, value in config.items():
        dotted = f"{prefix}{key}"
        keys.append(dotted)
        if isinstance(value, dict):
            keys += leaf_keys(value, dotted + ".")
    return keys


def check_override(defined, key, value, raw, source):
    # defined: the merged YAML files before overrides. A key they do not define is a typo until proven
    # otherwise; a value of another type than the YAML's would fail (or silently mislead) later.
    node = defined
    parts = key.split(".")
    for part in parts:
        if not isinstance(node, dict) or part not in node:
            known = leaf_keys(defined)
            close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"Unknown config key '{key}' (no YAML file of {source} defines it){hint}")
        node = node[part]
    expected = node
    if key in VALUE_RULES:
        # a key with a rule of its own (training.mixed_precision takes false or bf16) is checked by it
        return value
    if expected is None or (value is None and parts[0] == "model"):
        # null in the YAML: the key takes any type (a size, a list of layers, ...); model keys may be
        # set to null where the model documents what null means (its constructor checks the value)
        return value
    if isinstance(expected, str):
        # YAML would read dataset.category=01 as the integer 1: a string key keeps the text as typed
        # (a list stays a list: data.normalization also takes [mean, std], checked by VALUE_RULES)
        if isinstance(value, (str, list)):
            return value
        return raw if raw is not None else str(value)
    if isinstance(expected, bool):
        ok = isinstance(value, bool)
    elif isinstance(expected, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(expected, float):
        if isinstance(value, str):
            # YAML 1.1 reads 1e6 (no dot) as a string; as a number it is what the user meant
            try:
                value = float(value)
            except ValueError:
                pass
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    else:
        ok = isinstance(value, type(expected))
    if not ok:
        shown = raw if raw is not None else repr(value)
        raise ConfigError(f"Config key '{key}' expects {TYPE_NAMES.get(type(expected), type(expected).__name__)} "
                          f"(the YAML has {expected!r}), got '{shown}'")
    return value


def apply_overrides(defined, overrides, source):
    items = [(key, check_override(defined, key, value, raw, source), raw)
             for key, value, raw in override_items(overrides)]
    return merge_configs(defined, nest_items(items))


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


def finalize_config(raw, source, config_dir):
    project_root = Path(config_dir).resolve().parent
    config = resolve_references(raw, builtins={"PROJECT_ROOT": str(project_root)}, source=source)
    return _absolutize_paths(config, project_root)


def load_config(path, overrides=None):
    path = Path(path)
    raw = apply_overrides(read_yaml(path), overrides, str(path))
    return finalize_config(raw, str(path), path.resolve().parent)


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
    source = f"{config_dir} (model={model_name}, dataset={dataset_name})"
    raw = apply_overrides(raw, overrides, source)
    check_values(raw)
    return finalize_config(raw, source, config_dir)


def save_config(config, path):
    return atomic_write_text(path, yaml.safe_dump(config, sort_keys=False, default_flow_style=False))


class _FromYaml:
    def __repr__(self):
        return "FROM_YAML"


# A constructor argument left at FROM_YAML takes the value of configs/models/<model>.yaml (over default.yaml):
# the YAML is the one home of every default, the Python API included.
FROM_YAML = _FromYaml()


@functools.lru_cache(maxsize=None)
def packaged_defaults(model_name):
    config_dir = default_config_dir()
    return merge_configs(read_yaml(config_dir / "default.yaml"),
                         _named_config(config_dir, "models", model_name, "model"))


def fill_from_yaml(model_name, section, arguments):
    wanted = [key for key, value in arguments.items() if value is FROM_YAML]
    if not wanted:
        return dict(arguments)
    defaults = packaged_defaults(model_name).get(section) or {}
    for key in wanted:
        if key not in defaults:
            raise ConfigError(f"{section}.{key} has no value in configs/models/{model_name}.yaml or "
                              f"configs/default.yaml: pass {key}= explicitly or add it to the YAML")
    return {key: copy.deepcopy(defaults[key]) if value is FROM_YAML else value for key, value in arguments.items()}


def _positive_int(value):
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _image_size(value):
    sizes = value if isinstance(value, list) and len(value) == 2 else [value]
    return all(isinstance(v, int) and not isinstance(v, bool) and v >= 8 for v in sizes)


# Keys every run reads, checked before any work so a bad value stops the run before the first epoch rather
# than after training. Model keys are checked by the model's constructor, which also runs before training.
VALUE_RULES = {
    "seed": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0, "an integer >= 0"),
    "device": (lambda v: v in ("auto", "cpu", "mps") or (isinstance(v, str) and re.fullmatch(r"cuda(:\d+)?", v)),
               "auto, cpu, cuda, cuda:N or mps"),
    "cpu_allocator": (lambda v: v in ("keep", "release"), "keep or release"),
    "data.image_size": (_image_size, "an integer >= 8 or [height, width]"),
    "data.center_crop": (lambda v: v is None or _image_size(v), "null, an integer >= 8 or [height, width]"),
    "data.eval_batch_size": (_positive_int, "an integer >= 1"),
    "data.num_workers": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0, "an integer >= 0"),
    "data.val_fraction": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < 1,
                          "a number in [0, 1)"),
    "training.num_epochs": (_positive_int, "an integer >= 1"),
    "training.batch_size": (_positive_int, "an integer >= 1"),
    "training.micro_batch_size": (lambda v: v is None or _positive_int(v), "null or an integer >= 1"),
    "training.gradient_clip_norm": (lambda v: v is None or (isinstance(v, (int, float)) and v > 0),
                                    "null or a number > 0"),
    "training.mixed_precision": (lambda v: v in (False, True, "auto", "bf16", "bfloat16", "fp16", "float16"),
                                 "false, true, bf16 or fp16"),
    "training.monitor_mode": (lambda v: v in ("min", "max"), "min or max"),
    "evaluation.threshold_quantile": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v <= 1,
                                      "a number in (0, 1]"),
    "evaluation.max_panels": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0, "an integer >= 0"),
    "evaluation.pixel_resolution": (lambda v: v in ("input", "native"), "input or native"),
    "data.normalization": (lambda v: v in ("backbone", "imagenet", "half") or (isinstance(v, list) and len(v) == 2),
                           "backbone, imagenet, half or [[mean x3], [std x3]]"),
}


def check_values(config):
    for key, (valid, expected) in VALUE_RULES.items():
        try:
            value = _lookup(config, key)
        except KeyError:
            continue
        if isinstance(value, str) and _REFERENCE.search(value):
            continue
        if not valid(value):
            raise ConfigError(f"Config key '{key}' must be {expected}, got {value!r}")
    return config
