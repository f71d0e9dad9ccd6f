# src/anomaly_detection/utils.py
import json
import logging
import os
import random
import resource
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

PROJECT_ROOT = Path(__file__).resolve().parents[2]

logger = logging.getLogger("anomaly_detection")


def setup_logging(level=logging.INFO):
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
    logger.setLevel(level)
    return logger


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def resolve_device(device="auto"):
    device = str(device)
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if device not in ("cpu", "mps") and not device.startswith("cuda"):
        raise ValueError(f"unknown device '{device}': expected auto, cpu, cuda, cuda:N or mps")
    if device.startswith("cuda") and not torch.cuda.is_available():
        # the seed's examples say device="cuda"; they must still run on a CPU-only machine
        logger.warning("device '%s' was requested but CUDA is not available: running on the CPU", device)
        return torch.device("cpu")
    if device == "mps" and not (getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()):
        logger.warning("device 'mps' was requested but MPS is not available: running on the CPU")
        return torch.device("cpu")
    return torch.device(device)


def _atomic_write(path, write_fn, mode):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as handle:
            write_fn(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path, text):
    return _atomic_write(path, lambda handle: handle.write(text), "w")


def json_safe(value):
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, (float, np.floating)):
        # NaN/inf are not JSON: an undefined metric is written as null
        return float(value) if np.isfinite(value) else None
    if isinstance(value, (np.integer, np.bool_)):
        return value.item()
    return value


def to_json(data, indent=None):
    return json.dumps(json_safe(data), indent=indent, default=_json_default)


def atomic_write_json(path, data):
    return atomic_write_text(path, to_json(data, indent=2) + "\n")


def atomic_torch_save(obj, path):
    return _atomic_write(path, lambda handle: torch.save(obj, handle), "wb")


def atomic_save_figure(figure, path, **kwargs):
    suffix = Path(path).suffix.lstrip(".") or "png"
    return _atomic_write(path, lambda handle: figure.savefig(handle, format=suffix, **kwargs), "wb")


def _json_default(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def peak_rss_mb():
    # data-loader workers are child processes: count the largest of them too
    peak = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
    # Linux reports KiB, macOS bytes
    return peak / 1024.0 if sys.platform != "darwin" else peak / (1024.0 * 1024.0)


def to_numpy(values):
    if isinstance(values, torch.Tensor):
        return values.detach().cpu().numpy()
    return np.asarray(values)
