# benchmarks/record.py
# The one writer of benchmark results: every script in benchmarks/ appends its runs through append_record,
# one JSON object per line, to benchmarks/results/<script stem>.jsonl.
#
# A line: {"date", "git_commit", "machine": {"cpu", "cores", "torch", "python"}, "command", "script",
#          "label" / "variant" (when the script has them), "figures": {...}, any further fields}
# A run that a later one replaces stays in its file with "status": "superseded" and "superseded_by".
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent
REPO = BENCHMARKS.parent
RESULTS = BENCHMARKS / "results"
SHARED = REPO.parent / "shared"
# Anomalib 2.7.0 lives in its own venv; one setting for every script, by default where ../shared/peer/setup.sh
# puts it (peer-venv in the temp folder)
ANOMALIB_VENV = os.environ.get("ANOMALIB_VENV", str(Path(tempfile.gettempdir()) / "peer-venv"))
PEER_PYTHON = str(Path(ANOMALIB_VENV) / "bin" / "python")
PEER_DIR = SHARED / "peer"


def results_path(script):
    return RESULTS / f"{Path(script).stem}.jsonl"


def typed_command(argv=None):
    argv = sys.argv if argv is None else argv
    return "python " + shlex.join(argv)


def git_commit(path=REPO):
    def git(*args):
        return subprocess.run(["git", "-C", str(path), *args], capture_output=True, text=True, check=True).stdout
    try:
        commit = git("rev-parse", "--short", "HEAD").strip()
        dirty = git("status", "--porcelain", "--untracked-files=no").strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("-dirty" if dirty else "")


def cpu_model():
    try:
        output = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return platform.processor() or "unknown"
    for line in output.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def package_version(name):
    # read from the installed metadata, so that writing a record never imports torch
    try:
        from importlib.metadata import version
        return version(name)
    except Exception:
        return None


def machine():
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "torch": package_version("torch"),
            "python": platform.python_version()}


def make_record(script, command, figures, **fields):
    record = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
              "git_commit": fields.pop("git_commit", None) or git_commit(),
              "machine": fields.pop("machine", None) or machine(),
              "command": command, "script": Path(script).name, "figures": figures}
    record.update(fields)
    return record


def append_record(script, command, figures, out=None, **fields):
    record = make_record(script, command, figures, **fields)
    path = Path(out) if out else results_path(script)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        handle.write(json.dumps(record) + "\n")
    return record


def read_records(path):
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip().startswith("{")]
