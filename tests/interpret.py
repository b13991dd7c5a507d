"""Running a test file's kernel checks in Triton's interpreter: TRITON_INTERPRET must be set before triton is
imported, so the checks run in one child process (the file run as a script prints a JSON dict as its last line)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src"


def run_interpreted(test_file: str) -> dict:
    """The dict `python test_file` prints under TRITON_INTERPRET=1 (skips the test where triton is missing)."""
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    env = dict(os.environ, TRITON_INTERPRET="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (env.get("PYTHONPATH"), str(SRC)) if p)
    proc = subprocess.run([sys.executable, str(Path(test_file).resolve())], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])
