# tests/phase_03/test_cpu_allocator.py
import subprocess
import sys

import pytest

from anomaly_detection import allocator, runner, runtimes
from anomaly_detection.config import load_experiment_config

# A 200 MB tensor is freed while a later block keeps it off the top of the heap, then a 160 MB one is made:
# with "keep" it lands in the freed block, whose pages are still mapped; with "release" (glibc's default)
# the first was unmapped on free and the second page-faults every 4 KB page in again.
PROBE = """
import resource, sys, torch
from anomaly_detection.allocator import configure_cpu_allocator
configure_cpu_allocator(sys.argv[1])
first = torch.ones(50_000_000); later = torch.ones(1_000_000); del first
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
second = torch.ones(40_000_000)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def page_faults(mode):
    result = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True)
    return int(result.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt is glibc's")
def test_keep_reuses_freed_memory_where_release_faults_it_in_again():
    released, kept = page_faults("release"), page_faults("keep")
    assert released > 30_000  # 160 MB / 4 KB pages = 39,063
    assert kept < released / 10


def test_unknown_mode_is_refused_with_the_key_name():
    with pytest.raises(ValueError, match="cpu_allocator must be one of keep, release, got 'fast'"):
        allocator.configure_cpu_allocator("fast")


def test_stfpm_keeps_the_one_pass_models_release_and_every_entry_point_applies_it(tiny_run, monkeypatch):
    assert load_experiment_config("stfpm", "demo")["cpu_allocator"] == "keep"
    assert load_experiment_config("patchcore", "demo")["cpu_allocator"] == "release"
    assert load_experiment_config("padim", "demo")["cpu_allocator"] == "release"
    seen = []
    monkeypatch.setattr(runner, "configure_cpu_allocator", seen.append)
    monkeypatch.setattr(runtimes, "configure_cpu_allocator", seen.append)
    runner.test_checkpoint(tiny_run.model_path, overrides=["cpu_allocator=release", "evaluation.figures=false"])
    runtimes.open_model(tiny_run.model_path, overrides=["cpu_allocator=release"])
    assert seen == ["release", "release"]
