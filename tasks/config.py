"""Configuration of the problem set (built-in arithmetic or local files)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class TaskConfig(BaseModel):
    """Where problems come from and how answers are checked."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["arithmetic", "file"] = Field(
        "arithmetic", description="built-in arithmetic task, or a local jsonl/parquet file")
    seed: int = Field(0, description="seed of the built-in task's problem generator")
    num_problems: int = Field(2048, ge=1, description="training problems of the built-in task")
    num_eval_problems: int = Field(256, ge=1, description="held-out problems of the built-in task")
    max_digits: int = Field(4, ge=1, le=9, description="largest operand digit count (built-in)")
    path: Path | None = Field(None, description="training problems file (kind = 'file')")
    eval_path: Path | None = Field(None, description="held-out problems file (kind = 'file')")
    id_field: str = Field("id", description="field holding the problem id (row index if absent)")
    prompt_field: str = Field("prompt", description="field holding the prompt text")
    answer_field: str = Field("answer", description="field holding the reference answer")
    verifier: Literal["reversed-integer", "integer", "math"] | None = Field(
        None, description="answer checker; default: reversed-integer (built-in) / math (files)")
    verifier_timeout_s: float = Field(5.0, gt=0, description="per-answer verifier time limit")

    @model_validator(mode="after")
    def _check_paths(self) -> TaskConfig:
        if self.kind == "file":
            if self.path is None:
                raise ValueError("task.path is required when task.kind = 'file'")
            for name in ("path", "eval_path"):
                p = getattr(self, name)
                if p is not None and not Path(p).is_file():
                    raise ValueError(f"task.{name}: no such file: {p}")
        return self

    @property
    def verifier_name(self) -> str:
        if self.verifier is not None:
            return self.verifier
        return "reversed-integer" if self.kind == "arithmetic" else "math"
