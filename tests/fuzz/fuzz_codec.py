"""Coverage-guided fuzzing of the wire codec with atheris (libFuzzer).

Run for a bounded time:
    .venv/bin/python tests/fuzz/fuzz_codec.py -max_total_time=60 [CORPUS_DIR]
An input is a msgpack list of byte strings (the ZeroMQ frames; anything else is one raw
frame). `--seed-corpus DIR` writes valid encodings of every message type into DIR first, so
mutations start next to real messages and reach the validation code. `decode` must either
return a validated message or raise a ProtocolError; any other exception is a finding.
"""

from __future__ import annotations

import sys
from pathlib import Path

import atheris
import msgpack

with atheris.instrument_imports():
    from protocol.codec import decode, encode
    from protocol.errors import ProtocolError


def frames_of(data: bytes) -> list[bytes]:
    try:
        obj = msgpack.unpackb(data, max_bin_len=1 << 20, max_array_len=16)
    except Exception:
        return [data]
    if isinstance(obj, list) and obj and all(isinstance(f, bytes) for f in obj):
        return obj
    return [data]


def test_one_input(data: bytes) -> None:
    try:
        decode(frames_of(data), max_message_bytes=1 << 20)
    except ProtocolError:
        pass


def seed_corpus(out: Path) -> None:
    import numpy as np

    from protocol import messages as m

    out.mkdir(parents=True, exist_ok=True)
    samples = [
        m.WorkRequest(actor_id="a", want=2, policy_version=1),
        m.WorkGrant(grant_id=1, lease_id=2, problem_id="p", prompt="1+2=", answer="3",
                    verifier="integer", n=4, lease_s=10.0, issued_version=0),
        m.NoWork(retry_after_s=0.1, reason="x"),
        m.StatsReport(grant_id=1, lease_id=2, problem_id="p", actor_id="a", k=1, n=4),
        m.Heartbeat(sender="a", role="actor", sent_at=1.0, policy_version=0, in_flight=[1]),
        m.LearnerProgress(version=1, consumed_groups=2, consumed_samples=8, dropped_stale=0),
        m.Error(code="x", message="y", ref=0),
        m.WeightAck(actor_id="a", version=1, next_index=0),
        m.WeightChunk(version=1, index=0, data=b"abcd", crc32c=0),
        m.RolloutGroup(grant_id=1, lease_id=1, problem_id="p", actor_id="a",
                       prompt_token_ids=np.array([4, 5], np.int32),
                       completion_token_ids=np.array([6, 1, 7], np.int32),
                       completion_lengths=np.array([2, 1], np.int32),
                       behaviour_logprobs=np.array([-0.1, -0.2, -0.3], np.float32),
                       token_versions=np.array([0, 0, 0], np.int32),
                       rewards=np.array([1.0, 0.0], np.float32),
                       finished=np.array([True, False]), gen_seconds=0.1),
    ]
    for i, msg in enumerate(samples):
        (out / f"seed{i}").write_bytes(msgpack.packb([bytes(f) for f in encode(msg)]))


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--seed-corpus":
        seed_corpus(Path(sys.argv[2]))
        del sys.argv[1:3]
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
