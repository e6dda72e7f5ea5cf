"""Weight sync time vs number of actors, per backend, across rehearsal hosts whose links are
rate-limited so that the network, not the CPU, is the bottleneck.

The learner's weight publisher runs in one network namespace, N weight receivers
(launch/weights_probe.py: an actor's weights socket, ZeroMQ receiver and broadcast member,
without an engine) in N others, every link limited to --rate by a tbf qdisc (launch/netns.py).
For each backend (zmq: one transfer per actor from the learner; broadcast: one copy down a
pipelined chain of actors) and each N, it publishes --versions versions of --mib MiB and
reports the median sync time: publish -> every receiver holds the version (received, checked).
Needs root (network namespaces); about 2-4 minutes.

    python bench/weights_scale.py                       # 1, 2, 4, 8 actors, 16 MiB, 200mbit

Target (issue 14): with broadcast, 8 actors take <= 1.5x the time of 1. Final line: JSON with
`rows` ([{backend, actors, sync_ms}]) and `ratio_8_to_1` per backend.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def learner_main(args: argparse.Namespace) -> None:
    """Inside the learner's namespace: publish versions, time each until every probe has it."""
    import torch
    import zmq

    from protocol.sockets import SocketOptions, open_socket
    from protocol.weights import BroadcastSettings, WeightPublisher

    out = Path(args.out)
    ctx = zmq.Context()
    sock = open_socket(ctx, zmq.ROUTER, f"tcp://{args.addr}:5712", bind=True,
                       options=SocketOptions(sndhwm=256))
    bc = BroadcastSettings(host=args.addr, port=5713, timeout_s=60.0,
                           chunk_bytes=int(args.chunk_mib * (1 << 20))) \
        if args.backend == "broadcast" else None
    pub = WeightPublisher(sock, broadcast=bc)
    names = [f"a{i}" for i in range(args.actors)]

    def versions_of(name: str) -> set[int]:
        f = out / f"{name}.jsonl"
        return {json.loads(x)["version"] for x in f.read_text().splitlines()} \
            if f.exists() else set()

    deadline = time.monotonic() + 60
    while len(pub.peers) < args.actors or (
            bc is not None and sum(p.offered for p in list(pub._peers.values())) < args.actors):
        assert time.monotonic() < deadline, "the probes never connected"
        time.sleep(0.05)
    g = torch.Generator().manual_seed(0)
    n = int(args.mib * (1 << 20) / 4)
    times = []
    for v in range(1, args.versions + 2):  # version 1 forms the group: not timed
        weights = [("w", torch.randn(n, generator=g))]
        t = time.monotonic()
        pub.publish(v, weights, chunk_bytes=8 << 20)
        while not all(v in versions_of(x) for x in names):
            assert time.monotonic() - t < 300, f"v{v} never reached every probe"
            time.sleep(0.005)
        if v > 1:
            times.append(time.monotonic() - t)
    print(json.dumps({"sync_s": times, "counters": dict(pub.counters)}), flush=True)
    pub.close()
    sock.close(linger=0)
    ctx.term()


def measure(backend: str, actors: int, args: argparse.Namespace) -> float:
    from launch.netns import Hosts

    with Hosts(actors + 1, rate=args.rate) as hosts, tempfile.TemporaryDirectory() as tmp:
        probes = [subprocess.Popen(
            [*hosts.exec_prefix(i + 1), sys.executable, "-m", "launch.weights_probe",
             f"tcp://{hosts.addrs[0]}:5712", f"a{i}", f"{tmp}/a{i}.jsonl",
             *([] if backend == "broadcast" else ["--no-broadcast"])], cwd=ROOT)
            for i in range(actors)]
        try:
            r = subprocess.run(
                [*hosts.exec_prefix(0), sys.executable, __file__, "--learner",
                 "--backend", backend, "--actors", str(actors), "--addr", hosts.addrs[0],
                 "--out", tmp, "--mib", str(args.mib), "--versions", str(args.versions),
                 "--chunk-mib", str(args.chunk_mib)],
                cwd=ROOT, capture_output=True, text=True, timeout=900)
        finally:
            for p in probes:
                p.kill()
                p.wait()
        if r.returncode != 0:
            raise RuntimeError(f"{backend} x{actors}: {r.stderr[-3000:]}")
        res = json.loads(r.stdout.strip().splitlines()[-1])
        return statistics.median(res["sync_s"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--actors", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--backends", nargs="+", default=["zmq", "broadcast"],
                    choices=["zmq", "broadcast"])
    ap.add_argument("--mib", type=float, default=16.0, help="weights per version")
    ap.add_argument("--rate", default="200mbit", help="tbf rate of every host's link")
    ap.add_argument("--versions", type=int, default=3, help="timed versions per point")
    ap.add_argument("--chunk-mib", type=float, default=0.5, help="broadcast chain chunk")
    # child mode: the learner side, inside its namespace
    ap.add_argument("--learner", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--backend", help=argparse.SUPPRESS)
    ap.add_argument("--addr", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.learner:
        args.actors = args.actors[0] if isinstance(args.actors, list) else args.actors
        learner_main(args)
        return
    from launch.netns import available

    why = available()
    if why:
        sys.exit(f"weights_scale: network namespaces unavailable here ({why})")
    link_s = args.mib * 8 * 2**20 / _bits(args.rate)
    print(f"{args.mib:g} MiB per version over {args.rate} links (one copy: {link_s:.2f} s); "
          f"median of {args.versions} versions")
    print(f"{'backend':>10} " + " ".join(f"{n:>8}" for n in args.actors) + "   ratio (max/1)")
    rows, ratios = [], {}
    for backend in args.backends:
        ms = []
        for n in args.actors:
            ms.append(measure(backend, n, args) * 1000)
            rows.append({"backend": backend, "actors": n, "sync_ms": ms[-1]})
        ratios[backend] = ms[-1] / ms[0]
        print(f"{backend:>10} " + " ".join(f"{x:>8.0f}" for x in ms) +
              f"   {ratios[backend]:.2f}", flush=True)
    print(json.dumps({"mib": args.mib, "rate": args.rate, "rows": rows,
                      f"ratio_{max(args.actors)}_to_{min(args.actors)}": ratios}))


def _bits(rate: str) -> float:
    units = {"kbit": 1e3, "mbit": 1e6, "gbit": 1e9}
    for u, f in units.items():
        if rate.endswith(u):
            return float(rate[:-len(u)]) * f
    return float(rate)


if __name__ == "__main__":
    main()
