"""The Triton kernels' logic on the CPU: tests/triton_interpreter_cases.py under Triton's interpreter.

A subprocess, because TRITON_INTERPRET must be set before triton is imported and must not reach this
process's CUDA tests. Needs triton >= 3.9 (the version CI installs; 3.6's interpreter fails on NumPy 2.4's
scalar conversion); skipped without it.
"""

import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

import pytest


def _triton_version() -> tuple[int, ...] | None:
    try:
        return tuple(int(part) for part in importlib.metadata.version("triton").split(".")[:2])
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return None


@pytest.mark.skipif((_triton_version() or (0,)) < (3, 9), reason="needs triton >= 3.9 for its interpreter")
def test_triton_kernels_match_their_references_under_the_interpreter():
    cases = Path(__file__).with_name("triton_interpreter_cases.py")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(cases)],
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    assert " passed" in result.stdout and "skipped" not in result.stdout
