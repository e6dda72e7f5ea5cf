"""Several "hosts" on one machine: Linux network namespaces on a bridge, for rehearsing the
cluster path (launch/cluster.sh --remote-cmd "ip netns exec", the broadcast weights backend)
without a cluster. Needs root and iproute2.

Each host is a namespace with its loopback up and one veth to a bridge in the root namespace
(addresses 10.X.0.1, 10.X.0.2, ...), optionally rate-limited with a tbf qdisc on both ends,
so the link, not the CPU, bounds what a host can send and receive. Traffic stays between the
namespaces (no route out). `Hosts` deletes everything it made when its `with` block ends,
also on errors; names carry a per-process tag so parallel runs do not collide.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass, field


def available() -> str | None:
    """None if namespaces can be made here, else why not."""
    if os.geteuid() != 0:
        return "needs root"
    if shutil.which("ip") is None or shutil.which("tc") is None:
        return "needs iproute2 (ip, tc)"
    tag = f"dynchk{os.getpid() % 100000}"
    r = subprocess.run(["ip", "netns", "add", tag], capture_output=True, text=True)
    if r.returncode != 0:
        return f"ip netns add failed: {r.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", tag], capture_output=True)
    return None


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=10)


@dataclass
class Hosts:
    """`n` namespaces on a bridge; `rate` (e.g. "1gbit") limits each host's link both ways."""

    n: int
    rate: str | None = None
    subnet: int = 77
    tag: str = field(default_factory=lambda: f"d{os.getpid() % 100000}")
    names: list[str] = field(default_factory=list)
    addrs: list[str] = field(default_factory=list)

    @property
    def bridge(self) -> str:
        return f"{self.tag}br"

    def __enter__(self) -> Hosts:
        try:
            _ip("link", "add", self.bridge, "type", "bridge")
            _ip("link", "set", self.bridge, "up")
            for i in range(self.n):
                ns, addr = f"{self.tag}h{i}", f"10.{self.subnet}.0.{i + 1}"
                host_if, ns_if = f"{self.tag}v{i}", f"{self.tag}e{i}"
                _ip("netns", "add", ns)
                self.names.append(ns)
                _ip("link", "add", host_if, "type", "veth", "peer", "name", ns_if)
                _ip("link", "set", ns_if, "netns", ns)
                _ip("link", "set", host_if, "master", self.bridge)
                _ip("link", "set", host_if, "up")
                _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", ns_if)
                _ip("-n", ns, "link", "set", ns_if, "up")
                _ip("-n", ns, "link", "set", "lo", "up")
                if self.rate:
                    for dev, where in ((ns_if, ["ip", "netns", "exec", ns]), (host_if, [])):
                        subprocess.run([*where, "tc", "qdisc", "add", "dev", dev, "root", "tbf",
                                        "rate", self.rate, "burst", "256kb", "latency",
                                        "50ms"], check=True, capture_output=True, timeout=10)
                self.addrs.append(addr)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        for ns in self.names:
            # processes still in a namespace would keep it alive: kill them first
            pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True,
                                  text=True).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), 9)
                except (ProcessLookupError, ValueError):
                    pass
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        for i in range(self.n):  # deleting a namespace deletes its veth end and the peer
            subprocess.run(["ip", "link", "del", f"{self.tag}v{i}"], capture_output=True)
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True)
        self.names.clear()

    def exec_prefix(self, i: int) -> list[str]:
        return ["ip", "netns", "exec", self.names[i]]
