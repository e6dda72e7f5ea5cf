"""Codec overhead on the wire: encode -> PUSH -> loopback TCP -> PULL -> decode of a RolloutGroup,
versus raw pyzmq moving the very same frames (same count, same sizes, copy=False both ways).

Sender and receiver are separate processes, as actor and learner are in a run, so encoding and
decoding cost what they cost each side. Rounds alternate between the modes (and which goes
first) so drift in machine load hits both alike; the first two rounds are warm-up, and rates
are medians over rounds (robust to bursts of other load). Prints a table, then one JSON line;
`ratio` = ours / raw messages per second (target >= 0.8).

    python bench/codec.py [--samples 16 --tokens 1024 --rounds 16 --per-round 400]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import zmq

from protocol import RolloutGroup, encode
from protocol.sockets import SocketOptions, open_socket, recv, send

TARGET = 0.8
WARMUP_ROUNDS = 2
OPTIONS = SocketOptions(linger_ms=0, rcvtimeo_ms=30_000, sndtimeo_ms=30_000)


def make_group(samples: int, tokens: int, prompt_tokens: int = 256) -> RolloutGroup:
    rng = np.random.default_rng(0)  # fixed: both processes build identical messages
    t = samples * tokens
    return RolloutGroup(
        grant_id=1, lease_id=1, problem_id="bench-problem", actor_id="bench-actor",
        prompt_token_ids=rng.integers(0, 150_000, prompt_tokens, dtype=np.int32),
        completion_token_ids=rng.integers(0, 150_000, t, dtype=np.int32),
        completion_lengths=np.full(samples, tokens, np.int32),
        behaviour_logprobs=-rng.random(t, dtype=np.float32) * 4,
        token_versions=np.full(t, 7, np.int32),
        rewards=rng.integers(0, 2, samples).astype(np.float32),
        finished=np.ones(samples, bool),
        gen_seconds=3.0,
    )


def sender(data_ep: str, ctrl_ep: str, samples: int, tokens: int) -> None:
    """Send `count` messages in the mode each control message names, until told to stop."""
    msg = make_group(samples, tokens)
    raw_frames = [bytes(f) for f in encode(msg)]
    ctx: zmq.Context[Any] = zmq.Context()
    push = open_socket(ctx, zmq.PUSH, data_ep, bind=False, options=OPTIONS)
    ctrl = open_socket(ctx, zmq.PULL, ctrl_ep, bind=False, options=OPTIONS)
    try:
        while True:
            mode, count = ctrl.recv_string().split()
            if mode == "stop":
                return
            for _ in range(int(count)):
                if mode == "ours":
                    send(push, msg)
                else:
                    push.send_multipart(raw_frames, copy=False)
    finally:
        ctx.destroy(linger=1000)


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=16, help="per mode, warm-up included")
    ap.add_argument("--per-round", type=int, default=400)
    args = ap.parse_args()

    msg = make_group(args.samples, args.tokens)
    frames = encode(msg)
    msg_bytes = sum(memoryview(f).nbytes for f in frames)

    ctx: zmq.Context[Any] = zmq.Context()
    pull = open_socket(ctx, zmq.PULL, "tcp://127.0.0.1:*", bind=True, options=OPTIONS)
    ctrl = open_socket(ctx, zmq.PUSH, "tcp://127.0.0.1:*", bind=True, options=OPTIONS)
    proc = mp.get_context("spawn").Process(target=sender, args=(
        pull.getsockopt_string(zmq.LAST_ENDPOINT), ctrl.getsockopt_string(zmq.LAST_ENDPOINT),
        args.samples, args.tokens))
    proc.start()
    receivers: dict[str, Callable[[], Any]] = {
        "ours": lambda: recv(pull),
        "raw": lambda: pull.recv_multipart(copy=False),
    }
    rates: dict[str, list[float]] = {"ours": [], "raw": []}
    seconds = {"ours": 0.0, "raw": 0.0}
    try:
        ctrl.send_string("ours 1")
        assert recv(pull) == msg, "decoded message differs from the one sent"
        for rnd in range(args.rounds):
            for mode in (("ours", "raw") if rnd % 2 == 0 else ("raw", "ours")):
                receive = receivers[mode]
                start = time.perf_counter()
                ctrl.send_string(f"{mode} {args.per_round}")
                for _ in range(args.per_round):
                    receive()
                dt = time.perf_counter() - start
                if rnd >= WARMUP_ROUNDS:
                    seconds[mode] += dt
                    rates[mode].append(args.per_round / dt)
        ctrl.send_string("stop 0")
        proc.join(30)
    finally:
        if proc.is_alive():
            proc.terminate()
        ctx.destroy(linger=0)

    per_s = {mode: statistics.median(r) for mode, r in rates.items()}
    print(f"RolloutGroup {args.samples} samples x {args.tokens} tokens: {msg_bytes} bytes in "
          f"{len(frames)} frames; {args.rounds - WARMUP_ROUNDS} rounds x {args.per_round} "
          f"messages per mode, sender and receiver in separate processes")
    print(f"{'mode':<6}{'msgs/s':>10}{'MB/s':>10}{'round min':>12}{'round max':>12}"
          f"{'overall':>12}")
    for mode in ("ours", "raw"):
        r = rates[mode]
        overall = len(r) * args.per_round / seconds[mode]
        print(f"{mode:<6}{per_s[mode]:>10.0f}{per_s[mode] * msg_bytes / 1e6:>10.0f}"
              f"{min(r):>12.0f}{max(r):>12.0f}{overall:>12.0f}")
    print(json.dumps({
        "bench": "codec", "msg_bytes": msg_bytes,
        "ours_msgs_per_s": round(per_s["ours"], 1), "raw_msgs_per_s": round(per_s["raw"], 1),
        "ours_MBps": round(per_s["ours"] * msg_bytes / 1e6, 1),
        "raw_MBps": round(per_s["raw"] * msg_bytes / 1e6, 1),
        "ratio": round(per_s["ours"] / per_s["raw"], 3), "target": TARGET,
    }))


if __name__ == "__main__":
    main()
