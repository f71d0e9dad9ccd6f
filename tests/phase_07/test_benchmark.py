# tests/phase_07/test_benchmark.py
# `anomaly-detection benchmark`: the grid's table and report, resuming without rerunning finished cells, and
# refusing to mix two grids' settings in one folder.
import json

import pandas as pd
import pytest

from helpers import run_cli


@pytest.fixture(scope="module")
def grid(tmp_path_factory, separation):
    root = tmp_path_factory.mktemp("grid")
    overrides = separation.overrides(root / "data_root", image_size=64, num_train=8, num_test_good=3,
                                     num_test_defect=1)
    # the grid writes its runs under its own folder; only the data settings come from the shared overrides
    overrides = [o for o in overrides if not o.startswith(("results_dir", "checkpoint_dir", "log_dir"))]
    argv = ["benchmark", "--models", "stfpm,padim", "--dataset", "demo", "--category", "demo", "--output",
            str(root / "grid"), *overrides]
    first = run_cli(argv)
    return root / "grid", argv, first


def test_grid_writes_a_row_per_cell_a_report_and_a_figure(grid):
    output, _, first = grid
    assert first.code == 0, first.err
    summary = json.loads(first.out.strip().splitlines()[-1])
    assert (summary["cells"], summary["ran"], summary["reused"], summary["failed"]) == (2, 2, 0, 0)
    table = pd.read_csv(output / "results.csv")
    assert list(table["model"]) == ["stfpm", "padim"] and (table["status"] == "ok").all()
    for key in ("image_auroc", "pixel_auroc", "aupro", "f1_max"):
        assert table[key].between(0, 1).all(), key
    assert (table["fit_s"] > 0).all() and (table["peak_rss_mb"] > 50).all()
    assert table["images_per_s"].tolist() == pytest.approx((table["num_test_images"] / table["test_s"]).tolist())
    report = (output / "report.md").read_text()
    assert "## stfpm" in report and "## padim" in report and report.count("| **mean** |") == 2
    assert (output / "report.png").stat().st_size > 1000
    # one category: each mean row is that category's figures
    assert summary["means"]["padim"]["image_auroc"] == pytest.approx(table["image_auroc"][1])


def test_rerun_reuses_finished_cells_and_runs_only_the_missing_one(grid):
    output, argv, _ = grid
    again = run_cli(argv)
    assert again.code == 0, again.err
    assert json.loads(again.out.strip().splitlines()[-1])["ran"] == 0
    # an interrupted grid: padim's row never got written
    table = pd.read_csv(output / "results.csv")
    stfpm_checkpoint = table["checkpoint"][0]
    table[table["model"] == "stfpm"].to_csv(output / "results.csv", index=False)
    before = (output / "runs" / "checkpoints").joinpath("stfpm", "demo", "demo", "model.pt").stat().st_mtime_ns
    resumed = run_cli(argv)
    assert resumed.code == 0, resumed.err
    summary = json.loads(resumed.out.strip().splitlines()[-1])
    assert (summary["ran"], summary["reused"]) == (1, 1)
    assert list(pd.read_csv(output / "results.csv")["model"]) == ["stfpm", "padim"]
    assert pd.read_csv(output / "results.csv")["checkpoint"][0] == stfpm_checkpoint
    after = (output / "runs" / "checkpoints").joinpath("stfpm", "demo", "demo", "model.pt").stat().st_mtime_ns
    assert after == before


def test_other_settings_into_the_same_folder_are_refused(grid):
    output, argv, _ = grid
    result = run_cli(argv + ["training.num_epochs=3"])
    assert result.code == 2 and "other settings" in result.err and "overrides" in result.err


def test_a_failed_cell_is_reported_and_exits_1(tmp_path):
    missing = tmp_path / "no_dataset"
    result = run_cli(["benchmark", "--models", "padim", "--dataset", "mvtec", "--category", "bottle", "--output",
                      str(tmp_path / "grid"), f"dataset.root_dir={missing}", "model.backbone=resnet18",
                      "model.pretrained=false"])
    assert result.code == 1
    table = pd.read_csv(tmp_path / "grid" / "results.csv")
    assert table["status"].tolist() == ["failed"] and str(missing) in table["error"][0]
    assert "failed" in (tmp_path / "grid" / "report.md").read_text()


def test_unknown_model_is_refused_before_any_cell_runs(tmp_path):
    result = run_cli(["benchmark", "--models", "stfpm,nosuch", "--dataset", "demo", "--category", "demo",
                      "--output", str(tmp_path / "grid")])
    assert result.code == 2 and "Unknown model 'nosuch'" in result.err
    assert not (tmp_path / "grid" / "results.csv").exists()


def test_model_prefixed_overrides_reach_only_that_models_cells():
    from anomaly_detection.benchmark import overrides_for
    overrides = ["seed=1", "stfpm:model.layers=[layer1,layer2]", "padim:model.n_features=10"]
    assert overrides_for("stfpm", overrides, ["stfpm", "padim"]) == ["seed=1", "model.layers=[layer1,layer2]"]
    assert overrides_for("padim", overrides, ["stfpm", "padim"]) == ["seed=1", "model.n_features=10"]
    with pytest.raises(ValueError, match="'patchcore' is not a model of this grid"):
        overrides_for("stfpm", ["patchcore:model.coreset_ratio=0.01"], ["stfpm", "padim"])
