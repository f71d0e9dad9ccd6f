# tests/phase_03/test_notebooks.py
import json

import pytest

from anomaly_detection.utils import PROJECT_ROOT

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NOTEBOOKS = PROJECT_ROOT / "notebooks"
CELL_TIMEOUT_S = 240


def execute(name, folder, extra_cells=()):
    path = NOTEBOOKS / name
    assert path.is_file(), f"{path} is missing"
    notebook = nbformat.read(path, as_version=4)
    assert all(not cell.get("outputs") for cell in notebook.cells if cell.cell_type == "code"), \
        f"{name} is committed with outputs"
    for source in extra_cells:
        notebook.cells.append(nbformat.v4.new_code_cell(source))
    client = nbclient.NotebookClient(notebook, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                                     resources={"metadata": {"path": str(folder)}})
    client.execute()
    return notebook


def outputs_of(notebook, output_type=None):
    found = []
    for cell in notebook.cells:
        if cell.cell_type == "code":
            found += [out for out in cell.outputs if output_type is None or out.output_type == output_type]
    return found


def stream_text(notebook):
    return "".join(out.get("text", "") for out in outputs_of(notebook, "stream"))


def printed_report(text):
    # the JSON a test's extra cell printed after "REPORT "
    line = [row for row in text.splitlines() if row.startswith("REPORT ")][-1]
    return json.loads(line[len("REPORT "):])


def image_count(notebook):
    return sum("image/png" in out.get("data", {}) for out in outputs_of(notebook))


@pytest.fixture
def kernel_env(monkeypatch):
    # the kernel is another process on the shared 2-core machine: one intra-op thread is faster there
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    return monkeypatch


def test_eval_stfpm_notebook_runs_on_a_tiny_model(tiny_run, kernel_env, tmp_path):
    kernel_env.setenv("ANOMALY_DETECTION_NOTEBOOK_CHECKPOINT", str(tiny_run.model_path))
    report = ("import json\n"
              "print('REPORT ' + json.dumps({'metrics': {k: metrics[k] for k in keys}, 'threshold': threshold, "
              "'checkpoint': str(CHECKPOINT), 'panels': len(indices)}))")
    notebook = execute("eval_stfpm.ipynb", tmp_path, [report])
    assert not outputs_of(notebook, "error")
    text = stream_text(notebook)
    report = printed_report(text)
    assert report["checkpoint"] == str(tiny_run.model_path)
    for key in ("image_auroc", "pixel_auroc", "aupro", "f1_max"):
        assert report["metrics"][key] == pytest.approx(tiny_run.summary[key], rel=1e-5), key
    saved = json.loads((tiny_run.dirs["results"] / "metrics.json").read_text())["threshold"]
    assert report["threshold"] == pytest.approx(saved)
    assert "image_threshold" in text and "true_positive_rate" in text
    assert report["panels"] >= 1
    # the ROC/histogram figure and the heat-map figure
    assert image_count(notebook) >= 2
    html = "".join(out.get("data", {}).get("text/html", "") for out in outputs_of(notebook))
    assert "image_auroc" in html and "aupro" in html


def test_eval_notebook_shows_efficientad_maps_and_their_saved_quantiles(separation, one_thread, kernel_env,
                                                                        tmp_path):
    from anomaly_detection.runner import build_config, train_and_evaluate

    # padded PDN: at 64 px the unpadded one leaves an 8x8 map
    overrides = separation.overrides(tmp_path / "run", image_size=64, num_train=12, num_test_good=4,
                                     num_test_defect=2, figures=True, backbone=None)
    overrides += ["training.max_steps=4", "model.padding=true", "model.pretrained=false"]
    with one_thread():
        summary = train_and_evaluate(build_config("efficientad", "demo", overrides))
    kernel_env.setenv("ANOMALY_DETECTION_NOTEBOOK_CHECKPOINT", summary["checkpoint"])
    report = ("import json\n"
              "print('REPORT ' + json.dumps({'image_auroc': metrics['image_auroc'], "
              "'st': model.st_quantiles.tolist(), 'ae': model.ae_quantiles.tolist()}))")
    notebook = execute("eval_stfpm.ipynb", tmp_path, [report])
    assert not outputs_of(notebook, "error")
    text = stream_text(notebook)
    assert "model efficientad (EfficientADModel): model_size small" in text
    report = printed_report(text)
    assert report["image_auroc"] == pytest.approx(summary["image_auroc"], rel=1e-5)
    # the quantiles printed are the ones fitted on the validation images and saved in model.pt
    assert f"student-teacher map quantiles (q_a, q_b): {[round(v, 5) for v in report['st']]}" in text
    assert f"autoencoder map quantiles (q_a, q_b):     {[round(v, 5) for v in report['ae']]}" in text
    assert report["st"][1] != 0.1
    # ROC/histogram, heat maps and the EfficientAD figure
    assert image_count(notebook) >= 3


def test_dataset_statistics_notebook_runs_on_generated_data(tiny_run, kernel_env, tmp_path):
    kernel_env.setenv("ANOMALY_DETECTION_NOTEBOOK_ROOT", str(tiny_run.data_root))
    kernel_env.setenv("ANOMALY_DETECTION_NOTEBOOK_CATEGORY", tiny_run.category)
    kernel_env.setenv("ANOMALY_DETECTION_NOTEBOOK_DATASET", "mvtec")
    notebook = execute("dataset_statistics.ipynb", tmp_path)
    assert not outputs_of(notebook, "error")
    text = stream_text(notebook)
    assert str(tiny_run.data_root / tiny_run.category) in text
    assert "MVTec AD / demo" in text
    assert image_count(notebook) >= 1
