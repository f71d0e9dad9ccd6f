# benchmarks/peer_test_from_checkpoint.py
# Anomalib's test pass alone, from the checkpoint one of its fits saved: run with Anomalib's venv python,
# with run_anomalib.py's own options plus --checkpoint. The data module, model, weights and network guard
# are the peer harness's (../shared/peer/run_anomalib.py, imported, not copied), and the timed call is the
# same engine.test it times after a fit, so a test pass can be compared again without refitting (Anomalib's
# PatchCore fit on magnetic_tile's 714 images takes about 34 minutes here). Prints one JSON line.
import json
import os
import sys
import time
from pathlib import Path

PEER_DIR = Path(os.environ.get("PEER_DIR", Path(__file__).resolve().parents[2] / "shared" / "peer"))


def main():
    arguments = sys.argv[1:]
    if "--checkpoint" not in arguments:
        raise SystemExit("--checkpoint PATH (an Anomalib model.ckpt) is required")
    at = arguments.index("--checkpoint")
    checkpoint = Path(arguments[at + 1])
    if not checkpoint.is_file():
        raise SystemExit(f"--checkpoint {checkpoint}: no such file")
    sys.argv = [str(PEER_DIR / "run_anomalib.py")] + arguments[:at] + arguments[at + 2:]
    sys.path.insert(0, str(PEER_DIR))
    real_stdout = sys.stdout
    sys.stdout = sys.stderr  # Lightning's prints must not mix with the JSON line
    import run_anomalib as peer  # installs the harness's offline environment and socket guard

    args = peer.parse_args()
    os.environ["TQDM_DISABLE"] = "1"
    import torch
    from anomalib.engine import Engine
    from lightning.pytorch import seed_everything

    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    seed_everything(args.seed, workers=True, verbose=False)
    weights_file = None
    if args.weights:
        weights_file, _ = peer.prepare_weights_file(args.weights, args.backbone,
                                                    Path(os.environ["XDG_CACHE_HOME"]) / "remapped_weights")
    peer.patch_timm(args.backbone, weights_file)
    datamodule = peer.build_datamodule(args, __import__("anomalib.data", fromlist=["MVTecAD"]))
    model = peer.build_model(args, weights_file)
    engine = Engine(accelerator="cpu", devices=1, default_root_dir=str(checkpoint.parent), logger=False,
                    enable_progress_bar=False, deterministic=False)
    started = time.perf_counter()
    results = engine.test(model=model, datamodule=datamodule, ckpt_path=str(checkpoint), verbose=False)
    test_s = time.perf_counter() - started
    metrics = {key: float(value) for key, value in (results[0] if results else {}).items()}
    record = {"side": "anomalib", "model": args.model, "checkpoint": str(checkpoint), "test_s": round(test_s, 2),
              "test_images": len(datamodule.test_data), "image_auroc": metrics.get("image_AUROC"),
              "pixel_auroc": metrics.get("pixel_AUROC"), "aupro": metrics.get("pixel_AUPRO"),
              "peak_rss_mb": peer.peak_rss_mb(), "threads": torch.get_num_threads()}
    print(json.dumps(record), file=real_stdout, flush=True)


if __name__ == "__main__":
    main()
