"""Answer checkers: pure functions (completion, reference answer) -> correct?

A checker may raise or run long; `tasks.scoring.Verifier` turns both into a score of 0 and
counts them. Checkers named in `CHEAP` run in bounded time (a regex or string comparison over
the completion) and are run in the caller; every other checker runs in a worker process.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Literal

AnswerExtraction = Literal["boxed", "answer_line", "either"]
DEFAULT_EXTRACTION: AnswerExtraction = "either"

_INT = re.compile(r"-?\d+")
# DAPO-Math-17k asks for "the last line of your response should be of the form Answer: $Answer"
# (its reward, verl's math_dapo, reads the last `Answer:`); markdown bold is tolerated.
_ANSWER_LINE = re.compile(r"^[ \t]*(?:\*\*)?answer(?:\*\*)?[ \t]*:(?:\*\*)?[ \t]*(.*?)[ \t]*$",
                          re.IGNORECASE | re.MULTILINE)


def check_integer(completion: str, answer: str) -> bool:
    """Exact integer match of the first integer in the completion."""
    m = _INT.search(completion)
    return m is not None and int(m.group()) == int(answer)


def check_reversed_integer(completion: str, answer: str) -> bool:
    """Built-in task: the completion is the answer's digits reversed (nothing else)."""
    text = completion.strip()
    return text.isdigit() and text[::-1].lstrip("0") == answer.lstrip("0")


def _last_boxed(text: str) -> tuple[int, str] | None:
    """(position, content) of the last \\boxed{...} with balanced braces, or None."""
    start = text.rfind("\\boxed")
    if start < 0:
        return None
    i = text.find("{", start)
    if i < 0:
        return None
    depth = 0
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return start, text[i + 1:j]
    return None


def extract_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} (balanced braces), or None."""
    found = _last_boxed(text)
    return None if found is None else found[1]


def _last_answer_line(text: str) -> tuple[int, str] | None:
    last = None
    for m in _ANSWER_LINE.finditer(text):
        if m.group(1):
            last = m
    if last is None:
        return None
    value = last.group(1).rstrip(".").strip()
    if len(value) > 1 and value[0] == value[-1] == "$":  # "Answer: $\frac{3}{4}$"
        value = value.strip("$").strip()
    return last.start(), value


def extract_answer(text: str, extraction: AnswerExtraction = DEFAULT_EXTRACTION) -> str | None:
    """The final answer a completion states: its last \\boxed{} (`boxed`), its last
    `Answer:` line (`answer_line`), or (`either`) whichever of the two comes last in the text,
    so a completion that states two different answers is judged by its final one."""
    found = [f for f in ((_last_boxed(text) if extraction != "answer_line" else None),
                         (_last_answer_line(text) if extraction != "boxed" else None))
             if f is not None]
    return max(found)[1] if found else None


def check_math(completion: str, answer: str,
               extraction: AnswerExtraction = DEFAULT_EXTRACTION) -> bool:
    """The completion's final answer (see `extract_answer`) equals the reference by value:
    HF math-verify's LaTeX/sympy equivalence (`\\frac{3}{4}` equals `0.75`)."""
    from math_verify import parse, verify

    pred_text = extract_answer(completion, extraction)
    if pred_text is None:
        return False
    # math-verify's own signal-based timeouts only work in a main thread (parse raises
    # anywhere else); tasks.scoring runs this in a worker process and kills it on timeout.
    gold = parse(f"${answer}$" if "$" not in answer and "\\boxed" not in answer else answer,
                 parsing_timeout=None)  # type: ignore[arg-type]
    pred = parse(f"\\boxed{{{pred_text}}}", parsing_timeout=None)  # type: ignore[arg-type]
    return bool(verify(gold, pred, timeout_seconds=None))  # type: ignore[arg-type]


CHECKERS: dict[str, Callable[[str, str], bool]] = {
    "integer": check_integer,
    "reversed-integer": check_reversed_integer,
    "math": check_math,
}
CHEAP = frozenset({"integer", "reversed-integer"})
