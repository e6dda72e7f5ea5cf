"""Warm the caches a first run would otherwise build on its critical path (`bootstrap.sh`
runs this after installing; `python -m launch.prepare` by hand).

- DeepSpeed's shared-memory communication op, compiled with g++ the first time a learner
  initialises DeepSpeed on a CPU (about 30 s on two cores, 60 s on one), into the per-
  environment `TORCH_EXTENSIONS_DIR` the learner uses (`learner/trainer.py`).
- The embedded models of the shipped CPU configs: the tiny arithmetic model of the main job
  (`configs/default.toml`, ~45 s) and the math rehearsal's model (`configs/math-rehearsal.toml`,
  ~3 min), cached under `.cache/models/` by a key of their recipe (`launch/cache.py`).
- vLLM's record of those models' classes (`VLLM_CACHE_ROOT/modelinfos/`): without it, the
  first engine start inspects the class in a fresh Python process that imports vLLM again
  (16 s of the first run's start-up on a slow two-core machine).

Idempotent and cheap once warm: each step first checks for its finished artefact.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ("default.toml", "math-rehearsal.toml")


def extensions_dir() -> Path:
    """Where DeepSpeed's JIT ops are built for this Python environment, as this process
    reaches it. The compile commands name the environment's include paths as reached (the
    path to the interpreter, not its target), so one environment reached through two paths
    (a symbolic link) gets one build per path. A shared directory would be rebuilt at every
    change of path. The learner compiles on its one core, which took 150-164 s on a 2-core
    machine."""
    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        return Path(os.environ["TORCH_EXTENSIONS_DIR"])
    tag = hashlib.sha256(sys.prefix.encode()).hexdigest()[:10]
    return Path(sys.prefix) / "torch_extensions" / tag


def shm_op_built() -> bool:
    return (extensions_dir() / "deepspeed_shm_comm" / "deepspeed_shm_comm.so").is_file()


def build_shm_op() -> None:
    """Compile DeepSpeed's CPU shared-memory op where the learner looks for it."""
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(extensions_dir()))
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from deepspeed.comm.torch import build_shm_op as ds_build

    if ds_build() is None:
        print("[prepare] DeepSpeed's shm op does not apply here (nothing to build)")


def modelinfo_cache_dir() -> Path:
    """Where vLLM keeps its model-class records (vllm.envs' VLLM_CACHE_ROOT default)."""
    root = os.environ.get("VLLM_CACHE_ROOT")
    if root:
        return Path(root).expanduser() / "modelinfos"
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return Path(cache) / "vllm" / "modelinfos"


def warm_vllm_model_info(architectures: list[str]) -> list[str]:
    """Have vLLM inspect each architecture's model class now and record it, so that no run
    pays the inspection on its critical path. Returns those inspected (a recorded one is
    skipped without importing vLLM)."""
    missing = [a for a in architectures
               if not any(modelinfo_cache_dir().glob(f"*-{a}.json"))]
    if missing:
        from vllm import ModelRegistry

        for arch in missing:
            ModelRegistry.models[arch].inspect_model_cls()
    return missing


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m launch.prepare", description=__doc__)
    ap.add_argument("--skip-models", action="store_true", help="only the DeepSpeed op")
    args = ap.parse_args(argv)
    os.chdir(ROOT)  # the configs' cache directories are relative to the repository
    if not shm_op_built() and not __import__("torch").cuda.is_available():
        t = time.time()
        print("[prepare] compiling DeepSpeed's shared-memory op (once per environment)",
              flush=True)
        build_shm_op()
        print(f"[prepare] DeepSpeed op ready in {time.time() - t:.0f} s", flush=True)
    if args.skip_models:
        return 0
    from launch.config import load_config
    from launch.runtime import model_path

    archs: set[str] = set()
    for name in CONFIGS:
        cfg = load_config(ROOT / "configs" / name)
        t = time.time()
        path = model_path(cfg, progress=sys.stderr.isatty())
        took = time.time() - t
        print(f"[prepare] {name}: model {path}"
              + (f" (built in {took:.0f} s)" if took > 1 else " (cached)"), flush=True)
        archs.update(json.loads((Path(path) / "config.json").read_text())["architectures"])
    t = time.time()
    done = warm_vllm_model_info(sorted(archs))
    if done:
        print(f"[prepare] vLLM's record of {', '.join(done)} written in "
              f"{time.time() - t:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
