"""The text a model is given for a problem: one function for training and evaluation.

Actors (training rollouts), the learner's held-out evaluation and `dynamo-rl eval` all build
prompts with `prompt_token_ids(tokenizer, problem, resolved_prompt_format(task))`, so a model is
evaluated on exactly the format it was trained on. The defaults that depend on the dataset
are resolved here and nowhere else.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

from tasks.config import TaskConfig
from tasks.problems import Problem

# Qwen2.5-Math's chain-of-thought instruction. `{problem}` is replaced with str.replace
# (str.format would trip on the braces of \boxed{}).
MATH_TEMPLATE = ("{problem}\nPlease reason step by step, and put your final answer within "
                 "\\boxed{}.")


@dataclass(frozen=True, slots=True)
class PromptFormat:
    """How a problem's text becomes the prompt.

    chat_template: True wraps it in the tokenizer's chat template (an error if there is
    none), None does so when the tokenizer has one, False never does.
    """

    template: str = "{problem}"
    system_prompt: str | None = None
    chat_template: bool | None = False


def resolved_prompt_format(task: TaskConfig,
                           kind: Literal["arithmetic", "file"] | None = None) -> PromptFormat:
    """The task's prompt format, its unset fields defaulted by dataset `kind` (the task's
    own unless given: `dynamo-rl eval` puts file benchmarks to a model trained on the
    built-in task): math (files, the rehearsal) gets the Qwen2.5-Math CoT instruction in the
    tokenizer's chat template if it has one; the built-in task its bare prompt, as the tiny
    model learnt it."""
    math = (kind or task.kind) != "arithmetic"
    return PromptFormat(
        template=task.prompt_template if task.prompt_template is not None
        else MATH_TEMPLATE if math else "{problem}",
        system_prompt=task.system_prompt,
        chat_template=task.chat_template if task.chat_template is not None
        else None if math else False)


def render_prompt(tokenizer, problem: str, fmt: PromptFormat) -> str:
    """The prompt text for `problem` (special tokens of a chat template included)."""
    text = fmt.template.replace("{problem}", problem)
    has_chat = bool(getattr(tokenizer, "chat_template", None))
    if fmt.chat_template and not has_chat:
        raise ValueError("task.chat_template = true but the tokenizer has no chat template")
    if has_chat and fmt.chat_template is not False:
        messages = [{"role": "user", "content": text}]
        if fmt.system_prompt is not None:
            messages.insert(0, {"role": "system", "content": fmt.system_prompt})
        return tokenizer.apply_chat_template(messages, tokenize=False,
                                             add_generation_prompt=True)
    return text if fmt.system_prompt is None else f"{fmt.system_prompt}\n\n{text}"


def prompt_token_ids(tokenizer, problem: str, fmt: PromptFormat) -> list[int]:
    """Token ids of the prompt for `problem`; a chat template writes its own special tokens,
    so none are added here."""
    return tokenizer.encode(render_prompt(tokenizer, problem, fmt), add_special_tokens=False)


def render_problems(tokenizer, problems: list[Problem], fmt: PromptFormat) -> list[Problem]:
    """`problems` with each prompt replaced by its rendered text (for a consumer that encodes
    prompts as given: the learner's held-out evaluation)."""
    return [dataclasses.replace(q, prompt=render_prompt(tokenizer, q.prompt, fmt))
            for q in problems]
