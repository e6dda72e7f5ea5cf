"""Who may say what: one CURVE key pair per role, the sender's role, the grant MAC.

A run's key directory (RUN_DIR/keys, owner-only) holds `allocator.key`, `learner.key` and one
`actor*.key` per actor host (`actor` on one machine), each with its `.key_secret`, and
`grant.secret`, an HMAC key shared by the allocator and the learner alone.

Guarantees:
- A process loads only its own role's secret key (and `grant.secret` for the allocator and
  the learner); every other role is known by its public key. A host given only its own
  role's secrets (launch/cluster.sh copies no others) cannot speak as another role.
- A message's role is that of the key its connection authenticated with (ZeroMQ reports the
  CURVE client key as the message's User-Id), never a field the sender wrote. `role_of`
  maps a User-Id to "learner", "actor" or None (unknown, or no CURVE).
- `grant_mac` is HMAC-SHA256 over (grant_id, lease_id, problem_id, n), length-prefixed so no
  two tuples share an input, truncated to 128 bits. The allocator puts it in each WorkGrant,
  the actor echoes it in the RolloutGroup, the learner recomputes it: without grant.secret
  nobody can make the learner accept a group for a grant the allocator never issued, or for
  another lease, problem or sample count.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from zmq.auth.certs import load_certificate

from protocol.sockets import CurveKeys, generate_keys

GRANT_SECRET = "grant.secret"
MAC_HEX = 32  # characters of the hex digest carried on the wire (128 bits)
ROLES = ("allocator", "learner", "actor")


def grant_mac(secret: bytes, grant_id: int, lease_id: int, problem_id: str, n: int) -> str:
    pid = problem_id.encode()
    msg = f"{grant_id}:{lease_id}:{n}:{len(pid)}:".encode() + pid
    return hmac.new(secret, msg, hashlib.sha256).hexdigest()[:MAC_HEX]


def mac_ok(secret: bytes, mac: str, grant_id: int, lease_id: int, problem_id: str,
           n: int) -> bool:
    return hmac.compare_digest(mac, grant_mac(secret, grant_id, lease_id, problem_id, n))


def generate_run_keys(key_dir: str | os.PathLike[str], actors: Iterable[str] = ("actor",)
                      ) -> None:
    """Create whatever of the run's keys is missing (never overwrites one)."""
    d = Path(key_dir)
    names = ["allocator", "learner", *actors]
    missing = [n for n in names if not (d / f"{n}.key_secret").is_file()]
    if missing:
        generate_keys(d, missing)
    if not (d / GRANT_SECRET).is_file():
        fd = os.open(d / GRANT_SECRET, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32) + "\n")


def sender_key(frame) -> str | None:
    """The z85 CURVE key a received message's connection authenticated with (None without
    CURVE)."""
    try:
        return frame.get("User-Id") or None
    except Exception:  # no such property: the socket has no ZAP handler
        return None


@dataclass(frozen=True, slots=True)
class RunKeys:
    """This process's key pair and every role's public key (z85 bytes)."""

    role: str
    public: bytes
    secret: bytes
    allocator: bytes
    learner: bytes
    actors: frozenset[bytes]
    grant_secret: bytes | None = None

    @classmethod
    def load(cls, key_dir: str | os.PathLike[str], role: str, name: str | None = None
             ) -> RunKeys:
        """Keys of `role` (its pair is `name`, default the role) from a run's key directory."""
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {role!r}")
        d = Path(key_dir)
        public, secret = load_certificate(d / f"{name or role}.key_secret")
        if secret is None:
            raise ValueError(f"{d / (name or role)}.key_secret holds no secret key")
        actors = frozenset(load_certificate(p)[0] for p in d.glob("actor*.key"))
        grant = None
        if role != "actor":  # actors never read the grant secret
            grant = bytes.fromhex((d / GRANT_SECRET).read_text().strip())
        return cls(role, public, secret, load_certificate(d / "allocator.key")[0],
                   load_certificate(d / "learner.key")[0], actors, grant)

    def serve(self) -> CurveKeys:
        """Keys for binding a CURVE server socket as this role."""
        return CurveKeys(server_public=self.public, server_secret=self.secret)

    def connect(self, server_public: bytes) -> CurveKeys:
        """Keys for connecting to the server whose public key is `server_public`."""
        return CurveKeys(server_public=server_public, client_public=self.public,
                         client_secret=self.secret)

    def role_of(self, user_id: str | None) -> str | None:
        if user_id is None:
            return None
        key = user_id.encode()
        if key == self.learner:
            return "learner"
        if key in self.actors:
            return "actor"
        return None
