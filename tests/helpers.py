# tests/helpers.py
import io
import json
from contextlib import redirect_stderr, redirect_stdout
from types import SimpleNamespace

from anomaly_detection.cli import main


def run_cli(argv, entry=main):
    # the CLI (or an experiment script's main) in this process, its stdout, stderr and exit code captured
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = entry(argv)
    return SimpleNamespace(code=code, out=out.getvalue(), err=err.getvalue())


def json_lines(stdout):
    return [json.loads(line) for line in stdout.strip().splitlines() if line.startswith("{")]
