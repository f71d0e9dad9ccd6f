# tests/phase_00/test_config.py
import os
import shutil
from pathlib import Path

import pytest

from anomaly_detection.config import (
    CONFIG_DIR_ENV, ConfigError, available_names, load_config, load_experiment_config,
    merge_configs, parse_overrides, save_config,
)
from anomaly_detection.data import DATASETS
from anomaly_detection.utils import PROJECT_ROOT

CONFIGS = PROJECT_ROOT / "configs"


@pytest.fixture(autouse=True)
def no_config_dir_from_environment(monkeypatch):
    monkeypatch.delenv(CONFIG_DIR_ENV, raising=False)


@pytest.fixture
def config_dir(tmp_path):
    folder = tmp_path / "project" / "configs"
    shutil.copytree(CONFIGS, folder)
    return folder


def write(path, text):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_project_config_files_exist():
    for name in ("paths.yaml", "default.yaml"):
        assert (CONFIGS / name).is_file()
    assert {"mvtec", "visa", "btad", "folder"} <= set(available_names(CONFIGS, "datasets"))
    assert "stfpm" in available_names(CONFIGS, "models")


def test_load_paths_substitutes_variables():
    config = load_config(CONFIGS / "paths.yaml")
    assert type(config) is dict
    assert config["project_root"] == str(PROJECT_ROOT)
    assert config["mvtec_dir"] == os.path.join(config["dataset_root"], "mvtec")
    assert config["checkpoint_dir"] == os.path.join(config["output_dir"], "checkpoints")
    assert all("${" not in str(value) for value in config.values())


def test_seed_load_config_call_from_the_project_root(monkeypatch):
    monkeypatch.chdir(PROJECT_ROOT)
    config = load_config("configs/paths.yaml")
    assert Path(config["mvtec_dir"]).is_absolute()
    assert config["source_dir"] == str(PROJECT_ROOT / "src")


def test_experiment_config_merge_order(config_dir):
    config = load_experiment_config("stfpm", "mvtec", config_dir=config_dir)
    assert type(config) is dict and type(config["training"]) is dict
    # models/stfpm.yaml wins over default.yaml, key by key
    assert config["training"]["num_epochs"] == 100
    assert config["training"]["mixed_precision"] is False
    assert config["data"]["image_size"] == 256
    assert config["model"]["name"] == "stfpm"
    assert config["dataset"]["name"] == "mvtec"
    assert config["dataset"]["root_dir"] == config["mvtec_dir"]
    write(config_dir / "datasets" / "mvtec.yaml",
          "dataset:\n  name: mvtec\n  root_dir: ${mvtec_dir}\n  category: bottle\ntraining:\n  num_epochs: 7\n"
          "  batch_size: 5\n")
    config = load_experiment_config("stfpm", "mvtec", config_dir=config_dir)
    # the model file sets num_epochs, so it wins over the dataset file; it leaves batch_size to the others
    assert config["training"]["num_epochs"] == 100
    assert config["training"]["batch_size"] == 5
    write(config_dir / "models" / "stfpm.yaml", "model:\n  name: stfpm\n")
    config = load_experiment_config("stfpm", "mvtec", config_dir=config_dir)
    assert config["training"]["num_epochs"] == 7 and config["training"]["batch_size"] == 5


@pytest.mark.parametrize("dataset", ["mvtec", "visa", "btad", "folder", "demo"])
def test_every_dataset_config_loads(dataset):
    config = load_experiment_config("stfpm", dataset)
    assert config["dataset"]["name"] in DATASETS
    assert Path(config["dataset"]["root_dir"]).is_absolute()


def test_folder_config_keeps_relative_subfolders():
    config = load_experiment_config("stfpm", "folder")
    assert config["dataset"]["normal_dir"] == "good"
    assert config["dataset"]["abnormal_dirs"] == ["defect"]


def test_overrides_dict_and_strings(config_dir):
    config = load_experiment_config("stfpm", "mvtec", config_dir=config_dir, overrides={
        "training": {"num_epochs": 3}, "model.backbone": "resnet50"})
    assert config["training"]["num_epochs"] == 3 and config["training"]["learning_rate"] == 0.4
    assert config["model"]["backbone"] == "resnet50"
    config = load_experiment_config("stfpm", "mvtec", config_dir=config_dir, overrides=[
        "training.num_epochs=5", "model.pretrained=false", "data.center_crop=null", "model.layers=[layer1, layer2]",
        "training.learning_rate=0.01", "dataset.category=cable", "model.weights=", "dataset.category=a=b"])
    assert config["training"]["num_epochs"] == 5
    assert config["model"]["pretrained"] is False
    assert config["data"]["center_crop"] is None
    assert config["model"]["layers"] == ["layer1", "layer2"]
    assert config["training"]["learning_rate"] == pytest.approx(0.01)
    assert config["model"]["weights"] == ""
    assert config["dataset"]["category"] == "a=b"
    assert load_experiment_config("stfpm", "mvtec", config_dir=config_dir,
                                  overrides="seed=3")["seed"] == 3


@pytest.mark.parametrize("override, message", [
    ("traning.num_epochs=3", "Unknown config key 'traning.num_epochs'.*did you mean 'training.num_epochs'"),
    ("model.backbon=resnet50", "Unknown config key 'model.backbon'.*did you mean 'model.backbone'"),
    ("training.num_epochs.extra=1", "Unknown config key 'training.num_epochs.extra'"),
    ("nothing_like_it=1", "Unknown config key 'nothing_like_it'"),
    ("training.num_epochs=abc", "'training.num_epochs' must be an integer >= 1, got 'abc'"),
    ("training.num_epochs=2.5", "'training.num_epochs' must be an integer >= 1, got 2.5"),
    ("training.momentum=high", "'training.momentum' expects a number.*got 'high'"),
    ("training.learning_rate=fast", "'training.learning_rate' expects a number.*got 'fast'"),
    ("model.pretrained=maybe", "'model.pretrained' expects true or false.*got 'maybe'"),
    ("training.num_epochs=0", "'training.num_epochs' must be an integer >= 1, got 0"),
    ("evaluation.threshold_quantile=1.5", "'evaluation.threshold_quantile' must be a number in \\(0, 1\\], got 1.5"),
    ("data.val_fraction=1", "'data.val_fraction' must be a number in \\[0, 1\\), got 1"),
    ("device=gpu", "'device' must be auto, cpu, cuda, cuda:N or mps, got 'gpu'"),
    ("cpu_allocator=fast", "'cpu_allocator' must be keep or release, got 'fast'"),
    ("training.mixed_precision=fp8", "'training.mixed_precision' must be false, true, bf16 or fp16"),
    ("data.image_size=4", "'data.image_size' must be an integer >= 8"),
    ("training.num_epochs=null", "'training.num_epochs' must be an integer >= 1, got None"),
    ("model.layers=7", None),
])
def test_bad_overrides_name_the_key_and_what_was_expected(config_dir, override, message):
    if message is None:
        # model.layers is null in the YAML: any type passes here, the model's constructor checks it
        load_experiment_config("stfpm", "mvtec", config_dir=config_dir, overrides=[override])
        return
    with pytest.raises(ConfigError, match=message):
        load_experiment_config("stfpm", "mvtec", config_dir=config_dir, overrides=[override])


def test_dict_overrides_are_checked_key_by_key(config_dir):
    with pytest.raises(ConfigError, match="Unknown config key 'training.num_epoch'.*'training.num_epochs'"):
        load_experiment_config("stfpm", "mvtec", config_dir=config_dir, overrides={"training": {"num_epoch": 3}})


def test_string_keys_keep_the_text_as_typed(config_dir):
    config = load_experiment_config("stfpm", "mvtec", config_dir=config_dir,
                                    overrides=["dataset.category=01", "training.mixed_precision=bf16"])
    assert config["dataset"]["category"] == "01" and config["training"]["mixed_precision"] == "bf16"


def test_bad_override_strings():
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["training.num_epochs"])
    with pytest.raises(ConfigError, match="empty key"):
        parse_overrides(["=5"])


def test_overriding_dataset_root_moves_dataset_dirs(config_dir, tmp_path):
    target = tmp_path / "elsewhere"
    config = load_experiment_config("stfpm", "mvtec", config_dir=config_dir, overrides={"dataset_root": str(target)})
    assert config["mvtec_dir"] == str(target / "mvtec")
    assert config["visa_dir"] == str(target / "visa")
    assert config["dataset"]["root_dir"] == str(target / "mvtec")


def test_relative_paths_resolve_against_project_root_not_cwd(config_dir, tmp_path, monkeypatch):
    work = tmp_path / "somewhere_else"
    work.mkdir()
    monkeypatch.chdir(work)
    project = config_dir.parent
    config = load_experiment_config("stfpm", "mvtec", config_dir=config_dir, overrides=["dataset_root=data/raw"])
    assert config["dataset_root"] == str(project / "data" / "raw")
    assert config["mvtec_dir"] == str(project / "data" / "raw" / "mvtec")
    assert config["output_dir"] == str(project / "outputs")
    default = load_experiment_config("stfpm", "mvtec", overrides=["dataset_root=data/raw"])
    assert default["mvtec_dir"] == str(PROJECT_ROOT / "data" / "raw" / "mvtec")
    assert not default["mvtec_dir"].startswith(str(work))


def test_home_directory_paths_are_expanded(config_dir, monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    config = load_experiment_config("stfpm", "mvtec", config_dir=config_dir, overrides=["dataset_root=~/ad"])
    assert config["dataset_root"] == str(tmp_path / "home" / "ad")
    assert config["dataset"]["root_dir"] == str(tmp_path / "home" / "ad" / "mvtec")


def test_config_dir_from_environment(config_dir, monkeypatch):
    write(config_dir / "paths.yaml", "dataset_root: /from/env\nmvtec_dir: ${dataset_root}/mvtec\n")
    monkeypatch.setenv(CONFIG_DIR_ENV, str(config_dir))
    config = load_experiment_config("stfpm", "mvtec")
    assert config["mvtec_dir"] == "/from/env/mvtec"
    assert "output_dir" not in config


def test_environment_and_nested_references(tmp_path, monkeypatch):
    monkeypatch.setenv("PWD", "/some/work/dir")
    monkeypatch.setenv("AD_TEST_TOKEN", "xyz")
    path = write(tmp_path / "configs" / "vars.yaml", "\n".join([
        "here: ${PWD}/runs",
        "token: prefix-${AD_TEST_TOKEN}",
        "training:",
        "  batch_size: 8",
        "  nested: {depth: '${model.depth}'}",
        "model:",
        "  depth: 18",
        "eval_batch: ${training.batch_size}",
        "label: bs${training.batch_size}-d${model.depth}",
        "items: ['${model.depth}', '${token}']",
    ]))
    config = load_config(path)
    assert config["here"] == "/some/work/dir/runs"
    assert config["token"] == "prefix-xyz"
    # a whole-value reference keeps the referenced type
    assert config["eval_batch"] == 8 and config["training"]["nested"]["depth"] == 18
    assert config["label"] == "bs8-d18"
    assert config["items"] == [18, "prefix-xyz"]
    assert config["training"]["batch_size"] == 8


def test_config_keys_take_precedence_over_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("AD_TEST_NAME", "from-env")
    config = load_config(write(tmp_path / "c.yaml", "AD_TEST_NAME: from-file\nvalue: ${AD_TEST_NAME}\n"))
    assert config["value"] == "from-file"


def test_unknown_variable_names_variable_key_and_file(tmp_path):
    path = write(tmp_path / "bad.yaml", "a: 1\nsection:\n  target: ${no_such_var_xyz}/x\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert "no_such_var_xyz" in message and "section.target" in message and str(path) in message


def test_unknown_variable_in_experiment_config_names_the_key(config_dir):
    write(config_dir / "models" / "stfpm.yaml", "model:\n  weights: ${weights_home}/r18.pth\n")
    with pytest.raises(ConfigError, match=r"weights_home.*model\.weights"):
        load_experiment_config("stfpm", "mvtec", config_dir=config_dir)


@pytest.mark.parametrize("text, cycle", [
    ("a: ${b}\nb: ${a}\n", "a -> b -> a"),
    ("a: x${a}\n", "a -> a"),
    ("a: ${b}/x\nb: ${c.d}\nc:\n  d: ${a}\n", "a -> b -> c.d -> a"),
])
def test_reference_cycles_are_reported(tmp_path, text, cycle):
    path = write(tmp_path / "cycle.yaml", text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert cycle in str(info.value) and str(path) in str(info.value)


def test_invalid_yaml_reports_file_and_line(tmp_path):
    path = write(tmp_path / "broken.yaml", "a: 1\nb: 2\nc: [1, 2\nd: 4\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert str(path) in message and "line" in message
    line = int(message.split("line ")[1].split(",")[0])
    assert 3 <= line <= 5


def test_invalid_yaml_in_experiment_config(config_dir):
    write(config_dir / "default.yaml", "seed: 42\ndata:\n  image_size: 256\n    bad_indent: 1\n")
    with pytest.raises(ConfigError, match=r"default\.yaml.*line 4"):
        load_experiment_config("stfpm", "mvtec", config_dir=config_dir)


def test_top_level_must_be_a_mapping(tmp_path):
    path = write(tmp_path / "list.yaml", "- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(path)
    assert load_config(write(tmp_path / "empty.yaml", "")) == {}


def test_missing_files_are_named(tmp_path, config_dir):
    with pytest.raises(FileNotFoundError, match="nothing.yaml"):
        load_config(tmp_path / "nothing.yaml")
    (config_dir / "paths.yaml").unlink()
    with pytest.raises(FileNotFoundError, match="paths.yaml"):
        load_experiment_config("stfpm", "mvtec", config_dir=config_dir)
    with pytest.raises(FileNotFoundError, match="no_configs_here"):
        load_experiment_config("stfpm", "mvtec", config_dir=tmp_path / "no_configs_here")


def test_unknown_model_or_dataset_lists_known_names(config_dir):
    with pytest.raises(ConfigError) as info:
        load_experiment_config("stfpm", "kolektor", config_dir=config_dir)
    assert "kolektor" in str(info.value) and "mvtec" in str(info.value) and "visa" in str(info.value)
    with pytest.raises(ConfigError) as info:
        load_experiment_config("no_such_model", "mvtec", config_dir=config_dir)
    assert "no_such_model" in str(info.value) and "stfpm" in str(info.value)


def test_saved_config_reloads_equal(config_dir, tmp_path):
    config = load_experiment_config("stfpm", "folder", config_dir=config_dir, overrides=["training.num_epochs=2"])
    saved = save_config(config, tmp_path / "run" / "config.yaml")
    assert saved.is_file()
    assert load_config(saved) == config
    assert not [p for p in saved.parent.iterdir() if p.name != "config.yaml"]


def test_merge_configs_is_deep_and_does_not_mutate():
    base = {"a": {"b": 1, "c": [1, 2]}, "d": 1}
    override = {"a": {"b": 2}, "e": {"f": 3}}
    merged = merge_configs(base, override)
    assert merged == {"a": {"b": 2, "c": [1, 2]}, "d": 1, "e": {"f": 3}}
    assert base == {"a": {"b": 1, "c": [1, 2]}, "d": 1}
    merged["a"]["c"].append(3)
    assert base["a"]["c"] == [1, 2]
