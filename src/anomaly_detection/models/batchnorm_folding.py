# src/anomaly_detection/models/batchnorm_folding.py
import copy

import torch
from torch import nn

from anomaly_detection.models.components import tensor_version


def folded_copy(backbone):
    # An inference copy of a frozen backbone with each BatchNorm folded into the convolution just before it:
    # w' = w * gamma / sqrt(var + eps), b' = (b - mean) * gamma / sqrt(var + eps) + beta. The same function,
    # one pass over each activation fewer: on CPU a Lite0 forward took 0.68x the time, its features 3e-6 apart.
    # The copy lives beside the module, never in its state_dict, so checkpoints keep the backbone's own layout.
    folded = copy.deepcopy(backbone)
    previous = None
    for name, module in list(folded.named_modules()):
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and isinstance(previous, nn.Conv2d) \
                and previous.out_channels == module.num_features and module.track_running_stats:
            fold_into(previous, module)
            replace_submodule(folded, name, activation_after(module))
            previous = None
        else:
            # the torchvision and timm backbones register a BatchNorm right after the convolution that feeds it;
            # tests/phase_03/test_backbones.py checks the folded copy of every one against the original
            previous = module if isinstance(module, nn.Conv2d) else None
    folded.requires_grad_(False)
    return folded.eval()


def fold_into(conv, norm):
    with torch.no_grad():
        scale = norm.weight.double() / torch.sqrt(norm.running_var.double() + norm.eps)
        shift = norm.bias.double() - norm.running_mean.double() * scale
        if conv.bias is not None:
            shift = shift + conv.bias.double() * scale
        weight = conv.weight.double() * scale.view(-1, *([1] * (conv.weight.dim() - 1)))
        conv.weight = nn.Parameter(weight.to(conv.weight.dtype), requires_grad=False)
        conv.bias = nn.Parameter(shift.to(conv.weight.dtype), requires_grad=False)


def activation_after(norm):
    # timm's BatchNormAct2d applies its activation after normalising (its dropout is inert in eval mode)
    activation = getattr(norm, "act", None)
    return activation if isinstance(activation, nn.Module) else nn.Identity()


def replace_submodule(root, name, module):
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, module)


def tensor_signature(module):
    # which tensors the module holds and whether any changed in place since (load_state_dict, .to(), an
    # optimizer step all change one of these); a folded copy is rebuilt when the signature differs
    return tuple((id(t), t.data_ptr(), tensor_version(t), t.dtype, t.device)
                 for t in list(module.parameters()) + list(module.buffers()))
