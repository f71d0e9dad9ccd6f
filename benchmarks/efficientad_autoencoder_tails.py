# benchmarks/efficientad_autoencoder_tails.py
# Where an EfficientAD checkpoint's autoencoder map is large on normal images: per held-out normal training image
# (those run_anomalib.py --max-train left out for the seed), the image's size and brightness and the maxima of the
# raw autoencoder and student-teacher maps at the PDN's resolution. Either framework's checkpoint: an Anomalib
# model.ckpt (run with Anomalib's python) or our model.pt. --compare then sets two recorded runs side by side
# (correlation of the per-image maxima, of brightness with each). A diagnosis of normal images, no test labels:
#
#   /tmp/peer-venv/bin/python benchmarks/efficientad_autoencoder_tails.py --checkpoint RUN/.../model.ckpt \
#       --train-dir ../shared/data/magnetic_tile/train/good --max-train 571 --seed 0 --label anomalib
#   python benchmarks/efficientad_autoencoder_tails.py --checkpoint RUN/.../model.pt ... --label ours
#   python benchmarks/efficientad_autoencoder_tails.py --compare anomalib,ours
import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from efficientad_peer_map_sources import held_out_paths, image_tensor  # noqa: E402
from record import append_record, read_records, results_path, typed_command  # noqa: E402

IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def raw_maps_function(checkpoint):
    # both take the image in [0, 1]: Anomalib's networks normalise it themselves, ours take it normalised
    if checkpoint.endswith(".ckpt"):
        from efficientad_peer_map_sources import load_peer_model  # imports Anomalib: its python only
        model = load_peer_model(checkpoint)

        def peer_maps(image):
            teacher = (model.teacher(image) - model.mean_std["mean"]) / model.mean_std["std"]
            student = model.student(image)
            autoencoder = model.ae(image, image.shape[-2:])
            channels = teacher.shape[1]
            map_st = ((teacher - student[:, :channels]) ** 2).mean(1)
            return map_st, ((autoencoder - student[:, channels:]) ** 2).mean(1)
        return peer_maps
    from diagnosis import load_model_file
    model = load_model_file(checkpoint)[0].eval()

    def our_maps(image):
        map_st, map_ae = model.raw_maps((image - IMAGENET_MEAN) / IMAGENET_STD)
        return map_st[:, 0], map_ae[:, 0]
    return our_maps


def analyse(args):
    maps = raw_maps_function(args.checkpoint)
    rows = []
    with torch.no_grad():
        for path in held_out_paths(args.train_dir, args.max_train, args.seed):
            with Image.open(path) as image:
                size = image.size
            tensor = image_tensor(path, args.image_size)[None]
            map_st, map_ae = maps(tensor)
            rows.append({"image": path.name, "size": list(size), "brightness": float(tensor.mean()),
                         "autoencoder_max": float(map_ae.amax()), "student_teacher_max": float(map_st.amax())})
    maxima = np.array([row["autoencoder_max"] for row in rows])
    return {"checkpoint": args.checkpoint, "images": len(rows), "autoencoder_max_median": float(np.median(maxima)),
            "autoencoder_max_largest": float(maxima.max()), "per_image": rows}


def compare(labels):
    records = {record.get("label"): record for record in read_records(results_path(__file__))
               if "per_image" in record.get("figures", {})}
    missing = [label for label in labels if label not in records]
    if missing:
        raise SystemExit(f"no recorded run labelled {', '.join(missing)} in {results_path(__file__)}")
    first, second = (records[label]["figures"]["per_image"] for label in labels)
    if [row["image"] for row in first] != [row["image"] for row in second]:
        raise SystemExit("the two runs looked at different images (another --max-train or --seed?)")
    a = np.array([row["autoencoder_max"] for row in first])
    b = np.array([row["autoencoder_max"] for row in second])
    brightness = np.array([row["brightness"] for row in first])
    return {"labels": labels, "images": len(a),
            "correlation_of_autoencoder_maxima": float(np.corrcoef(a, b)[0, 1]),
            "brightness_correlation": {labels[0]: float(np.corrcoef(brightness, a)[0, 1]),
                                       labels[1]: float(np.corrcoef(brightness, b)[0, 1])},
            "median_maximum": {labels[0]: float(np.median(a)), labels[1]: float(np.median(b))},
            "largest_maximum": {labels[0]: float(a.max()), labels[1]: float(b.max())}}


def main():
    parser = argparse.ArgumentParser(description="EfficientAD: the autoencoder map's maxima on held-out normal images")
    parser.add_argument("--checkpoint", help="an Anomalib model.ckpt or our model.pt")
    parser.add_argument("--train-dir", help="the train/good folder the run drew its images from")
    parser.add_argument("--max-train", type=int, help="the harness run's --max-train")
    parser.add_argument("--seed", type=int, help="the harness run's --seed")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--label", default="")
    parser.add_argument("--compare", default=None, help="two labels of recorded runs, comma-separated")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.compare:
        labels = args.compare.split(",")
        if len(labels) != 2:
            parser.error("--compare takes two labels")
        figures = compare(labels)
    else:
        if not (args.checkpoint and args.train_dir and args.max_train is not None and args.seed is not None):
            parser.error("--checkpoint, --train-dir, --max-train and --seed are needed (or --compare)")
        if "," in args.label:
            parser.error(f"--label {args.label!r}: no commas, since --compare separates two labels with one")
        figures = analyse(args)
    print(json.dumps({key: value for key, value in figures.items() if key != "per_image"}))
    append_record(__file__, typed_command(), figures, out=args.out, label=args.label)


if __name__ == "__main__":
    main()
