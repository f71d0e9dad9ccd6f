# benchmarks/test_pass_breakdown.py
# Where the test pass of a fitted PatchCore or PaDiM model goes, part by part, in one process: loading
# the test images, the backbone, the model's scoring (nearest-neighbour search or Mahalanobis distance),
# the blur and the metrics, next to the machine's float32 matrix-multiply rate measured in the same
# script (a 4096-row product, for scale), and the bfloat16-candidate search against the exact one on the same
# patches: its time, and how many patches it gave another row than the exact search. Also the resident memory
# of the imports alone
# (this script keeps every batch, so its own peak is not that of a test run).
import argparse
import json
import resource
import time

import torch

from record import append_record, results_path, typed_command


def rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed(function, repeats=1):
    started = time.perf_counter()
    for _ in range(repeats):
        result = function()
    return result, (time.perf_counter() - started) / repeats


def gemm_rate(rows, cols, dim):
    left, right = torch.randn(rows, dim), torch.randn(dim, cols)
    torch.mm(left, right)
    _, seconds = timed(lambda: torch.mm(left, right), repeats=3)
    return 2.0 * rows * cols * dim / seconds / 1e9


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--checkpoint", required=True, help="model.pt of a fitted patchcore or padim run")
    parser.add_argument("--out", default=str(results_path(__file__)),
                        help="append the record here (default: %(default)s; '' writes none)")
    args = parser.parse_args()
    torch_mb = rss_mb()

    from anomaly_detection.evaluator import compute_metrics
    from anomaly_detection.models.components import gaussian_blur
    from anomaly_detection.models.patchcore.search import nearest_neighbours
    from anomaly_detection.runner import build_loaders, load_model_file
    imports_mb = rss_mb()

    model, config, _ = load_model_file(args.checkpoint)
    model.eval()
    category = str(config["dataset"]["category"])
    _, _, loader = build_loaders(config, category)

    batches, load_s = timed(lambda: list(loader))
    images = [batch["image"] for batch in batches]
    with torch.no_grad():
        features, backbone_s = timed(lambda: [model.feature_extractor(batch) for batch in images])
        embeddings, embed_s = timed(lambda: [model.embed(batch) for batch in images])
        outputs, forward_s = timed(lambda: [model(batch) for batch in images])
        maps = torch.cat([out["anomaly_map"] for out in outputs])
        _, blur_s = timed(lambda: gaussian_blur(maps, getattr(model, "blur_sigma", 4.0)))
    record = {"model": config["model"]["name"], "checkpoint": args.checkpoint, "images": int(maps.shape[0]),
              "threads": torch.get_num_threads(), "load_s": load_s, "backbone_s": backbone_s,
              "embed_s_incl_backbone": embed_s, "model_forward_s": forward_s, "blur_s": blur_s}
    if record["model"] == "patchcore":
        queries = torch.cat([e.permute(0, 2, 3, 1).reshape(-1, e.shape[1]) for e in embeddings])
        bank = model.memory_bank
        exact, search_s = timed(lambda: nearest_neighbours(queries, bank, 1, model.memory_budget_mb))
        approximate, search_bf16_s = timed(lambda: nearest_neighbours(queries, bank, 1, model.memory_budget_mb,
                                                                      torch.bfloat16))
        record.update(search_bf16_s=search_bf16_s,
                      bf16_patches_off_nearest_row=int((approximate[1] != exact[1]).sum()),
                      bf16_largest_relative_distance_change=float(
                          ((approximate[0] - exact[0]).abs() / exact[0].clamp_min(1e-12)).max()))
        rate = gemm_rate(4096, bank.shape[0], bank.shape[1])
        flops = 2.0 * queries.shape[0] * bank.shape[0] * bank.shape[1]
        record.update(search_s=search_s, search_gflop=flops / 1e9, gemm_gflops=rate,
                      search_at_gemm_rate_s=flops / 1e9 / rate, queries=int(queries.shape[0]),
                      bank=list(bank.shape))
    predictions = {"scores": torch.cat([out["pred_score"] for out in outputs]).numpy(),
                   "labels": torch.cat([torch.as_tensor(b["label"]) for b in batches]).numpy(),
                   "maps": maps[:, 0].numpy(), "masks": torch.cat([b["mask"] for b in batches])[:, 0].numpy() > 0.5,
                   "has_masks": True, "defect_types": sum((list(b["defect_type"]) for b in batches), [])}
    _, metrics_s = timed(lambda: compute_metrics(predictions))
    record.update(metrics_s=metrics_s, torch_import_rss_mb=torch_mb, imports_rss_mb=imports_mb)
    print(json.dumps(record))
    if args.out:
        append_record(__file__, typed_command(), record, out=args.out, variant=record["model"],
                      checkpoint=args.checkpoint)


if __name__ == "__main__":
    main()
