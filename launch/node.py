"""`dynamo-rl learner-node`: the learner ranks of one node of a cluster run (launch/cluster.sh).

What torchrun did for us, without its agent: torchrun's rendezvous store listens on every
interface, ours (learner rank 0's, learner/trainer.py: init_distributed) on MASTER_ADDR only.
Each rank is a child with RANK, LOCAL_RANK, WORLD_SIZE and MASTER_ADDR/PORT set. SIGTERM and
SIGINT are passed to every rank (each writes its part of the final checkpoint); when one rank
fails, the others are stopped and its exit status is returned.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from launch.harness import _pdeathsig


def run_learner_node(config_args: list[str], *, ranks_here: int, first_rank: int, world: int,
                     master: str, grace_s: float = 120.0) -> int:
    addr, _, port = master.rpartition(":")
    if not addr or not port.isdigit():
        raise SystemExit(f"--master: expected ADDRESS:PORT, got {master!r}")
    if not 0 <= first_rank < first_rank + ranks_here <= world:
        raise SystemExit(f"ranks {first_rank}..{first_rank + ranks_here - 1} do not fit a world "
                         f"of {world}")
    procs = []
    for local in range(ranks_here):
        env = {**os.environ, "RANK": str(first_rank + local), "LOCAL_RANK": str(local),
               "LOCAL_WORLD_SIZE": str(ranks_here), "WORLD_SIZE": str(world),
               "MASTER_ADDR": addr, "MASTER_PORT": port}
        procs.append(subprocess.Popen([sys.executable, "-m", "launch.cli", "learner",
                                       *config_args], env=env, preexec_fn=_pdeathsig))
    stop = {"signal": None}

    def forward(signum, _frame) -> None:
        stop["signal"] = signum
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    for s in (signal.SIGTERM, signal.SIGINT):
        signal.signal(s, forward)
    while True:
        codes = [p.poll() for p in procs]
        failed = [c for c in codes if c not in (None, 0)]
        if failed and stop["signal"] is None:
            print(f"[learner-node] a rank exited with status {failed[0]}; stopping the others",
                  file=sys.stderr, flush=True)
            forward(signal.SIGTERM, None)
        if all(c is not None for c in codes):
            return next((c for c in codes if c != 0), 0)
        if stop["signal"] is not None and time.monotonic() > stop.setdefault(
                "deadline", time.monotonic() + grace_s):
            for p in procs:
                p.kill()
        time.sleep(0.2)
