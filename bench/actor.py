"""Actor throughput end to end vs vLLM alone, on the embedded tiny model, in one run.

End to end: allocator process + one actor process (grant -> generate -> score -> send) +
this process as the learner (PULL, progress messages so pacing never binds). We count the
completion tokens that arrive over a fixed window after warm-up.
vLLM alone: the same engine settings generating the same prompts with the same per-prompt
sample counts through `LLM.generate` in one batched call, in this process.
Final line: JSON with both rates and their ratio (target >= 0.85).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from launch.config import load_config
from launch.embedded_model import ensure_embedded_model

# Run as a script, this file's folder would shadow the `allocator` package with
# bench/allocator.py: put the repository root first instead.
from launch.harness import LearnerStandIn, Proc, make_config, wait_for


def end_to_end(cfg_path: Path, warmup_s: float, window_s: float):
    """Generated tokens/s of a real actor fed by the real allocator, everything it sends
    consumed at once (no learner pacing), over `window_s` after `warmup_s`."""
    learner = LearnerStandIn(load_config(cfg_path), gate=None)
    procs = [Proc("allocator", cfg_path), Proc("actor", cfg_path, "--index", "0")]
    try:
        wait_for(lambda: learner.received() > 0, 300, "the first group")
        t_first = learner.timed()[0][0]
        wait_for(lambda: time.monotonic() - t_first >= warmup_s + window_s, 600,
                 "the measuring window", interval=0.5)
        groups = [(t, g) for t, g in learner.timed() if t - t_first >= warmup_s]
    finally:
        for p in procs:
            p.stop()
        learner.close()
    span = groups[-1][0] - groups[0][0]
    tokens = sum(g.num_tokens for _, g in groups[1:])
    return tokens / span, [(g.prompt_token_ids.tolist(), g.n) for _, g in groups], \
        [g.completion_lengths.tolist() for _, g in groups]


def vllm_alone(cfg, model: str, work: list[tuple[list[int], int]]) -> float:
    from actors.engine import configure_vllm_env

    configure_vllm_env(cfg.actor.kv_cache_gib)
    from vllm import LLM, SamplingParams

    a = cfg.actor
    llm = LLM(model=model, max_model_len=a.max_model_len, seed=0, enforce_eager=True,
              dtype=a.dtype, logprobs_mode="processed_logprobs", enable_prefix_caching=True,
              kv_cache_memory_bytes=int(a.kv_cache_gib * (1 << 30)))
    prompts = [{"prompt_token_ids": ids} for ids, _ in work]
    params = [SamplingParams(n=n, temperature=a.temperature, top_p=a.top_p,
                             max_tokens=a.max_tokens, logprobs=0) for _, n in work]
    llm.generate(prompts[:8], params[:8], use_tqdm=False)  # warm-up (compilation)
    t = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    dt = time.perf_counter() - t
    return sum(len(c.token_ids) for o in outs for c in o.outputs) / dt


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--warmup", type=float, default=10.0)
    ap.add_argument("--window", type=float, default=30.0)
    ap.add_argument("--actor", action="append", default=[], metavar="KEY=VALUE",
                    help="actor setting (repeatable), e.g. max_batch_grants=64")
    args = ap.parse_args()
    actor = {k: json.loads(v) for k, _, v in (kv.partition("=") for kv in args.actor)}
    model = ensure_embedded_model(Path(".cache/models"), 600, 0, progress=False)
    with tempfile.TemporaryDirectory() as d:
        cfg_path = make_config(Path(d), model, network={"curve": False},
                               allocator={"max_staleness": 1000}, actor=actor)
        e2e, work, _ = end_to_end(cfg_path, args.warmup, args.window)
        alone = vllm_alone(load_config(cfg_path), str(model), work)
    ratio = e2e / alone
    print(f"actor end to end : {e2e:9.0f} completion tokens/s")
    print(f"vLLM alone       : {alone:9.0f} completion tokens/s  (same prompts and n)")
    print(json.dumps({"bench": "actor", "e2e_tokens_per_s": round(e2e, 1),
                      "vllm_tokens_per_s": round(alone, 1), "ratio": round(ratio, 3),
                      "target": 0.85, "groups": len(work), "cpus": os.cpu_count(),
                      "actor_settings": actor}))


if __name__ == "__main__":
    main()
