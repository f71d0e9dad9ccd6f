# benchmarks/reverse_distillation_parity.py
# Our Reverse Distillation against Anomalib 2.7.0's, network against network, in one process: the same encoder
# file, Anomalib's initial bottleneck and decoder weights copied into ours, the same batches, the same optimizer.
# It records how far the two anomaly maps are apart before training, both losses at every step, then both
# models' test scores, image and pixel AUROC on the same images. Equal figures say that the two networks
# compute the same thing and that a gap between the frameworks' runs comes from around the network (data,
# loader, optimizer, seeds); unequal ones point at the part that differs. A diagnosis, not a score: it is run
# with Anomalib's python and our sources on the path:
#
#   PYTHONPATH=src /tmp/peer-venv/bin/python benchmarks/reverse_distillation_parity.py \
#       --data /tmp/bw/synth/synthetic/texture --weights /tmp/bw/synth/resnet18_random.pth --steps 6 --seeds 0,1,2
import argparse
import json
import sys
from pathlib import Path

import torch
from sklearn.metrics import roc_auc_score

sys.path.insert(0, str(Path(__file__).resolve().parent))
from record import append_record, typed_command  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Reverse Distillation: ours against Anomalib's, same weights")
    parser.add_argument("--data", required=True, help="an MVTec-layout category folder (train/good, test/...)")
    parser.add_argument("--weights", required=True, help="torchvision-format resnet18 state_dict (both encoders)")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-train", type=int, default=48)
    parser.add_argument("--subset", choices=("first", "harness"), default="first",
                        help="which --max-train images train: the first in name order, or those run_anomalib.py "
                             "--max-train draws for the seed (a new subset per seed)")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--betas", default="0.5,0.999", help="Adam betas on both sides (Anomalib ships 0.5,0.99)")
    parser.add_argument("--checkpointing", action="store_true", help="ours with activation checkpointing")
    parser.add_argument("--contiguous", action="store_true",
                        help="ours with NCHW tensors (as shipped: channels-last bottleneck and decoder)")
    parser.add_argument("--seeds", default="0", help="comma-separated: one comparison per seed (init and batch order)")
    parser.add_argument("--out", default=None)
    return parser.parse_args(argv)


def anomalib_model(weights, image_size):
    from anomalib.models.image.reverse_distillation.anomaly_map import AnomalyMapGenerationMode
    from anomalib.models.image.reverse_distillation.torch_model import ReverseDistillationModel
    model = ReverseDistillationModel("resnet18", (image_size, image_size), ["layer1", "layer2", "layer3"],
                                     AnomalyMapGenerationMode.ADD, pre_trained=False)
    state = {k: v for k, v in torch.load(weights, map_location="cpu").items() if not k.startswith("fc.")}
    model.encoder.feature_extractor.load_state_dict(state, strict=False)
    return model


def bottleneck_key(key):
    # Anomalib's OCBE names (the official BN_layer's) -> ours; conv4/bn4 are built but never used there
    renames = {"conv1.": "fusions.0.0.", "bn1.": "fusions.0.1.", "conv2.": "fusions.0.3.", "bn2.": "fusions.0.4.",
               "conv3.": "fusions.1.0.", "bn3.": "fusions.1.1."}
    if key.startswith("bn_layer."):
        return "embedding." + key[len("bn_layer."):].replace("downsample.", "shortcut.")
    for old, new in renames.items():
        if key.startswith(old):
            return new + key[len(old):]
    return None


def decoder_key(key):
    stage = {"layer1.": "stages.0.", "layer2.": "stages.1.", "layer3.": "stages.2."}
    for old, new in stage.items():
        if key.startswith(old):
            return new + key[len(old):].replace("upsample.", "shortcut.")
    raise KeyError(key)


def copy_into_ours(peer, ours):
    state = {}
    for key, value in peer.bottleneck.state_dict().items():
        if bottleneck_key(key) is not None:
            state["bottleneck." + bottleneck_key(key)] = value
    for key, value in peer.decoder.state_dict().items():
        state["decoder." + decoder_key(key)] = value
    missing, unexpected = ours.load_state_dict(state, strict=False)
    learned = [k for k in missing if not k.startswith("encoder.")]
    if learned or unexpected:
        raise SystemExit(f"weights did not map: missing {learned[:5]}, unexpected {unexpected[:5]}")


def as_nchw(model):
    # the bottleneck and decoder in NCHW, fed NCHW encoder features (the encoder itself stays as shipped)
    model.bottleneck.to(memory_format=torch.contiguous_format)
    model.decoder.to(memory_format=torch.contiguous_format)
    encode = model.encoder.forward
    model.encoder.forward = lambda images: {k: v.contiguous() for k, v in encode(images).items()}


def load_masks(data, paths, size):
    import numpy as np
    from PIL import Image
    masks = []
    for path in paths:
        mask = data / "ground_truth" / path.parent.name / f"{path.stem}_mask.png"
        masks.append(np.array(Image.open(mask).resize((size, size), Image.NEAREST)) > 0 if mask.is_file()
                     else np.zeros((size, size), bool))
    return np.stack(masks)


def load_images(folder, transform, limit=None):
    from PIL import Image
    paths = sorted(p for p in folder.rglob("*.png") if "ground_truth" not in p.parts)[:limit]
    return torch.stack([transform(Image.open(p).convert("RGB")) for p in paths]), paths


def main(argv=None):
    args = parse_args(argv)
    from torchvision.transforms import v2
    transform = v2.Compose([v2.ToImage(), v2.Resize((args.image_size, args.image_size), antialias=True),
                            v2.ToDtype(torch.float32, scale=True),
                            v2.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
    data = Path(args.data)
    train, _ = load_images(data / "train" / "good", transform, args.max_train if args.subset == "first" else None)
    test, test_paths = load_images(data / "test", transform)
    labels = [0 if p.parent.name == "good" else 1 for p in test_paths]
    masks = load_masks(data, test_paths, args.image_size)
    for seed in [int(s) for s in args.seeds.split(",")]:
        compare(args, seed, subset(train, args, seed), test, labels, masks)


def harness_subset(count, size, seed):
    # run_anomalib.py's --max-train: a seeded draw of indices into the name-ordered training images, sorted
    import numpy as np
    return np.sort(np.random.default_rng(seed).choice(count, size, replace=False)).tolist()


def subset(train, args, seed):
    if args.subset == "first" or len(train) <= args.max_train:
        return train
    return train[torch.as_tensor(harness_subset(len(train), args.max_train, seed))]


def compare(args, seed, train, test, labels, masks):
    from anomalib.models.image.reverse_distillation.loss import ReverseDistillationLoss as PeerLoss
    from anomaly_detection.models.reverse_distillation import ReverseDistillationLoss, ReverseDistillationModel

    torch.manual_seed(seed)
    peer = anomalib_model(args.weights, args.image_size)
    ours = ReverseDistillationModel(backbone="resnet18", pretrained=True, weights=args.weights,
                                    activation_checkpointing=args.checkpointing)
    copy_into_ours(peer, ours)
    if args.contiguous:
        as_nchw(ours)

    with torch.no_grad():
        encoded_peer = list(peer.encoder(test[:4]).values())
        encoded_ours = ours.encoder(test[:4])
        peer.eval(), ours.eval()
        initial_maps = peer(test[:4]).anomaly_map, ours(test[:4])["anomaly_map"]
    encoder_gap = max((a - encoded_ours[layer]).abs().max().item() / a.abs().max().item()
                      for a, layer in zip(encoded_peer, ours.layers))
    initial_map_gap = ((initial_maps[0] - initial_maps[1]).abs().max() / initial_maps[0].abs().max()).item()

    betas = tuple(float(b) for b in args.betas.split(","))
    optimizers = {name: torch.optim.Adam(list(model.bottleneck.parameters()) + list(model.decoder.parameters()),
                                         lr=0.005, betas=betas) for name, model in (("peer", peer), ("ours", ours))}
    losses = {"peer": PeerLoss(), "ours": ReverseDistillationLoss()}
    generator = torch.Generator().manual_seed(seed)
    history = []
    step = 0
    while step < args.steps:
        order = torch.randperm(len(train), generator=generator)
        for start in range(0, len(train), args.batch_size):
            if step == args.steps:
                break
            batch = train[order[start:start + args.batch_size]]
            values = {}
            for name, model in (("peer", peer), ("ours", ours)):
                model.train()
                encoder_features, decoder_features = model(batch)
                loss = losses[name](encoder_features, decoder_features)
                optimizers[name].zero_grad()
                loss.backward()
                optimizers[name].step()
                values[name] = loss.item()
            history.append(values)
            step += 1

    scores, pixel_auroc = {}, {}
    for name, model in (("peer", peer), ("ours", ours)):
        model.eval()
        with torch.no_grad():
            outputs = [model(test[i:i + 8]) for i in range(0, len(test), 8)]
        scores[name] = torch.cat([o.pred_score if name == "peer" else o["pred_score"] for o in outputs]).flatten()
        maps = torch.cat([o.anomaly_map if name == "peer" else o["anomaly_map"] for o in outputs])
        pixel_auroc[name] = roc_auc_score(masks.ravel(), maps.flatten().numpy())
    record = {"steps": args.steps, "subset": args.subset, "betas": list(betas), "checkpointing": args.checkpointing,
              "contiguous": args.contiguous, "seed": seed,
              "encoder_gap": encoder_gap, "initial_map_gap": initial_map_gap, "losses": history,
              "score_gap": ((scores["peer"] - scores["ours"]).abs().max() / scores["peer"].abs().max()).item(),
              "image_auroc_peer": roc_auc_score(labels, scores["peer"].numpy()),
              "image_auroc_ours": roc_auc_score(labels, scores["ours"].numpy()),
              "pixel_auroc_peer": pixel_auroc["peer"], "pixel_auroc_ours": pixel_auroc["ours"]}
    print(json.dumps({k: v for k, v in record.items() if k != "losses"}))
    append_record(__file__, typed_command(), record, out=args.out)


if __name__ == "__main__":
    main()
