# benchmarks/efficientad_peer_map_sources.py
# efficientad_map_sources.py for Anomalib 2.7.0's EfficientAD checkpoints: image and pixel AUROC of the
# student-teacher map alone, the autoencoder map alone, and the combined map with the checkpoint's own quantiles
# (Anomalib fits them on the good images of its validation set, which is the test set in the harness), on an
# MVTec-layout test split. Beside our checkpoints' figures it says whether a gap between the frameworks lies in one
# map or in both. A diagnosis on test labels, not a way to score. Run it with Anomalib's python:
#
#   /tmp/peer-venv/bin/python benchmarks/efficientad_peer_map_sources.py --checkpoints RUN/.../model.ckpt \
#       --test-dir ../shared/data/magnetic_tile/test
#
# With --train-dir, --max-train and --seed (the harness run's own) it also fits the four quantiles, as Anomalib
# computes them, on the normal training images that run did not train on (run_anomalib.py --max-train draws the
# rest), and scores the combined map with those: Anomalib's network under our protocol, where the quantiles come
# from normal images held out of training, never from test images.
import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from sklearn.metrics import roc_auc_score

sys.path.insert(0, str(Path(__file__).resolve().parent))
from record import append_record, typed_command  # noqa: E402

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


def load_peer_model(checkpoint):
    from anomalib.models.image.efficient_ad.torch_model import EfficientAdModel, EfficientAdModelSize
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)["state_dict"]
    weights = {key[len("model."):]: value for key, value in state.items() if key.startswith("model.")}
    out_channels = weights["teacher.conv4.weight"].shape[0]
    size = EfficientAdModelSize.M if "teacher.conv6.weight" in weights else EfficientAdModelSize.S
    model = EfficientAdModel(teacher_out_channels=out_channels, model_size=size)
    model.load_state_dict(weights)
    return model.eval()


def image_tensor(path, image_size):
    # Anomalib's EfficientAD input: the image resized, in [0, 1] (the networks normalise it themselves)
    image = Image.open(path).convert("RGB").resize((image_size, image_size), Image.BILINEAR)
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)


def test_split(test_dir, image_size):
    test_dir = Path(test_dir)
    paths = sorted(p for p in test_dir.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    ground_truth = test_dir.parent / "ground_truth"
    for path in paths:
        mask_path = ground_truth / path.parent.name / f"{path.stem}_mask.png"
        mask = np.zeros((image_size, image_size), bool)
        if path.parent.name != "good" and mask_path.is_file():
            mask = np.array(Image.open(mask_path).convert("L").resize((image_size, image_size), Image.NEAREST)) > 127
        yield image_tensor(path, image_size), int(path.parent.name != "good"), mask


def held_out_paths(train_dir, max_train, seed):
    # the name-ordered training images run_anomalib.py --max-train did not draw for the seed
    from reverse_distillation_parity import harness_subset
    paths = sorted(p for p in Path(train_dir).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if len(paths) <= max_train:
        raise SystemExit(f"{train_dir} holds {len(paths)} images: --max-train {max_train} leaves none held out")
    trained = set(harness_subset(len(paths), max_train, seed))
    return [path for index, path in enumerate(paths) if index not in trained]


def held_out_normals(train_dir, max_train, seed, image_size):
    for path in held_out_paths(train_dir, max_train, seed):
        yield image_tensor(path, image_size)


def held_out_quantiles(model, images):
    # Anomalib's map_norm_quantiles: the 0.9 and 0.995 quantiles of all pixels of the raw maps, per map
    maps_st, maps_ae = [], []
    with torch.no_grad():
        for image in images:
            map_st, map_ae = model.get_maps(image[None], normalize=False)
            maps_st.append(map_st.flatten())
            maps_ae.append(map_ae.flatten())
    maps_st, maps_ae = torch.cat(maps_st), torch.cat(maps_ae)
    return {"qa_st": float(torch.quantile(maps_st, 0.9)), "qb_st": float(torch.quantile(maps_st, 0.995)),
            "qa_ae": float(torch.quantile(maps_ae, 0.9)), "qb_ae": float(torch.quantile(maps_ae, 0.995)),
            "images": len(images)}


def combined_map(raw_st, raw_ae, quantiles):
    return 0.5 * normalised(raw_st, quantiles["qa_st"], quantiles["qb_st"]) \
        + 0.5 * normalised(raw_ae, quantiles["qa_ae"], quantiles["qb_ae"])


def scored(maps, labels, masks):
    return {"image_auroc": roc_auc_score(labels, maps.reshape(len(maps), -1).max(1)),
            "pixel_auroc": roc_auc_score(masks.ravel(), maps.ravel())}


def normalised(maps, low, high):
    # Anomalib's compute_maps: 0.1 (map - q_a) / (q_b - q_a) once its quantiles are set (the raw map while they
    # are all 0); padding and upsampling come first there, and being linear they commute with it
    return maps if low == high == 0 else 0.1 * (maps - low) / (high - low)


def analyse(checkpoint, test_dir, image_size, held_out=None):
    model = load_peer_model(checkpoint)
    raw_st, raw_ae, labels, masks = [], [], [], []
    with torch.no_grad():
        for image, label, mask in test_split(test_dir, image_size):
            map_st, map_ae = model.get_maps(image[None], normalize=False)
            raw_st.append(map_st[0, 0].numpy())
            raw_ae.append(map_ae[0, 0].numpy())
            labels.append(label)
            masks.append(mask)
    labels, masks, raw_st, raw_ae = np.array(labels), np.stack(masks), np.stack(raw_st), np.stack(raw_ae)
    quantiles = {key: float(value) for key, value in model.quantiles.items()}
    sources = {"student_teacher_alone": scored(raw_st, labels, masks),
               "autoencoder_alone": scored(raw_ae, labels, masks),
               "checkpoint_quantiles": scored(combined_map(raw_st, raw_ae, quantiles), labels, masks),
               "saved_quantiles": quantiles}
    if held_out is not None:
        fitted = held_out_quantiles(model, list(held_out))
        sources["held_out_quantiles"] = dict(scored(combined_map(raw_st, raw_ae, fitted), labels, masks),
                                             quantiles=fitted)
    return {"checkpoint": str(checkpoint), "test_images": len(labels), "sources": sources}


def main():
    parser = argparse.ArgumentParser(description="Anomalib EfficientAD checkpoints: which map separates")
    parser.add_argument("--checkpoints", required=True, help="comma-separated Anomalib model.ckpt files")
    parser.add_argument("--test-dir", required=True, help="the MVTec-layout test folder they were tested on")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--train-dir", default=None, help="the train/good folder the run drew its images from")
    parser.add_argument("--max-train", type=int, default=None, help="the run's run_anomalib.py --max-train")
    parser.add_argument("--seed", type=int, default=None, help="the run's run_anomalib.py --seed")
    parser.add_argument("--label", default="")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    given = [value is not None for value in (args.train_dir, args.max_train, args.seed)]
    if any(given) and not all(given):
        parser.error("--train-dir, --max-train and --seed go together (the harness run's held-out images)")
    for checkpoint in args.checkpoints.split(","):
        held_out = held_out_normals(args.train_dir, args.max_train, args.seed, args.image_size) if all(given) else None
        figures = analyse(checkpoint, args.test_dir, args.image_size, held_out)
        print(json.dumps(figures))
        append_record(__file__, typed_command(), figures, out=args.out, label=args.label)


if __name__ == "__main__":
    main()
