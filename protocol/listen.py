"""Listeners bound to one address: torch's TCPStore (the learner ranks' rendezvous, the weight
broadcast's rendezvous) otherwise listens on every interface, whatever host it is given. Here
the socket is bound first, to the configured address, and handed to the store."""

from __future__ import annotations

import datetime
import fcntl
import ipaddress
import socket
import struct
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch.distributed

_SIOCGIFADDR = 0x8915


def interface_ipv4(name: str) -> str:
    """The IPv4 address of network interface `name` (e.g. "eth0")."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        packed = fcntl.ioctl(s.fileno(), _SIOCGIFADDR, struct.pack("256s", name[:15].encode()))
    return socket.inet_ntoa(packed[20:24])


def resolve(host: str) -> str:
    """An IP address for `host`: an address as it is, an interface name's IPv4 address, or a
    host name's address."""
    if host == "*":
        return host
    try:
        ipaddress.ip_address(host)
        return host
    except ValueError:
        pass
    if host in {name for _, name in socket.if_nameindex()}:
        return interface_ipv4(host)
    return socket.gethostbyname(host)


def listening_store(host: str, port: int, *, timeout_s: float, world: int | None = None,
                    wait_for_workers: bool = False) -> torch.distributed.TCPStore:
    """A TCPStore server listening on host:port only (port 0: any free port, see `.port`)."""
    import torch.distributed

    addr = resolve(host)
    sock = socket.socket(socket.AF_INET6 if ":" in addr else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((addr, port))
        bound = sock.getsockname()[1]
    except BaseException:
        sock.close()
        raise
    return torch.distributed.TCPStore(
        addr, bound, world, is_master=True, wait_for_workers=wait_for_workers,
        timeout=datetime.timedelta(seconds=timeout_s), master_listen_fd=sock.detach())
