"""What a run exposes on the network, read from the kernel rather than from our own code:
every TCP listener of every process of a real `dynamo-rl run` (/proc/PID/net/tcp*), and every
refused CURVE handshake, counted per socket and by kind by each service while three bad peers
(keyless, another run's key, our key aimed at another server key) knock on every port."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import zmq
from conftest import REPO, make_config

from launch.config import load_config
from launch.harness import listeners
from protocol.auth import RunKeys, generate_run_keys
from protocol.handshakes import KINDS
from protocol.sockets import CurveKeys, SocketOptions, generate_keys, open_socket

BAD = ("keyless", "wrong_key", "wrong_server_key")


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def _role(pid: int) -> str:
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return "gone"
    return args[args.index(b"launch.cli") + 1].decode() if b"launch.cli" in args else "other"


def _bad_peers(ctx: zmq.Context, kind: int, endpoint: str, server_public: bytes,
               run_keys: Path, outsider: Path) -> list[zmq.Socket]:
    """One socket per kind of refused handshake; each keeps reconnecting (and being refused)."""
    ours = RunKeys.load(run_keys, "actor").connect(server_public)
    theirs = CurveKeys.load(outsider, server="allocator", client="actor")
    wrong_server = CurveKeys.load(outsider, server="allocator")
    opts = SocketOptions(linger_ms=0)
    return [
        open_socket(ctx, kind, endpoint, bind=False, options=opts),
        open_socket(ctx, kind, endpoint, bind=False, options=opts,
                    keys=CurveKeys(server_public=server_public,
                                   client_public=theirs.client_public,
                                   client_secret=theirs.client_secret)),
        open_socket(ctx, kind, endpoint, bind=False, options=opts,
                    keys=CurveKeys(server_public=wrong_server.server_public,
                                   client_public=ours.client_public,
                                   client_secret=ours.client_secret)),
    ]


def test_a_run_listens_on_loopback_only_and_counts_every_refused_handshake(tiny_model,
                                                                           tmp_path):
    cfg_path = make_config(tmp_path, tiny_model, allocator={"snapshot_every_s": 0.2},
                           learner={"total_steps": 8, "eval_every": 0, "checkpoint_every": 100})
    cfg = load_config(cfg_path)
    net = cfg.network
    keys = tmp_path / "keys"
    generate_run_keys(keys)
    generate_keys(tmp_path / "outsider", ["allocator", "actor"])
    run = subprocess.Popen([sys.executable, "-m", "launch.cli", "run", str(cfg_path)], cwd=REPO,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    ctx = zmq.Context()
    seen: dict[str, set[tuple[str, int]]] = {}
    peers: list[zmq.Socket] = []
    try:
        deadline = time.monotonic() + 400
        while run.poll() is None and time.monotonic() < deadline:
            for pid in _children(run.pid):
                try:
                    seen.setdefault(_role(pid), set()).update(listeners(pid))
                except OSError:  # exited between the listing and the read
                    pass
            if not peers and (tmp_path / "metrics.jsonl").exists():  # every service is up
                learner_pub = RunKeys.load(keys, "actor").learner
                alloc_pub = RunKeys.load(keys, "actor").allocator
                for kind, endpoint, server in ((zmq.DEALER, net.allocator, alloc_pub),
                                               (zmq.PUSH, net.rollouts, learner_pub),
                                               (zmq.DEALER, net.weights, learner_pub)):
                    peers += _bad_peers(ctx, kind, endpoint, server, keys,
                                        tmp_path / "outsider")
            time.sleep(0.5)
        out = run.communicate(timeout=60)[0]
        assert run.returncode == 0, out[-3000:]
    finally:
        for s in peers:
            s.close(linger=0)
        ctx.destroy(linger=0)
        if run.poll() is None:
            run.kill()

    # the run trained to the end with the bad peers knocking throughout
    recs = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert recs[-1]["step"] == 8
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
    status = json.loads((tmp_path / "allocator_status.json").read_text())["counters"]
    counts = {k: status.get(f"handshake_refused/allocator/{k}", 0) for k in KINDS}
    assert all(counts[k] >= 1 for k in BAD), counts
