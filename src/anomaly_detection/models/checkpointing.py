# src/anomaly_detection/models/checkpointing.py
import contextlib

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


def checkpoint_segments(backbone, steps, feature_steps):
    # Splits a truncated backbone into segments whose inputs are the only activations kept for the
    # backward pass. A residual stage (a Sequential of blocks) gives one segment per block; runs of leaf
    # modules (a ResNet stem: conv, bn, in-place relu, maxpool) stay together, so no segment starts
    # with an in-place op that would overwrite the segment input it must recompute from.
    segments, pending = [], []

    def flush(feature=None):
        if pending:
            segments.append((tuple(pending), feature))
            pending.clear()

    for step in steps:
        module = backbone.get_submodule(step)
        children = list(module.named_children())
        if isinstance(module, nn.Sequential) and children and all(list(child.children()) for _, child in children):
            flush()
            segments.extend(((f"{step}.{name}",), None) for name, _ in children)
            if step in feature_steps:
                segments[-1] = (segments[-1][0], step)
        elif list(module.children()):
            flush()
            segments.append(((step,), step if step in feature_steps else None))
        else:
            pending.append(step)
            if step in feature_steps:
                flush(step)
    flush()
    return segments


def run_checkpointed(modules, hidden):
    # Recomputation in the backward pass runs the BatchNorm layers in training mode a second time; with
    # their momentum at 0 and the batch counter restored it leaves the running statistics as one forward
    # pass left them, so a run with checkpointing ends with the same weights and statistics as one without.
    norms = [layer for module in modules for layer in module.modules()
             if isinstance(layer, nn.modules.batchnorm._BatchNorm)]
    return checkpoint(run_sequence, modules, hidden, use_reentrant=False,
                      context_fn=lambda: (contextlib.nullcontext(), _frozen_running_stats(norms)))


def run_sequence(modules, hidden):
    for module in modules:
        hidden = module(hidden)
    return hidden


@contextlib.contextmanager
def _frozen_running_stats(norms):
    saved = [(norm.momentum, None if norm.num_batches_tracked is None else norm.num_batches_tracked.clone())
             for norm in norms]
    for norm in norms:
        norm.momentum = 0.0
    try:
        yield
    finally:
        for norm, (momentum, tracked) in zip(norms, saved):
            norm.momentum = momentum
            if tracked is not None:
                with torch.no_grad():
                    norm.num_batches_tracked.copy_(tracked)
