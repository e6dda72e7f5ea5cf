"""What every entry point shares (the CLI, the local launcher, evaluation, chaos runs):
logging, the model directory (building an embedded model if needed), the run's keys, and
telling config overrides from a command's own options, and how a service process ends."""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import gc
import logging
import os
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

from launch.config import ConfigError, RunConfig


def setup_logging(role: str) -> None:
    logging.basicConfig(level=os.environ.get("DYNAMO_LOG_LEVEL", "INFO"),
                        format=f"%(asctime)s {role} %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)


def start_up_without_gc() -> None:
    """The cyclic collector off while a process imports torch, vLLM or DeepSpeed and builds
    its engine or model: the imports create about 600,000 long-lived objects, and the
    collections they trigger cost 3-4 s of a 20 s import on one core here. `settle_heap`
    turns it back on once start-up is over."""
    gc.disable()


_frozen_at_start_up = 0


def settle_heap() -> None:
    """Start-up is over: what it created lives as long as the process, so it leaves the
    collector's generations (never traversed again), and collection resumes."""
    global _frozen_at_start_up
    gc.freeze()
    # counted once here: gc.get_freeze_count() walks every frozen object (60-90 ms for the
    # learner's ~1 M on this machine), too slow for a per-step metric
    _frozen_at_start_up = gc.get_freeze_count()
    gc.enable()


def heap_state() -> dict:
    """For metrics lines: whether the collector is on (it must be, once start-up is over)
    and how many objects start-up froze out of its generations."""
    return {"gc_enabled": gc.isenabled(), "gc_frozen_objects": _frozen_at_start_up}


def gpu_memory_lock_path() -> Path:
    """One per host and user: every colocated run's processes on this host meet there (per
    host, not per device: an engine and the learner ranks beside it see different device
    lists, so a per-device key would miss the ranks it must exclude)."""
    return Path(tempfile.gettempdir()) / f"dynamo-rl-{os.getuid()}-gpu-memory.lock"


@contextlib.contextmanager
def gpu_memory_turn(role: str, exclusive: bool, path: Path | None = None) -> Iterator[int]:
    """Colocated placement on GPU: a vLLM engine sizes its KV cache from how the device's
    free memory changes while it builds itself, and counts any other process's allocations
    (or frees) in that window as its own: a learner loading its model or training beside it
    shrinks the cache, or fails the engine's start ("Error in memory profiling"). So an
    engine is built (at start, or restarted) holding this host's lock exclusively, and the
    learner ranks hold it shared while they build their models and while each step
    allocates and frees (ranks share it: their collectives need each other). Linux `flock`
    grants a shared request while an exclusive one waits: a waiting engine cannot lock out
    a second rank; and ranks release it while they wait for a batch, which a restarted
    engine must produce, so the engine gets its turn."""
    path = path or gpu_memory_lock_path()
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        t = time.monotonic()
        fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        waited = time.monotonic() - t
        if waited > 0.5:
            logging.getLogger("dynamo.launch").info(
                "%s waited %.1fs for its turn on the GPU's memory (%s)", role, waited, path)
        yield fd
    finally:
        # unlocked explicitly: a child forked meanwhile (an engine's workers) holds a copy of
        # the descriptor, and closing ours alone would leave the lock held through theirs
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def exit_process(rc: int) -> NoReturn:
    """Ends a service process as a normal exit would (threads' exit hooks run and non-daemon
    threads are joined, then the atexit handlers: trace files, logging, multiprocessing
    children, vLLM's own), then skips only the interpreter's finalisation. Tearing down the
    module graph of torch and vLLM (600,000 objects) took 3.5-3.9 s per process on one core
    here, on the critical path of every run's end (learner, then actors)."""
    threading._shutdown()  # what the interpreter runs first at exit (private, stable)
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # closed or gone: nothing left to keep
            pass
    os._exit(rc)


def model_path(cfg: RunConfig, progress: bool = True) -> str:
    """The configured model directory, or the task's embedded model (built if not cached)."""
    if cfg.model.path is not None:
        return str(cfg.model.path)
    if cfg.task.kind == "math-rehearsal":
        from launch.rehearsal_model import ensure_rehearsal_model as ensure
    else:
        from launch.embedded_model import ensure_embedded_model as ensure
    return str(ensure(cfg.model.cache_dir, cfg.model.warm_start_steps, cfg.model.seed,
                      progress=progress))


def run_keys(cfg: RunConfig, role: str):
    """This process's role keys (protocol.auth.RunKeys), or None without CURVE."""
    if not cfg.network.curve:
        return None
    from protocol.auth import RunKeys

    key_dir = cfg.run_dir / "keys"
    if not (key_dir / f"{role}.key").is_file():
        raise ConfigError(f"network.curve is on but {key_dir} holds no {role} key: run "
                          f"`dynamo-rl keys {cfg.run_dir}` (the launcher does it for you)")
    return RunKeys.load(key_dir, role)


def ensure_run_keys(run_dir: Path) -> None:
    from protocol.auth import generate_run_keys

    generate_run_keys(run_dir / "keys")


def split_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
    """Separate config overrides (`--section.field VALUE`, `--preset X`) from CLI options."""
    # Whole sections (`--model DIR` is eval's option) are not scalar overrides.
    top = set(RunConfig.model_fields) - {"task", "model", "allocator", "actor", "learner",
                                         "network"}
    own, overrides = [], []
    i = 0
    while i < len(argv):
        a = argv[i]
        name = a[2:].partition("=")[0].replace("-", "_")
        if a.startswith("--") and ("." in name or name in top):
            take = 1 if "=" in a else 2
            overrides.extend(argv[i:i + take])
            i += take
        else:
            own.append(a)
            i += 1
    return own, overrides
