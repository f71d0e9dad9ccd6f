# src/anomaly_detection/cli.py
import argparse
import logging
import sys
from pathlib import Path

from anomaly_detection.utils import setup_logging, to_json

# the model `train` and `demo` use when none is named
DEFAULT_MODEL = "stfpm"
# 12 of the 60 generated normal images are held out: enough for a threshold quantile (see runner.py)
DEMO_OVERRIDES = ["model.backbone=tf_efficientnet_lite0", "training.num_epochs=8", "training.batch_size=16",
                  "data.image_size=128", "data.val_fraction=0.2"]


def add_overrides(parser):
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides, e.g. training.num_epochs=5 model.backbone=resnet50")


def build_parser():
    parser = argparse.ArgumentParser(prog="anomaly-detection",
                                     description="Train, evaluate and deploy visual anomaly detection models offline")
    commands = parser.add_subparsers(dest="command", required=True)

    generate = commands.add_parser("generate-demo", help="write a generated MVTec-layout category")
    generate.add_argument("--root", default=None, help="output root (default: demo_dir from configs/paths.yaml)")
    generate.add_argument("--category", default="demo")
    generate.add_argument("--kind", default="texture", choices=["texture", "object"])
    generate.add_argument("--image-size", type=int, default=128)
    generate.add_argument("--num-train", type=int, default=60)
    generate.add_argument("--num-test-good", type=int, default=20)
    generate.add_argument("--num-test-defect", type=int, default=10, help="per defect type")
    generate.add_argument("--seed", type=int, default=0)
    generate.add_argument("--overwrite", action="store_true")

    stats = commands.add_parser("stats", help="dataset statistics: counts, image sizes, mask areas")
    stats.add_argument("--dataset", default="mvtec", help="mvtec, visa, btad or folder")
    stats.add_argument("--root", default=None, help="dataset root (default: from the config)")
    stats.add_argument("--category", required=True)
    stats.add_argument("--json", action="store_true", help="print JSON instead of a table")

    train = commands.add_parser("train", help="train one or more categories, then evaluate on the test split")
    train.add_argument("--model", default=DEFAULT_MODEL)
    train.add_argument("--dataset", default="mvtec")
    train.add_argument("--category", default=None, help="one category, or a comma-separated list, or 'all'")
    train.add_argument("--resume", action="store_true", help="continue from the category's last.pt")
    add_overrides(train)

    test = commands.add_parser("test", help="evaluate a saved checkpoint on its test split")
    test.add_argument("--checkpoint", required=True)
    add_overrides(test)

    predict = commands.add_parser("predict", help="score new images with a model.pt or an exported model")
    predict.add_argument("--checkpoint", required=True,
                         help="a model.pt, an exported .onnx, an OpenVINO .xml or a .torchscript file")
    predict.add_argument("--input", required=True, help="an image file, or a folder (searched recursively)")
    predict.add_argument("--output", default=None, help="folder for predictions.csv, written as images are scored")
    predict.add_argument("--heatmaps", action="store_true", help="also write a heat-map overlay per image "
                                                                 "under <output>/heatmaps")
    predict.add_argument("--batch-size", type=int, default=16)
    add_overrides(predict)

    # commands whose code lives in a module of their own: HELP, add_arguments(parser) and run(args)
    for name, module in MODULE_COMMANDS.items():
        command = commands.add_parser(name, help=module_of(module).HELP)
        module_of(module).add_arguments(command)

    # sub-commands a model folder brings (a teacher distillation, say), named in models/__init__.py
    from anomaly_detection.models import MODEL_COMMANDS
    for name, module in MODEL_COMMANDS.items():
        command = commands.add_parser(name, help=module_of(module).HELP)
        module_of(module).add_arguments(command)

    demo = commands.add_parser("demo",
                               help=f"generated data -> {DEFAULT_MODEL} (pretrained EfficientNet-Lite0) -> metrics")
    add_overrides(demo)
    return parser


# commands that are a module of their own (HELP, add_arguments, run)
MODULE_COMMANDS = {
    "export": "anomaly_detection.export",
    "benchmark": "anomaly_detection.benchmark",
}


def module_of(name):
    import importlib
    return importlib.import_module(name)


def run_generate(args):
    from anomaly_detection.config import load_experiment_config
    from anomaly_detection.data.synthetic import generate_synthetic_category
    root = args.root or load_experiment_config(DEFAULT_MODEL, "demo")["demo_dir"]
    folder = generate_synthetic_category(root, category=args.category, kind=args.kind, image_size=args.image_size,
                                         num_train=args.num_train, num_test_good=args.num_test_good,
                                         num_test_defect=args.num_test_defect, seed=args.seed,
                                         overwrite=args.overwrite)
    return {"category_dir": str(folder)}


def run_stats(args):
    from anomaly_detection.config import load_experiment_config
    from anomaly_detection.data import get_dataset_class
    from anomaly_detection.data.statistics import dataset_statistics, format_statistics
    root = args.root or load_experiment_config(DEFAULT_MODEL, args.dataset)["dataset"]["root_dir"]
    stats = dataset_statistics(get_dataset_class(args.dataset if args.dataset != "demo" else "mvtec"),
                               root, args.category)
    if not args.json:
        print(format_statistics(stats))
    return stats


def resolve_categories(config, category):
    from anomaly_detection.data import get_dataset_class
    if category is None:
        return [str(config["dataset"]["category"])]
    if category == "all":
        known = get_dataset_class(config["dataset"]["name"]).categories()
        if not known:
            raise ValueError(f"dataset '{config['dataset']['name']}' has no fixed category list: name them")
        return known
    names = [part.strip() for part in category.split(",") if part.strip()]
    if not names:
        raise ValueError(f"--category {category!r} names no category: expected a name, a comma-separated list "
                         "or 'all'")
    return names


def run_train(args):
    from anomaly_detection.runner import build_config, train_and_evaluate
    config = build_config(args.model, args.dataset, args.overrides)
    results = [train_and_evaluate(config, category, resume=args.resume)
               for category in resolve_categories(config, args.category)]
    return results[0] if len(results) == 1 else summarize_categories(results)


def summarize_categories(results):
    import math
    summary = {"categories": results}
    for key in ("image_auroc", "pixel_auroc", "aupro", "f1_max"):
        values = [r[key] for r in results if r.get(key) is not None and not math.isnan(r[key])]
        summary[key] = sum(values) / len(values) if values else None
    for key in ("fit_s", "test_s"):
        summary[key] = sum(r[key] for r in results)
    summary["peak_rss_mb"] = max(r["peak_rss_mb"] for r in results)
    return summary


def run_test(args):
    from anomaly_detection.runner import test_checkpoint
    return test_checkpoint(args.checkpoint, args.overrides)


def run_predict(args):
    from anomaly_detection.predict import PredictionTable, check_output_folder, find_images, predict_images
    from anomaly_detection.runtimes import open_model
    if args.heatmaps and not args.output:
        raise ValueError("--heatmaps needs --output: the overlays are written under <output>/heatmaps")
    paths = find_images(args.input)
    output = check_output_folder(args.output) if args.output else None
    opened = open_model(args.checkpoint, args.overrides)
    table = PredictionTable(output / "predictions.csv") if output else None
    counts = {"images": len(paths), "scored": 0, "anomalous": 0, "skipped": 0, "runtime": opened.runtime.name}
    try:
        for record in predict_images(opened, paths, output / "heatmaps" if args.heatmaps else None,
                                     input_root=args.input, batch_size=args.batch_size):
            print(to_json(record), flush=True)
            if table is not None:
                table.write(record)
            if "error" in record:
                counts["skipped"] += 1
            else:
                counts["scored"] += 1
                counts["anomalous"] += int(record.get("pred_label") == 1)
    finally:
        if table is not None:
            table.close()
    if table is not None:
        counts["predictions_csv"] = str(table.path)
    # the scores above stand, but a run that skipped images must not look like a clean one to a script
    return counts, (1 if counts["skipped"] else 0)


def run_demo(args):
    from anomaly_detection.runner import build_config, train_and_evaluate
    config = build_config(DEFAULT_MODEL, "demo", DEMO_OVERRIDES + list(args.overrides))
    return train_and_evaluate(config)


COMMANDS = {"generate-demo": run_generate, "stats": run_stats, "train": run_train, "test": run_test,
            "predict": run_predict, "demo": run_demo}


def main(argv=None):
    from anomaly_detection import distributed
    from anomaly_detection.models import MODEL_COMMANDS
    args = build_parser().parse_args(argv)
    # under torchrun (WORLD_SIZE > 1 in the environment): one process per device, NCCL on CUDA, gloo on CPU;
    # the first process logs, warns and prints; the others report errors only (each warning once, not N times)
    distributed.init_distributed()
    main_process = distributed.is_main()
    setup_logging() if main_process else setup_logging(logging.ERROR)
    modules = dict(MODULE_COMMANDS, **MODEL_COMMANDS)
    completed = False
    try:
        if args.command in modules:
            result = module_of(modules[args.command]).run(args)
        else:
            result = COMMANDS[args.command](args)
        completed = True
    except (FileNotFoundError, ValueError, RuntimeError, OSError, FloatingPointError) as error:
        print(f"error: {error}" + (f" (process {distributed.rank()})" if distributed.active() else ""),
              file=sys.stderr)
        return 2
    finally:
        distributed.shutdown(synchronise=completed)
    result, code = result if isinstance(result, tuple) else (result, 0)
    # the last line of output is one JSON object, for scripts
    if main_process:
        print(to_json(result))
    return code


if __name__ == "__main__":
    sys.exit(main())
