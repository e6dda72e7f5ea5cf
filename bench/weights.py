"""Weight sync: learner step end -> every actor generating with the new version.

In one run, for the tiny embedded model and a ~100M-parameter Qwen2 built from a config:
- latency: this process publishes versioned weights (the learner's `WeightPublisher`,
  chunked, credit-based) to real actor processes, one pinned per core. Latency = the last
  actor's "applied weights vN at T" (it generates with vN from its next engine step) minus
  the publish call's start time. Two cases: "sync", actors idle and waiting for the version
  (sync mode's critical path), and "async", actors generating throughout (real allocator;
  this process drains their rollouts).
- bound: raw pyzmq moving the same bytes (one copy per actor, same chunk size) from one
  sender to as many receiver processes over loopback TCP.
Timed: 3 versions after 2 warm-up versions (which allocate the buffers that later versions
reuse, on the learner and on the actors). Final line: JSON with both per model and their
ratio (target <= 2).
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import re
import statistics
import tempfile
import time
from pathlib import Path

import torch
import zmq

from launch.config import load_config
from launch.embedded_model import build_sized_model, ensure_embedded_model
from launch.harness import LearnerStandIn, Proc, make_config, wait_for

_ROOT = Path(__file__).resolve().parents[1]

WARM = 2  # versions published before timing
APPLIED = re.compile(r"applied weights v(\d+) in ([0-9.]+)s at ([0-9.]+)")
RECEIVED = re.compile(r"received weights v(\d+) \(.*?\) in ([0-9.]+)s at ([0-9.]+)")


def _sink(port: int, total: int, ready, done) -> None:
    ctx = zmq.Context()
    s = ctx.socket(zmq.PULL)
    s.setsockopt(zmq.RCVHWM, 64)
    s.connect(f"tcp://127.0.0.1:{port}")
    ready.set()
    got = 0
    while got < total:
        got += len(s.recv(copy=False).buffer)
    done.put(time.perf_counter())
    s.close()
    ctx.term()


def raw_bound(nbytes: int, chunk: int, receivers: int, repeats: int = 3) -> float:
    """Seconds for raw pyzmq to deliver `nbytes` to each of `receivers` processes."""
    times = []
    payload = memoryview(bytearray(nbytes))
    for _ in range(repeats):
        ctx = zmq.Context()
        socks, procs, q = [], [], mp.Queue()
        for _ in range(receivers):
            s = ctx.socket(zmq.PUSH)
            s.setsockopt(zmq.SNDHWM, 64)
            port = s.bind_to_random_port("tcp://127.0.0.1")
            ev = mp.Event()
            p = mp.Process(target=_sink, args=(port, nbytes, ev, q))
            p.start()
            ev.wait()
            socks.append(s)
            procs.append(p)
        time.sleep(0.2)
        t0 = time.perf_counter()
        for off in range(0, nbytes, chunk):  # interleaved, as the publisher does
            for s in socks:
                s.send(payload[off:off + chunk], copy=False)
        ends = [q.get() for _ in procs]
        times.append(max(ends) - t0)
        for p in procs:
            p.join()
        for s in socks:
            s.close()
        ctx.term()
    return statistics.median(times)


def sync_latency(model: Path, actors: int, versions: int, chunk: int, tmp: Path, busy: bool
                 ) -> dict:
    """Publish `versions` versions; per version: publish start -> every actor applied it.
    busy: actors are generating throughout (async mode; the real allocator feeds them and this
    process drains their rollouts). Otherwise they are idle, as in sync mode, where every actor
    waits for the new version with its next step's work in hand."""
    cfg_path = make_config(tmp, model, network={"curve": False},
                           allocator={"max_staleness": 1000},
                           actor={"kv_cache_gib": 0.25, "max_batch_grants": 4,
                                  "prefetch_grants": 8})
    cfg = load_config(cfg_path)
    # busy: every group is consumed at once (the allocator keeps feeding the actors)
    learner = LearnerStandIn(cfg, gate=None)
    pub = learner.publisher
    # One actor per core, as the launcher places actors on a GPU machine (one per device):
    # unbound, each actor's vLLM runs OpenMP threads on every core and they spin on each other.
    cores = sorted(os.sched_getaffinity(0))
    procs = [Proc("actor", cfg_path, "--index", str(i),
                  env={"VLLM_CPU_OMP_THREADS_BIND": str(cores[i % len(cores)])})
             for i in range(actors)]
    if busy:
        procs.append(Proc("allocator", cfg_path))
    from transformers import AutoModelForCausalLM

    weights = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    named = [(n, p.detach()) for n, p in weights.named_parameters()]
    def drain(until: float) -> None:  # the stand-in's thread drains the rollouts
        time.sleep(max(0.0, until - time.monotonic()))

    def logged(pattern: re.Pattern, v: int) -> list[tuple[float, float]] | None:
        """(time, seconds) of every actor's first `pattern` line for version v."""
        out = []
        for p in procs[:actors]:
            hits = [(float(m[3]), float(m[2])) for m in pattern.finditer(p.text())
                    if int(m[1]) == v]
            if not hits:
                return None
            out.append(hits[0])
        return out

    lat, pack, apply_s, recv_at, nbytes = [], [], [], [], 0
    try:
        if busy:
            wait_for(lambda: learner.received() > 4 * actors, 300, "actors generating")
            drain(time.monotonic() + 2.0)  # steady state
        else:
            wait_for(lambda: len(pub.peers) == actors, 300, "actors subscribed to weights")
        for v in range(1, versions + 1):
            t0 = time.time()
            ann = pub.publish(v, named, chunk_bytes=chunk)
            pack.append(time.time() - t0)  # the snapshot copy on the learner side
            nbytes = ann.total_bytes
            ts = wait_for(lambda v=v: (drain(time.monotonic() + 0.02), logged(APPLIED, v))[1],
                          300, f"every actor on v{v}")
            lat.append(max(t for t, _ in ts) - t0)
            recv_at.append(max(t for t, _ in logged(RECEIVED, v)) - t0)
            apply_s.extend(a for _, a in ts)
            drain(time.monotonic() + 0.5)
    finally:
        for p in procs:
            p.stop()
        learner.close()
    # Steady state: the first `WARM` versions allocate the buffers later versions recycle
    # (on both sides), as in a long run; they are left out.
    return {"latency": lat[WARM:], "pack": pack[WARM:], "received": recv_at[WARM:],
            "apply": apply_s[WARM * actors:], "bytes": nbytes}


def main() -> None:
    actors, chunk = 2, 8 << 20
    out = {"bench": "weights", "actors": actors, "chunk_bytes": chunk}
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        models = {
            "tiny": ensure_embedded_model(_ROOT / ".cache/models", 600, 0, progress=False),
            "100M": build_sized_model(_ROOT / ".cache/models/qwen2-100m", hidden_size=768,
                                      intermediate_size=3072, num_hidden_layers=12,
                                      num_attention_heads=12, num_key_value_heads=12,
                                      max_position_embeddings=64),
        }
        for name, path in models.items():
            out[name] = {}
            for mode, busy in (("sync", False), ("async", True)):
                r = sync_latency(path, actors, WARM + 3, chunk, d / f"{name}-{mode}", busy)
                bound = raw_bound(r["bytes"], chunk, actors)
                ms = {k: round(statistics.median(r[k]) * 1e3, 1)
                      for k in ("latency", "pack", "received", "apply")}
                runs = [round(x * 1e3) for x in r["latency"]]
                what = ("actors idle, waiting for it" if not busy
                        else "actors generating throughout")
                print(f"{name:5s} {r['bytes'] / 1e6:6.1f} MB x {actors} actors, {mode:5s} "
                      f"({what}): step end -> all actors on new weights {ms['latency']:7.1f} ms "
                      f"(runs {runs}); raw pyzmq bound {bound * 1e3:6.1f} ms; ratio "
                      f"{ms['latency'] / 1e3 / bound:5.2f}. Of which: learner-side snapshot "
                      f"{ms['pack']:.0f} ms, last chunk in at {ms['received']:.0f} ms, "
                      f"engine pause to swap {ms['apply']:.1f} ms", flush=True)
                out[name][mode] = {"bytes": r["bytes"], "latency_ms": ms["latency"],
                                   "bound_ms": round(bound * 1e3, 1),
                                   "ratio": round(ms["latency"] / 1e3 / bound, 2),
                                   "pack_ms": ms["pack"], "received_ms": ms["received"],
                                   "apply_ms": ms["apply"]}
    out["target_ratio"] = 2.0
    print(json.dumps(out))


if __name__ == "__main__":
    main()
