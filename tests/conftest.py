"""Shared fixtures: the embedded model, free ports, real component processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launch.ports import free_ports

REPO = Path(__file__).resolve().parents[1]
MODEL_CACHE = REPO / ".cache" / "models"


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    from launch.embedded_model import ensure_embedded_model

    return ensure_embedded_model(MODEL_CACHE, steps=600, seed=0, progress=False)


def make_config(run_dir: Path, model: Path | None, **sections) -> Path:
    """Write a run config TOML with fresh ports; `sections` are nested override dicts."""
    from launch.config import RunConfig, dump_config

    a, r, w = free_ports(3)
    data: dict = {"run_dir": str(run_dir),
                  "network": {"allocator_port": a, "rollout_port": r, "weights_port": w}}
    if model is not None:
        data["model"] = {"path": str(model)}
    for key, val in sections.items():
        if isinstance(val, dict):
            data.setdefault(key, {}).update(val)
        else:
            data[key] = val
    cfg = RunConfig.model_validate(data)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "config.toml"
    path.write_text(dump_config(cfg))
    return path


def _pdeathsig() -> None:
    import ctypes

    ctypes.CDLL("libc.so.6").prctl(1, signal.SIGKILL)


class Proc:
    """A component process (`python -m launch.cli ROLE CONFIG ...`) logging to a file."""

    def __init__(self, role: str, config: Path, *args: str, log: Path | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.log = log or config.parent / "logs" / f"{role}{'-'.join(args)}.log"
        self.log.parent.mkdir(parents=True, exist_ok=True)
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        with self.log.open("a") as f:
            self.p = subprocess.Popen([sys.executable, "-m", "launch.cli", role, str(config),
                                       *args], stdout=f, stderr=subprocess.STDOUT, cwd=REPO,
                                      env=full_env, preexec_fn=_pdeathsig)

    def alive(self) -> bool:
        return self.p.poll() is None

    def stop(self, timeout: float = 30) -> int:
        if self.alive():
            self.p.send_signal(signal.SIGTERM)
            try:
                self.p.wait(timeout)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()
        return self.p.returncode

    def text(self) -> str:
        return self.log.read_text(errors="replace")


def wait_for(pred, timeout: float, what: str, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")
