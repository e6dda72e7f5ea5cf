"""Configuration of the learner (DeepSpeed trainer, DESIGN.md §3-4)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class LearnerConfig(BaseModel):
    """Optimisation, batching, off-policy correction, weight publishing, checkpoints."""

    model_config = ConfigDict(extra="forbid")

    ranks: int = Field(1, ge=1, description="data-parallel learner processes (local launcher)")
    total_steps: int = Field(40, ge=1, description="optimizer steps to train")
    prompts_per_step: int = Field(32, ge=1, description="rollout groups consumed per step")
    micro_batch_seqs: int = Field(256, ge=1, description="sequences per forward/backward pass")
    lr: float = Field(1e-4, gt=0, description="peak learning rate")
    warmup_steps: int = Field(2, ge=0, description="linear warm-up steps")
    weight_decay: float = Field(0.1, ge=0, description="AdamW weight decay")
    grad_clip: float = Field(1.0, gt=0, description="gradient norm clip")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas")
    zero_stage: int = Field(0, ge=0, le=3, description="DeepSpeed ZeRO stage")
    dtype: Literal["fp32", "bf16"] = Field("fp32", description="training precision")
    is_mode: Literal["tis", "bypass", "mask"] = Field(
        "tis", description="off-policy correction: truncated IS, bypass (πold = μ), or masking")
    is_cap: float = Field(2.0, gt=0, description="C: truncation of the IS weight")
    mask_low: float = Field(0.5, gt=0, description="mask mode: lowest IS weight kept")
    mask_high: float = Field(2.0, gt=0, description="mask mode: highest IS weight kept")
    skip_zero_signal: bool = Field(True, description="skip groups whose rewards are all equal")
    publish_every: int = Field(1, ge=1, description="publish weights every k steps")
    weight_chunk_mib: float = Field(8.0, gt=0, description="weight message chunk size")
    checkpoint_every: int = Field(20, ge=1, description="checkpoint every k steps")
    eval_every: int = Field(10, ge=0, description="held-out evaluation every k steps (0: off)")
    grad_variance_every: int = Field(
        0, ge=0, description="every k versions, estimate gradient variance by split-half "
        "(one extra forward/backward; 0: off)")
    seed: int = Field(0, description="torch seed")
