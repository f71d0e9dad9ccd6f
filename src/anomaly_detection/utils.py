# src/anomaly_detection/utils.py
import functools
import hashlib
import json
import logging
import os
import random
import re
import resource
import socket
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

PROJECT_ROOT = Path(__file__).resolve().parents[2]

logger = logging.getLogger("anomaly_detection")


class StderrHandler(logging.StreamHandler):
    # writes to whatever sys.stderr is now, not the stream it was created with: a test or notebook that
    # swaps stderr and later closes its stream must not leave the logger writing into a closed file
    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def setup_logging(level=logging.INFO):
    if not logger.handlers:
        handler = StderrHandler()
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
            # under torchrun, this process's own GPU
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
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


# Output files are private to their owner: 0600 is set explicitly because mkstemp's 0600 is further
# narrowed by the umask, and a plain open() would widen it to 0666 & ~umask.
OUTPUT_FILE_MODE = 0o600
# .<target name>.<pid>-<host tag>.<random>.tmp, as _atomic_write names its temporary files
_TEMP_NAME = re.compile(r"^\.(.+)\.(\d+)-([0-9a-f]{8})\.[^./]+\.tmp$")
_swept_folders = set()
_host_tag_value = None


@functools.lru_cache(maxsize=None)
def cpu_has_native_bf16():
    # bfloat16 units (AMX, AVX-512 BF16): asked once per process, the hardware does not change under it
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def _host_tag():
    # The temporary file's name carries who writes it: the host (and, on Linux, the PID namespace, so
    # containers sharing a folder do not judge each other's process ids) and the process id.
    global _host_tag_value
    if _host_tag_value is None:
        try:
            namespace = os.readlink("/proc/self/ns/pid")
        except OSError:
            namespace = ""
        text = f"{socket.gethostname()}|{namespace}".encode()
        _host_tag_value = hashlib.blake2s(text, digest_size=4).hexdigest()
    return _host_tag_value


def _process_exists(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temp_files(folder):
    # A temporary file is removed only when its name says it was made on this host, in this PID
    # namespace, by a process id that does not exist now. A live writer's process exists, so its file is
    # never removed; a reused process id only keeps a stale file. Age is not used: it cannot tell a slow
    # live writer (a large checkpoint on a network disk) from a killed one.
    host = _host_tag()
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        match = _TEMP_NAME.match(entry.name)
        if match is None or match.group(3) != host or _process_exists(int(match.group(2))):
            continue
        try:
            os.unlink(entry.path)
            removed.append(Path(entry.path))
        except FileNotFoundError:
            pass
    return removed


def _atomic_write(path, write_fn, mode):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    folder = str(path.parent.resolve())
    # one sweep per folder and process: scanning the folder on every write would make writing n files
    # into one folder cost n^2
    if folder not in _swept_folders:
        _swept_folders.add(folder)
        remove_stale_temp_files(folder)
    tag = f"{os.getpid()}-{_host_tag()}"
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{tag}.", suffix=".tmp")
    try:
        os.fchmod(fd, OUTPUT_FILE_MODE)
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


def atomic_write_bytes(path, data):
    return _atomic_write(path, lambda handle: handle.write(data), "wb")


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
    peak = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
               resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
    # Linux reports KiB, macOS bytes
    return peak / 1024.0 if sys.platform != "darwin" else peak / (1024.0 * 1024.0)


def to_numpy(values):
    if isinstance(values, torch.Tensor):
        return values.detach().cpu().numpy()
    return np.asarray(values)
