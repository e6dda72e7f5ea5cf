"""Applying a weight version on the vLLM CPU engine: the packed swap (actor.weight_loader =
"packed") against vLLM's weight-transfer API (actor.weight_loader = "vllm_api", our
backend's inline load: the same worker calls a broadcast version goes through, without the
transfer), side by side in one run, for the tiny embedded model and a ~25M Qwen2 built from a
config.

Per version, on an idle engine: `prepare` = the off-engine-thread part (packed: packing the
new kernel handles; vllm_api: none), `pause` = what the engine thread spends between two steps
(packed: the swap; vllm_api: start / update / finish_weight_update through collective_rpc).
Each (model, loader) runs in its own process (one in-process engine each); 2 warm-up versions,
then the median of 5. Final line: JSON.

    python bench/weight_loader.py
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(_ROOT))

SIZES = {"tiny": None, "25M": dict(hidden_size=512, intermediate_size=2048,
                                   num_hidden_layers=6, num_attention_heads=8,
                                   num_key_value_heads=4, max_position_embeddings=64)}
WARM, TIMED = 2, 5


def one(model: str, loader: str) -> dict:
    """Times WARM + TIMED versions through one loader; returns medians of the timed ones."""
    import torch
    from safetensors.torch import load_file

    from actors.engine import Engine

    eng = Engine(model, max_model_len=64, max_tokens=8, temperature=1.0, top_p=1.0, seed=0,
                 kv_cache_gib=0.25, weight_loader=loader)
    base = load_file(str(Path(model) / "model.safetensors"))
    base.pop("lm_head.weight", None)  # tied: the learner publishes named_parameters()
    g = torch.Generator().manual_seed(0)
    prepare, pause = [], []
    for v in range(1, WARM + TIMED + 1):
        tensors = [(n, (t + 0.01 * torch.randn(t.shape, generator=g)).contiguous())
                   for n, t in base.items()]
        t0 = time.perf_counter()
        update = eng.prepare_weights(tensors)
        t1 = time.perf_counter()
        eng.apply_weights(update, v)
        t2 = time.perf_counter()
        if v > WARM:
            prepare.append(t1 - t0)
            pause.append(t2 - t1)
    params = sum(t.numel() for t in base.values())
    packed = update.prepared is not None
    return {"params": params, "mb": round(sum(t.nbytes for t in base.values()) / 1e6, 1),
            "packed_path": packed, "prepare_ms": round(1e3 * statistics.median(prepare), 2),
            "pause_ms": round(1e3 * statistics.median(pause), 2)}


def main() -> None:
    from launch.embedded_model import build_sized_model, ensure_embedded_model

    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, arch in SIZES.items():
            path = ensure_embedded_model(_ROOT / ".cache/models", steps=600, seed=0,
                                         progress=False) if arch is None \
                else build_sized_model(Path(tmp) / name, seed=0, **arch)
            for loader in ("packed", "vllm_api"):
                proc = subprocess.run([sys.executable, __file__, "--one", str(path), loader],
                                      capture_output=True, text=True, timeout=900, cwd=_ROOT)
                if proc.returncode != 0:
                    raise RuntimeError(f"{name}/{loader} failed:\n{proc.stderr[-3000:]}")
                r = json.loads(proc.stdout.strip().splitlines()[-1])
                results[f"{name}/{loader}"] = r
                print(f"{name:5s} {loader:8s} {r['mb']:7.1f} MB  prepare {r['prepare_ms']:8.2f} ms"
                      f"  engine pause {r['pause_ms']:8.2f} ms", flush=True)
    print(json.dumps(results))


if __name__ == "__main__":
    if sys.argv[1:2] == ["--one"]:
        print(json.dumps(one(sys.argv[2], sys.argv[3])))
    else:
        main()
