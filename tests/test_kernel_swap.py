"""Weight updates packed off the engine thread (actors/kernel_swap.py) against vLLM's own
in-place reload, on the real vLLM CPU engine (run in a child process: see the helper)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

HELPER = Path(__file__).with_name("kernel_swap_check.py")


def test_packed_swap_matches_vllm_reload(tiny_model):
    proc = subprocess.run([sys.executable, str(HELPER), str(tiny_model)], capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["fast_path"] is True  # the embedded model on CPU takes the packed path
    assert out["prepare_leaves_live_model"] is True  # preparing runs beside generation
    assert out["weights_changed_outputs"] is True  # not vacuous
    assert out["independent_of_source_after_swap"] is True  # the buffer may be reused
    # Greedy tokens identical, log-probs equal to float32 rounding (measured: 0.0 exactly)
    assert all(out["tokens_equal_vllm_reload"]), out
    assert out["max_dlogp_vs_vllm_reload"] <= 1e-5, out
    assert out["second_update_matches"] is True
    # no prompt KV cached under the old weights is reused after a swap, even though the
    # swap came while a request ran (vLLM cannot reset its cache then)
    assert out["busy_at_swap"] is True
    assert out["prefix_cache_hit_before_swap"] >= 16, out
    assert out["prefix_cache_hit_after_swap"] == 0, out
    assert out["no_stale_prefix_kv_after_swap"] is True
    # a plan that does not cover the model exactly falls back to vLLM's reload
    assert "no incoming weight" in out["rejects_missing_weight"]
    assert "no parameter" in out["rejects_unknown_name"]
    assert "float16" in out["rejects_wrong_dtype"]
    # the engine's KV cache is the 0.25 GiB asked for (not vLLM's VLLM_CPU_KVCACHE_SPACE)
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(tiny_model)
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * 4  # K, V fp32
    kv_bytes = out["kv_cache_blocks"] * out["kv_block_tokens"] * per_token
    assert 0.9 * (1 << 28) < kv_bytes <= 1 << 28, out
