"""A vLLM engine driven step by step, with per-token behaviour log-probs and versions.

Guarantees:
- Each sample is its own request (n = 1), so a grant's samples can be interleaved with other
  grants' in the engine's continuous batch; prompt prefixes are shared by prefix caching.
- Every generated token is reported with the log-prob of the distribution it was sampled
  from (vLLM `processed_logprobs`: after temperature / top-p) and the policy version of the
  weights that produced it. Weights are swapped between engine steps, in place (no engine
  restart), and the prefix cache is reset with them so no KV from old weights is reused.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch


def configure_vllm_env(kv_cache_gib: float) -> None:
    """Process-wide vLLM settings; must run before vllm is imported."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in-process: 3-5 s start
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, round(kv_cache_gib))))
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")


@dataclass(slots=True)
class Sample:
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)
    finished: bool = False
    truncated: bool = False


class Engine:
    def __init__(self, model_path: str, *, max_model_len: int, max_tokens: int,
                 temperature: float, top_p: float, seed: int, kv_cache_gib: float,
                 dtype: str = "float32",
                 gpu_memory_utilization: float = 0.85, tensor_parallel_size: int = 1,
                 enforce_eager: bool = True) -> None:
        configure_vllm_env(kv_cache_gib)
        from vllm import LLM, SamplingParams
        from vllm.sampling_params import RequestOutputKind

        kwargs: dict = {}
        if not torch.cuda.is_available():
            kwargs["kv_cache_memory_bytes"] = int(kv_cache_gib * (1 << 30))
        else:
            kwargs["gpu_memory_utilization"] = gpu_memory_utilization
        self.llm = LLM(model=model_path, max_model_len=max_model_len, seed=seed,
                       enforce_eager=enforce_eager, tensor_parallel_size=tensor_parallel_size,
                       logprobs_mode="processed_logprobs", enable_prefix_caching=True, dtype=dtype,
                       **kwargs)
        self.engine = self.llm.llm_engine
        self.params = SamplingParams(n=1, temperature=temperature, top_p=top_p,
                                     max_tokens=max_tokens, logprobs=0,
                                     output_kind=RequestOutputKind.DELTA)
        self.max_tokens = max_tokens
        self.tokenizer = self.llm.get_tokenizer()
        self.version = 0
        self.samples: dict[str, Sample] = {}

    def add(self, request_id: str, prompt_token_ids: list[int]) -> None:
        self.samples[request_id] = Sample()
        self.engine.add_request(request_id, {"prompt_token_ids": prompt_token_ids}, self.params)

    def busy(self) -> bool:
        return self.engine.has_unfinished_requests()

    def step(self) -> list[tuple[str, Sample]]:
        """One engine step; returns the samples that finished in it."""
        done = []
        for out in self.engine.step():
            s = self.samples.get(out.request_id)
            if s is None:
                continue
            for c in out.outputs:
                s.tokens.extend(c.token_ids)
                # logprobs=0 returns exactly the sampled token's log-prob at each position
                for tok, lp in zip(c.token_ids, c.logprobs or [], strict=True):
                    s.logprobs.append(lp[tok].logprob)
                s.versions.extend([self.version] * len(c.token_ids))
                if out.finished:
                    s.truncated = c.finish_reason == "length"
            if out.finished:
                s.finished = True
                done.append((out.request_id, self.samples.pop(out.request_id)))
        return done

    def load_weights(self, tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        """Swap weights in place between steps and stamp `version` on every later token."""
        worker = self.engine.model_executor.driver_worker.worker
        worker.reload_weights(weights_iterator=iter(tensors))
        self._refresh_tied_lm_head(worker.model_runner.model)
        self.llm.reset_prefix_cache()
        self.version = version

    @staticmethod
    def _refresh_tied_lm_head(model) -> None:
        """A tied LM head receives no tensor of its own in a reload, so vLLM puts its old
        kernel-format weights back (on CPU a pre-packed GEMM of the *old* embedding). Re-run
        its post-load processing so the logits use the new embedding."""
        head = getattr(model, "lm_head", None)
        embed = getattr(getattr(model, "model", None), "embed_tokens", None)
        if head is None or embed is None or getattr(head, "weight", None) is None:
            return
        if head.weight.data_ptr() == embed.weight.data_ptr():
            head.quant_method.process_weights_after_loading(head)

    def abort(self, request_ids: list[str]) -> None:
        self.engine.abort_request(request_ids)
        for r in request_ids:
            self.samples.pop(r, None)
