# tests/phase_03/test_cli.py
import json
import runpy
import shutil
import subprocess

import pytest
import torch

from anomaly_detection.cli import main
from anomaly_detection.utils import PROJECT_ROOT
from helpers import run_cli

SUMMARY_KEYS = ("image_auroc", "pixel_auroc", "aupro", "f1_max", "fit_s", "test_s", "peak_rss_mb")
GENERATE = ["--category", "demo", "--image-size", "32", "--num-train", "5", "--num-test-good", "2",
            "--num-test-defect", "1"]


def last_json(stdout):
    lines = stdout.strip().splitlines()
    assert lines, "nothing on stdout"
    return json.loads(lines[-1])


def assert_summary(summary):
    missing = [key for key in SUMMARY_KEYS if key not in summary]
    assert not missing, missing
    for key in ("image_auroc", "pixel_auroc", "aupro", "f1_max"):
        assert 0.0 <= summary[key] <= 1.0, key
    assert summary["peak_rss_mb"] > 10 and summary["test_s"] > 0


@pytest.fixture(scope="module")
def cli_root(tmp_path_factory):
    return tmp_path_factory.mktemp("cli")


@pytest.fixture(scope="module")
def generated(cli_root, one_thread):
    with one_thread():
        result = run_cli(["generate-demo", "--root", str(cli_root / "generated")] + GENERATE)
    return result


@pytest.fixture(scope="module")
def trained(cli_root, make_overrides, one_thread):
    argv = ["train", "--model", "stfpm", "--dataset", "demo"] + make_overrides(cli_root / "run", epochs=2)
    argv += ["model.backbone=resnet18", "model.pretrained=false", "training.num_epochs=1"]
    with one_thread():
        result = run_cli(argv)
    result.summary = last_json(result.out) if result.code == 0 else None
    last = cli_root / "run" / "checkpoints" / "stfpm" / "demo" / "demo" / "last.pt"
    result.history = torch.load(last, map_location="cpu", weights_only=True)["history"] if last.is_file() else None
    return result


def test_generate_demo(generated, cli_root):
    assert generated.code == 0, generated.err
    folder = cli_root / "generated" / "demo"
    assert last_json(generated.out) == {"category_dir": str(folder)}
    assert len(list((folder / "train" / "good").glob("*.png"))) == 5
    assert len(list((folder / "test" / "good").glob("*.png"))) == 2
    defect_types = [p.name for p in (folder / "test").iterdir() if p.name != "good"]
    assert defect_types
    for defect in defect_types:
        assert len(list((folder / "ground_truth" / defect).glob("*_mask.png"))) == 1


def test_stats_table_and_json(generated, cli_root, capsys):
    arguments = ["stats", "--dataset", "mvtec", "--root", str(cli_root / "generated"), "--category", "demo"]
    assert main(arguments) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("MVTec AD / demo")
    assert any(line.split()[:3] == ["train", "good", "5"] for line in lines[:-1])
    table_stats = json.loads(lines[-1])

    assert main(arguments + ["--json"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1
    stats = json.loads(lines[0])
    assert stats == table_stats
    assert stats["train"]["images"] == 5 and stats["test"]["good"] == 2
    assert stats["test"]["has_masks"] is True and stats["train"]["width"]["max"] == 32


def test_train_prints_summary_json_last(trained, cli_root):
    assert trained.code == 0, trained.err
    assert_summary(trained.summary)
    assert trained.summary["model"] == "stfpm" and trained.summary["category"] == "demo"
    checkpoint = cli_root / "run" / "checkpoints" / "stfpm" / "demo" / "demo" / "model.pt"
    assert trained.summary["checkpoint"] == str(checkpoint)
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    assert state["config"]["training"]["num_epochs"] == 1
    assert state["config"]["model"]["pretrained"] is False
    assert state["epoch"] == 0


def test_test_checkpoint_reproduces_the_training_metrics(trained, capsys):
    assert main(["test", "--checkpoint", trained.summary["checkpoint"]]) == 0
    summary = last_json(capsys.readouterr().out)
    assert_summary(summary)
    assert summary["fit_s"] == 0.0
    for key in ("image_auroc", "pixel_auroc", "aupro", "f1_max"):
        assert summary[key] == pytest.approx(trained.summary[key], rel=1e-6), key


def test_predict_scores_a_folder_and_a_file(trained, cli_root, capsys):
    folder = cli_root / "run" / "data" / "demo" / "test" / "good"
    images = sorted(folder.glob("*.png"))
    output = cli_root / "predictions"
    code = main(["predict", "--checkpoint", trained.summary["checkpoint"], "--input", str(folder),
                 "--output", str(output), "--heatmaps", "--batch-size", "3"])
    assert code == 0
    lines = capsys.readouterr().out.strip().splitlines()
    records = [json.loads(line) for line in lines[:-1]]
    assert [r["image_path"] for r in records] == [str(p) for p in images]
    assert all(r["pred_label"] in (0, 1) and r["pred_score"] >= 0 for r in records)
    assert json.loads(lines[-1]) == {"images": len(images), "scored": len(images), "skipped": 0,
                                     "anomalous": sum(r["pred_label"] for r in records), "runtime": "pytorch",
                                     "predictions_csv": str(output / "predictions.csv")}
    table = (output / "predictions.csv").read_text().splitlines()
    assert table[0] == "image_path,pred_score,pred_label,heatmap,error" and len(table) == len(images) + 1
    heatmaps = sorted(p.name for p in (output / "heatmaps").glob("*.png"))
    assert heatmaps == sorted(f"{p.stem}_heatmap.png" for p in images)

    # one image alone, in a batch of one, scores as it did in a batch of three
    assert main(["predict", "--checkpoint", trained.summary["checkpoint"], "--input", str(images[0])]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert json.loads(lines[0])["pred_score"] == pytest.approx(records[0]["pred_score"], rel=1e-5)
    assert json.loads(lines[-1])["images"] == 1


def test_unknown_model_exits_with_2(capsys):
    assert main(["train", "--model", "no_such_model", "--dataset", "demo"]) == 2
    captured = capsys.readouterr()
    assert "Unknown model 'no_such_model'" in captured.err and "stfpm" in captured.err
    assert captured.out == ""


def test_missing_checkpoint_exits_with_2(tmp_path, capsys):
    missing = tmp_path / "missing" / "model.pt"
    tmp_path.joinpath("image.png").write_bytes(b"")
    for command in (["test", "--checkpoint", str(missing)],
                    ["predict", "--checkpoint", str(missing), "--input", str(tmp_path)]):
        assert main(command) == 2
        captured = capsys.readouterr()
        assert f"error: Checkpoint not found: {missing}" in captured.err
        assert captured.out == ""


def test_corrupt_checkpoint_exits_with_2(tmp_path, capsys):
    corrupt = tmp_path / "model.pt"
    corrupt.write_bytes(bytes(range(256)) * 8)
    assert main(["test", "--checkpoint", str(corrupt)]) == 2
    captured = capsys.readouterr()
    assert "error:" in captured.err and str(corrupt) in captured.err and "corrupt" in captured.err
    assert captured.out == ""


def test_malformed_override_exits_with_2(capsys):
    assert main(["train", "--dataset", "demo", "training.num_epochs"]) == 2
    assert "key=value" in capsys.readouterr().err


def test_missing_required_argument_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as caught:
        main(["test"])
    assert caught.value.code == 2
    assert "--checkpoint" in capsys.readouterr().err


def test_train_resume_continues_from_last_checkpoint(trained, cli_root, make_overrides, capsys):
    overrides = make_overrides(cli_root / "run", epochs=2)
    assert main(["train", "--dataset", "demo", "--resume"] + overrides) == 0
    summary = last_json(capsys.readouterr().out)
    assert_summary(summary)
    folder = cli_root / "run" / "checkpoints" / "stfpm" / "demo" / "demo"
    last = torch.load(folder / "last.pt", map_location="cpu", weights_only=True)
    assert last["epoch"] == 1
    assert [r["epoch"] for r in last["history"]] == [0, 1]
    assert last["history"][0] == trained.history[0]


def test_experiment_script_trains_several_categories(tmp_path, make_overrides, capsys):
    script = runpy.run_path(str(PROJECT_ROOT / "experiments" / "train_stfpm.py"), run_name="train_stfpm")
    overrides = make_overrides(tmp_path, image_size=32, num_train=6, num_test_good=2, num_test_defect=1)
    assert script["main"](["--dataset", "demo", "--category", "first,second"] + overrides) == 0
    summary = last_json(capsys.readouterr().out)
    assert [r["category"] for r in summary["categories"]] == ["first", "second"]
    assert_summary(summary)
    expected = sum(r["image_auroc"] for r in summary["categories"]) / 2
    assert summary["image_auroc"] == pytest.approx(expected)
    for category in ("first", "second"):
        assert (tmp_path / "results" / "stfpm" / "demo" / category / "metrics.json").is_file()


def test_experiment_script_reports_bad_input(capsys):
    script = runpy.run_path(str(PROJECT_ROOT / "experiments" / "train_stfpm.py"), run_name="train_stfpm")
    assert script["main"](["--dataset", "no_such_dataset"]) == 2
    assert "Unknown dataset 'no_such_dataset'" in capsys.readouterr().err


def test_console_script_help():
    executable = shutil.which("anomaly-detection")
    assert executable, "the anomaly-detection console script is not installed (pip install -e .)"
    completed = subprocess.run([executable, "--help"], capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr
    for command in ("generate-demo", "stats", "train", "test", "predict"):
        assert command in completed.stdout


def test_test_checkpoint_keeps_the_trained_category(tmp_path, make_overrides):
    # "01" is the BTAD-style name that YAML would read as the number 1
    overrides = make_overrides(tmp_path, image_size=32, num_train=6, num_test_good=2, num_test_defect=1, epochs=1)
    trained = run_cli(["train", "--model", "stfpm", "--dataset", "demo", "--category", "01"] + overrides)
    assert trained.code == 0, trained.err
    checkpoint = last_json(trained.out)["checkpoint"]
    tested = run_cli(["test", "--checkpoint", checkpoint])
    assert tested.code == 0, tested.err
    summary = last_json(tested.out)
    assert summary["category"] == "01"
    assert summary["image_auroc"] == pytest.approx(last_json(trained.out)["image_auroc"])
