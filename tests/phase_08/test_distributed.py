# tests/phase_08/test_distributed.py
# torchrun with 2 processes on the CPU (gloo): PaDiM and PatchCore fitted by 2 processes are the model one process
# fits (the same weights, bank and metrics), STFPM killed mid-run resumes under torchrun to the metrics of an
# uninterrupted run with one set of checkpoints and results, and every hook fires in the seed's order on every
# rank. Each run is a real `torchrun` of `python -m anomaly_detection`, on 64 px generated images.
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from anomaly_detection import distributed
from anomaly_detection.trainer import load_checkpoint_file

HERE = Path(__file__).resolve().parent


def launch(args, processes, **popen):
    # one process: plain `python -m anomaly_detection`; more: torchrun on a free local port
    prefix = [sys.executable] + (["-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                                  str(processes)] if processes > 1 else [])
    environment = dict(os.environ, OMP_NUM_THREADS="1")
    if Path("/sys/class/net/lo").exists():
        # gloo connects over the loopback device, not whichever interface the host name resolves to
        environment.setdefault("GLOO_SOCKET_IFNAME", "lo")
    return subprocess.Popen(prefix + args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=environment, **popen)


def train(model, root, data, processes, extra=(), resume=False):
    overrides = run_overrides(root, data) + list(extra)
    process = launch(["-m", "anomaly_detection", "train", "--model", model, "--dataset", "demo", *overrides]
                     + (["--resume"] if resume else []), processes)
    out, err = process.communicate(timeout=600)
    assert process.returncode == 0, err[-3000:]
    summaries = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert len(summaries) == 1, f"expected one summary (the first process's), got {len(summaries)}"
    return summaries[0]


def run_overrides(root, data):
    return [f"demo_dir={data}", f"results_dir={root / 'results'}", f"checkpoint_dir={root / 'checkpoints'}",
            f"log_dir={root / 'logs'}", "data.image_size=64", "dataset.synthetic.image_size=64",
            "dataset.synthetic.num_train=22", "dataset.synthetic.num_test_good=6",
            "dataset.synthetic.num_test_defect=3", "training.batch_size=4", "data.eval_batch_size=4",
            "model.pretrained=false", "model.backbone=resnet18", "training.progress_bar=false",
            "evaluation.figures=false", "data.val_fraction=0.25"]


def saved_model(root, model):
    return load_checkpoint_file(root / "checkpoints" / model / "demo" / "demo" / "model.pt")


METRICS = ("image_auroc", "pixel_auroc", "aupro", "f1_max", "pixel_f1_max", "image_ap", "pixel_ap")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tmp_path_factory.mktemp("distributed_data")


# ---- the shards and their merge, without processes ------------------------------------------------------------
@pytest.mark.parametrize("length,batch_size,shards", [(10, 3, 2), (9, 3, 3), (7, 1, 2), (2, 4, 3), (0, 2, 2),
                                                      (13, 4, 2)])
def test_shards_cover_every_item_once_in_whole_batches_and_merge_back_in_order(length, batch_size, shards):
    samplers = [distributed.ShardSampler(range(length), batch_size, shard_rank=r, shards=shards)
                for r in range(shards)]
    parts = [sampler.indices() for sampler in samplers]
    assert sorted(i for part in parts for i in part) == list(range(length))
    one_process_batches = [list(range(s, min(s + batch_size, length))) for s in range(0, length, batch_size)]
    for rank, part in enumerate(parts):
        batches = [part[s:s + batch_size] for s in range(0, len(part), batch_size)]
        assert batches == one_process_batches[rank::shards]
    assert distributed.merge_shards(parts, batch_size) == list(range(length))
    tensors = [torch.tensor(part, dtype=torch.float32).view(-1, 1) for part in parts]
    assert distributed.merge_shards(tensors, batch_size).view(-1).tolist() == list(range(length))


# ---- one-pass models: 2 processes fit the model one process fits ----------------------------------------------
@pytest.mark.parametrize("model", ["padim", "patchcore"])
def test_two_processes_fit_the_same_model_as_one(model, data, tmp_path):
    one = train(model, tmp_path / "one", data, 1)
    two = train(model, tmp_path / "two", data, 2)
    assert two["processes"] == 2 and "processes" not in one
    assert one["num_train_images"] == two["num_train_images"] and one["num_test_images"] == two["num_test_images"]
    for key in METRICS:
        assert two[key] == pytest.approx(one[key], abs=1e-4), key
    state_one, state_two = saved_model(tmp_path / "one", model), saved_model(tmp_path / "two", model)
    for key, value in state_one["model"].items():
        assert value.shape == state_two["model"][key].shape, key
        assert torch.allclose(value.double(), state_two["model"][key].double(), rtol=1e-5, atol=1e-7), key
    assert state_one["threshold"]["image_threshold"] == pytest.approx(state_two["threshold"]["image_threshold"],
                                                                      rel=1e-5)
    if model == "patchcore":
        # the same features give the same coreset: the bank is identical, row for row
        assert torch.equal(state_one["model"]["memory_bank"], state_two["model"]["memory_bank"])


# ---- STFPM: DDP training, killed and resumed under torchrun ---------------------------------------------------
def files_under(root):
    return sorted(str(path.relative_to(root)) for path in root.rglob("*") if path.is_file()
                  and "events.out.tfevents" not in path.name)


def descendants(pid):
    children = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, queue = [], [pid]
    while queue:
        for child in children.get(queue.pop(), []):
            found.append(child)
            queue.append(child)
    return found


def test_stfpm_killed_under_torchrun_resumes_to_the_uninterrupted_runs_metrics(data, tmp_path):
    straight = train("stfpm", tmp_path / "straight", data, 2, ["training.num_epochs=6"])

    killed_root = tmp_path / "killed"
    args = ["-m", "anomaly_detection", "train", "--model", "stfpm", "--dataset", "demo",
            *run_overrides(killed_root, data), "training.num_epochs=6"]
    process = launch(args, 2)
    last = killed_root / "checkpoints" / "stfpm" / "demo" / "demo" / "last.pt"
    deadline = time.monotonic() + 300
    while not last.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    # torchrun and both workers at once, as a lost machine stops them (torchrun starts each worker in a process
    # group of its own, so killing torchrun's group alone would leave them running)
    for pid in [process.pid] + descendants(process.pid):
        os.kill(pid, signal.SIGKILL)
    process.communicate()
    cut_at = load_checkpoint_file(last)["epoch"]
    assert cut_at < 5, "the run ended before it was killed: nothing was resumed"
    assert not (killed_root / "results" / "stfpm" / "demo" / "demo" / "summary.json").exists()

    resumed = train("stfpm", killed_root, data, 2, ["training.num_epochs=6"], resume=True)
    for key in METRICS:
        assert resumed[key] == pytest.approx(straight[key], abs=1e-4), key
    assert resumed["best_epoch"] == straight["best_epoch"]
    # one checkpoint set and one results folder, as one process writes them (no per-rank copies, no partial files)
    assert files_under(killed_root) == files_under(tmp_path / "straight")
    assert files_under(killed_root / "checkpoints") == [f"stfpm/demo/demo/{name}" for name in
                                                        ("best.pt", "config.yaml", "last.pt", "model.pt")]
    weights_straight = saved_model(tmp_path / "straight", "stfpm")["model"]
    weights_resumed = saved_model(killed_root, "stfpm")["model"]
    assert all(torch.allclose(weights_resumed[key], value, atol=1e-6) for key, value in weights_straight.items())


# ---- hooks: the seed's order on every rank ---------------------------------------------------------------------
def run_worker(output, processes):
    process = launch([str(HERE / "hook_order_worker.py"), str(output)], processes)
    _, err = process.communicate(timeout=300)
    assert process.returncode == 0, err[-3000:]
    return [json.loads((output / f"hooks_rank{rank}.json").read_text()) for rank in range(processes)]


def test_every_hook_fires_in_the_seeds_order_on_every_rank(tmp_path):
    from phase_02.test_base_trainer import expected_hook_sequence
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    one = run_worker(tmp_path / "one", 1)[0]
    ranks = run_worker(tmp_path / "two", 2)
    assert one["trained_inside"] == "Conv2d" and one["world_size"] == 1
    for record in ranks:
        assert record["world_size"] == 2
        assert record["trained_inside"] == "DistributedDataParallel" and record["after_fit"] == "Conv2d"
        assert record["wrappers_alive_after_fit"] == 0
        # 8 training images in batches of 2 over 2 processes: 2 batches each; 4 validation images: 1 each
        assert (record["train_batches"], record["val_batches"]) == (2, 1)
        expected = expected_hook_sequence(2, 2, 1)
        assert [tuple(call) if len(call) > 1 else call[0] for call in record["calls"]] == expected


# ---- PatchCore's sharded nearest-neighbour search --------------------------------------------------------------
def test_sharded_search_splits_the_bank_and_finds_what_the_whole_bank_search_finds(tmp_path):
    process = launch([str(HERE / "sharded_search_worker.py"), str(tmp_path)], 2)
    _, err = process.communicate(timeout=300)
    assert process.returncode == 0, err[-3000:]
    reports = [json.loads((tmp_path / f"sharded_rank{rank}.json").read_text()) for rank in range(2)]
    # 53 rows: blocks of 27 and 26, contiguous
    assert [(r["block_rows"], r["offset"]) for r in reports] == [(27, 0), (26, 27)]
    for report in reports:
        assert report["k1_same_indices"] and report["k5_same_indices"] and report["rows_equal"]
        assert report["k1_max_distance_difference"] < 1e-5 and report["k5_max_distance_difference"] < 1e-5


def test_patchcore_with_sharded_search_scores_as_one_process(data, tmp_path):
    # float16 patch storage: the gathered rows travel as bytes (gloo has no 16-bit types)
    one = train("patchcore", tmp_path / "one", data, 1, ["model.feature_dtype=float16"])
    two = train("patchcore", tmp_path / "two", data, 2, ["model.sharded_search=true", "model.feature_dtype=float16"])
    for key in METRICS:
        assert two[key] == pytest.approx(one[key], abs=1e-4), key
    one_table, two_table = (pd.read_csv(root / "results" / "patchcore" / "demo" / "demo" / "scores.csv")
                            for root in (tmp_path / "one", tmp_path / "two"))
    assert list(one_table["image_path"]) == list(two_table["image_path"])
    assert two_table["score"].to_numpy() == pytest.approx(one_table["score"].to_numpy(), rel=1e-5)
    # the checkpoint holds the whole bank (the first process keeps it), so one process can test and predict
    assert torch.equal(saved_model(tmp_path / "one", "patchcore")["model"]["memory_bank"],
                       saved_model(tmp_path / "two", "patchcore")["model"]["memory_bank"])
