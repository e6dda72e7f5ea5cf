"""Answer checkers. A checker never raises: errors and timeouts score 0 and are counted."""

from __future__ import annotations

import re
import threading
from collections import Counter
from collections.abc import Callable

_INT = re.compile(r"-?\d+")


def check_integer(completion: str, answer: str) -> bool:
    """Exact integer match of the first integer in the completion."""
    m = _INT.search(completion)
    return m is not None and int(m.group()) == int(answer)


def check_reversed_integer(completion: str, answer: str) -> bool:
    """Built-in task: the completion is the answer's digits reversed (nothing else)."""
    text = completion.strip()
    return text.isdigit() and text[::-1].lstrip("0") == answer.lstrip("0")


def extract_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} (balanced braces), or None."""
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
                return text[i + 1:j]
    return None


def check_math(completion: str, answer: str) -> bool:
    """Math answers via HF math-verify (LaTeX/sympy equivalence) on the boxed answer."""
    from math_verify import parse, verify

    boxed = extract_boxed(completion)
    if boxed is None:
        return False
    # math-verify's own signal-based timeouts only work in the main thread (parse raises
    # anywhere else); Verifier runs this in a thread and times out from outside instead.
    gold = parse(f"${answer}$" if "$" not in answer and "\\boxed" not in answer else answer,
                 parsing_timeout=None)  # type: ignore[arg-type]
    pred = parse(f"\\boxed{{{boxed}}}", parsing_timeout=None)  # type: ignore[arg-type]
    return bool(verify(gold, pred, timeout_seconds=None))


CHECKERS: dict[str, Callable[[str, str], bool]] = {
    "integer": check_integer,
    "reversed-integer": check_reversed_integer,
    "math": check_math,
}


class Verifier:
    """Scores completions with a named checker; counts errors and timeouts (score 0)."""

    def __init__(self, timeout_s: float = 5.0) -> None:
        self.timeout_s = timeout_s
        self.counters: Counter[str] = Counter()

    def score(self, name: str, completion: str, answer: str) -> float:
        check = CHECKERS.get(name)
        if check is None:
            self.counters["unknown_verifier"] += 1
            return 0.0
        if name != "math":  # cheap pure-Python checks: no thread needed
            try:
                return 1.0 if check(completion, answer) else 0.0
            except Exception:
                self.counters["verifier_error"] += 1
                return 0.0
        result: list[bool] = []
        error: list[BaseException] = []

        def run() -> None:
            try:
                result.append(check(completion, answer))
            except BaseException as e:  # noqa: BLE001 - any checker failure scores 0
                error.append(e)

        t = threading.Thread(target=run, daemon=True)
        t.start()
        t.join(self.timeout_s)
        if t.is_alive():
            self.counters["verifier_timeout"] += 1
            return 0.0
        if error:
            self.counters["verifier_error"] += 1
            return 0.0
        return 1.0 if result and result[0] else 0.0
