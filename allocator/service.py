"""The allocator service: one asyncio (uvloop) process serving a ROUTER socket.

It owns the problem set and the Ledger (rounds, leases, statistics). Nothing malformed
reaches the Ledger: the codec rejects it, the rejection is logged and counted by error code,
and the service goes on. With CURVE, each message is taken only from the role allowed to send
it (the key its connection authenticated with, protocol/auth.py): work requests, stats reports
and actor heartbeats from actor keys, learner progress from the learner's key; anything else
is refused and counted (`refused_role_<Type>`). Each grant carries the allocator's MAC, which
the learner checks. State is snapshotted atomically to the run directory and restored on
restart, so a restarted allocator continues the same epoch with the same statistics; a
snapshot is also written whenever a round is formed, before any of its grants is sent, so
every grant id an actor may hold is in the ledger a restart restores.

A work request the pacing window turns down is parked: its grants are pushed the moment work
can be issued (the learner took a batch, an actor reported, a grant was re-queued), not when
the actor polls again, so a batch's hand-over costs one message, not a poll interval.

It records spans of its work (allocate: a request that formed a new round; grant: one served
from the current round; expire; snapshot) and, for every heartbeat, a clock sample
`receive wall time - sent_at` per sender, from which the trace merger estimates each
process's clock offset relative to this one (telemetry/merge.py).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import pickle
import signal
import time
from pathlib import Path

import zmq
import zmq.asyncio

from allocator.config import AllocatorConfig
from allocator.ledger import Ledger
from protocol.auth import RunKeys, grant_mac, sender_key
from protocol.codec import decode, encode
from protocol.errors import ProtocolError
from protocol.handshakes import HandshakeWatch
from protocol.idset import IdSet
from protocol.messages import (
    Error,
    Heartbeat,
    LearnerProgress,
    NoWork,
    StatsReport,
    WorkRequest,
)
from protocol.sockets import SocketOptions, open_socket, start_authenticator
from tasks.problems import Problem
from telemetry.spans import event, now_ns, open_trace, record, span

log = logging.getLogger("dynamo.allocator")
SNAPSHOT = "allocator_state.pkl"


def write_snapshot(ledger: Ledger, run_dir: Path) -> Path:
    """Atomic: write to a temporary file, fsync, rename over the previous snapshot."""
    path = run_dir / SNAPSHOT
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    with tmp.open("wb") as f:
        pickle.dump(ledger.state_dict(), f, protocol=pickle.HIGHEST_PROTOCOL)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)
    status = run_dir / f"allocator_status.json.tmp{os.getpid()}"  # replaced atomically:
    status.write_text(json.dumps({
        "time": time.time(), "epoch": ledger.epoch, "round": ledger.round,
        "learner_version": ledger.learner_version, "issued_groups": ledger.issued_groups,
        "completed_groups": ledger.completed_groups, "received_groups": ledger.received_groups,
        "consumed_groups": ledger.consumed_groups, "outstanding": ledger.outstanding(),
        "queue": len(ledger.queue), "stats": ledger.stats.describe(),
        "counters": dict(ledger.counters)}, indent=1))
    status.replace(run_dir / "allocator_status.json")  # readers never see a partial file
    return path


def read_snapshot(run_dir: Path) -> dict | None:
    path = run_dir / SNAPSHOT
    if not path.is_file():
        return None
    with path.open("rb") as f:
        return pickle.load(f)


PARKED_RETRY_S = 1.0  # a parked actor asks again this often (NoWork.retry_after_s)
PARKED_FOR_S = 3 * PARKED_RETRY_S  # a parked request not renewed by then is dropped


class AllocatorService:
    def __init__(self, problems: list[Problem], cfg: AllocatorConfig, *, rule: str,
                 verifier: str, prompts_per_step: int, max_staleness: int, endpoint: str,
                 updates_per_batch: int = 1,
                 run_dir: Path, keys: RunKeys | None = None) -> None:
        self.cfg = cfg
        self.endpoint = endpoint
        self.run_dir = Path(run_dir)
        self.keys = keys  # None: no CURVE, no roles, grants unsigned
        secret = keys.grant_secret if keys is not None else None
        self.mac = (lambda *grant: grant_mac(secret, *grant)) if secret else None
        self.ledger = Ledger(problems, cfg, rule=rule, verifier=verifier,
                             prompts_per_step=prompts_per_step, max_staleness=max_staleness,
                             updates_per_batch=updates_per_batch)
        state = read_snapshot(self.run_dir)
        if state is not None:
            self.ledger.load_state_dict(state, time.monotonic())
            log.info("restored snapshot: epoch %d round %d, %d grants outstanding",
                     self.ledger.epoch, self.ledger.round, len(self.ledger.grants))
        self.stop = asyncio.Event()
        # ident -> (actor id, grants still wanted, when asked): requests the pacing window
        # turned down, answered as soon as work can be issued (`_serve_parked`)
        self.parked: dict[bytes, tuple[str, int, float]] = {}
        self.auth = None
        self.handshakes: HandshakeWatch | None = None

    async def _handle(self, sock: zmq.asyncio.Socket, frames: list[zmq.Frame]) -> None:
        ident, body = frames[0].bytes, frames[1:]
        ledger = self.ledger
        try:
            msg = decode(body)
        except ProtocolError as e:
            ledger.counters[f"rejected_{e.code}"] += 1
            log.warning("rejected message from %r: %s", ident[:32], e)
            await self._send(sock, ident, Error.from_exception(e))
            return
        now = time.monotonic()
        if not self._allowed(msg, body[0]):
            ledger.counters[f"refused_role_{type(msg).__name__}"] += 1
            log.warning("refused a %s from %r: not this role's key", type(msg).__name__,
                        ident[:32])
            return
        if isinstance(msg, WorkRequest):
            self.parked.pop(ident, None)
            reply = await self._grant(sock, ident, msg.actor_id, msg.want, now)
            if isinstance(reply, NoWork):
                # Parked: the grants go out the moment the window opens (a learner's take,
                # a report, a re-queue), not at the actor's next poll; the NoWork tells it
                # to ask again only after PARKED_RETRY_S (a backstop, and its sign of life).
                self.parked[ident] = (msg.actor_id, msg.want, now)
                await self._send(sock, ident, NoWork(retry_after_s=PARKED_RETRY_S,
                                                     reason=reply.reason))
        elif isinstance(msg, StatsReport):
            status = ledger.report(msg, now)
            if status != "accepted":
                log.info("ignored %s report for grant %d (lease %d) from %s", status,
                         msg.grant_id, msg.lease_id, msg.actor_id)
            else:
                await self._serve_parked(sock)
        elif isinstance(msg, Heartbeat):
            # NTP-style: receive - send = one-way delay + (our clock - sender's clock).
            event("clock_sample", sender=msg.sender,
                  delta_ns=time.time_ns() - round(msg.sent_at * 1e9))
            if msg.role == "actor":  # a learner's heartbeat is a clock sample only: as a
                # live "actor" it would halve every actor's fair share of the window
                ledger.heartbeat(msg.sender, list(msg.in_flight), now)
        elif isinstance(msg, LearnerProgress):
            try:
                resumed = IdSet.from_ranges(zip(msg.resumed[::2], msg.resumed[1::2],
                                                strict=True))
            except ValueError:  # odd length, unsorted or overlapping ranges
                status = ledger._refuse("malformed_resumed")
            else:
                status = ledger.progress(msg.version, msg.consumed_groups, msg.session,
                                         resumed)
            if status not in ("accepted", "restart"):
                # its receipts too: a session the ledger has not settled must not add to the
                # ids a later settlement counts as the old session's (their grants are
                # re-issued, and the learner acknowledges the duplicate again)
                log.warning("refused learner progress (%s): version %d, consumed %d; %d "
                            "receipts ignored", status, msg.version, msg.consumed_groups,
                            len(msg.received))
                ledger.counters["receipts_ignored"] += len(msg.received)
            else:
                ledger.receipts(list(msg.received))
                ledger.refused(list(zip(msg.refused[::2], msg.refused[1::2], strict=False)))
                await self._serve_parked(sock)
        else:
            ledger.counters["rejected_unexpected_type"] += 1
            log.warning("unexpected %s from %r", type(msg).__name__, ident[:32])

    async def _grant(self, sock: zmq.asyncio.Socket, ident: bytes, actor_id: str, want: int,
                     now: float, parked: bool = False) -> list | NoWork:
        """Grants for one request, sent; a NoWork is returned, not sent."""
        ledger = self.ledger
        t, rnd = now_ns(), ledger.round
        reply = ledger.request(actor_id, want, now, mac=self.mac, parked=parked)
        if ledger.round != rnd:  # the new round's ids are durable before any is sent
            write_snapshot(ledger, self.run_dir)
        granted = 0 if isinstance(reply, NoWork) else len(reply)
        if granted or not parked:
            record("allocate" if ledger.round != rnd else "grant", t, now_ns(),
                   round=ledger.round, granted=granted, parked=parked)
        if isinstance(reply, NoWork):
            return reply
        unsent = [(m.grant_id, m.lease_id) for m in reply
                  if not await self._send(sock, ident, m)]
        if unsent:  # the actor is gone: its grants must not wait out a lease
            ledger.refused(unsent, why="unsent")
            self.parked.pop(ident, None)
        return reply

    async def _serve_parked(self, sock: zmq.asyncio.Socket) -> None:
        """Answer parked requests, oldest first, with whatever work can be issued now; a
        request is forgotten once served in full or after PARKED_FOR_S (its actor asks again
        every PARKED_RETRY_S while alive)."""
        now = time.monotonic()
        for ident, (actor_id, want, since) in list(self.parked.items()):
            if now - since > PARKED_FOR_S:
                del self.parked[ident]
                continue
            reply = await self._grant(sock, ident, actor_id, want, now, parked=True)
            if isinstance(reply, NoWork) or ident not in self.parked:  # none, or unsent
                continue
            self.ledger.counters["grants_pushed"] += len(reply)
            if want - len(reply) > 0:
                self.parked[ident] = (actor_id, want - len(reply), since)
            else:
                del self.parked[ident]

    def _allowed(self, msg, frame) -> bool:
        """Whether the key this message came with may send it (always, without CURVE)."""
        if self.keys is None:
            return True
        role = self.keys.role_of(sender_key(frame))
        if isinstance(msg, WorkRequest | StatsReport):
            return role == "actor"
        if isinstance(msg, LearnerProgress):
            return role == "learner"
        if isinstance(msg, Heartbeat):
            return role == msg.role
        return True  # unexpected types are counted as such

    async def _send(self, sock: zmq.asyncio.Socket, ident: bytes, msg) -> bool:
        # A vanished peer (ROUTER_MANDATORY) must not stop the service; a grant that could
        # not be sent is re-queued by the caller.
        try:
            await sock.send_multipart([ident, *encode(msg)], flags=zmq.NOBLOCK, copy=False)
            return True
        except zmq.ZMQError as e:
            self.ledger.counters["send_failed"] += 1
            log.warning("send to %r failed: %s", ident[:32], e)
            return False

    async def _housekeeping(self, sock: zmq.asyncio.Socket) -> None:
        last_snap = time.monotonic()
        while not self.stop.is_set():
            await asyncio.sleep(0.25)
            with span("expire"):
                n = self.ledger.expire(time.monotonic())
            if n:
                log.warning("%d grants re-queued (leases expired, or held by an actor silent "
                            "for %.0f s)", n, self.cfg.actor_silence_s)
            await self._serve_parked(sock)  # also: a dead actor's fair share freed
            if self.auth is not None:  # CURVE handshakes refused by the allow-list
                self.ledger.counters["refused_unauthenticated"] = self.auth.allow_list.refused
            if self.handshakes is not None:  # every refused handshake, by kind
                self.ledger.counters.update(self.handshakes.flat())
            if time.monotonic() - last_snap >= self.cfg.snapshot_every_s:
                with span("snapshot"):
                    write_snapshot(self.ledger, self.run_dir)
                last_snap = time.monotonic()

    async def serve(self) -> None:
        open_trace(self.run_dir, "allocator", "allocator")
        ctx = zmq.asyncio.Context()
        auth = None
        if self.keys is not None:
            auth = start_authenticator(ctx, {self.keys.learner, *self.keys.actors})
        self.auth = auth
        sock = open_socket(ctx, zmq.ROUTER, self.endpoint, bind=True,
                           keys=self.keys.serve() if self.keys is not None else None,
                           options=SocketOptions(sndhwm=10000, rcvhwm=10000))
        self.handshakes = None
        if self.keys is not None:
            self.handshakes = HandshakeWatch(ctx)
            self.handshakes.watch(sock, "allocator")
        log.info("allocator serving %s (%d problems)", self.endpoint, len(self.ledger.problems))
        house = asyncio.create_task(self._housekeeping(sock))
        try:
            while not self.stop.is_set():
                if await sock.poll(200) & zmq.POLLIN:
                    frames = await sock.recv_multipart(copy=False)
                    await self._handle(sock, frames)
        finally:
            house.cancel()
            write_snapshot(self.ledger, self.run_dir)
            sock.close(linger=0)
            if self.handshakes is not None:
                self.handshakes.close()
            if auth is not None:
                auth.stop()
            ctx.term()


def run_allocator(service: AllocatorService) -> None:
    """Run until SIGTERM/SIGINT, on uvloop."""
    import uvloop

    async def main() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, service.stop.set)
        await service.serve()

    uvloop.run(main())
