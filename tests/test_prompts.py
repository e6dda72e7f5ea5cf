"""Prompt building (tasks.prompts): the one function actors, the learner's held-out evaluation
and `dynamo-rl eval` use, with defaults resolved from the dataset."""

from __future__ import annotations

from pathlib import Path

import pytest

from launch.embedded_model import build_tokenizer
from tasks.config import TaskConfig
from tasks.problems import Problem
from tasks.prompts import (
    MATH_TEMPLATE,
    PromptFormat,
    prompt_token_ids,
    render_problems,
    render_prompt,
    resolved_prompt_format,
)

ROLES = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}|{% endfor %}"
         "{% if add_generation_prompt %}<assistant>{% endif %}")


@pytest.fixture
def chat_tok():
    tok = build_tokenizer()  # a real HF fast tokenizer (the tiny model's)
    tok.chat_template = ROLES
    return tok


@pytest.fixture
def math_task(tmp_path: Path) -> TaskConfig:
    path = tmp_path / "train.jsonl"
    path.write_text('{"problem": "P", "answer": "1"}\n')
    return TaskConfig(kind="file", path=path)


def test_the_builtin_task_sends_its_bare_prompt_even_with_a_chat_template(chat_tok) -> None:
    fmt = resolved_prompt_format(TaskConfig())
    assert fmt == PromptFormat("{problem}", None, False)
    assert prompt_token_ids(chat_tok, "1+2=", fmt) == chat_tok.encode(
        "1+2=", add_special_tokens=False) == [4, 13, 5, 14]


def test_math_files_default_to_the_cot_instruction_in_the_chat_template(
        chat_tok, math_task: TaskConfig) -> None:
    fmt = resolved_prompt_format(math_task)
    assert fmt == PromptFormat(MATH_TEMPLATE, None, None)
    cot = ("1+2\nPlease reason step by step, and put your final answer within \\boxed{}.")
    assert render_prompt(chat_tok, "1+2", fmt) == f"<user>{cot}|<assistant>"
    chat_tok.chat_template = None  # a base model without one: the plain text
    assert render_prompt(chat_tok, "1+2", fmt) == cot


def test_configured_template_system_prompt_and_chat_switch_are_applied(
        chat_tok, math_task: TaskConfig) -> None:
    task = math_task.model_copy(update={"prompt_template": "Q: {problem}\nA:",
                                        "system_prompt": "Be brief."})
    fmt = resolved_prompt_format(task)
    assert render_prompt(chat_tok, "1+2", fmt) == "<system>Be brief.|<user>Q: 1+2\nA:|<assistant>"
    off = resolved_prompt_format(task.model_copy(update={"chat_template": False}))
    assert render_prompt(chat_tok, "1+2", off) == "Be brief.\n\nQ: 1+2\nA:"
    # Explicit settings hold for the built-in task too (its defaults are only defaults).
    arith = resolved_prompt_format(TaskConfig(chat_template=True))
    assert render_prompt(chat_tok, "1+2=", arith) == "<user>1+2=|<assistant>"


def test_a_required_chat_template_the_tokenizer_lacks_is_an_error(math_task: TaskConfig) -> None:
    fmt = resolved_prompt_format(math_task.model_copy(update={"chat_template": True}))
    with pytest.raises(ValueError, match="tokenizer has no chat template"):
        render_prompt(build_tokenizer(), "1+2", fmt)


def test_braces_in_templates_and_problems_survive(chat_tok) -> None:
    fmt = PromptFormat("{problem} in \\boxed{}", None, False)
    assert render_prompt(chat_tok, "Find {x}", fmt) == "Find {x} in \\boxed{}"


def test_a_file_benchmark_of_a_builtin_task_run_gets_math_defaults() -> None:
    task = TaskConfig(system_prompt="S")
    assert resolved_prompt_format(task, "file") == PromptFormat(MATH_TEMPLATE, "S", None)


def test_rendered_problems_encode_to_the_ids_actors_send(chat_tok,
                                                          math_task: TaskConfig) -> None:
    fmt = resolved_prompt_format(math_task)
    problems = [Problem("a", "1+2", "3", "d1"), Problem("b", "4+5", "9")]
    rendered = render_problems(chat_tok, problems, fmt)
    assert [(q.id, q.answer, q.difficulty) for q in rendered] == [("a", "3", "d1"),
                                                                  ("b", "9", "")]
    for q, r in zip(problems, rendered, strict=True):  # what the learner's evaluation encodes
        assert chat_tok.encode(r.prompt, add_special_tokens=False) == prompt_token_ids(
            chat_tok, q.prompt, fmt)
