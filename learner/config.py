"""Configuration of the learner (DeepSpeed trainer, docs/DESIGN.md §3-7)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class LearnerConfig(BaseModel):
    """Optimisation, batching, off-policy correction, weight publishing, checkpoints."""

    model_config = ConfigDict(extra="forbid")

    ranks: int = Field(1, ge=1, description="data-parallel learner processes (local launcher)")
    total_steps: int = Field(40, ge=1, description="optimizer steps to train")
    prompts_per_step: int = Field(32, ge=1, description="rollout groups consumed per step")
    mini_batch_prompts: int | None = Field(
        None, ge=1, description="groups per optimizer update; a batch of prompts_per_step "
        "groups gives prompts_per_step / mini_batch_prompts updates per epoch, all against the "
        "πold of the batch start (None: prompts_per_step, one update per batch)")
    ppo_epochs: int = Field(1, ge=1, description="passes over each rollout batch")
    micro_batch_seqs: int = Field(256, ge=1, description="sequences per forward/backward pass "
                                  "(at most)")
    micro_batch_tokens: int | None = Field(
        None, ge=1, description="token budget of a micro-batch (rows x longest row): as many "
        "sequences as fit, capped by micro_batch_seqs (None: micro_batch_seqs rows)")
    dynamo_stats_scope: Literal["micro_batch", "update"] = Field(
        "micro_batch", description="where H_min/H_max (β_comp) and max Ξ (β_stab) are taken: "
        "each micro-batch (the official code) or the whole optimizer update, all ranks "
        "(costs one extra forward pass per update)")
    share_prompts: bool = Field(
        True, description="run each group's prompt once per micro-batch, its samples attending "
        "to its keys and values (exact; fewer tokens than n full rows); off under "
        "gradient_checkpointing")
    logits_chunk_mib: float = Field(
        64.0, gt=0, description="LM-head chunk: float32 logits alive at once, in MiB")
    gradient_checkpointing: bool = Field(False, description="recompute the transformer's "
                                         "activations in backward (less memory, ~1/3 more time)")
    lr: float = Field(1e-4, gt=0, description="peak learning rate")
    warmup_steps: int = Field(2, ge=0, description="linear warm-up steps")
    weight_decay: float = Field(0.1, ge=0, description="AdamW weight decay")
    grad_clip: float = Field(1.0, gt=0, description="gradient norm clip")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas")
    zero_stage: int = Field(0, ge=0, le=3, description="DeepSpeed ZeRO stage")
    dtype: Literal["fp32", "bf16"] = Field("fp32", description="training precision")
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = Field(
        "sdpa", description="the transformer's attention kernels in training (transformers' "
        "names; flash_attention_2 needs a GPU, bf16 and the flash-attn package)")
    is_mode: Literal["tis", "bypass", "mask"] = Field(
        "tis", description="off-policy correction: truncated IS, bypass (πold = μ), or masking")
    is_cap: float = Field(2.0, gt=0, description="C: truncation of the IS weight")
    mask_low: float = Field(0.5, gt=0, description="mask mode: lowest IS weight kept")
    mask_high: float = Field(2.0, gt=0, description="mask mode: highest IS weight kept")
    skip_zero_signal: bool = Field(True, description="skip groups whose rewards are all equal")
    comp_constant: float | None = Field(
        None, gt=0, description="control experiment: multiply A > 0 tokens by this constant "
        "instead of β_comp (β_stab unchanged; modulation presets only; None: β_comp)")
    publish_every: int = Field(1, ge=1, description="publish weights every k batches")
    weight_chunk_mib: float = Field(8.0, gt=0, description="weight message chunk size")
    checkpoint_every: int = Field(20, ge=1, description="checkpoint every k steps")
    eval_every: int = Field(10, ge=0, description="held-out evaluation every k steps (0: off)")
    eval_samples: int = Field(4, ge=1, description="samples per held-out problem for pass@1")
    grad_variance_every: int = Field(
        0, ge=0, description="every k versions, estimate gradient variance by split-half "
        "(one extra forward/backward; 0: off)")
    replica_check_every: int = Field(
        1, ge=0, description="with several ranks, compare every rank's weights (CRC-32C of the "
        "gathered parameters) every k versions published; 0: never")
    seed: int = Field(0, description="torch seed")

    @property
    def groups_per_update(self) -> int:
        return self.mini_batch_prompts or self.prompts_per_step

    @property
    def updates_per_batch(self) -> int:
        """Most optimizer updates (policy versions) one rollout batch can take."""
        return -(-self.prompts_per_step // self.groups_per_update) * self.ppo_epochs

    @model_validator(mode="after")
    def _check(self) -> LearnerConfig:
        problems = check_learner(self, self.ranks)
        if problems:
            raise ValueError("; ".join(problems))
        return self


def check_learner(cfg: LearnerConfig, world: int) -> list[str]:
    """What this learner cannot run with `world` ranks (also checked at start-up with the
    real world size, which torchrun may set differently from `ranks`)."""
    out = []
    if cfg.mini_batch_prompts and cfg.prompts_per_step % cfg.mini_batch_prompts:
        out.append(f"learner.prompts_per_step = {cfg.prompts_per_step} is not a multiple of "
                   f"learner.mini_batch_prompts = {cfg.mini_batch_prompts}")
    if cfg.grad_variance_every and (cfg.zero_stage >= 2 or world > 1):
        out.append(f"learner.grad_variance_every needs one rank and learner.zero_stage <= 1 "
                   f"(full gradients on one process), got ranks = {world}, zero_stage = "
                   f"{cfg.zero_stage}")
    if cfg.eval_every and cfg.zero_stage == 3 and world > 1:
        out.append("learner.eval_every must be 0 with learner.zero_stage = 3 and several "
                   "ranks (rank 0 alone cannot run the partitioned model); evaluate "
                   "checkpoints with `dynamo-rl eval`")
    if cfg.attn_implementation == "flash_attention_2" and cfg.dtype != "bf16":
        out.append("learner.attn_implementation = 'flash_attention_2' needs learner.dtype = "
                   "'bf16' (flash-attn has no float32 kernels)")
    return out
