"""launch/cluster.sh: role placement and commands (dry runs under a fake Slurm and a host
file), start-up validation, stopping everything it started, and one real single-host run."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, free_ports, wait_for

SCRIPT = REPO / "launch" / "cluster.sh"
CONFIG = REPO / "configs" / "default.toml"
OPTIONS = ["--config", "--hostfile", "--learner-nodes", "--actor-nodes", "--gpus-per-node",
           "--actor-tp", "--run-dir", "--resume", "--master-port", "--python", "--dry-run",
           "--help", "--separate-allocator", "--weights-backend", "--net-if", "--remote-cmd",
           "--shared-run-dir", "--colocated"]



def key_files(run_dir: str, role: str) -> str:
    """The key files cluster.sh copies to a node running `role`, as scp source words."""
    secrets = {"learner": ["learner.key_secret", "grant.secret"],
               "actor": ["actor.key_secret"]}[role]
    return " ".join(f"{run_dir}/keys/{f}" for f in
                    ["allocator.key", "learner.key", "actor.key", *secrets])

def launch(*args: str, env: dict[str, str] | None = None,
           timeout: float = 60) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    return subprocess.run([str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout,
                          env={**clean, **(env or {})}, cwd=REPO)


def fake_tools(bin_dir: Path, record: Path) -> dict[str, str]:
    """`scontrol` listing node1..node4; srun/ssh/scp that only record being called."""
    bin_dir.mkdir()
    tools = {"scontrol": 'test "$1 $2" = "show hostnames" && printf "node%s\\n" 1 2 3 4'}
    tools |= {t: f'echo "{t} $*" >> {record}' for t in ("srun", "ssh", "scp")}
    for name, body in tools.items():
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(0o755)
    return {"PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_NODELIST": "node[1-4]"}


def fake_model(tmp_path: Path) -> Path:
    """Enough of a model directory for config validation (no build-model step)."""
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    return tmp_path / "model"


def process_lines(out: str, role: str) -> list[str]:
    return [line for line in out.splitlines() if f" launch.cli {role} " in line]


def test_slurm_dry_run_places_roles_and_passes_overrides(tmp_path):
    record = tmp_path / "called"
    env = fake_tools(tmp_path / "bin", record)
    run_dir = tmp_path / "run"
    r = launch("--config", str(CONFIG), "--learner-nodes", "2", "--actor-nodes", "1",
               "--gpus-per-node", "2", "--separate-allocator", "--run-dir", str(run_dir),
               "--master-port", "29600", "--dry-run", "--learner.lr", "1e-6",
               "--preset=grpo", "--weights-backend", "broadcast", "--net-if", "eth1", env=env)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    # Dry run: nothing executed, nothing created.
    assert not record.exists() and not run_dir.exists()
    on = {line: re.match(r"srun --nodes=1 --ntasks=1 --overlap -w (node\d) bash -c ", line)
          for line in out.splitlines() if not line.startswith("scp ")}
    assert all(on.values()), [line for line, m in on.items() if not m]

    def node(line: str) -> str:
        return on[line].group(1)

    [alloc] = process_lines(out, "allocator")
    # every service listens on its own node's address, never on all interfaces
    assert node(alloc) == "node1" and alloc.endswith("--network.bind_host node1'")
    learners = [line for line in out.splitlines() if "launch.cli learner-node" in line]
    assert [node(x) for x in learners] == ["node2", "node3"]
    for rank, line in enumerate(learners):
        assert (f"--ranks-here 2 --first-rank {2 * rank} --world 4 --master node2:29600") in line
        assert "--network.bind_host node2 --network.allocator_host node1" in line
        assert "env GLOO_SOCKET_IFNAME=eth1 NCCL_SOCKET_IFNAME=eth1 " in line
    actors = process_lines(out, "actor")
    assert [node(x) for x in actors] == ["node4", "node4"]  # one per GPU
    for i, (line, devices) in enumerate(zip(actors, ["0", "1"], strict=True)):
        assert f"env CUDA_VISIBLE_DEVICES={devices} GLOO_SOCKET_IFNAME=eth1 " in line
        assert f"--index {i} " in line and "--actor.tensor_parallel_size 1" in line
        assert "--network.allocator_host node1 --network.learner_host node2" in line
    [keys] = process_lines(out, "keys")
    assert node(keys) == "node1"
    copies = [line for line in out.splitlines() if line.startswith("scp ")]
    # Each node gets every public key and the secrets of its own roles only.
    assert copies == [f"scp -pq -3 -o BatchMode=yes {key_files(f'node1:{run_dir}', role)} "
                      f"{n}:{run_dir}/.keys.incoming/"
                      for n, role in (("node2", "learner"), ("node3", "learner"),
                                      ("node4", "actor"))]
    # Every process gets the run dir and the passthrough overrides.
    for line in [alloc, *learners, *actors, keys]:
        assert (f"--run_dir {run_dir} --learner.lr 1e-6 --preset grpo "
                "--network.weights_backend broadcast") in line


def test_by_default_the_allocator_shares_the_first_learner_node(tmp_path):
    hosts = tmp_path / "hosts"
    hosts.write_text("ns-a addr=10.9.0.1\nns-b addr=10.9.0.2\nns-c addr=10.9.0.3\n")
    r = launch("--hostfile", str(hosts), "--config", str(CONFIG), "--gpus-per-node", "1",
               "--remote-cmd", "ip netns exec {host} bash -c", "--shared-run-dir",
               "--run-dir", str(tmp_path / "run"), "--dry-run")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    [alloc] = process_lines(out, "allocator")
    [learner] = [line for line in out.splitlines() if "launch.cli learner-node" in line]
    # the allocator and learner rank 0 on the first host; every other host runs actors
    assert alloc.startswith("ip netns exec ns-a bash -c 'cd ")
    assert learner.startswith("ip netns exec ns-a bash -c 'cd ")
    assert "--master 10.9.0.1:29500 " in learner
    actors = process_lines(out, "actor")
    assert [a.split()[3] for a in actors] == ["ns-b", "ns-c"]  # ip netns exec NS
    assert all("--network.allocator_host 10.9.0.1 --network.learner_host 10.9.0.1" in a
               for a in actors)
    assert not [line for line in out.splitlines() if line.startswith("scp ")]  # shared dir


def test_tensor_parallel_actors_get_their_gpus_and_vllms_weight_loader(tmp_path):
    hosts = tmp_path / "hosts"
    hosts.write_text("ns-a addr=10.9.0.1\nns-b addr=10.9.0.2 slots=4\n")
    r = launch("--hostfile", str(hosts), "--config", str(CONFIG), "--gpus-per-node", "1",
               "--actor-tp", "2", "--weights-backend", "broadcast", "--remote-cmd",
               "ip netns exec {host} bash -c", "--shared-run-dir", "--run-dir",
               str(tmp_path / "run"), "--dry-run")
    assert r.returncode == 0, r.stderr
    actors = process_lines(r.stdout, "actor")
    assert len(actors) == 2  # 4 GPUs, 2 per actor
    for line, devices in zip(actors, ["0,1", "2,3"], strict=True):
        assert f"CUDA_VISIBLE_DEVICES={devices} " in line
        assert "--actor.tensor_parallel_size 2 --actor.weight_loader vllm_api" in line


def test_colocated_nodes_run_actors_on_the_learners_gpus_beside_actor_only_nodes(tmp_path):
    hosts = tmp_path / "hosts"
    hosts.write_text("ns-a addr=10.9.0.1\nns-b addr=10.9.0.2\nns-c addr=10.9.0.3\n")
    common = ["--hostfile", str(hosts), "--config", str(CONFIG), "--gpus-per-node", "2",
              "--remote-cmd", "ip netns exec {host} bash -c", "--shared-run-dir", "--run-dir",
              str(tmp_path / "run"), "--dry-run"]
    r = launch(*common, "--learner-nodes", "2", "--colocated")
    assert r.returncode == 0, r.stderr
    learners = [x for x in r.stdout.splitlines() if "launch.cli learner-node" in x]
    actors = process_lines(r.stdout, "actor")
    assert [x.split()[3] for x in learners] == ["ns-a", "ns-b"]
    # two actors on each learner node's two GPUs, two more on the actor-only node
    assert [(x.split()[3], re.search(r"CUDA_VISIBLE_DEVICES=(\S+)", x).group(1))
            for x in actors] == [("ns-a", "0"), ("ns-a", "1"), ("ns-b", "0"), ("ns-b", "1"),
                                 ("ns-c", "0"), ("ns-c", "1")]
    assert all("--placement colocated" in x for x in [*learners, *actors])
    r = launch(*common, "--learner-nodes", "3", "--colocated", "--actor-nodes", "0")
    assert r.returncode == 0, r.stderr
    assert len(process_lines(r.stdout, "actor")) == 6  # every node: 2 learner ranks, 2 actors
    r = launch(*common, "--learner-nodes", "2", "--actor-nodes", "0")
    assert r.returncode == 2 and "--actor-nodes 0 leaves no actor" in r.stderr


def test_host_file_dry_run_uses_ssh_slots_and_runs_this_machine_locally(tmp_path):
    hosts = tmp_path / "hosts"
    hosts.write_text(f"# head first\n{socket.gethostname()}\nh1 slots=2\n\nh2 slots=4  # big\n"
                     "h3\nh4\n")
    run_dir = tmp_path / "run"
    r = launch("--hostfile", str(hosts), "--config", str(CONFIG), "--actor-nodes", "2",
               "--gpus-per-node", "1", "--run-dir", str(run_dir), "--dry-run",
               "--separate-allocator", "--model.path", str(fake_model(tmp_path)))
    assert r.returncode == 0, r.stderr
    assert "unused: h4" in r.stderr
    out = r.stdout
    [alloc] = process_lines(out, "allocator")
    assert alloc.startswith("launch/cluster.sh --child ")  # this machine: no ssh
    [learner] = [line for line in out.splitlines() if "launch.cli learner-node" in line]
    assert learner.startswith(f"ssh -o BatchMode=yes h1 'cd {REPO} && launch/cluster.sh ")
    assert "--ranks-here 2 --first-rank 0 --world 2 --master h1:29500 " in learner
    actors = process_lines(out, "actor")
    assert [a.split()[3] for a in actors] == ["h2"] * 4 + ["h3"]  # slots=4, then default 1
    assert [re.search(r"CUDA_VISIBLE_DEVICES=(\S+)", a).group(1) for a in actors] == \
        ["0", "1", "2", "3", "0"]
    assert [int(re.search(r"--index (\d+)", a).group(1)) for a in actors] == list(range(5))
    # Keys: made here (the head), copied from here with scp -p, never shown.
    [keys] = process_lines(out, "keys")
    assert not keys.startswith("ssh")
    assert [line for line in out.splitlines() if line.startswith("scp ")] == \
        [f"scp -pq -o BatchMode=yes {key_files(str(run_dir), role)} "
         f"{h}:{run_dir}/.keys.incoming/"
         for h, role in (("h1", "learner"), ("h2", "actor"), ("h3", "actor"))]


@pytest.mark.parametrize("hosts, args, message", [
    ("a\nb\nc\n", ["--learner-nodes", "2", "--actor-nodes", "1", "--separate-allocator"],
     "not enough hosts: 1 allocator + 2 learner + 1 actor node(s) need 4 hosts"),
    ("a\nb\n", ["--separate-allocator"], "need 3 hosts"),
    ("a\nb\n", ["--learner-nodes", "2"], "0 allocator + 2 learner + 1 actor node(s) need 3"),
    ("a\nb\nc\n", ["--actor-tp", "3"], "2 GPUs per node is not divisible by --actor-tp 3"),
    ("a\nb\nc\n", ["--weights-backend", "nccl"], "--weights-backend must be zmq or broadcast"),
    ("a\n", ["--actor-nodes", "2"], "names one host, which runs every role only with"),
    ("a\nb\nc\n", ["--config", "/nonexistent.toml"], "config file not found: /nonexistent"),
    ("a\nb\nc\n", ["--learner.nope", "1"], "learner.nope"),
    ("a\nb\nc\n", ["--learner-node", "1"], "unknown option --learner-node"),
    ("a\nb\nc\n", ["--actor-tp", "0"], "--actor-tp must be a positive integer"),
    ("a slots=x\n", [], "slots must be a positive integer"),
    ("localhost\nb\nc\n", [], "name the head and the first learner node by addresses"),
])
def test_invalid_launches_fail_with_a_clear_error(tmp_path, hosts, args, message):
    (tmp_path / "hosts").write_text(hosts)
    r = launch("--hostfile", str(tmp_path / "hosts"), "--config", str(CONFIG),
               "--gpus-per-node", "2", "--dry-run", *args)
    assert r.returncode == 2 and message in r.stderr, r.stderr
    assert r.stdout == ""


def test_without_slurm_or_host_file_it_asks_for_hosts():
    r = launch("--config", str(CONFIG), "--dry-run")
    assert r.returncode == 2 and "no hosts" in r.stderr


def test_help_documents_every_option():
    r = launch("--help")
    assert r.returncode == 0
    for option in OPTIONS:
        assert re.search(rf"^\s+(-h, )?{option}\b", r.stdout, re.M), option
    assert "--section.field" in r.stdout and "exactly one host" in r.stdout


def test_an_existing_run_is_not_overwritten_and_resume_needs_a_checkpoint(tmp_path):
    hosts = tmp_path / "hosts"
    hosts.write_text("localhost\n")
    (tmp_path / "old" / "checkpoints").mkdir(parents=True)
    (tmp_path / "old" / "checkpoints" / "LATEST").write_text("step0000003")
    r = launch("--hostfile", str(hosts), "--config", str(CONFIG), "--gpus-per-node", "1",
               "--run-dir", str(tmp_path / "old"))
    assert r.returncode == 2 and "already holds a run; pass --resume" in r.stderr
    r = launch("--hostfile", str(hosts), "--config", str(CONFIG), "--gpus-per-node", "1",
               "--run-dir", str(tmp_path / "new"), "--resume")
    assert r.returncode == 2 and "nothing to resume" in r.stderr
    assert not (tmp_path / "new" / "keys").exists()


def pids_of(run_dir: Path, pattern: str = "") -> list[int]:
    r = subprocess.run(["pgrep", "-f", f"{pattern}{run_dir}"], capture_output=True, text=True)
    return [int(p) for p in r.stdout.split()]


@pytest.fixture
def stand_in_python(tmp_path) -> Path:
    """A `--python` whose components (allocator, learner, actor) are sleepers that each
    start a child, so stopping must reach whole process trees; config reading and key
    creation use the real interpreter."""
    sleeper = ("import subprocess, sys, time; "
               "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)', "
               "*sys.argv[1:]]); time.sleep(600)")
    path = tmp_path / "python"
    path.write_text(f"""#!/bin/bash
case " $* " in
    *" -c "*|*" launch.cli keys "*) exec {sys.executable} "$@" ;;
    *) exec {sys.executable} -c "{sleeper}" "$@" ;;
esac
""")
    path.chmod(0o755)
    return path


@pytest.fixture
def launchers():
    """Launchers a test started; any still running at teardown get SIGTERM (they stop
    their processes)."""
    procs: list[subprocess.Popen] = []
    yield procs
    for p in procs:
        if p.poll() is None:
            p.terminate()
            p.wait(timeout=60)


def start_stand_ins(launchers: list, tmp_path: Path, python: Path, hosts: list[str],
                    gpus: int, components: int, env: dict[str, str] | None = None):
    (tmp_path / "hosts").write_text("\n".join(hosts) + "\n")
    run_dir = tmp_path / "run"
    # Output to a file, not a pipe nobody reads while the launcher runs: a full pipe would
    # block the launcher (and its stop sequence) on a write.
    with (tmp_path / "launcher.out").open("w") as out:
        proc = subprocess.Popen(
            [str(SCRIPT), "--hostfile", str(tmp_path / "hosts"), "--config", str(CONFIG),
             "--gpus-per-node", str(gpus), "--run-dir", str(run_dir), "--python", str(python),
             "--model.path", str(fake_model(tmp_path))],
            cwd=REPO, stdout=out, stderr=subprocess.STDOUT, text=True,
            env={**os.environ, **(env or {})},
            # A shell started with SIGINT ignored (any background job inherits that) cannot
            # trap it: give the launcher the default disposition, as a terminal would.
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    launchers.append(proc)
    # Every component's own child is up: allocator, learner (stand-in), actors.
    grandchildren = r"import time; time\.sleep\(600\) .*"
    wait_for(lambda: len(pids_of(run_dir, grandchildren)) == components, 30,
             f"{components} stand-in processes")
    return proc, run_dir


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL])
def test_stopping_the_launcher_stops_every_process_it_started(tmp_path, stand_in_python, sig,
                                                             launchers):
    proc, run_dir = start_stand_ins(launchers, tmp_path, stand_in_python, ["127.0.0.1"], gpus=2,
                                    components=4)
    proc.send_signal(sig)
    try:
        proc.wait(timeout=150)  # the learner gets up to 120 s to write its final checkpoint
    except subprocess.TimeoutExpired:
        logs = {p.name: p.read_text()[-1500:] for p in (run_dir / "logs").glob("*.log")}
        raise AssertionError(f"launcher still running; its output:\n"
                             f"{(tmp_path / 'launcher.out').read_text()[-3000:]}\n"
                             f"logs: {logs}\nprocesses: {pids_of(run_dir)}") from None
    wait_for(lambda: not pids_of(run_dir), 15, "every process to stop")
    if sig == signal.SIGINT:
        assert proc.returncode == 130, (tmp_path / "launcher.out").read_text()


def test_remote_hosts_get_the_keys_and_stop_with_the_launcher(tmp_path, stand_in_python,
                                                              launchers):
    """Two "remote" hosts reached through an ssh/scp that run here: the same run directory
    on every host, as on a shared filesystem, where a key copy must not clobber its source."""
    record = tmp_path / "called"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "ssh").write_text(f"""#!/bin/bash
echo "ssh $*" >> {record}
while [[ $1 == -o ]]; do shift 2; done
shift
exec bash -c "$*"
""")
    (bin_dir / "scp").write_text(f"""#!/bin/bash
echo "scp $*" >> {record}
paths=()
while (($#)); do case $1 in -o) shift 2 ;; -*) shift ;; *) paths+=("${{1#*:}}"); shift ;; esac; done
exec cp -p ${{paths[@]:0:${{#paths[@]}}-1}} "${{paths[-1]}}"
""")
    for tool in ("ssh", "scp"):
        (bin_dir / tool).chmod(0o755)
    proc, run_dir = start_stand_ins(
        launchers, tmp_path, stand_in_python, [socket.gethostname(), "nodeA", "nodeB"], gpus=2,
        # allocator and learner here, two actors on each of nodeA and nodeB
        components=6, env={"PATH": f"{bin_dir}:{os.environ['PATH']}"})
    calls = record.read_text()
    assert "nodeA" in calls and "nodeB" in calls and "scp -pq" in calls
    keys = sorted((run_dir / "keys").iterdir())
    assert [k.name for k in keys] == sorted(
        ["grant.secret", *(f"{n}.key{s}" for n in ("actor", "allocator", "learner")
                           for s in ("", "_secret"))])
    for key in keys:
        assert key.stat().st_size > 0 and stat.S_IMODE(key.stat().st_mode) == 0o600, key
    assert not (run_dir / ".keys.incoming").exists()
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=150)  # the learner gets up to 120 s to write its final checkpoint
    wait_for(lambda: not pids_of(run_dir), 15, "every process to stop")
    assert proc.returncode == 143


@pytest.mark.slow  # 33 s; cluster.sh across hosts: test_cluster_netns.py
def test_single_host_run_trains_and_leaves_no_process(tmp_path, tiny_model):
    """The real stack on this machine only: allocator, learner (learner-node), vLLM CPU actor."""
    hosts = tmp_path / "hosts"
    hosts.write_text(f"{socket.gethostname()}\n")
    run_dir = tmp_path / "run"
    alloc, rollouts, weights, master = free_ports(4)
    t0 = time.monotonic()
    r = launch("--hostfile", str(hosts), "--config", str(CONFIG), "--gpus-per-node", "1",
               "--learner-nodes", "1", "--actor-nodes", "1", "--run-dir", str(run_dir),
               "--master-port", str(master), "--model.path", str(tiny_model),
               "--learner.total_steps", "3", "--learner.eval_every", "0",
               "--network.allocator_port", str(alloc), "--network.rollout_port", str(rollouts),
               "--network.weights_port", str(weights), timeout=420)
    logs = {p.name: p.read_text(errors="replace")[-3000:] for p in (run_dir / "logs").glob("*")}
    assert r.returncode == 0, (r.stderr, logs)
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in recs] == [1, 2, 3]
    assert (run_dir / "checkpoints" / "LATEST").read_text().strip() == "step0000003"
    assert {p.name for p in (run_dir / "logs").glob("*.log")} == \
        {"allocator.log", "learner-node0.log", "actor0.log"}
    for key in (run_dir / "keys").iterdir():
        if key.name.endswith("_secret"):
            assert stat.S_IMODE(key.stat().st_mode) == 0o600, key
    assert not pids_of(run_dir)
    print(f"single-host cluster run: {time.monotonic() - t0:.0f}s")
