"""What a run exposes on the network, read from the kernel rather than from our own code:
every TCP listener of every process of a real `dynamo-rl run` (/proc/PID/net/tcp*), and every
refused CURVE handshake, counted per socket and by kind by each service while three bad peers
(keyless, another run's key, our key aimed at another server key) knock on every port. The run
is conftest's shared `trained` run, which sets the peers on it (tests/listening.py)."""

from __future__ import annotations

import json

from conftest import TRAINED_STEPS
from listening import BAD

from launch.config import load_config
from protocol.handshakes import KINDS


def test_a_run_listens_on_loopback_only_and_counts_every_refused_handshake(trained):
    run_dir, seen = trained.run_dir, trained.listeners
    net = load_config(trained.config).network
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert recs[-1]["step"] == TRAINED_STEPS
    # every listener of every process is on loopback (the configured host); the services'
    # ports are where the config says, the rest (rendezvous, process groups) also loopback
    assert {"allocator", "learner", "actor"} <= seen.keys(), seen
    assert all(addr == "127.0.0.1" for ports in seen.values() for addr, _ in ports), seen
    assert ("127.0.0.1", net.allocator_port) in seen["allocator"]
    assert {("127.0.0.1", net.rollout_port), ("127.0.0.1", net.weights_port)} <= seen["learner"]
    assert len(seen["learner"]) >= 3  # and the rank's rendezvous store (MASTER_PORT)
    # each kind of refused handshake is counted on each of the three server sockets
    last = recs[-1]
    for sock in ("rollouts", "weights"):
        counts = {k: last.get(f"handshake_refused/{sock}/{k}", 0) for k in KINDS}
        assert all(counts[k] >= 1 for k in BAD), (sock, counts)
    status = json.loads((run_dir / "allocator_status.json").read_text())["counters"]
    counts = {k: status.get(f"handshake_refused/allocator/{k}", 0) for k in KINDS}
    assert all(counts[k] >= 1 for k in BAD), counts
