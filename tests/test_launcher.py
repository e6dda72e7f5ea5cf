"""`dynamo-rl run` supervises real processes: restarts dead actors, names a dead learner,
shuts down cleanly on SIGTERM with a final checkpoint, and leaves no orphan behind, even
when the launcher itself is SIGKILLed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, make_config, wait_for


def start(cfg: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "launch.cli", "run", str(cfg)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def pids(pattern: str) -> list[int]:
    out = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True).stdout
    return [int(x) for x in out.split()]


def steps(run_dir: Path) -> int:
    f = run_dir / "metrics.jsonl"
    if not f.is_file():
        return 0
    return max([json.loads(x)["step"] for x in f.read_text().splitlines()] or [0])


def config(run_dir: Path, model: Path, total: int) -> Path:
    return make_config(run_dir, model, allocator={"batch_prompts": 16, "n_mean": 8,
                                                  "n_min": 4, "n_max": 16},
                       learner={"total_steps": total, "prompts_per_step": 16,
                                "eval_every": 0, "checkpoint_every": 1000})


def test_dead_actor_is_restarted_and_sigterm_stops_with_a_final_checkpoint(tiny_model,
                                                                            tmp_path):
    run_dir = tmp_path / "run"
    proc = start(config(run_dir, tiny_model, 10_000))
    try:
        wait_for(lambda: steps(run_dir) >= 2, 300, "two learner steps")
        (actor,) = pids(f"launch.cli actor {run_dir}")
        os.kill(actor, signal.SIGKILL)
        s = steps(run_dir)
        wait_for(lambda: pids(f"launch.cli actor {run_dir}") not in ([], [actor]), 60,
                 "a replacement actor")
        wait_for(lambda: steps(run_dir) >= s + 3, 300, "training to go on")
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out
    assert "actor0 died" in out and "restarting" in out
    tag = (run_dir / "checkpoints" / "LATEST").read_text().strip()
    state = json.loads((run_dir / "checkpoints" / tag / "learner_state.json").read_text())
    assert state["step"] == steps(run_dir)  # the final checkpoint holds the last step
    assert (run_dir / "checkpoints" / tag / "hf" / "config.json").is_file()
    assert pids(str(run_dir)) == []


@pytest.mark.slow  # 25 s
def test_dead_learner_ends_the_run_naming_it(tiny_model, tmp_path):
    run_dir = tmp_path / "run"
    proc = start(config(run_dir, tiny_model, 10_000))
    try:
        wait_for(lambda: steps(run_dir) >= 1, 300, "a learner step")
        (learner,) = pids(f"launch.cli learner {run_dir}")
        os.kill(learner, signal.SIGKILL)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1
    assert "learner exited with code -9" in out and "learner.log" in out
    assert pids(str(run_dir)) == []


def test_sigkilled_launcher_leaves_no_orphans(tiny_model, tmp_path):
    run_dir = tmp_path / "run"
    proc = start(config(run_dir, tiny_model, 10_000))
    try:
        wait_for(lambda: steps(run_dir) >= 1, 300, "a learner step")
        assert len(pids(str(run_dir))) >= 3  # allocator, learner, actor
        proc.kill()
        proc.wait()
        wait_for(lambda: pids(str(run_dir)) == [], 30, "every child to exit")
    finally:
        if proc.poll() is None:
            proc.kill()


WARM_THEN_FORBID = """
import sys
from launch.prepare import warm_vllm_model_info
first = warm_vllm_model_info(["Qwen2ForCausalLM"])
again = warm_vllm_model_info(["Qwen2ForCausalLM"])
import vllm.model_executor.models.registry as reg
def forbidden(fn):
    raise AssertionError("vLLM inspected the model class in a subprocess")
reg._run_in_subprocess = forbidden
info = reg.ModelRegistry.models["Qwen2ForCausalLM"].inspect_model_cls()
print(first, again, info.is_text_generation_model)
"""


@pytest.mark.slow  # ~35 s: two vLLM imports (bootstrap.sh runs the same step on every CI)
def test_prepare_records_the_model_class_so_no_engine_start_inspects_it(tmp_path):
    """launch/prepare.py (bootstrap): vLLM's record of the model class is written once, and
    vLLM then answers from it instead of a fresh Python process (16 s of a first run's
    start-up on a slow machine)."""
    env = {**os.environ, "VLLM_CACHE_ROOT": str(tmp_path / "vllm")}
    r = subprocess.run([sys.executable, "-c", WARM_THEN_FORBID], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().splitlines()[-1] == "['Qwen2ForCausalLM'] [] True"
    assert list((tmp_path / "vllm" / "modelinfos").glob("*Qwen2ForCausalLM.json"))


def test_one_environment_reached_by_two_paths_builds_its_ops_in_two_places(tmp_path):
    """DeepSpeed's JIT op build names the include paths as the interpreter reached them; two
    paths to one environment sharing one build directory rebuilt the op at every change of
    path (150-164 s of a learner's start-up on one core). Each path now has its own."""
    link = tmp_path / "venv"
    link.symlink_to(Path(sys.prefix), target_is_directory=True)
    env = {k: v for k, v in os.environ.items() if k != "TORCH_EXTENSIONS_DIR"}

    def build_dir(python: Path) -> Path:
        r = subprocess.run([str(python), "-c", "from launch.prepare import extensions_dir; "
                            "print(extensions_dir())"], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        return Path(r.stdout.strip())

    direct = build_dir(Path(sys.prefix) / "bin" / "python")
    linked = build_dir(link / "bin" / "python")
    assert direct.resolve() != linked.resolve(), (direct, linked)
    assert build_dir(Path(sys.prefix) / "bin" / "python") == direct  # stable per path


EXITING_CHILD = """
import atexit, sys, threading, time
from launch.runtime import exit_process

def late_writer():
    time.sleep(0.5)
    print("thread done", flush=True)

atexit.register(lambda: open(sys.argv[1], "w").write("atexit ran"))
threading.Thread(target=late_writer).start()  # not a daemon: the exit must wait for it
sys.stdout.write("unflushed")  # no newline, no flush
exit_process(3)
print("never")
"""


def test_a_service_process_ends_like_a_normal_exit_without_finalising_its_modules(tmp_path):
    marker = tmp_path / "atexit"
    res = subprocess.run([sys.executable, "-c", EXITING_CHILD, str(marker)], cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 3
    assert res.stdout == "unflushedthread done\n"  # flushed, thread joined, nothing after
    assert marker.read_text() == "atexit ran"
