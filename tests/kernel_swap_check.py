"""Run by tests/test_kernel_swap.py in its own process (vLLM in-process binds the CPU
threads and memory policy of the process that hosts it): weight updates packed off the engine
thread against vLLM's own in-place reload, on the embedded model. Prints one JSON line."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402


def main(model: str) -> None:
    from transformers import AutoModelForCausalLM
    from vllm import SamplingParams

    from actors.engine import Engine
    from actors.kernel_swap import KernelSwap, Unsupported

    os.environ["VLLM_CPU_KVCACHE_SPACE"] = "3"  # vLLM's legacy knob must not override ours
    eng = Engine(model, max_model_len=64, max_tokens=12, temperature=1e-4, top_p=1.0, seed=0,
                 kv_cache_gib=0.25,  # near-greedy for its own requests
                 block_size=32)  # (CPU default 128) so that a 40-token prompt fills a block
    cache = eng.engine.vllm_config.cache_config
    out: dict = {"kv_cache_blocks": cache.num_gpu_blocks, "kv_block_tokens": cache.block_size}
    hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    gen_ = torch.Generator().manual_seed(0)

    def perturbed() -> list[tuple[str, torch.Tensor]]:
        return [(n, (p.detach() + 0.05 * torch.randn(p.shape, generator=gen_)).contiguous())
                for n, p in hf.named_parameters()]

    params = SamplingParams(temperature=0.0, max_tokens=12, logprobs=0)
    prompts = [{"prompt_token_ids": ids} for ids in ([3, 5, 7, 4, 9], [2, 6, 6, 8], [11, 4])]

    def generate() -> list[tuple[list[int], list[float]]]:
        outs = eng.llm.generate(prompts, params, use_tqdm=False)
        return [(list(o.outputs[0].token_ids),
                 [next(iter(d.values())).logprob for d in o.outputs[0].logprobs]) for o in outs]

    def max_dlogp(a, b) -> float:
        return max(abs(x - y) for (_, la), (_, lb) in zip(a, b, strict=True)
                   for x, y in zip(la, lb, strict=False))

    base = generate()
    w1 = perturbed()
    update = eng.prepare_weights(w1)
    out["fast_path"] = update.prepared is not None
    out["prepare_leaves_live_model"] = generate() == base
    eng.apply_weights(update, 1)
    fast1 = generate()
    out["weights_changed_outputs"] = fast1 != base
    with torch.no_grad():  # the update's source buffer is reused for later versions
        for _, t in w1:
            t.fill_(0.5)
    out["independent_of_source_after_swap"] = generate() == fast1
    # the same weights through vLLM's in-place reload
    reference = [(n, t.clone()) for n, t in perturbed()]
    eng.use_vllm_reload = True
    gen_.manual_seed(0)
    w1_again = perturbed()
    eng.load_weights(w1_again, 2)
    ref1 = generate()
    out["tokens_equal_vllm_reload"] = [a[0] == b[0] for a, b in zip(fast1, ref1, strict=True)]
    out["max_dlogp_vs_vllm_reload"] = max_dlogp(fast1, ref1)
    # and back: a second fast update after a vLLM reload
    eng.use_vllm_reload = False
    eng.load_weights(reference, 3)
    fast2 = generate()
    eng.use_vllm_reload = True
    eng.load_weights([(n, t.clone()) for n, t in reference], 4)
    out["second_update_matches"] = generate() == fast2 and fast2 != fast1
    # Prefix cache across a swap (the Engine's own requests, as the actor makes them): a
    # prompt long enough to fill cached KV blocks, generated again after new weights, must
    # give what the new weights give from scratch (llm.generate never shares the salted
    # blocks), not continue from KV cached under the old ones.
    long_prompt = [3 + (i * 7) % 12 for i in range(40)]

    def engine_tokens(rid: str) -> list[int]:
        eng.add(rid, long_prompt, 1)
        while True:
            for _, samples in eng.step():
                return samples[0].tokens

    engine_tokens("cache-a")  # fills the prefix cache under `reference`
    hits = eng.cached_prompt_tokens
    engine_tokens("cache-a2")  # same weights: served from the cache (the check is not vacuous)
    out["prefix_cache_hit_before_swap"] = eng.cached_prompt_tokens - hits
    hits = eng.cached_prompt_tokens
    eng.use_vllm_reload = False
    # a request in flight across the swap (it cannot end early): vLLM cannot reset its cache
    eng.engine.add_request("busy", {"prompt_token_ids": [2, 3]},
                           SamplingParams(temperature=1e-4, max_tokens=12, min_tokens=12))
    eng.step()
    out["busy_at_swap"] = eng.busy()
    eng.load_weights([(n, t.clone()) for n, t in w1_again], 5)
    while eng.busy():
        eng.step()
    after = engine_tokens("cache-b")
    out["prefix_cache_hit_after_swap"] = eng.cached_prompt_tokens - hits
    fresh = eng.llm.generate([{"prompt_token_ids": long_prompt}],
                             SamplingParams(temperature=0.0, max_tokens=12),
                             use_tqdm=False)[0].outputs[0].token_ids
    out["no_stale_prefix_kv_after_swap"] = after == list(fresh)
    model_ = eng._model()
    metas = [(n, tuple(t.shape), t.dtype) for n, t in w1_again]
    for name, bad in (("missing_weight", metas[:-1]),
                      ("unknown_name", [*metas, ("model.nope.weight", (4, 4), torch.float32)]),
                      ("wrong_dtype", [(n, s, torch.float16) for n, s, _ in metas])):
        try:
            KernelSwap(model_, bad)
            out[f"rejects_{name}"] = False
        except Unsupported as e:
            out[f"rejects_{name}"] = str(e)
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1])
