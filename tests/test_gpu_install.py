"""The GPU install path resolves (opt-in, `-m slow`: it asks the package index): pip's
resolver, in dry-run mode, finds vLLM 0.33, the torch it pins, DeepSpeed and this package
together, without installing or downloading the CUDA wheels. Installing and running them
needs a GPU node (`./bootstrap.sh --gpu`)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
from conftest import REPO

pytestmark = pytest.mark.slow


def test_the_gpu_environment_resolves_with_vllm_033():
    r = subprocess.run(["./bootstrap.sh", "--gpu", "--check"], cwd=REPO, capture_output=True,
                       text=True, timeout=900, env={**os.environ, "PYTHON": sys.executable})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    line = r.stdout.strip().splitlines()[-1]
    assert "vllm 0.33.0" in line and "deepspeed 0.19." in line, line
    torch_version = re.search(r"torch (\S+),", line)
    assert torch_version and torch_version.group(1) != "2.13.0", line  # not the CPU pin


def test_bootstrap_refuses_unknown_options():
    r = subprocess.run(["./bootstrap.sh", "--gpus"], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 2 and "unknown option --gpus" in r.stderr
