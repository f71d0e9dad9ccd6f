# src/anomaly_detection/distributed.py
# torch.distributed as torchrun sets it up: one process per device, NCCL on CUDA, gloo on CPU. Without torchrun
# (no WORLD_SIZE in the environment, or WORLD_SIZE=1) every function here is a no-op that returns its input, so
# the single-process code paths are the distributed ones with one rank.
import gc
import os
import warnings

import torch
import torch.distributed as dist
from torch.utils.data import Sampler


def launched_by_torchrun():
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


def init_distributed():
    # reads the environment torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT)
    if not launched_by_torchrun() or not dist.is_available() or dist.is_initialized():
        return False
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank())
        dist.init_process_group("nccl", device_id=torch.device("cuda", local_rank()))
    else:
        dist.init_process_group("gloo")
    return True


def shutdown(synchronise=True):
    if active():
        # after a run that completed, every process reaches this point before any tears its connections down: a
        # rank that destroyed the group while its peer's last gloo message was in flight aborted once ("terminate
        # called without an active exception", 1 run in about 8 of the hook-order test). Not after an error: the
        # other processes may be waiting in another collective, and torchrun stops them when this one exits
        if synchronise:
            dist.barrier()
        # anything still holding the group (a DistributedDataParallel in a reference cycle, after a failed fit)
        # lets go of it now and not during interpreter finalisation: such wrappers were still alive when a rank
        # aborted at exit ('terminate called without an active exception', the hook-order test in CI)
        gc.collect()
        dist.destroy_process_group()


def active():
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank():
    return dist.get_rank() if active() else 0


def world_size():
    return dist.get_world_size() if active() else 1


def local_rank():
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main():
    return rank() == 0


def barrier():
    if active():
        dist.barrier()


def collective_device():
    # NCCL moves CUDA tensors only; gloo moves CPU tensors
    return torch.device("cuda", local_rank()) if active() and dist.get_backend() == "nccl" else torch.device("cpu")


def all_reduce_sum(tensor):
    # the sum over ranks, in place, on the tensor's own device and dtype
    if not active():
        return tensor
    moved = tensor.to(collective_device())
    dist.all_reduce(moved, op=dist.ReduceOp.SUM)
    if moved is not tensor:
        tensor.copy_(moved)
    return tensor


def all_reduce_count(value):
    return int(all_reduce_sum(torch.tensor([int(value)], dtype=torch.int64))[0])


def all_gather_objects(obj):
    # every rank's object, in rank order, on every rank
    if not active():
        return [obj]
    gathered = [None] * world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def all_gather_tensor(tensor):
    # every rank's tensor of the same shape, in rank order, on every rank (on the tensor's own device)
    if not active():
        return [tensor]
    moved = tensor.to(collective_device()).contiguous()
    gathered = [torch.empty_like(moved) for _ in range(world_size())]
    dist.all_gather(gathered, moved)
    return [part.to(tensor.device) for part in gathered]


def gather_objects(obj, destination=0):
    # every rank's object, in rank order, on `destination`; None elsewhere (what the others hold is not copied)
    if not active():
        return [obj]
    gathered = [None] * world_size() if rank() == destination else None
    dist.gather_object(obj, gathered, dst=destination)
    return gathered


def broadcast_object(obj, source=0):
    if not active():
        return obj
    box = [obj if rank() == source else None]
    dist.broadcast_object_list(box, src=source)
    return box[0]


def broadcast_tensor(tensor, source=0):
    # `tensor` from `source` on every rank, whatever its shape there (the others pass None)
    if not active():
        return tensor
    meta = broadcast_object((tuple(tensor.shape), tensor.dtype) if rank() == source else None, source)
    device = collective_device()
    buffer = tensor.to(device).contiguous() if rank() == source else torch.empty(meta[0], dtype=meta[1],
                                                                                 device=device)
    dist.broadcast(buffer, src=source)
    return buffer


def gather_rows(tensor, destination=0):
    # the rows of every rank's tensor (counts may differ), as one list in rank order on `destination`
    if not active():
        return [tensor]
    counts = all_gather_objects(int(tensor.shape[0]))
    device = collective_device()
    # rows travel as their bytes: gloo knows neither bfloat16 nor int16, and bytes cannot round
    sent = tensor.contiguous().view(torch.uint8) if tensor.dim() > 1 else tensor.view(-1, 1).view(torch.uint8)
    padded = torch.zeros((max(counts),) + tuple(sent.shape[1:]), dtype=torch.uint8, device=device)
    padded[:sent.shape[0]] = sent.to(device)
    if rank() != destination:
        dist.gather(padded, None, dst=destination)
        return None
    buffers = [torch.empty_like(padded) for _ in range(world_size())]
    dist.gather(padded, buffers, dst=destination)
    return [buffer[:count].to(tensor.device).view(tensor.dtype).view((count,) + tuple(tensor.shape[1:]))
            for buffer, count in zip(buffers, counts)]


class ShardSampler(Sampler):
    # Rank r takes the dataset's batches r, r + N, r + 2N, ... of batch_size items each, in the dataset's order:
    # no sample twice and none padded in (a sum or a metric over the gathered shards is the one-process one), and
    # every batch a process runs is exactly a batch one process would run, so its outputs are bit for bit the
    # one-process ones (a batch of other images may take other kernels and round differently). The loader's
    # batch size must be batch_size; counts differ by at most one batch.
    def __init__(self, dataset, batch_size=1, shard_rank=None, shards=None):
        self.length = len(dataset)
        self.batch_size = int(batch_size)
        self.shard_rank = rank() if shard_rank is None else shard_rank
        self.shards = world_size() if shards is None else shards

    def indices(self):
        step = self.batch_size * self.shards
        return [index for start in range(self.shard_rank * self.batch_size, self.length, step)
                for index in range(start, min(start + self.batch_size, self.length))]

    def __iter__(self):
        return iter(self.indices())

    def __len__(self):
        return len(self.indices())


def interleave_batches(shards):
    # the inverse of ShardSampler for lists of batches: rank r's k-th batch was the dataset's batch k * N + r
    merged = []
    for position in range(max((len(shard) for shard in shards), default=0)):
        merged += [shard[position] for shard in shards if position < len(shard)]
    return merged


def merge_shards(parts, block=1):
    # the inverse of ShardSampler(batch_size=block) for lists, arrays or tensors whose first axis holds the items
    # of each rank's shard in the order it read them
    batches = interleave_batches([[part[start:start + block] for start in range(0, len(part), block)]
                                  for part in parts])
    first = parts[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(batches) if batches else first[:0]
    if isinstance(first, list):
        return [item for batch in batches for item in batch]
    import numpy as np
    return np.concatenate(batches) if batches else first[:0]


def gather_batches_to_all(batches):
    # every rank's list of batch outputs (tensors moved to the CPU), in the dataset's batch order, on every rank
    if not active():
        return list(batches)
    return interleave_batches(all_gather_objects([batch.cpu() if isinstance(batch, torch.Tensor) else batch
                                                  for batch in batches]))


# ---- DistributedDataParallel around the trainable parts only --------------------------------------------------
def trainable(module):
    return any(parameter.requires_grad for parameter in module.parameters())


def wrap_trainable_parts(model, device):
    # Each child of the model that holds trainable parameters is replaced by DistributedDataParallel around it;
    # frozen parts (teachers, encoders) stay as they are, so DDP never waits for gradients they do not have. A
    # container without a forward of its own (ModuleList, ModuleDict) is entered and its members wrapped. Returns
    # what was wrapped, for unwrap_parts; the model's state_dict keys are those of the unwrapped model again once
    # unwrapped. broadcast_buffers=False: no collective inside forward, so validation and test shards of
    # different sizes never wait on each other; BatchNorm statistics are each process's own and the first
    # process's are the ones saved.
    if not active():
        return []
    from torch import nn
    from torch.nn.parallel import DistributedDataParallel

    wrapped = []

    def visit(parent):
        for name, child in list(parent.named_children()):
            if not trainable(child):
                continue
            if isinstance(child, (nn.ModuleList, nn.ModuleDict)):
                visit(child)
                continue
            with warnings.catch_warnings():
                # torch 2.14 deprecates broadcast_buffers for forward_sync_buffers, which syncs buffers at
                # construction; its own warning says to keep broadcast_buffers=False where buffers stay each
                # process's own, as ours do
                warnings.filterwarnings("ignore", message="`broadcast_buffers` is deprecated", category=FutureWarning)
                ddp = DistributedDataParallel(child, device_ids=[device] if device.type == "cuda" else None,
                                              broadcast_buffers=False)
            wrapped.append((parent, name, ddp))

    visit(model)
    rewrap_parts(wrapped)
    return wrapped


def unwrap_parts(wrapped):
    from torch import nn
    for parent, name, ddp in wrapped:
        if isinstance(parent, nn.ModuleList):
            parent[int(name)] = ddp.module
        else:
            setattr(parent, name, ddp.module)


def release_parts(wrapped):
    # after fit: the plain modules back in the model, and the wrappers freed now, while the process group they
    # hold is alive (DistributedDataParallel sits in reference cycles that only the garbage collector breaks)
    unwrap_parts(wrapped)
    if wrapped:
        wrapped.clear()
        gc.collect()


def rewrap_parts(wrapped):
    from torch import nn
    for parent, name, ddp in wrapped:
        if isinstance(parent, nn.ModuleList):
            parent[int(name)] = ddp
        else:
            setattr(parent, name, ddp)
