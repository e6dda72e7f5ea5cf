#!/usr/bin/env bash
# A DynaMO-RL run across nodes: learner ranks (`dynamo-rl learner-node`) on the first --learner-nodes hosts,
# the allocator beside learner rank 0 (or on a host of its own), vLLM actors on the following
# --actor-nodes hosts.
#
# Guarantees:
# - Every process it starts is stopped when it exits, however it exits (end of training,
#   error, Ctrl-C, SIGTERM, even SIGKILL): each process is started under `--child`, which
#   reads a lifeline (a FIFO held open by this script) and stops the process when the
#   lifeline closes. The learner's lifeline closes first, so it writes its final checkpoint
#   while the others still run.
# - What --dry-run prints is exactly what a real run executes, one command per line.
# - Secret keys never appear in any command or output.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
STOP_GRACE_S=120  # a stopped process gets this long (the learner's final checkpoint) before KILL

usage() {
    cat <<'EOF'
Usage: launch/cluster.sh --config CONFIG [options] [--section.field VALUE ...]

Starts a DynaMO-RL run across the nodes of a Slurm allocation (SLURM_JOB_NODELIST) or of a
host file, and waits for the learner. Any --section.field VALUE (and --preset, --mode) is a
config override passed to every process.

Options:
  --config CONFIG       run config TOML (required)
  --hostfile FILE       hosts, one per line: `HOST [slots=N] [addr=ADDRESS]` (N: GPUs of
                        that host; ADDRESS: how the other hosts reach it, default HOST; `#`
                        starts a comment). Without it, the hosts of the Slurm allocation.
  --learner-nodes N     nodes running learner ranks (default 1)
  --actor-nodes M       nodes running actors (default: every host left after the head and
                        the learner nodes)
  --gpus-per-node G     GPUs per node (default: SLURM_GPUS_ON_NODE under Slurm); `slots=N`
                        in the host file overrides it for that host
  --actor-tp T          GPUs per actor (vLLM tensor parallel size, default 1); T > 1 loads
                        weights through vLLM's weight-transfer API in every worker
                        (actor.weight_loader = vllm_api)
  --colocated           actors also on every learner node, sharing its GPUs with the learner
                        ranks (placement = colocated: they take turns, the engines sleep while
                        the learner trains); --actor-nodes then defaults to the hosts left
                        (0 allowed)
  --separate-allocator  the allocator on a host of its own (default: beside learner rank 0,
                        which wastes no node on it)
  --weights-backend B   zmq (default) or broadcast: how weights reach the actors
                        (network.weights_backend)
  --net-if IFACE        network interface of the learner and actor processes for gloo/NCCL
                        (GLOO_SOCKET_IFNAME, NCCL_SOCKET_IFNAME)
  --remote-cmd CMD      how a host-file host runs a shell command: `CMD HOST 'COMMAND'`, or
                        CMD with {host} replaced (default `ssh -o BatchMode=yes`; for network
                        namespaces: 'ip netns exec {host} bash -c')
  --shared-run-dir      every host sees RUN_DIR (shared filesystem): keys are not copied
  --run-dir DIR         run directory (default: the config's run_dir; relative paths in the
                        config are relative to the repository)
  --resume              continue the run in the run directory from its latest checkpoint;
                        node counts may differ from the previous start
  --master-port P       learner rendezvous port on the first learner node (default 29500)
  --python PATH         Python on every node (default: REPO/.venv-gpu/bin/python, built by
                        ./bootstrap.sh --gpu, else REPO/.venv/bin/python, else python3)
  --dry-run             print every command it would run, one per line; run nothing
  -h, --help            this help

Roles: hosts 1..N run `dynamo-rl learner-node` with G ranks (one learner rank per GPU;
rank 0 on host 1 takes the rollouts and serves the weights) and host 1 also runs the
allocator; the next M hosts run G/T actors each: N + M hosts are needed (1 + N + M with
--separate-allocator, which puts the allocator on host 1 and the learners on 2..N+1); extra
hosts are left unused. Exception: a host list of exactly one host runs every role on that host (with
--learner-nodes 1 --actor-nodes 1; learner ranks and actors then share its G GPUs, which
suits a CPU smoke test; for one GPU machine prefer `dynamo-rl run`).

Commands run locally when the host is this machine (its hostname, localhost, 127.0.0.1),
else through `srun --nodes=1 --ntasks=1 --overlap -w HOST` (hosts from Slurm; allocate
with --ntasks-per-node=1 and all CPUs and GPUs of each node per task, steps inherit them)
or `ssh HOST` (host file; see --remote-cmd). The repository and Python environment must be at the same path
on every node. Across nodes, the allocator binds 0.0.0.0 on the head, learner rank 0 binds
0.0.0.0 on its node, and the others connect to those hosts by the names given here.

The run's CURVE keys are created once in RUN_DIR/keys on the head node and copied with
`scp -p` (owner-only files) into RUN_DIR/keys on the other nodes: every role's public key,
and the secrets of the roles a node runs only (learner nodes: the learner's key and the grant
MAC secret; actor nodes: the actor key), so an actor node cannot speak as the learner. With
--shared-run-dir every host reads the head's key directory. Put RUN_DIR on a
filesystem shared by the nodes for multi-node checkpoints and --resume. Each process logs
to RUN_DIR/logs/NAME.log on this machine; the learner writes RUN_DIR/metrics.jsonl on its
first node. The script exits with the learner's status; Ctrl-C stops the run (learner
first, with a final checkpoint, then actors and allocator).
EOF
}

die() { echo "cluster.sh: $*" >&2; exit 2; }
note() { echo "[cluster] $*" >&2; }

# Shell words for "$@", quoted only where needed (POSIX single quotes: any remote shell).
q() {
    local out=() a
    for a; do
        if [[ $a =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then out+=("$a")
        else out+=("'${a//\'/\'\\\'\'}'"); fi
    done
    echo "${out[*]}"
}

# --child CMD...: run CMD in its own process group; when stdin (the lifeline) reaches EOF,
# SIGTERM it, and SIGKILL its group after STOP_GRACE_S. Its exit status is CMD's.
run_child() {
    # The environment `dynamo-rl run` gives its children (launch/local.py, child_env).
    export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
    exec 3<&0 </dev/null
    setsid "$@" 3<&- &
    local pid=$! rc=0 watcher
    {
        while read -r _ <&3; do :; done
        kill -TERM "$pid" 2>/dev/null || exit 0
        for ((t = 0; t < 2 * STOP_GRACE_S; t++)); do
            kill -0 "$pid" 2>/dev/null || exit 0
            sleep 0.5
        done
        kill -KILL -- "-$pid" 2>/dev/null
    } &
    watcher=$!
    wait "$pid" || rc=$?
    kill -KILL -- "-$pid" 2>/dev/null || true  # what it left behind (engine workers)
    kill "$watcher" 2>/dev/null || true
    exit "$rc"
}

if [[ ${1-} == --child ]]; then
    shift
    run_child "$@"
fi

# ---------------------------------------------------------------------------- options
config= hostfile= run_dir= learner_nodes=1 actor_nodes= gpus= tp=1 master_port=29500
resume=0 dry=0 py= lifelines= separate=0 backend= net_if= shared=0 colocated=0
remote_cmd="ssh -o BatchMode=yes"
passthrough=()
abspath() { [[ $1 == /* ]] && echo "$1" || echo "$PWD/$1"; }
while (($#)); do
    if [[ $1 =~ ^(--[A-Za-z0-9_.-]+)=(.*)$ ]]; then  # --name=value -> --name value
        set -- "${BASH_REMATCH[1]}" "${BASH_REMATCH[2]}" "${@:2}"
    fi
    case $1 in
        --config|--hostfile|--learner-nodes|--actor-nodes|--gpus-per-node|--actor-tp|--run-dir|\
        --master-port|--python|--preset|--mode|--weights-backend|--net-if|--remote-cmd|--*.*)
            (($# >= 2)) || die "$1 needs a value" ;;
    esac
    case $1 in
        -h|--help) usage; exit 0 ;;
        --config) config=$(abspath "$2") ;;
        --hostfile) hostfile=$(abspath "$2") ;;
        --learner-nodes) learner_nodes=$2 ;;
        --actor-nodes) actor_nodes=$2 ;;
        --gpus-per-node) gpus=$2 ;;
        --actor-tp) tp=$2 ;;
        --run-dir) run_dir=$(abspath "$2") ;;
        --master-port) master_port=$2 ;;
        --python) py=$2 ;;
        --weights-backend) backend=$2 ;;
        --net-if) net_if=$2 ;;
        --remote-cmd) remote_cmd=$2 ;;
        --separate-allocator) separate=1; shift; continue ;;
        --colocated) colocated=1; shift; continue ;;
        --shared-run-dir) shared=1; shift; continue ;;
        --resume) resume=1; shift; continue ;;
        --dry-run) dry=1; shift; continue ;;
        --run_dir) die "use --run-dir DIR" ;;
        --preset|--mode|--*.*) passthrough+=("$1" "$2") ;;
        *) die "unknown option $1 (see --help)" ;;
    esac
    shift 2
done
posint() { [[ $2 =~ ^[1-9][0-9]*$ ]] || die "$1 must be a positive integer, got '$2'"; }
posint --learner-nodes "$learner_nodes"
if [[ -n $actor_nodes ]] && ! ((colocated)) && [[ $actor_nodes == 0 ]]; then
    die "--actor-nodes 0 leaves no actor (only with --colocated, which runs actors on the" \
        "learner nodes)"
fi
[[ -z $actor_nodes || $actor_nodes == 0 ]] || posint --actor-nodes "$actor_nodes"
((!colocated)) || passthrough+=(--placement colocated)
[[ -z $gpus ]] || posint --gpus-per-node "$gpus"
posint --actor-tp "$tp"
tp_args=()  # the packed swap and the in-process reload reach one in-process worker only
((tp == 1)) || tp_args=(--actor.weight_loader vllm_api)
case $backend in
    "") ;;
    zmq|broadcast) passthrough+=(--network.weights_backend "$backend") ;;
    *) die "--weights-backend must be zmq or broadcast, got '$backend'" ;;
esac
[[ -z $net_if || $net_if =~ ^[A-Za-z0-9_.@-]+$ ]] || die "--net-if: not an interface name: $net_if"
posint --master-port "$master_port"
[[ -n $config ]] || die "--config CONFIG is required (see --help)"
[[ -f $config ]] || die "config file not found: $config"
if [[ -z $py ]]; then  # the GPU environment (./bootstrap.sh --gpu) where it was built
    if [[ -x $REPO/.venv-gpu/bin/python ]]; then py=$REPO/.venv-gpu/bin/python
    elif [[ -x $REPO/.venv/bin/python ]]; then py=$REPO/.venv/bin/python
    else py=python3; fi
fi
cd "$REPO"

# ------------------------------------------------------------------------------ hosts
hosts=() slots=() addrs=() slurm=0
if [[ -n $hostfile ]]; then
    [[ -f $hostfile ]] || die "host file not found: $hostfile"
    while read -r host rest || [[ -n $host ]]; do
        [[ -z $host || $host == \#* ]] && continue
        n= addr=$host
        for field in $rest; do
            case $field in
                slots=*) n=${field#slots=}; posint "$hostfile: $host slots" "$n" ;;
                addr=?*) addr=${field#addr=} ;;
                \#*) break ;;
                *) die "$hostfile: unknown field '$field' for host $host (expected slots=N" \
                       "or addr=ADDRESS)" ;;
            esac
        done
        hosts+=("$host"); slots+=("$n"); addrs+=("$addr")
    done <"$hostfile"
    source="host file $hostfile"
elif [[ -n ${SLURM_JOB_NODELIST-} ]]; then
    names=$(scontrol show hostnames "$SLURM_JOB_NODELIST") || die "scontrol failed"
    for host in $names; do hosts+=("$host"); slots+=(""); addrs+=("$host"); done
    slurm=1 source="Slurm allocation ($SLURM_JOB_NODELIST)"
else
    die "no hosts: run inside a Slurm allocation or pass --hostfile FILE"
fi
nh=${#hosts[@]}
((nh)) || die "the $source names no host"

# Host indices per role.
if ((nh == 1)); then
    ((learner_nodes == 1 && ${actor_nodes:-1} == 1)) || die "the $source names one host," \
        "which runs every role only with --learner-nodes 1 --actor-nodes 1"
    actor_nodes=1 head=0 learner_ix=(0) actor_ix=(0)
else
    if [[ -z $actor_nodes ]]; then
        actor_nodes=$((nh - separate - learner_nodes))
        ((actor_nodes >= 1 || colocated)) || actor_nodes=1
        ((actor_nodes >= 0)) || actor_nodes=0
    fi
    need=$((separate + learner_nodes + actor_nodes))
    ((nh >= need)) || die "not enough hosts: $((separate ? 1 : 0)) allocator + $learner_nodes" \
        "learner + $actor_nodes actor node(s) need $need hosts, the $source names $nh"
    ((nh == need)) || note "WARNING: using $need of the $nh hosts; unused: ${hosts[*]:need}"
    head=0 learner_ix=() actor_ix=()
    for ((i = separate; i < separate + learner_nodes; i++)); do learner_ix+=("$i"); done
    for ((; i < need; i++)); do actor_ix+=("$i"); done
    if ((colocated)); then actor_ix=("${learner_ix[@]}" "${actor_ix[@]}"); fi
fi

gpus_of() {  # GPUs of host index $1
    local n=${slots[$1]:-${gpus:-${SLURM_GPUS_ON_NODE:-}}}
    [[ -n $n ]] || die "GPUs per node unknown: pass --gpus-per-node G (or slots=N in the host file)"
    echo "$n"
}
for i in "${learner_ix[@]}" "${actor_ix[@]}"; do gpus_of "$i" >/dev/null; done
for i in "${actor_ix[@]}"; do
    g=$(gpus_of "$i")
    ((g % tp == 0)) || die "${hosts[$i]}: $g GPUs per node is not divisible by --actor-tp $tp"
done

me=" localhost 127.0.0.1 $(hostname) $(hostname -s 2>/dev/null || true)"
me+=" $(hostname -f 2>/dev/null || true) "
is_local() { [[ ${me,,} == *" ${1,,} "* ]]; }
is_loopback() { [[ $1 == localhost || $1 == 127.* ]]; }

head_host=${hosts[$head]} learner0=${hosts[${learner_ix[0]}]}
head_addr=${addrs[$head]} learner0_addr=${addrs[${learner_ix[0]}]}
if ((nh > 1)) && { is_loopback "$head_addr" || is_loopback "$learner0_addr"; }; then
    for i in "${learner_ix[@]}" "${actor_ix[@]}"; do
        if ! is_local "${hosts[$i]}"; then
            die "name the head and the first learner node by addresses the other nodes reach," \
                "not $head_addr / $learner0_addr"
        fi
    done
fi

# ----------------------------------------------------------------------------- config
# Validate the config with its overrides once, here; read what the launcher needs from it.
info=$("$py" -c '
import sys
from launch.config import ConfigError, load_config
try:
    cfg = load_config(sys.argv[1], sys.argv[2:])
except ConfigError as e:
    sys.exit(f"cluster.sh: {e}")
print(cfg.run_dir.resolve(), int(cfg.network.curve), int(cfg.model.path is None), sep="\n")
' "$config" ${run_dir:+--run_dir "$run_dir"} "${passthrough[@]}") || exit 2
{ read -r run_dir; read -r curve; read -r embedded_model; } <<<"$info"
overrides=(--run_dir "$run_dir" "${passthrough[@]}")  # every process gets these

# ------------------------------------------------------------------------ execution
# One shell line per command, printed (dry run) or executed by `bash -c`.
on() {  # HOST SHELL_COMMAND -> the line that runs SHELL_COMMAND in REPO on HOST
    if is_local "$1"; then echo "$2"
    elif ((slurm)); then
        q srun --nodes=1 --ntasks=1 --overlap -w "$1" bash -c "cd $(q "$REPO") && $2"
    elif [[ $remote_cmd == *"{host}"* ]]; then
        echo "${remote_cmd//\{host\}/$(q "$1")} $(q "cd $(q "$REPO") && $2")"
    else echo "$remote_cmd $(q "$1" "cd $(q "$REPO") && $2")"; fi
}
role_secrets() {  # HOST -> the secret key files of the roles HOST runs (never another's)
    local j out=()
    for j in "${learner_ix[@]}"; do
        [[ ${hosts[$j]} == "$1" ]] && { out+=(learner.key_secret grant.secret); break; }
    done
    for j in "${actor_ix[@]}"; do
        [[ ${hosts[$j]} == "$1" ]] && { out+=(actor.key_secret); break; }
    done
    echo "${out[*]}"
}
run() {  # LINE: print it, or run it in the foreground
    if ((dry)); then echo "$1"; else bash -c "$1"; fi
}

declare -A pid_of=()
learner_names=() service_names=() actor_names=()
start() {  # NAME HOST LIFELINE CMD...: run CMD under --child on HOST, in the background
    local name=$1 host=$2 fifo=$3 line
    shift 3
    line=$(on "$host" "$(q launch/cluster.sh --child "$@")")
    if ((dry)); then echo "$line"; return; fi
    bash -c "$line" <"$fifo" >>"$run_dir/logs/$name.log" 2>&1 8>&- 9>&- &
    pid_of[$name]=$!
}

alive() { kill -0 "${pid_of[$1]}" 2>/dev/null; }
reap() { rc=0; wait "${pid_of[$1]}" || rc=$?; }  # sets rc (no subshell: wait needs the parent)
wait_gone() {  # SECONDS NAME...
    local deadline=$((SECONDS + $1)) name
    shift
    for name; do
        while alive "$name" && ((SECONDS < deadline)); do sleep 0.2; done
    done
}
stop_all() {
    trap - EXIT INT TERM HUP
    exec 9>&-  # learner lifeline: SIGTERM, final checkpoint
    wait_gone $((STOP_GRACE_S + 15)) "${learner_names[@]}"
    exec 8>&-  # everyone else
    wait_gone $((STOP_GRACE_S + 15)) "${actor_names[@]}" "${service_names[@]}"
    local name
    for name in "${!pid_of[@]}"; do kill -KILL "${pid_of[$name]}" 2>/dev/null || true; done
    rm -rf "$lifelines"
}
tail_log() { tail -n 15 "$run_dir/logs/$1.log" 2>/dev/null | sed 's/^/    /' >&2 || true; }

cli=("$py" -m launch.cli)
master_addr=$learner0_addr alloc_net=() learner_net=() actor_net=() net_env=()
if ((nh > 1)); then
    # every listener on the node's own address (the one the other nodes reach), none on all
    alloc_net=(--network.bind_host "$head_addr")
    learner_net=(--network.bind_host "$learner0_addr" --network.allocator_host "$head_addr"
                 --network.learner_host "$learner0_addr")
    actor_net=(--network.allocator_host "$head_addr" --network.learner_host "$learner0_addr")
else
    master_addr=127.0.0.1  # one host: the config's network addresses as they are
fi
[[ -z $net_if ]] || net_env=("GLOO_SOCKET_IFNAME=$net_if" "NCCL_SOCKET_IFNAME=$net_if")

names() { local i out=(); for i; do out+=("${hosts[$i]}"); done; echo "${out[*]}"; }
note "allocator: $head_host | learner: $(names "${learner_ix[@]}") (rendezvous" \
     "$master_addr:$master_port) | actors: $(names "${actor_ix[@]}") (TP $tp) | $run_dir"

if ((!dry)); then
    mkdir -p "$run_dir/logs"
    lifelines=$(mktemp -d)
    mkfifo "$lifelines/learner" "$lifelines/others"
    exec 9<>"$lifelines/learner" 8<>"$lifelines/others"
    trap stop_all EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM HUP
fi

# The head node: refuse to overwrite a run, or restore the allocator for --resume; keys.
if ((resume)); then
    restore='import sys; from pathlib import Path; from launch.local import '
    restore+='restore_allocator_snapshot as r; sys.exit(r(Path(sys.argv[1])) is None)'
    run "$(on "$head_host" "$(q "$py" -c "$restore" "$run_dir")")" \
        || die "nothing to resume: $run_dir/checkpoints/LATEST not found on $head_host"
else
    if run "$(on "$head_host" "$(q test -e "$run_dir/checkpoints/LATEST")")" && ((!dry)); then
        die "$run_dir already holds a run; pass --resume or another --run-dir"
    fi
fi
if ((curve)); then
    run "$(on "$head_host" "$(q "${cli[@]}" keys "$config" "${overrides[@]}")")" \
        || die "creating the run keys on $head_host failed"
    declare -A copied=([$head_host]=1)
    if ((shared)); then for h in "${hosts[@]}"; do copied[$h]=1; done; fi
    for i in "${learner_ix[@]}" "${actor_ix[@]}"; do
        host=${hosts[$i]}
        [[ -z ${copied[$host]-} ]] || continue
        copied[$host]=1
        if is_local "$host" && is_local "$head_host"; then continue; fi
        # Into a private staging directory, then renamed into place: on a shared filesystem
        # the source files are never truncated.
        incoming=$run_dir/.keys.incoming
        src=$run_dir/keys dst=$incoming/ three=()
        is_local "$head_host" || src=$head_host:$src
        is_local "$host" || dst=$host:$dst
        is_local "$head_host" || is_local "$host" || three=(-3)
        src_words=""  # every public key, and the secrets of the roles this host runs only
        for f in allocator.key learner.key actor.key $(role_secrets "$host"); do
            src_words+=" $(q "$src/$f")"
        done
        prepare="$(q rm -rf "$incoming") && $(q mkdir -p "$run_dir")"
        prepare+=" && $(q mkdir -m 700 "$incoming")"
        install="$(q mkdir -p -m 700 "$run_dir/keys") && mv -f $(q "$incoming")/*"
        install+=" $(q "$run_dir/keys/") && $(q rmdir "$incoming")"
        { run "$(on "$host" "$prepare")" &&
          run "$(q scp -pq "${three[@]}" -o BatchMode=yes)$src_words $(q "$dst")" &&
          run "$(on "$host" "$install")"
        } || die "copying the run keys to $host failed"
    done
fi

# The embedded model is built once per node before anything loads it.
if ((embedded_model)); then
    declare -A built=()
    for i in "${learner_ix[@]}" "${actor_ix[@]}"; do
        host=${hosts[$i]}
        [[ -z ${built[$host]-} ]] || continue
        built[$host]=1
        start "build-model-$host" "$host" "$lifelines/others" \
            "${cli[@]}" build-model "$config" "${overrides[@]}"
    done
    if ((!dry)); then
        for host in "${!built[@]}"; do
            reap "build-model-$host"
            ((rc == 0)) || {
                tail_log "build-model-$host"; die "building the model on $host failed"
            }
            unset "pid_of[build-model-$host]"
        done
    fi
fi

start allocator "$head_host" "$lifelines/others" \
    "${cli[@]}" allocator "$config" "${overrides[@]}" "${alloc_net[@]}"
service_names+=(allocator)
world=0
for i in "${learner_ix[@]}"; do world=$((world + $(gpus_of "$i"))); done
rank=0 first=0
for i in "${learner_ix[@]}"; do
    start "learner-node$rank" "${hosts[$i]}" "$lifelines/learner" \
        env "${net_env[@]}" "${cli[@]}" learner-node "$config" \
        --ranks-here "$(gpus_of "$i")" --first-rank "$first" --world "$world" \
        --master "$master_addr:$master_port" "${overrides[@]}" "${learner_net[@]}"
    learner_names+=("learner-node$rank")
    first=$((first + $(gpus_of "$i"))) rank=$((rank + 1))
done
index=0
for i in "${actor_ix[@]}"; do
    g=$(gpus_of "$i")
    for ((first = 0; first < g; first += tp)); do
        devices=$(seq -s, "$first" $((first + tp - 1)))
        start "actor$index" "${hosts[$i]}" "$lifelines/others" \
            env "CUDA_VISIBLE_DEVICES=$devices" "${net_env[@]}" \
            "${cli[@]}" actor "$config" --index "$index" "${overrides[@]}" \
            --actor.tensor_parallel_size "$tp" "${tp_args[@]}" "${actor_net[@]}"
        actor_names+=("actor$index")
        index=$((index + 1))
    done
done
((dry)) && exit 0

note "started allocator, ${#learner_names[@]} learner node(s), ${#actor_names[@]} actor(s);" \
     "logs in $run_dir/logs"
declare -A reported=()
while :; do
    sleep 1
    running=0
    for name in "${learner_names[@]}"; do
        if alive "$name"; then running=1; continue; fi
        [[ -z ${reported[$name]-} ]] || continue
        reported[$name]=1
        reap "$name"
        if ((rc != 0)); then
            note "ERROR: $name exited with status $rc; last lines of $run_dir/logs/$name.log:"
            tail_log "$name"
            exit "$rc"
        fi
    done
    if ((!running)); then note "learner finished"; exit 0; fi
    if ! alive allocator; then
        note "ERROR: the allocator exited; last lines of $run_dir/logs/allocator.log:"
        tail_log allocator
        exit 1
    fi
    dead=0
    for name in "${actor_names[@]}"; do
        alive "$name" && continue
        dead=$((dead + 1))
        [[ -z ${reported[$name]-} ]] || continue
        reported[$name]=1
        reap "$name"
        note "$name exited (status $rc); see $run_dir/logs/$name.log"
    done
    if ((dead == ${#actor_names[@]})); then note "ERROR: every actor has exited"; exit 1; fi
done
