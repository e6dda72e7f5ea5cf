"""The cluster path rehearsed across "hosts" on this machine: launch/cluster.sh starts the
learner (`dynamo-rl learner-node`) and the allocator in one network namespace and a vLLM CPU
actor in each of two others (--remote-cmd: `ip netns exec`), the hosts joined by a bridge with
rate-limited links (launch/netns.py). As on a cluster node, inside each namespace this
machine's host name resolves to the namespace's own address (a private /etc/hosts), so a
listener nobody pinned would land on the cluster interface. Only the namespaces' addresses
are used; everything is deleted at the end. Skipped where namespaces cannot be made (not
root, no iproute2)."""

from __future__ import annotations

import json
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest
from listening import role as process_role
from test_cluster_launch import CONFIG, launch

from launch.config import load_config
from launch.harness import listeners
from launch.netns import Hosts, available
from telemetry.merge import read_traces

WHY = available()


def _cmdline(pid: str) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:200]
    except OSError:
        return pid


def _on_host_script(tmp_path: Path, hosts: Hosts) -> Path:
    """--remote-cmd: `SCRIPT HOST 'COMMAND'` runs COMMAND in namespace HOST, with this
    machine's host name resolving to HOST's address there."""
    for ns, addr in zip(hosts.names, hosts.addrs, strict=True):
        (tmp_path / f"hosts-{ns}").write_text(
            f"127.0.0.1 localhost\n{addr} {socket.gethostname()}\n")
    script = tmp_path / "on-host"
    script.write_text(f"""#!/bin/bash
exec ip netns exec "$1" unshare --mount bash -c \\
    'mount --bind "$1" /etc/hosts && exec bash -c "$2"' _ "{tmp_path}/hosts-$1" "$2"
""")
    script.chmod(0o755)
    return script


class _ListenerLog(threading.Thread):
    """Every (role, address, port) listened on in each namespace while the run lasts."""

    def __init__(self, names: list[str]) -> None:
        super().__init__(daemon=True)
        self.names, self.seen = names, {ns: set() for ns in names}
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.5):
            for ns in self.names:
                pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True,
                                      text=True).stdout.split()
                for pid in pids:
                    try:
                        role = process_role(int(pid))
                        ports = listeners(int(pid))
                    except (OSError, ValueError):  # exited meanwhile
                        continue
                    if role != "gone":
                        self.seen[ns].update((role, a, p) for a, p in ports)


def _cluster_run(model: Path, tmp_path: Path, hosts: Hosts,
                 *layout: str) -> tuple[Path, _ListenerLog]:
    """`cluster.sh` across the namespaces (one learner node first, then `layout`) for 5
    steps of 16 prompts, its listeners logged meanwhile; asserts it ended well."""
    hostfile = tmp_path / "hosts"
    hostfile.write_text("".join(f"{ns} slots=1 addr={a}\n"
                                for ns, a in zip(hosts.names, hosts.addrs, strict=True)))
    run_dir = tmp_path / "run"
    sampler = _ListenerLog(list(hosts.names))
    sampler.start()
    r = launch("--hostfile", str(hostfile), "--config", str(CONFIG),
               "--remote-cmd", str(_on_host_script(tmp_path, hosts)), "--shared-run-dir",
               "--learner-nodes", "1", *layout,
               "--run-dir", str(run_dir), "--model.path", str(model),
               "--learner.total_steps", "5", "--learner.eval_every", "0",
               "--learner.prompts_per_step", "16", "--allocator.batch_prompts", "16",
               timeout=600)
    sampler.done.set()
    sampler.join()
    logs = {p.name: p.read_text(errors="replace")[-3000:] for p in (run_dir / "logs").glob("*")}
    assert r.returncode == 0, (r.stderr, logs)
    return run_dir, sampler


pytestmark = pytest.mark.skipif(WHY is not None, reason=f"network namespaces: {WHY}")


@pytest.mark.parametrize("backend", [
    "broadcast",
    pytest.param("zmq", marks=pytest.mark.slow),  # the path every other test already takes
])
def test_cluster_run_across_three_namespaces_trains(tiny_model, tmp_path, backend):
    with Hosts(3, rate="1gbit", subnet=78) as hosts:
        t0 = time.monotonic()
        ns_addrs = list(zip(hosts.names, hosts.addrs, strict=True))
        run_dir, sampler = _cluster_run(tiny_model, tmp_path, hosts, "--actor-nodes", "2",
                                        "--weights-backend", backend)
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
    # Listeners: each on the host's own address or on loopback, never on all interfaces. The
    # head's own address carries exactly the documented ports (the services, the learner's
    # rendezvous, process-group links); each actor host's carries only its broadcast-group
    # link, its engine's internal process groups stay on loopback.
    net = load_config(CONFIG).network
    for i, (ns, addr) in enumerate(ns_addrs):
        seen = sampler.seen[ns]
        assert seen and all(a in (addr, "127.0.0.1") for _, a, _ in seen), (ns, seen)
        outside = {(role, port) for role, a, port in seen if a == addr}
        if i == 0:
            assert {r for r, _ in outside} <= {"allocator", "learner"}, outside
            assert {("allocator", net.allocator_port)} == {x for x in outside
                                                           if x[0] == "allocator"}
            ports = {p for r, p in outside if r == "learner"}
            assert {net.rollout_port, net.weights_port, 29500} <= ports, outside
            if backend == "broadcast":
                assert net.weights_group_port in ports, outside
        else:
            assert {r for r, _ in outside} <= {"actor"}, outside
            assert len(outside) <= (2 if backend == "broadcast" else 0), outside
            assert len([a for role, a, _ in seen if role == "actor" and a == "127.0.0.1"]) >= 5
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


def test_cluster_run_with_a_colocated_node_beside_an_actor_node_trains(tiny_model, tmp_path):
    """`cluster.sh --colocated` for real: one "node" runs the allocator, the learner and an
    actor that takes turns with it (placement = colocated), a second node an actor alone.
    The run trains across the bridge; the traces show no actor generating while the learner
    trains (colocated phases are synchronous), and both actors' groups reach the learner."""
    with Hosts(2, rate="1gbit", subnet=79) as hosts:
        names = list(hosts.names)
        run_dir, sampler = _cluster_run(tiny_model, tmp_path, hosts, "--actor-nodes", "1",
                                        "--colocated")
    # an actor on the learner's node, another on its own (read from the kernel's listeners)
    roles = {ns: {role for role, _, _ in sampler.seen[ns]} for ns in names}
    assert {"learner", "allocator", "actor"} <= roles[names[0]], roles
    assert roles[names[1]] == {"actor"}, roles
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [x for x in recs if x["step"] > 0]
    assert [x["step"] for x in steps] == [1, 2, 3, 4, 5]
    assert all(x["staleness/max"] == 0 for x in steps), steps
    for i in (0, 1):
        last = json.loads((run_dir / f"metrics_actor{i}.jsonl").read_text().splitlines()[-1])
        assert last.get("groups_sent", 0) > 0, (i, last)
    procs = read_traces(run_dir)
    gen = [(sp["start_ns"], sp["end_ns"]) for p in procs if p.role == "actor"
           for sp in p.spans if sp["name"] == "generate"]
    train = [(sp["start_ns"], sp["end_ns"]) for p in procs if p.role == "learner"
             for sp in p.spans if sp["name"] == "train_step"]
    assert gen and len(train) == 5
    assert not [(g, t) for g in gen for t in train if g[0] < t[1] and t[0] < g[1]]
