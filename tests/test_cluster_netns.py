"""The cluster path rehearsed across "hosts" on this machine: launch/cluster.sh starts the
learner (torchrun) and the allocator in one network namespace and a vLLM CPU actor in each of
two others (--remote-cmd "ip netns exec"), the hosts joined by a bridge with rate-limited
links (launch/netns.py). Only the namespaces' addresses are used; everything is deleted at
the end. Skipped where namespaces cannot be made (not root, no iproute2)."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest
from test_cluster_launch import CONFIG, launch

from launch.netns import Hosts, available

WHY = available()


def _cmdline(pid: str) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:200]
    except OSError:
        return pid
pytestmark = pytest.mark.skipif(WHY is not None, reason=f"network namespaces: {WHY}")


@pytest.mark.parametrize("backend", [
    "broadcast",
    pytest.param("zmq", marks=pytest.mark.slow),  # the path every other test already takes
])
def test_cluster_run_across_three_namespaces_trains(tiny_model, tmp_path, backend):
    with Hosts(3, rate="1gbit", subnet=78) as hosts:
        hostfile = tmp_path / "hosts"
        hostfile.write_text("".join(f"{ns} slots=1 addr={a}\n"
                                    for ns, a in zip(hosts.names, hosts.addrs, strict=True)))
        run_dir = tmp_path / "run"
        t0 = time.monotonic()
        r = launch("--hostfile", str(hostfile), "--config", str(CONFIG),
                   "--remote-cmd", "ip netns exec {host} bash -c", "--shared-run-dir",
                   "--learner-nodes", "1", "--actor-nodes", "2", "--weights-backend", backend,
                   "--run-dir", str(run_dir), "--model.path", str(tiny_model),
                   "--learner.total_steps", "5", "--learner.eval_every", "0",
                   "--learner.prompts_per_step", "16", "--allocator.batch_prompts", "16",
                   timeout=600)
        logs = {p.name: p.read_text(errors="replace")[-3000:]
                for p in (run_dir / "logs").glob("*")}
        assert r.returncode == 0, (r.stderr, logs)
        # every namespace's processes are gone with the launcher (stopping takes a moment)
        def left() -> dict[str, list[str]]:
            out = {}
            for ns in hosts.names:
                pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True,
                                      text=True).stdout.split()
                if pids:
                    out[ns] = [_cmdline(p) for p in pids]
            return out

        deadline = time.monotonic() + 20
        while left() and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not left(), left()
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in recs] == [1, 2, 3, 4, 5]
    # both actors generated (their groups reached the learner across the bridge)
    actors = {json.loads(x)["actor"] for i in (0, 1)
              for x in (run_dir / f"metrics_actor{i}.jsonl").read_text().splitlines()
              if json.loads(x).get("groups_sent", 0) > 0}
    assert len(actors) == 2, actors
    actor_logs = [(run_dir / "logs" / f"actor{i}.log").read_text() for i in (0, 1)]
    learner_log = (run_dir / "logs" / "learner-node0.log").read_text()
    if backend == "broadcast":
        assert "weight broadcast group" in learner_log
        assert all("by broadcast" in log for log in actor_logs)
    else:
        assert all("by broadcast" not in log for log in actor_logs)
    print(f"{backend}: {time.monotonic() - t0:.0f}s")
