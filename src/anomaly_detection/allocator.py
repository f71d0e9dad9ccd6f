# src/anomaly_detection/allocator.py
import ctypes
import ctypes.util
import sys

from anomaly_detection.utils import logger

# mallopt parameters from glibc's malloc.h
M_MMAP_MAX = -4
MODES = ("keep", "release")
_applied = None


def configure_cpu_allocator(mode):
    # glibc serves every allocation above its mmap threshold (at most 32 MB) with a fresh mapping and
    # unmaps it on free, so each large tensor is page-faulted in and zeroed again on every step. "keep"
    # (mallopt M_MMAP_MAX=0) serves them from the heap, where freed blocks are reused: a student-teacher epoch
    # on 2 CPU cores ran 1.6x faster with 30x fewer page faults, for a larger peak RSS. "release" is
    # glibc's default. Process-wide; applies to allocations made after the call.
    global _applied
    mode = "release" if mode is None else str(mode)
    if mode not in MODES:
        raise ValueError(f"cpu_allocator must be one of {', '.join(MODES)}, got '{mode}'")
    if mode == _applied or (mode == "release" and _applied is None):
        return mode == "keep"
    mallopt = _glibc_mallopt()
    if mallopt is None:
        if mode == "keep":
            logger.info("cpu_allocator=keep needs glibc's malloc; leaving the allocator as it is")
        return False
    # 65536 is glibc's default limit on the number of mmapped blocks
    if mallopt(M_MMAP_MAX, 0 if mode == "keep" else 65536) != 1:
        logger.warning("mallopt(M_MMAP_MAX) was refused; cpu_allocator=%s has no effect", mode)
        return False
    _applied = mode
    return mode == "keep"


def _glibc_mallopt():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return None
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return mallopt
