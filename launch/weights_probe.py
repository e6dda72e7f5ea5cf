"""An actor's weight-receiving side without an engine, for tests/test_weights_broadcast.py and
bench/weights_scale.py: the weights socket, the ZeroMQ receiver and the broadcast member, as
the actor's I/O loop drives them, recording each complete version as it arrives.

    python -m launch.weights_probe ENDPOINT NAME OUT_JSONL [--no-broadcast]

Writes one JSON line per version received:
{"version", "at" (wall clock), "via" ("broadcast" | "zmq"), "crc"} (CRC-32C over the tensors
in order), flushed at once.
"""

from __future__ import annotations

import json
import queue
import sys
import time

import torch
import zmq
from crc32c import crc32c

from protocol.broadcast import BroadcastMember
from protocol.messages import WeightBroadcast, WeightGroupJoin
from protocol.sockets import SocketOptions, open_socket, recv, send
from protocol.weights import WeightReceiver


def tensors_crc(named) -> int:
    crc = 0
    for _, t in named:
        crc = crc32c(t.contiguous().view(torch.uint8).numpy(), crc)
    return crc


def main() -> int:
    endpoint, name, out_path = sys.argv[1:4]
    use_broadcast = "--no-broadcast" not in sys.argv
    ctx = zmq.Context()
    sock = open_socket(ctx, zmq.DEALER, endpoint, bind=False,
                       options=SocketOptions(rcvtimeo_ms=20))
    receiver = WeightReceiver(name)
    delivered: queue.Queue = queue.Queue()
    host, port = endpoint.removeprefix("tcp://").rsplit(":", 1)
    member = BroadcastMember(receiver, delivered, host, int(port)) if use_broadcast else None
    send(sock, receiver.hello())
    if member is not None:
        send(sock, member.offer())
    out = open(out_path, "a")
    while True:
        try:
            msg = recv(sock)
        except zmq.Again:
            msg = None
        if isinstance(msg, WeightGroupJoin | WeightBroadcast):
            assert member is not None
            member.submit(msg)
        elif msg is not None:
            acks, done = receiver.handle(msg)
            for a in acks:
                send(sock, a)
            if done is not None:
                delivered.put(done + ("zmq",))
        while member is not None and not member.outbox.empty():
            send(sock, member.outbox.get())
        while not delivered.empty():
            item = delivered.get()
            version, named, blob = item[:3]
            via = item[3] if len(item) > 3 else "broadcast"
            out.write(json.dumps({"version": version, "at": time.time(), "via": via,
                                  "crc": tensors_crc(named)}) + "\n")
            out.flush()
            receiver.pool.give_back(blob)


if __name__ == "__main__":
    sys.exit(main())
