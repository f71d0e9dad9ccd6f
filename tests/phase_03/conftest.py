# tests/phase_03/conftest.py
import json
from pathlib import Path
from types import SimpleNamespace

import pytest


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, make_overrides, one_thread):
    from anomaly_detection.runner import build_config, output_dirs, train_and_evaluate

    root = tmp_path_factory.mktemp("tiny_run")
    overrides = make_overrides(root, epochs=2)
    config = build_config("stfpm", "demo", overrides)
    with one_thread():
        summary = train_and_evaluate(config)
    dirs = output_dirs(config, "demo")
    # read now: later tests run `test` on this model, which writes the results folder's summary.json again
    written_summary = json.loads((dirs["results"] / "summary.json").read_text())
    return SimpleNamespace(root=root, overrides=overrides, config=config, summary=summary, dirs=dirs,
                           written_summary=written_summary,
                           data_root=root / "data", category="demo",
                           model_path=dirs["checkpoints"] / "model.pt")


@pytest.fixture(scope="session")
def make_overrides(separation):
    def tiny_overrides(root, image_size=64, num_train=12, num_test_good=4, num_test_defect=2, epochs=1):
        return separation.overrides(root, image_size=image_size, num_train=num_train, num_test_good=num_test_good,
                                    num_test_defect=num_test_defect, epochs=epochs, figures=True)
    return tiny_overrides
