"""Configuration of the problem set (built-in arithmetic or local files)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from tasks.verifiers import DEFAULT_EXTRACTION, AnswerExtraction


class TaskConfig(BaseModel):
    """Where problems come from, how they are put to the model and how answers are checked."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["arithmetic", "file", "math-rehearsal"] = Field(
        "arithmetic", description="built-in arithmetic task, local jsonl/parquet files, or "
        "the math rehearsal (generated word problems written as DAPO-Math-17k parquet and "
        "MATH500 jsonl under data_dir; tasks/math_rehearsal.py)")
    seed: int = Field(0, description="seed of the problem generator (built-in, rehearsal)")
    num_problems: int = Field(2048, ge=1, description="training problems (built-in, rehearsal)")
    num_eval_problems: int = Field(256, ge=1,
                                   description="held-out problems (built-in, rehearsal)")
    data_dir: Path = Field(Path(".cache/data"),
                           description="where the rehearsal's generated files are written")
    max_digits: int = Field(4, ge=1, le=9, description="largest operand digit count (built-in)")
    path: Path | None = Field(None, description="training problems file (kind = 'file')")
    eval_path: Path | None = Field(None, description="held-out problems file (kind = 'file')")
    id_field: str | None = Field(
        None, description="field holding the problem id; default: detected (id, unique_id, "
        "extra_info.index), else the row index")
    prompt_field: str | None = Field(
        None, description="field holding the prompt text (or chat message list); default: "
        "detected (prompt, problem, question)")
    answer_field: str | None = Field(
        None, description="field holding the reference answer; default: detected (answer, "
        "reward_model.ground_truth, final_answer)")
    prompt_template: str | None = Field(
        None, description="text put to the model, `{problem}` replaced by the prompt; default: "
        "the Qwen2.5-Math chain-of-thought instruction for files, the bare prompt for the "
        "built-in task (tasks.prompts.resolved_prompt_format)")
    system_prompt: str | None = Field(
        None, description="system message (or, without a chat template, a first paragraph)")
    chat_template: bool | None = Field(
        None, description="wrap the prompt in the tokenizer's chat template (true: required); "
        "default: for files when the tokenizer has one, never for the built-in task")
    verifier: Literal["reversed-integer", "integer", "math"] | None = Field(
        None, description="answer checker; default: reversed-integer (built-in), else math")
    answer_extraction: AnswerExtraction = Field(
        DEFAULT_EXTRACTION, description="math answers: the last \\boxed{}, the last `Answer:` line "
        "(DAPO-Math-17k's format), or whichever of the two comes last")
    verifier_timeout_s: float = Field(
        5.0, gt=0, description="per-answer verifier time limit; a check over it is killed and "
        "scores 0")

    @model_validator(mode="after")
    def _check(self) -> TaskConfig:
        if self.kind == "file":
            if self.path is None:
                raise ValueError("task.path is required when task.kind = 'file'")
            for name in ("path", "eval_path"):
                p = getattr(self, name)
                if p is not None and not Path(p).is_file():
                    raise ValueError(f"task.{name}: no such file: {p}")
        if self.kind == "math-rehearsal" and (self.path or self.eval_path):
            raise ValueError("task.path / task.eval_path: the math rehearsal writes its own "
                             "files (under task.data_dir); use kind = 'file' for yours")
        if self.prompt_template is not None and "{problem}" not in self.prompt_template:
            raise ValueError("task.prompt_template must contain {problem}")
        return self

    @property
    def verifier_name(self) -> str:
        if self.verifier is not None:
            return self.verifier
        return "reversed-integer" if self.kind == "arithmetic" else "math"
