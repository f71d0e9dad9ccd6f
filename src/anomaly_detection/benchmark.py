# src/anomaly_detection/benchmark.py
# `anomaly-detection benchmark`: a grid of models x categories, each cell a `train` run of its own process (so
# its peak RSS is its own), written to results.csv as each cell finishes; report.md gives a table per model with
# the unweighted mean over categories, as the papers report, and a figure comparing the models.
#
# An interrupted grid is resumed by running the same command again: finished cells are read back, not rerun, and
# the cell that was cut short continues from its last checkpoint (train --resume). The grid's settings are saved
# in grid.json; a second run with other settings into the same folder is refused rather than mixed in.
import json
import math
import subprocess
import sys
import time
from pathlib import Path

from anomaly_detection.utils import atomic_write_json, atomic_write_text, logger

HELP = "train and evaluate models x categories; results.csv, report.md and a figure; resumable"
COLUMNS = ("model", "dataset", "category", "status", "image_auroc", "pixel_auroc", "aupro", "f1_max", "fit_s",
           "test_s", "peak_rss_mb", "images_per_s", "num_test_images", "best_epoch", "checkpoint", "error")
METRICS = ("image_auroc", "pixel_auroc", "aupro", "f1_max")
FIGURES = ("fit_s", "test_s", "peak_rss_mb", "images_per_s")


def add_arguments(parser):
    parser.add_argument("--models", required=True, help="comma-separated, e.g. padim,patchcore,stfpm")
    parser.add_argument("--dataset", default="mvtec")
    parser.add_argument("--category", default="all", help="'all' or a comma-separated list")
    parser.add_argument("--output", required=True, help="folder for results.csv, report.md, the runs and logs")
    parser.add_argument("overrides", nargs="*", metavar="[model:]key=value",
                        help="config overrides for every cell, or with a model prefix (stfpm:model.layers=[...]) "
                             "for that model's cells only")


def parse_models(text):
    from anomaly_detection.models import get_trainer_class
    models = [name.strip() for name in text.split(",") if name.strip()]
    if not models:
        raise ValueError(f"--models {text!r} names no model: expected a comma-separated list such as padim,stfpm")
    for name in models:
        get_trainer_class(name)
    return models


def overrides_for(model, overrides, models):
    # "key=value" goes to every cell; "model:key=value" only to that model's cells (a layer list or a learning
    # rate rarely suits every model of a grid). A prefix naming no model of the grid is a typo, not a no-op.
    chosen = []
    for override in overrides:
        key, separator, value = override.partition("=")
        prefix, colon, bare_key = key.partition(":")
        if not colon:
            chosen.append(override)
            continue
        if prefix not in models:
            raise ValueError(f"Override {override!r}: {prefix!r} is not a model of this grid ({', '.join(models)}); "
                             "expected model:key=value with one of them, or key=value for every model")
        if prefix == model:
            chosen.append(f"{bare_key}{separator}{value}")
    return chosen


def grid_cells(models, dataset, category, overrides):
    # every cell's config is built (so checked) before the first cell runs
    from anomaly_detection.cli import resolve_categories
    from anomaly_detection.runner import build_config
    cells = []
    for model in models:
        config = build_config(model, dataset, overrides_for(model, overrides, models))
        cells += [(model, name) for name in resolve_categories(config, None if category is None else category)]
    return cells


def check_grid_settings(output, settings):
    path = output / "grid.json"
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved != settings:
            changed = sorted(key for key in settings if saved.get(key) != settings[key])
            raise ValueError(f"{output} holds a grid run with other settings ({', '.join(changed)}: "
                             f"{[saved.get(k) for k in changed]} there, {[settings[k] for k in changed]} now): "
                             "use another --output, or the same settings to resume it")
    else:
        atomic_write_json(path, settings)


def read_results(path):
    import pandas as pd
    if not path.is_file():
        return []
    table = pd.read_csv(path, dtype={"category": str})
    return [{key: (None if isinstance(value, float) and math.isnan(value) else value) for key, value in row.items()}
            for row in table.to_dict("records")]


def write_results(path, rows):
    import pandas as pd
    atomic_write_text(path, pd.DataFrame(rows, columns=list(COLUMNS)).to_csv(index=False))


def run_cell(model, dataset, category, overrides, output):
    runs = output / "runs"
    command = [sys.executable, "-m", "anomaly_detection.cli", "train", "--model", model, "--dataset", dataset,
               "--category", category, "--resume", *overrides, f"results_dir={runs / 'results'}",
               f"checkpoint_dir={runs / 'checkpoints'}", f"log_dir={runs / 'logs'}"]
    log = output / "logs" / f"{model}_{category}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with open(log, "w") as stderr:
        process = subprocess.run(command, stdout=subprocess.PIPE, stderr=stderr, text=True)
    row = {"model": model, "dataset": dataset, "category": category}
    summary = last_json_line(process.stdout)
    if process.returncode != 0 or summary is None:
        lines = [line for line in log.read_text().splitlines() if line.strip()]
        row.update(status="failed", error=(lines[-1] if lines else f"exit code {process.returncode}")[:500])
        logger.warning("%s / %s failed after %.0f s: %s (log: %s)", model, category, time.perf_counter() - started,
                       row["error"], log)
        return row
    row.update({key: summary.get(key) for key in METRICS + ("fit_s", "test_s", "peak_rss_mb", "best_epoch",
                                                            "checkpoint")})
    row["num_test_images"] = summary.get("num_test_images")
    row["images_per_s"] = summary["num_test_images"] / summary["test_s"] if summary.get("test_s") else None
    row["status"] = "ok"
    return row


def last_json_line(stdout):
    for line in reversed(stdout.strip().splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                return None
    return None


def mean_row(rows, model):
    # the unweighted mean over categories; a metric missing for some category (a label-only one) is averaged
    # over the others, and the report says over how many
    mean = {"model": model, "category": "mean"}
    for key in METRICS + FIGURES:
        values = [float(r[key]) for r in rows if r.get(key) is not None and not math.isnan(float(r[key]))]
        mean[key] = sum(values) / len(values) if values else None
        mean[key + "_count"] = len(values)
    return mean


def format_value(value, key):
    if value is None:
        return "n/a"
    if key in METRICS:
        return f"{value:.3f}"
    return f"{value:.1f}" if key != "images_per_s" else f"{value:.2f}"


def write_report(output, rows, settings):
    ok = [row for row in rows if row.get("status") == "ok"]
    models = list(dict.fromkeys(row["model"] for row in rows))
    lines = [f"# Benchmark: {', '.join(models)} on {settings['dataset']}", "",
             f"Command: `anomaly-detection benchmark --models {','.join(settings['models'])} --dataset "
             f"{settings['dataset']} --category {settings['category']} --output {output}"
             + (" " + " ".join(settings["overrides"]) if settings["overrides"] else "") + "`", "",
             "Metrics on raw scores over the test split; fit and test seconds and peak RSS of each cell's own "
             "process; images/s is test images over test seconds. The mean row is the unweighted mean over "
             "categories.", ""]
    headers = ("category",) + METRICS + FIGURES
    means = []
    for model in models:
        model_rows = [row for row in ok if row["model"] == model]
        failed = [row for row in rows if row["model"] == model and row.get("status") != "ok"]
        lines += [f"## {model}", "", "| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
        for row in model_rows:
            lines.append("| " + " | ".join([str(row["category"])] + [format_value(row.get(k), k)
                                                                     for k in headers[1:]]) + " |")
        if model_rows:
            mean = mean_row(model_rows, model)
            means.append(mean)
            cells = [format_value(mean[k], k) + ("" if mean[k + "_count"] == len(model_rows)
                                                 else f" ({mean[k + '_count']} of {len(model_rows)})")
                     for k in headers[1:]]
            lines.append("| **mean** | " + " | ".join(cells) + " |")
        for row in failed:
            lines.append(f"\n{row['category']}: **failed**: {row.get('error')}")
        lines.append("")
    if means:
        figure = plot_comparison(output / "report.png", ok, models)
        lines += [f"![models compared]({figure.name})", ""]
    atomic_write_text(output / "report.md", "\n".join(lines))
    return means


def plot_comparison(path, rows, models):
    # image AUROC per category, a bar per model, and the mean
    import numpy as np
    from matplotlib.figure import Figure

    from anomaly_detection.utils import atomic_save_figure
    categories = list(dict.fromkeys(str(row["category"]) for row in rows)) + ["mean"]
    figure = Figure(figsize=(max(6, 1.2 * len(categories) * max(1, len(models)) / 2), 4.5), layout="constrained")
    axis = figure.subplots()
    width = 0.8 / max(1, len(models))
    for index, model in enumerate(models):
        by_category = {str(r["category"]): r.get("image_auroc") for r in rows if r["model"] == model}
        values = [by_category.get(c) for c in categories[:-1]]
        known = [v for v in values if v is not None]
        values.append(sum(known) / len(known) if known else None)
        heights = [np.nan if v is None else v for v in values]
        axis.bar(np.arange(len(categories)) + index * width - 0.4 + width / 2, heights, width, label=model)
    axis.set_xticks(np.arange(len(categories)), categories, rotation=30, ha="right")
    axis.set_ylabel("image AUROC")
    axis.set_ylim(0.0, 1.0)
    # above the axes: inside, the legend covers the tallest bars
    figure.legend(loc="outside upper center", ncols=min(len(models), 6))
    return atomic_save_figure(figure, path, dpi=100)


def run(args):
    models = parse_models(args.models)
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    settings = {"models": models, "dataset": args.dataset, "category": args.category,
                "overrides": list(args.overrides)}
    cells = grid_cells(models, args.dataset, args.category, args.overrides)
    check_grid_settings(output, settings)
    results_path = output / "results.csv"
    rows = {(row["model"], str(row["category"])): row for row in read_results(results_path)}
    reused = ran = 0
    for model, category in cells:
        if rows.get((model, category), {}).get("status") == "ok":
            reused += 1
            continue
        logger.info("benchmark: %s / %s (%d of %d)", model, category, cells.index((model, category)) + 1,
                    len(cells))
        rows[(model, category)] = run_cell(model, args.dataset, category,
                                           overrides_for(model, args.overrides, models), output)
        ran += 1
        write_results(results_path, [rows[cell] for cell in cells if cell in rows])
    ordered = [rows[cell] for cell in cells]
    write_results(results_path, ordered)
    means = write_report(output, ordered, settings)
    failed = sum(row.get("status") != "ok" for row in ordered)
    summary = {"results_csv": str(results_path), "report": str(output / "report.md"), "cells": len(cells),
               "ran": ran, "reused": reused, "failed": failed,
               "means": {m["model"]: {k: m[k] for k in METRICS} for m in means}}
    return summary, (1 if failed else 0)
