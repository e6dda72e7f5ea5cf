"""Configuration of the allocator service (docs/DESIGN.md §2)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from allocator.budget import check_budget_feasible


class AllocatorConfig(BaseModel):
    """Round size, per-problem budgets, leases and pacing."""

    model_config = ConfigDict(extra="forbid")

    batch_prompts: int = Field(32, ge=1, description="B: prompts per allocation round")
    n_mean: int = Field(16, ge=2, description="mean samples per prompt; round total N = B*n_mean")
    n_min: int = Field(8, ge=2, description="fewest samples any prompt gets")
    n_max: int = Field(24, ge=2, description="most samples any prompt gets")
    initial_budget: int = Field(
        4, ge=1, description="samples for prompts still being explored (raised to n_min)")
    rule: Literal["variance", "std", "uniform"] | None = Field(
        None, description="priority rule; default follows the run's preset")
    mastery_threshold: float = Field(
        0.85, gt=0, le=1, description="pass rate at which a problem counts as mastered")
    min_priority: float = Field(0.01, gt=0, description="priority floor (mastered problems)")
    stats_half_life: float | None = Field(
        None, gt=0, description="decay statistics with this half-life in samples (None: no decay)")
    lease_s: float = Field(120.0, gt=0, description="a grant not returned within this is re-issued")
    actor_silence_s: float = Field(
        20.0, gt=0, description="an actor heard from neither by heartbeat nor by request for this "
        "long is taken for dead: its unreported grants are re-issued at once (not at their lease's "
        "end) and it no longer counts for the fair share; must exceed a few actor.heartbeat_s")
    max_staleness: int = Field(
        2, ge=0, description="learner versions of work that may be outstanding (0 = synchronous)")
    snapshot_every_s: float = Field(10.0, gt=0, description="period of state snapshots")
    seed: int = Field(0, description="seed of the epoch shuffles")

    @model_validator(mode="after")
    def _check_budget(self) -> AllocatorConfig:
        check_budget_feasible(self.batch_prompts, self.n_mean, self.n_min, self.n_max,
                              self.initial_budget)  # BudgetError (a ValueError) names the numbers
        return self

    @property
    def round_total(self) -> int:
        return self.batch_prompts * self.n_mean
