"""Real component processes for tests and benchmarks: a run config with fresh ports, a
component process that dies with its parent, polling with a deadline, and the learner's side
of the wire without a learner (`LearnerStandIn`). Shared by tests/ and bench/ so that each
is written once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import zmq

from launch.ports import free_ports
from protocol.messages import LearnerProgress, RolloutGroup
from protocol.sockets import SocketOptions, open_socket, recv, send
from protocol.weights import BroadcastSettings, WeightPublisher

REPO = Path(__file__).resolve().parents[1]


def make_config(run_dir: Path, model: Path | None, **sections) -> Path:
    """Write a run config TOML with fresh ports; `sections` are nested override dicts."""
    from launch.config import RunConfig, dump_config

    a, r, w = free_ports(3)
    data: dict = {"run_dir": str(run_dir),
                  "network": {"allocator_port": a, "rollout_port": r, "weights_port": w}}
    if model is not None:
        data["model"] = {"path": str(model)}
    for key, val in sections.items():
        if isinstance(val, dict):
            data.setdefault(key, {}).update(val)
        else:
            data[key] = val
    cfg = RunConfig.model_validate(data)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "config.toml"
    path.write_text(dump_config(cfg))
    return path


def _pdeathsig() -> None:
    import ctypes

    ctypes.CDLL("libc.so.6").prctl(1, signal.SIGKILL)


class Proc:
    """A component process (`python -m launch.cli ROLE CONFIG ...`) logging to a file; it
    dies with the process that started it."""

    def __init__(self, role: str, config: Path, *args: str, log: Path | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.log = log or config.parent / "logs" / f"{role}{'-'.join(args)}.log"
        self.log.parent.mkdir(parents=True, exist_ok=True)
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        with self.log.open("a") as f:
            self.p = subprocess.Popen([sys.executable, "-m", "launch.cli", role, str(config),
                                       *args], stdout=f, stderr=subprocess.STDOUT, cwd=REPO,
                                      env=full_env, preexec_fn=_pdeathsig)

    def alive(self) -> bool:
        return self.p.poll() is None

    def stop(self, timeout: float = 30) -> int:
        if self.alive():
            self.p.send_signal(signal.SIGTERM)
            try:
                self.p.wait(timeout)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()
        return self.p.returncode

    def text(self) -> str:
        return self.log.read_text(errors="replace")


def rss(pid: int) -> int:
    """Resident memory of a live process in bytes (0 once it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) << 10
    except OSError:
        pass
    return 0


def _tcp_address(hex_addr: str) -> tuple[str, int]:
    """"0100007F:1F90" (/proc/net/tcp, little-endian words) -> ("127.0.0.1", 8080)."""
    import ipaddress

    host, port = hex_addr.split(":")
    raw = bytes.fromhex(host)
    raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    return str(ipaddress.ip_address(raw)), int(port, 16)


def listeners(pid: int) -> list[tuple[str, int]]:
    """(address, port) of every TCP socket process `pid` listens on, read from the kernel's
    socket table of the process's own network namespace (/proc/PID/net/tcp, tcp6)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:  # closed meanwhile
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    out = []
    for table in ("tcp", "tcp6"):
        try:
            lines = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            if f[3] == "0A" and f[9] in inodes:  # state LISTEN, and the socket is this pid's
                out.append(_tcp_address(f[1]))
    return sorted(out)


def wait_for(pred, timeout: float, what: str, interval: float = 0.1):
    """The first truthy value of pred(), polled until `timeout` seconds passed."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


class LearnerStandIn:
    """The learner's side of the wire without training, on loopback and without CURVE: PULL
    rollouts (kept with their arrival time), publish weights, report progress with receipts.

    `gate` caps the consumption reported to the allocator (None: everything received is
    consumed at once, i.e. the allocator is not paced by a learner); `version` is the learner
    version reported."""

    def __init__(self, cfg, gate: int | None = None) -> None:
        net = cfg.network
        self.ctx = zmq.Context()
        self.pull = open_socket(self.ctx, zmq.PULL, f"tcp://127.0.0.1:{net.rollout_port}",
                                bind=True)
        self.wsock = open_socket(self.ctx, zmq.ROUTER, f"tcp://127.0.0.1:{net.weights_port}",
                                 bind=True, options=SocketOptions(sndhwm=256))
        self.alloc = open_socket(self.ctx, zmq.DEALER, f"tcp://127.0.0.1:{net.allocator_port}",
                                 bind=False)
        # the broadcast backend when the config asks for it (rendezvous on loopback)
        broadcast = BroadcastSettings(
            host="127.0.0.1", port=net.weights_group_port, timeout_s=net.broadcast_timeout_s,
            chunk_bytes=int(net.broadcast_chunk_mib * (1 << 20))) \
            if net.weights_backend == "broadcast" else None
        self.publisher = WeightPublisher(self.wsock, broadcast=broadcast)
        self.groups: list[tuple[float, RolloutGroup]] = []
        self.version = 0
        self.gate = gate
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        last = 0.0
        receipts: list[int] = []
        while not self.stop.is_set():
            if self.pull.poll(20):
                g = recv(self.pull)
                receipts.append(g.grant_id)
                with self.lock:
                    self.groups.append((time.monotonic(), g))
            if time.monotonic() - last > 0.1:
                with self.lock:
                    n = len(self.groups)
                if self.gate is not None:
                    n = min(n, self.gate)
                try:  # never block: with no allocator connected (teardown) it would hang
                    send(self.alloc, LearnerProgress(version=self.version, consumed_groups=n,
                                                     consumed_samples=0, dropped_stale=0,
                                                     received=receipts), zmq.NOBLOCK)
                    receipts = []
                except zmq.Again:
                    pass  # re-sent a moment later anyway
                last = time.monotonic()

    def received(self) -> int:
        with self.lock:
            return len(self.groups)

    def snapshot(self) -> list[RolloutGroup]:
        with self.lock:
            return [g for _, g in self.groups]

    def timed(self) -> list[tuple[float, RolloutGroup]]:
        with self.lock:
            return list(self.groups)

    def wait_groups(self, n: int, timeout: float = 120) -> list[RolloutGroup]:
        wait_for(lambda: len(self.snapshot()) >= n, timeout, f"{n} groups")
        return self.snapshot()

    def close(self) -> None:
        self.stop.set()
        self.thread.join()
        self.publisher.close()
        for s in (self.pull, self.wsock, self.alloc):
            s.close(linger=0)
        self.ctx.term()
