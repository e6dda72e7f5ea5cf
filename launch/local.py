"""`dynamo-rl run`: allocator, actors and learner on one machine, supervised.

Guarantees:
- Every child dies with the launcher (PR_SET_PDEATHSIG), so no process outlives the run,
  even when the launcher itself is SIGKILLed.
- A dead actor is restarted (or the run continues with the others, per `actor.restart_dead`);
  a dead learner or allocator ends the run with a message naming the process and its last
  log lines.
- Ctrl-C / SIGTERM: the learner gets SIGTERM and writes a final checkpoint; then the others
  are stopped. `--resume RUN_DIR` continues from the latest checkpoint, with the allocator's
  snapshot from that checkpoint.
"""

from __future__ import annotations

import ctypes
import json
import os
import pickle
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from launch.config import RunConfig, dump_config
from telemetry.merge import step_wall

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


@dataclass
class Child:
    name: str
    argv: list[str]
    log: Path
    env: dict[str, str]
    proc: subprocess.Popen | None = None
    restarts: int = 0
    started: float = field(default=0.0)

    def start(self) -> None:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        f = self.log.open("a")
        self.proc = subprocess.Popen(self.argv, stdout=f, stderr=subprocess.STDOUT,
                                     env=self.env, preexec_fn=_die_with_parent)
        f.close()
        self.started = time.monotonic()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def tail(self, n: int = 15) -> str:
        try:
            lines = self.log.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join("    " + line for line in lines[-n:])


def restore_allocator_snapshot(run_dir: Path) -> str | None:
    """On resume: the allocator restarts from the snapshot saved with the latest checkpoint."""
    latest = run_dir / "checkpoints" / "LATEST"
    if not latest.is_file():
        return None
    tag = latest.read_text().strip()
    snap = run_dir / "checkpoints" / tag / "allocator_state.pkl"
    if snap.is_file():
        with snap.open("rb") as f:
            state = pickle.load(f)
        state["resume"] = True  # the allocator forgets the previous launch's work in flight
        tmp = run_dir / "allocator_state.pkl.resume"
        with tmp.open("wb") as f:
            pickle.dump(state, f, protocol=pickle.HIGHEST_PROTOCOL)
        tmp.replace(run_dir / "allocator_state.pkl")
    return tag


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def cpu_partition() -> tuple[str, str] | None:
    """On a CPU-only machine, (actor cores, learner cores) as "a-b" ranges: vLLM's OpenMP
    threads are bound to every core by default and spin, so a learner sharing those cores
    slows down several-fold. Splitting the cores lets generation and training overlap.
    None on GPU machines, with fewer than 2 cores, or with DYNAMO_NO_CPU_PARTITION=1."""
    cores = sorted(os.sched_getaffinity(0))
    if _cuda() or len(cores) < 2 or os.environ.get("DYNAMO_NO_CPU_PARTITION"):
        return None
    half = len(cores) // 2

    def span(cs: list[int]) -> str:
        return ",".join(str(c) for c in cs)

    return span(cores[:half]), span(cores[half:])


class Progress:
    """Follows metrics.jsonl and prints one line per learner step; tokens/s and the ETA are
    measured over the last `window` steps, so they follow the run's current pace."""

    window = 10

    def __init__(self, path: Path, total_steps: int) -> None:
        self.path, self.total = path, total_steps
        self.pos = 0
        self.records: list[dict] = []
        self.t0 = time.monotonic()

    def poll(self) -> None:
        if not self.path.is_file():
            return
        with self.path.open() as f:
            f.seek(self.pos)
            for line in f:
                if not line.endswith("\n"):
                    break
                self.pos += len(line.encode())
                rec = json.loads(line)
                self.records.append(rec)
                self._print(rec)

    def _print(self, r: dict) -> None:
        step = r["step"]
        acc = (f"  held-out greedy {r['eval/acc']:.3f} pass@1 {r['eval/pass1']:.3f}"
               if "eval/acc" in r else "")
        if step == 0:
            print(f"[run] step    0{acc}", flush=True)
            return
        recent = [x for x in self.records if x.get("step", 0) > 0][-self.window:]
        secs = max(sum(step_wall(x) for x in recent), 1e-9)
        toks = sum(x.get("gen_tokens", 0) for x in recent) / secs
        eta = secs / len(recent) * (self.total - step)
        print(f"[run] step {step:4d}/{self.total}  reward {r['reward/mean']:.3f}  "
              f"zero-signal {r['zero_signal_frac']:.2f}  gen {toks:7.0f} tok/s  "
              f"step {step_wall(r):5.2f}s  ETA {eta:4.0f}s{acc}", flush=True)


def _cuda() -> bool:
    """Whether the children will see a GPU, without importing torch here (1.7 s of the
    launcher's start-up on a small machine): a CUDA build of torch and a GPU the driver
    lists. The children still ask torch themselves."""
    import importlib.util
    import re

    spec = importlib.util.find_spec("torch")
    if spec is None or spec.origin is None:
        return False
    version = Path(spec.origin).parent / "version.py"
    build = re.search(r"^cuda\b.*=\s*['\"]([^'\"]+)['\"]", version.read_text(), re.M) \
        if version.is_file() else None
    gpus = Path("/proc/driver/nvidia/gpus")
    return build is not None and gpus.is_dir() and any(gpus.iterdir())


def _free_port() -> int:
    from launch.ports import free_ports

    return free_ports(1)[0]


@dataclass
class Processes:
    """The run's children, in start order."""

    allocator: Child
    learners: list[Child]  # one per rank
    actors: list[Child]

    def all(self) -> list[Child]:
        return [self.allocator, *self.learners, *self.actors]


class StopSignals:
    """Ctrl-C / SIGTERM, caught from creation until `restore()`: the supervising loop sees
    `signal` set and ends the run in order (final checkpoint, shutdown, summary)."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}

    def _on_signal(self, signum, _frame) -> None:
        self.signal = signum

    def restore(self) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)


def run_local(cfg: RunConfig, resume: str | None = None) -> int:
    run_dir = cfg.run_dir
    if resume is None and (run_dir / "checkpoints" / "LATEST").exists():
        print(f"[run] {run_dir} already holds a run; use --resume {run_dir} or another "
              f"--run_dir", file=sys.stderr)
        return 2
    prepare_run_dir(cfg, resume)
    procs = plan_processes(cfg)
    stop = StopSignals()
    progress = Progress(run_dir / "metrics.jsonl", cfg.learner.total_steps)
    if resume and progress.path.exists():
        progress.pos = progress.path.stat().st_size  # follow only this launch's steps
    rc = 0
    t0 = time.monotonic()
    try:
        # Actors first: their engine (vLLM's import and start) is the longest start-up and
        # the first learner step waits for their first batch; everyone connects with retries.
        for c in [*procs.actors, procs.allocator, *procs.learners]:
            c.start()
        print(f"[run] started allocator, learner ({cfg.learner.ranks} rank(s)), "
              f"{len(procs.actors)} actor(s); logs in {run_dir / 'logs'}", flush=True)
        rc = supervise(cfg, procs, progress, stop)
    finally:
        shutdown(procs.learners, timeout=120)  # learners first: they write the final checkpoint
        shutdown([*procs.actors, procs.allocator], timeout=30)
        stop.restore()
        progress.poll()
    summary(progress.records, time.monotonic() - t0, run_dir)
    return rc


def prepare_run_dir(cfg: RunConfig, resume: str | None) -> None:
    """The run directory with its config and keys (on resume: the allocator's snapshot), and
    the model and task files the children will load, built now if not cached."""
    from launch.runtime import ensure_run_keys, model_path

    run_dir = cfg.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.toml").write_text(dump_config(cfg))
    if cfg.network.curve:
        ensure_run_keys(run_dir)
    else:
        print("[run] WARNING: network.curve = false: sockets are unauthenticated and "
              "unencrypted", file=sys.stderr)
    if resume:
        tag = restore_allocator_snapshot(run_dir)
        print(f"[run] resuming {run_dir} from checkpoint {tag}", flush=True)
    print(f"[run] model {model_path(cfg, progress=True)}", flush=True)
    if cfg.task.kind == "math-rehearsal":
        from tasks.math_rehearsal import rehearsal_files

        print(f"[run] task files {' '.join(map(str, rehearsal_files(cfg.task)))}", flush=True)


def plan_processes(cfg: RunConfig) -> Processes:
    """The allocator, the learner ranks and the actors, each with its command line, log and
    environment (not started)."""
    cfg_file = str(cfg.run_dir / "config.toml")
    py = [sys.executable, "-m", "launch.cli"]
    env = child_env()
    logs = cfg.run_dir / "logs"
    actor_env, learner_env = placement_envs(cfg, env)
    alloc = Child("allocator", [*py, "allocator", cfg_file], logs / "allocator.log", env)
    # Learner ranks are our own children (not torchrun's), so each dies with the launcher.
    master_port = _free_port()
    learners = []
    for rank in range(cfg.learner.ranks):
        renv = {**learner_env, "RANK": str(rank), "LOCAL_RANK": str(rank),
                "WORLD_SIZE": str(cfg.learner.ranks), "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(master_port)}
        name = "learner" if rank == 0 else f"learner{rank}"
        learners.append(Child(name, [*py, "learner", cfg_file], logs / f"{name}.log", renv))
    actors = [Child(f"actor{i}", [*py, "actor", cfg_file, "--index", str(i)],
                    logs / f"actor{i}.log", actor_env) for i in range(cfg.actor.num_actors)]
    return Processes(alloc, learners, actors)


def placement_envs(cfg: RunConfig, env: dict[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    """(actor env, learner env): `env` with the CPU cores and OpenMP waiting of the placement."""
    actor_env, learner_env = dict(env), dict(env)
    if cfg.placement == "colocated":
        # Actors and learner take turns (synchronous phases), each with every core. The
        # actors' idle OpenMP threads sleep at once instead of spinning, so the waiting side
        # costs little. The learner's keep OpenMP's default (a short spin, then sleep): its
        # many small parallel regions per step would each pay a futex wake-up (25M model,
        # both passive: 30.6 completions/s; learner default: 32.0).
        every = ",".join(str(c) for c in sorted(os.sched_getaffinity(0)))
        actor_env["OMP_WAIT_POLICY"] = "PASSIVE"
        if not _cuda():
            actor_env["VLLM_CPU_OMP_THREADS_BIND"] = every
            learner_env["DYNAMO_CPU_AFFINITY"] = every
        print(f"[run] placement: colocated (actors and learner take turns on cores {every})",
              flush=True)
        return actor_env, learner_env
    part = cpu_partition()
    if part is not None:
        actor_env["VLLM_CPU_OMP_THREADS_BIND"] = part[0]
        learner_env["DYNAMO_CPU_AFFINITY"] = part[1]
        print(f"[run] placement: disaggregated (CPU cores: actors {part[0]}, learner "
              f"{part[1]})", flush=True)
    else:
        print("[run] placement: disaggregated", flush=True)
    return actor_env, learner_env


def supervise(cfg: RunConfig, procs: Processes, progress: Progress, stop: StopSignals) -> int:
    """Follows the started run until it ends: 0 when the learners finished or a stop signal
    came, 1 when a learner failed, the allocator died or no actor is left."""
    while True:
        time.sleep(0.5)
        progress.poll()
        if stop.signal is not None:
            print("[run] stopping: final checkpoint, then shutdown", flush=True)
            return 0
        failed = [c for c in procs.learners if not c.alive() and c.proc.returncode != 0]
        if failed:
            return _fatal(failed[0])
        if not any(c.alive() for c in procs.learners):
            return 0
        if not procs.allocator.alive():
            return _fatal(procs.allocator)
        tend_actors(cfg, procs.actors)
        if procs.actors and all(a.proc is None for a in procs.actors):
            print("[run] ERROR: every actor is dead", file=sys.stderr)
            return 1


def _fatal(c: Child) -> int:
    print(f"[run] ERROR: {c.name} exited with code {c.proc.returncode}; last lines of "
          f"{c.log}:\n{c.tail()}", file=sys.stderr)
    return 1


def tend_actors(cfg: RunConfig, actors: list[Child]) -> None:
    """Restarts each actor that died, or (`actor.restart_dead = false`) lets it go
    (`proc` None: the run continues without it)."""
    for a in actors:
        if a.proc is not None and not a.alive():
            print(f"[run] actor {a.name} died (code {a.proc.returncode}); "
                  f"{'restarting' if cfg.actor.restart_dead else 'continuing without it'}",
                  flush=True)
            if cfg.actor.restart_dead:
                a.restarts += 1
                a.start()
            else:
                a.proc = None


def shutdown(children: list[Child], timeout: float) -> None:
    live = [c for c in children if c.alive()]
    for c in live:
        c.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for c in live:
        try:
            c.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            c.proc.kill()
            c.proc.wait()


def summary(records: list[dict], wall_s: float, run_dir: Path) -> None:
    steps = [r for r in records if r.get("step", 0) > 0]
    evals = [r for r in records if "eval/acc" in r]
    if not steps:
        print("[run] no learner step completed", flush=True)
        return
    samples = sum(r["samples"] for r in steps)
    gen_tokens = sum(r["gen_tokens"] for r in steps)
    train_s = steps[-1]["elapsed_s"]
    out = {
        "steps": steps[-1]["step"], "samples": samples, "gen_tokens": gen_tokens,
        "wall_s": round(wall_s, 1), "train_loop_s": round(train_s, 1),
        "gen_tokens_per_s": round(gen_tokens / max(train_s, 1e-9), 1),
        "acc_before": evals[0]["eval/acc"] if evals else None,
        "acc_after": evals[-1]["eval/acc"] if evals else None,
        "pass1_before": evals[0]["eval/pass1"] if evals else None,
        "pass1_after": evals[-1]["eval/pass1"] if evals else None,
        "reward_first": steps[0]["reward/mean"], "reward_last": steps[-1]["reward/mean"],
    }
    (run_dir / "summary.json").write_text(json.dumps(out, indent=1))
    print("[run] summary: " + ", ".join(f"{k} {v}" for k, v in out.items()), flush=True)
