"""ZeroMQ socket set-up and message send/receive helpers.

Guarantees:
- `open_socket` returns a socket whose limits are all set before it binds or connects:
  high-water marks, per-frame size cap (MAXMSGSIZE), linger, timeouts, ZMTP heartbeats on TCP,
  IMMEDIATE on connecting DEALER/PUSH (no queueing to peers that are not there), and
  ROUTER_MANDATORY on ROUTER (a send to an unknown peer raises instead of vanishing).
- With `CurveKeys`, the binding side is the CURVE server and the connecting side the client.
  A CURVE server admits only the client keys given to `start_authenticator` on its context;
  without a running authenticator libzmq would admit any client that knows the server key.
- `send*` hand frames to ZeroMQ without copying (arrays must stay untouched until sent);
  `recv*` return validated messages or raise `ProtocolError` (counted in `RejectCounts` when
  one is passed; `recv_routed` errors carry the sender's identity in `.peer`).
- DEALER <-> ROUTER carries no empty delimiter frame: ROUTER sees [identity, header, ...].
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zmq
import zmq.asyncio
from zmq.auth.asyncio import AsyncioAuthenticator
from zmq.auth.base import Authenticator
from zmq.auth.certs import load_certificate
from zmq.auth.thread import ThreadAuthenticator

from protocol.codec import DEFAULT_MAX_MESSAGE_BYTES, decode, encode
from protocol.errors import MalformedFrame, ProtocolError
from protocol.messages import Message

Socket = zmq.Socket[Any]


@dataclass(frozen=True, slots=True)
class SocketOptions:
    """One ZeroMQ option per field; -1 timeouts block forever."""

    sndhwm: int = 1000  # messages queued per peer before send blocks (or PUB drops)
    rcvhwm: int = 1000
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES  # MAXMSGSIZE: libzmq checks each frame
    linger_ms: int = 1000  # bounded, so close() never hangs on a dead peer
    rcvtimeo_ms: int = -1
    sndtimeo_ms: int = -1
    heartbeat_ivl_ms: int = 1000  # ZMTP PING interval (TCP only)
    heartbeat_timeout_ms: int = 5000  # drop the connection after this long without traffic


@dataclass(frozen=True, slots=True)
class CurveKeys:
    """Z85 CURVE keys of one run; secrets are None where this process does not hold them."""

    server_public: bytes
    server_secret: bytes | None = None
    client_public: bytes | None = None
    client_secret: bytes | None = None

    @classmethod
    def load(cls, key_dir: str | os.PathLike[str], *, server: str = "server",
             client: str | None = None) -> CurveKeys:
        """Keys written by `generate_keys`; a name's secret is read if its .key_secret exists."""
        server_public, server_secret = _load_pair(Path(key_dir), server)
        client_public = client_secret = None
        if client is not None:
            client_public, client_secret = _load_pair(Path(key_dir), client)
        return cls(server_public, server_secret, client_public, client_secret)


def _load_pair(key_dir: Path, name: str) -> tuple[bytes, bytes | None]:
    secret_file = key_dir / f"{name}.key_secret"
    return load_certificate(secret_file if secret_file.exists() else key_dir / f"{name}.key")


_CERT = """#   ZeroMQ CURVE {kind} Certificate (DynaMO-RL)
metadata
curve
    public-key = "{public}"
"""


def generate_keys(key_dir: str | os.PathLike[str], names: Iterable[str]) -> dict[str, Path]:
    """Write `<name>.key` (public) and `<name>.key_secret` per name, in zmq.auth's certificate
    format, owner-only (0600 files in a 0700 directory). Refuses to overwrite a key."""
    d = Path(key_dir)
    d.mkdir(mode=0o700, parents=True, exist_ok=True)
    d.chmod(0o700)
    written: dict[str, Path] = {}
    for name in names:
        public, secret = zmq.curve_keypair()
        pub_text = _CERT.format(kind="Public", public=public.decode())
        sec_text = _CERT.format(kind="**Secret**", public=public.decode())
        sec_text += f'    secret-key = "{secret.decode()}"\n'
        for path, text in ((d / f"{name}.key", pub_text), (d / f"{name}.key_secret", sec_text)):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as fh:
                os.fchmod(fh.fileno(), 0o600)  # the umask may only narrow 0600, but be exact
                fh.write(text)
        written[name] = d / f"{name}.key_secret"
    return written


def public_keys(key_dir: str | os.PathLike[str], exclude: Iterable[str] = ("server",)
                ) -> set[bytes]:
    """Public keys of every `<name>.key` in key_dir except the excluded names."""
    skip = set(exclude)
    return {load_certificate(p)[0] for p in Path(key_dir).glob("*.key") if p.stem not in skip}


class _AllowList:
    """zmq.auth credentials provider admitting exactly a set of Z85 client keys; counts the
    handshakes it refuses (`refused`), so services can report unauthenticated peers."""

    def __init__(self, keys: Iterable[bytes]):
        self.keys = frozenset(keys)
        self.refused = 0

    def callback(self, domain: str, key: bytes) -> bool:
        ok = key in self.keys
        if not ok:
            self.refused += 1
        return ok


def start_authenticator(ctx: zmq.Context[Any], client_keys: Iterable[bytes]) -> Authenticator:
    """Start a ZAP handler on ctx admitting only `client_keys` to its CURVE servers.

    A thread for a plain context; for a zmq.asyncio context an asyncio task, so call it from
    inside the running loop. Call `.stop()` on the result before terminating the context.
    """
    auth: Authenticator
    if isinstance(ctx, zmq.asyncio.Context):
        auth = AsyncioAuthenticator(ctx)
    else:
        auth = ThreadAuthenticator(ctx)
    allow = _AllowList(client_keys)
    auth.configure_curve_callback("*", credentials_provider=allow)
    auth.allow_list = allow  # type: ignore[attr-defined]  # .allow_list.refused: a counter
    auth.start()
    return auth


def open_socket(ctx: zmq.Context[Any], kind: int, endpoint: str, *, bind: bool,
                options: SocketOptions = SocketOptions(), keys: CurveKeys | None = None,
                identity: bytes | None = None, subscribe: Sequence[bytes] = (b"",)) -> Socket:
    """A configured socket of `kind` (zmq.ROUTER, DEALER, PUSH, PULL, PUB, SUB) bound or
    connected to endpoint. `subscribe` applies to SUB only (default: everything)."""
    sock = ctx.socket(kind)
    try:
        o = options
        for opt, value in (
            (zmq.LINGER, o.linger_ms), (zmq.SNDHWM, o.sndhwm), (zmq.RCVHWM, o.rcvhwm),
            (zmq.MAXMSGSIZE, o.max_message_bytes), (zmq.RCVTIMEO, o.rcvtimeo_ms),
            (zmq.SNDTIMEO, o.sndtimeo_ms),
        ):
            sock.setsockopt(opt, value)
        if endpoint.startswith("tcp://"):
            sock.setsockopt(zmq.HEARTBEAT_IVL, o.heartbeat_ivl_ms)
            sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, o.heartbeat_timeout_ms)
            sock.setsockopt(zmq.HEARTBEAT_TTL, o.heartbeat_timeout_ms)
        if kind == zmq.ROUTER:
            sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        if not bind and kind in (zmq.DEALER, zmq.PUSH):
            sock.setsockopt(zmq.IMMEDIATE, 1)
        if identity is not None:
            sock.setsockopt(zmq.ROUTING_ID, identity)
        if keys is not None:
            _apply_curve(sock, keys, server=bind)
        if kind == zmq.SUB:
            for topic in subscribe:
                sock.setsockopt(zmq.SUBSCRIBE, topic)
        if bind:
            sock.bind(endpoint)
        else:
            sock.connect(endpoint)
    except BaseException:
        sock.close(linger=0)
        raise
    return sock


def _apply_curve(sock: Socket, keys: CurveKeys, *, server: bool) -> None:
    if server:
        if keys.server_secret is None:
            raise ValueError("binding a CURVE socket needs the server secret key")
        sock.curve_secretkey = keys.server_secret
        sock.curve_publickey = keys.server_public
        sock.curve_server = True
    else:
        if keys.client_public is None or keys.client_secret is None:
            raise ValueError("connecting a CURVE socket needs a client key pair")
        sock.curve_secretkey = keys.client_secret
        sock.curve_publickey = keys.client_public
        sock.curve_serverkey = keys.server_public


@dataclass(slots=True)
class RejectCounts:
    """Rejected incoming messages by `ProtocolError.code`."""

    by_code: dict[str, int] = field(default_factory=dict)

    def record(self, err: ProtocolError) -> None:
        self.by_code[err.code] = self.by_code.get(err.code, 0) + 1

    @property
    def total(self) -> int:
        return sum(self.by_code.values())


# ---------------------------------------------------------------- send / receive


def send(sock: Socket, msg: Message, flags: int = 0) -> None:
    sock.send_multipart(encode(msg), flags, copy=False)


def send_routed(sock: Socket, identity: bytes, msg: Message, flags: int = 0) -> None:
    sock.send_multipart([identity, *encode(msg)], flags, copy=False)


def _decode_counted(frames: Sequence[Any], rejects: RejectCounts | None, limit: int,
                    peer: bytes | None = None) -> Message:
    try:
        return decode(frames, max_message_bytes=limit)
    except ProtocolError as e:
        e.peer = peer
        if rejects is not None:
            rejects.record(e)
        raise


def _decode_routed(frames: Sequence[Any], rejects: RejectCounts | None, limit: int
                   ) -> tuple[bytes, Message]:
    if len(frames) < 2:
        err = MalformedFrame("routed message without identity and header frames")
        if rejects is not None:
            rejects.record(err)
        raise err
    identity = frames[0].bytes
    return identity, _decode_counted(frames[1:], rejects, limit, identity)


def recv(sock: Socket, flags: int = 0, *, rejects: RejectCounts | None = None,
         max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> Message:
    frames = sock.recv_multipart(flags, copy=False)
    return _decode_counted(frames, rejects, max_message_bytes)


def recv_routed(sock: Socket, flags: int = 0, *, rejects: RejectCounts | None = None,
                max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> tuple[bytes, Message]:
    frames = sock.recv_multipart(flags, copy=False)
    return _decode_routed(frames, rejects, max_message_bytes)


async def send_async(sock: zmq.asyncio.Socket, msg: Message) -> None:
    await sock.send_multipart(encode(msg), copy=False)


async def send_routed_async(sock: zmq.asyncio.Socket, identity: bytes, msg: Message) -> None:
    await sock.send_multipart([identity, *encode(msg)], copy=False)


async def recv_async(sock: zmq.asyncio.Socket, *, rejects: RejectCounts | None = None,
                     max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> Message:
    frames = await sock.recv_multipart(copy=False)
    return _decode_counted(frames, rejects, max_message_bytes)


async def recv_routed_async(sock: zmq.asyncio.Socket, *, rejects: RejectCounts | None = None,
                            max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
                            ) -> tuple[bytes, Message]:
    frames = await sock.recv_multipart(copy=False)
    return _decode_routed(frames, rejects, max_message_bytes)
