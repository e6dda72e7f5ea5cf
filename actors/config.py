"""Configuration of an actor (a vLLM engine generating rollouts)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

# oneDNN's primitive cache (kernels compiled per matrix shape) in an actor: 1,024 entries by
# default, which vLLM's varying batch shapes fill for many minutes (+17-24 MiB/min per actor
# after minute 2, ~360 MiB in all); 256 keeps RSS flat with no loss of throughput here
# (measured side by side, docs/GUARANTEES.md). An ONEDNN_PRIMITIVE_CACHE_CAPACITY already in
# the environment wins.
ONEDNN_CACHE_CAPACITY = "256"


class ActorConfig(BaseModel):
    """Engine and sampling settings of every actor process."""

    model_config = ConfigDict(extra="forbid")

    num_actors: int = Field(1, ge=0, description="actor processes the local launcher starts")
    max_tokens: int = Field(16, ge=1, description="most generated tokens per completion")
    max_model_len: int = Field(64, ge=8, description="engine context length (prompt + completion)")
    temperature: float = Field(1.0, gt=0, description="sampling temperature")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling mass")
    prefetch_grants: int = Field(
        128, ge=1, description="grants held ahead of the engine so it never waits for work")
    max_batch_grants: int = Field(
        96, ge=1, description="grants submitted to the engine at once: enough that vLLM's "
        "waiting queue refills the batch while groups finish their last samples (32 kept the "
        "batch short of its 256 sequences: 0.80 of vLLM alone vs 0.92 at 96)")
    kv_cache_gib: float = Field(
        1.0, gt=0, description="KV cache size on CPU (GiB); vLLM's CPU blocks hold 128 "
        "tokens, so a batch of 256 short sequences takes 256 blocks (25M model: 384 MiB)")
    gpu_memory_utilization: float = Field(0.85, gt=0, le=1, description="GPU memory share")
    tensor_parallel_size: int = Field(1, ge=1, description="GPUs per actor engine")
    sleep_after_s: float = Field(
        0.5, ge=0, description="placement = colocated on GPU: the engine frees its GPU memory "
        "for the learner (vLLM sleep mode) after this long without work, and wakes for the "
        "next weights or grant; 0: as soon as it has none")
    weight_loader: Literal["packed", "vllm_api"] = Field(
        "packed", description="how new weights enter the engine: packed (CPU: kernel handles "
        "packed off the engine thread, swapped in ~1 ms; elsewhere vLLM's in-process reload) "
        "or vllm_api (vLLM's weight-transfer API on every worker, our broadcast as its "
        "backend: what tensor_parallel_size > 1 and GPUs need; see docs/WEIGHTS.md)")
    dtype: str = Field(
        "float32", description="engine dtype; float32 on CPU keeps behaviour log-probs equal to "
        "the learner's fp32 recompute, bfloat16 for GPU runs")
    enforce_eager: bool = Field(True, description="skip CUDA graph / compile capture")
    verifier_workers: int = Field(
        2, ge=1, description="processes checking answers with a non-trivial verifier (math); "
        "started on the first such answer, so the built-in task never starts them")
    heartbeat_s: float = Field(2.0, gt=0, description="heartbeat period to the allocator")
    heap_trim_s: float = Field(
        60.0, ge=0, description="seconds between returns of the C heap's freed pages to the "
        "kernel (malloc_trim); 0: never (actors/heap.py, docs/GUARANTEES.md)")
    restart_dead: bool = Field(True, description="launcher restarts an actor that died")
    seed: int = Field(0, description="sampling seed (offset by the actor index)")
