# benchmarks/patchcore_scaling.py
# Our PatchCore's fit time and peak RSS against the number of training images (first N sorted images of
# magnetic_tile, as hard-linked MVTec-layout copies) and the coreset ratio, one subprocess per run, with the
# trainer's breakdown of the fit: feature extraction, data loading, coreset selection, the rest.
#
#   python benchmarks/patchcore_scaling.py --ours-overrides model.pretrain_dim=null model.target_dim=null
# (records appended to benchmarks/results/patchcore_scaling.jsonl through record.py)
import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from patchcore_padim_compare import MAGNETIC_TILE, make_subset, run_ours  # noqa: E402
from record import append_record, results_path, typed_command  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="PatchCore fit time and peak RSS against training set size")
    parser.add_argument("--root", default=str(MAGNETIC_TILE), help="dataset root holding the category")
    parser.add_argument("--category", default="magnetic_tile")
    parser.add_argument("--train-images", default="100,300,714")
    parser.add_argument("--ratios", default="0.01,0.1")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--backbone", default="tf_efficientnet_lite0")
    parser.add_argument("--pretrained", default="true", help="false: random init (quick checks without weights)")
    parser.add_argument("--test-per-folder", type=int, default=2,
                        help="test images kept per test folder: the runs measure the fit, not the test")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ours-overrides", nargs="*", default=[], metavar="key=value")
    parser.add_argument("--work", default=None)
    parser.add_argument("--out", default=str(results_path(__file__)),
                        help="append the records here (default: %(default)s; '' writes none)")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="patchcore_scaling_"))
    work.mkdir(parents=True, exist_ok=True)
    # run_ours reads these settings the way the comparison script passes them
    settings = argparse.Namespace(image_size=args.image_size, seed=args.seed, coreset_ratio=None, n_features=None,
                                  ours_overrides=args.ours_overrides)
    rows = []
    for count in [int(n) for n in args.train_images.split(",")]:
        root, counts = make_subset(args.root, args.category, work / f"subset_{count}", count, args.test_per_folder)
        setup = {"root": root, "category": args.category, "backbone": args.backbone, "layers": {},
                 "ours_weights": [f"model.pretrained={args.pretrained}"]}
        for coreset_ratio in [float(r) for r in args.ratios.split(",")]:
            settings.coreset_ratio = coreset_ratio
            result = run_ours("patchcore", setup, settings, work, [])
            timings = result["fit_timings"]
            row = {"kind": "scaling", "train_images": counts["train"], "coreset_ratio": coreset_ratio,
                   "fit_s": timings.get("total_s"), "peak_rss_mb": result["peak_rss_mb"],
                   "extract_s": timings.get("extract_s"), "data_s": timings.get("data_s"),
                   "coreset_s": timings.get("coreset_s"),
                   "other_s": timings.get("finalize_s", 0.0) - timings.get("coreset_s", 0.0),
                   "num_patches": timings.get("num_patches"), "memory_bank_size": timings.get("memory_bank_size"),
                   "runner_fit_s": result["fit_s"], "wall_s": result["wall_s"],
                   "loadavg_start": result["loadavg_start"], "loadavg_end": result["loadavg_end"],
                   "image_size": args.image_size, "backbone": args.backbone}
            rows.append(row)
            if args.out:
                append_record(__file__, typed_command(), row, out=args.out, kind="scaling",
                              variant=f"{counts['train']} images, coreset {coreset_ratio}",
                              overrides=result["overrides"])
            print(json.dumps(row), file=sys.stderr)
    header = ("train images", "ratio", "patches", "bank", "fit s", "extract s", "data s", "coreset s", "other s",
              "peak RSS MB")
    print(" | ".join(header))
    print(" | ".join("---" for _ in header))
    for row in rows:
        print(" | ".join([str(row["train_images"]), str(row["coreset_ratio"]), str(row["num_patches"]),
                          str(row["memory_bank_size"])] +
                         [f"{row[key]:.1f}" for key in ("fit_s", "extract_s", "data_s", "coreset_s", "other_s",
                                                        "peak_rss_mb")]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
