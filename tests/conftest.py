"""Shared fixtures: the embedded models; the process helpers of launch/harness.py."""

from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

import pytest

from launch.harness import Proc, make_config, wait_for  # noqa: F401  (tests import them here)
from launch.ports import free_ports  # noqa: F401

REPO = Path(__file__).resolve().parents[1]
MODEL_CACHE = REPO / ".cache" / "models"
TRAINED_STEPS, TRAINED_BOUND = 32, 1  # BOUND: a one-batch pacing window, as the paper configs


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    from launch.embedded_model import ensure_embedded_model

    return ensure_embedded_model(MODEL_CACHE, steps=600, seed=0, progress=False)


@pytest.fixture(scope="session")
def math_model() -> Path:
    """The math rehearsal's embedded model (configs/math-rehearsal.toml builds the same)."""
    from launch.rehearsal_model import ensure_rehearsal_model

    return ensure_rehearsal_model(MODEL_CACHE, progress=False)


class TrainedRun(NamedTuple):
    run_dir: Path
    config: Path
    output: str  # the launcher's stdout and stderr
    listeners: dict[str, set[tuple[str, int]]]  # role -> (address, port) it listened on


@pytest.fixture(scope="session")
def trained(tiny_model, tmp_path_factory):
    """A 32-step `dynamo-rl run` of the tiny model (allocator + vLLM actor + DeepSpeed
    learner over CURVE-authenticated ZeroMQ) with hostile traffic sent while it trains;
    shared by test_training_run, test_profiling and test_listeners."""
    import subprocess
    import sys

    import numpy as np
    import zmq
    from listening import ListenerWatch, bad_peers

    from launch.config import load_config
    from protocol.auth import RunKeys, grant_mac
    from protocol.codec import encode
    from protocol.messages import RolloutGroup
    from protocol.sockets import generate_keys, open_socket, send

    STEPS, BOUND = TRAINED_STEPS, TRAINED_BOUND

    def metrics(run_dir: Path) -> list[dict]:
        return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]

    run_dir = tmp_path_factory.mktemp("train")
    cfg_path = make_config(
        run_dir, tiny_model, preset="dynamo",
        task={"num_eval_problems": 512},
        allocator={"batch_prompts": 32, "n_mean": 8, "n_min": 4, "n_max": 16,
                   "max_staleness": BOUND},
        learner={"total_steps": STEPS, "prompts_per_step": 32, "lr": 2e-4,
                 "eval_every": STEPS, "checkpoint_every": STEPS // 2})
    # Hostile traffic while it trains, sent with a valid actor key (an outsider without keys
    # is refused before the application sees anything): garbage, an inconsistent group, a
    # group for a grant the allocator never issued, and one whose grant MAC is valid (made
    # here with the run's grant secret) but whose tokens are outside the vocabulary.
    # And peers knocking on every port with the wrong keys, while the run's listeners are
    # read from the kernel (test_listeners checks both).
    generate_keys(run_dir.parent / f"{run_dir.name}-outsider", ["allocator", "actor"])
    proc = subprocess.Popen([sys.executable, "-m", "launch.cli", "run", str(cfg_path)],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    watch = ListenerWatch(proc.pid)
    ctx = zmq.Context()
    peers: list = []

    def first_steps() -> bool:
        if proc.poll() is not None:  # ended before training: say why at once
            raise AssertionError(f"the run ended early ({proc.returncode}):\n"
                                 f"{proc.stdout.read()[-4000:]}")
        return (run_dir / "metrics.jsonl").is_file() and len(metrics(run_dir)) >= 3

    try:  # whatever fails here, the run, the watcher and the sockets end with it
        wait_for(first_steps, 300, "the first learner steps")
        cfg = load_config(cfg_path)
        keys = RunKeys.load(run_dir / "keys", "actor")
        net = cfg.network
        for kind, endpoint, server in ((zmq.DEALER, net.allocator, keys.allocator),
                                       (zmq.PUSH, net.rollouts, keys.learner),
                                       (zmq.DEALER, net.weights, keys.learner)):
            peers += bad_peers(ctx, kind, endpoint, server, run_dir / "keys",
                               run_dir.parent / f"{run_dir.name}-outsider")
        push = open_socket(ctx, zmq.PUSH, f"tcp://127.0.0.1:{cfg.network.rollout_port}",
                           bind=False, keys=keys.connect(keys.learner))
        peers.append(push)
        push.send_multipart([b"\x93garbage", b"more"])
        good = RolloutGroup(grant_id=10**9, lease_id=1, problem_id="x", actor_id="evil",
                            prompt_token_ids=np.array([4, 5], np.int32),
                            completion_token_ids=np.array([6, 1], np.int32),
                            completion_lengths=np.array([2, 0], np.int32),
                            behaviour_logprobs=np.array([-0.1, -0.2], np.float32),
                            token_versions=np.array([0, 0], np.int32),
                            rewards=np.array([1.0, 0.0], np.float32),
                            finished=np.array([True, True]), gen_seconds=0.1)
        frames = [bytes(f) for f in encode(good)]
        frames[4] = frames[4][:4]  # behaviour_logprobs one element short of the lengths
        push.send_multipart(frames)
        send(push, good)  # no grant MAC: a grant the allocator never issued
        secret = bytes.fromhex((run_dir / "keys" / "grant.secret").read_text())
        oov = {n: getattr(good, n) for n, _ in good.SCHEMA}
        oov["completion_token_ids"] = np.array([6, 10**6], np.int32)
        oov["grant_mac"] = grant_mac(secret, good.grant_id, good.lease_id, good.problem_id,
                                     good.n)
        send(push, RolloutGroup(**oov))
        out, _ = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:  # its children die with it (PDEATHSIG)
            proc.kill()
            proc.wait()
        seen = watch.stop()
        for sock in peers:
            sock.close(linger=0)
        ctx.destroy(linger=0)
    assert proc.returncode == 0, out
    return TrainedRun(run_dir, cfg_path, out, seen)
