"""Problem sets: the built-in arithmetic task and local jsonl/parquet files.

A problem is (id, prompt, answer, difficulty). Ids are unique within a set; the built-in
task is a pure function of its seed, so every process rebuilds the identical set.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tasks.config import TaskConfig


@dataclass(frozen=True, slots=True)
class Problem:
    id: str
    prompt: str
    answer: str
    difficulty: str = ""


def arithmetic_problem(a: int, b: int) -> Problem:
    """`a+b=` whose completion is the sum's digits reversed, then EOS.

    Reversed digits let a tiny transformer emit the least significant digit first, the
    order in which carries are computed (ENVIRONMENT.md: much easier to learn).
    """
    difficulty = f"d{max(len(str(a)), len(str(b)))}"
    return Problem(id=f"{a}+{b}", prompt=f"{a}+{b}=", answer=str(a + b), difficulty=difficulty)


def _sample_pairs(rng: np.random.Generator, count: int, max_digits: int) -> list[tuple[int, int]]:
    # Digit counts drawn uniformly per operand, so easy (1-digit) and hard (max-digit)
    # problems are both common and per-problem pass rates spread widely.
    da = rng.integers(1, max_digits + 1, size=count)
    db = rng.integers(1, max_digits + 1, size=count)
    lo_a, hi_a = np.where(da == 1, 0, 10 ** (da - 1)), 10**da
    lo_b, hi_b = np.where(db == 1, 0, 10 ** (db - 1)), 10**db
    a = lo_a + (rng.random(count) * (hi_a - lo_a)).astype(np.int64)
    b = lo_b + (rng.random(count) * (hi_b - lo_b)).astype(np.int64)
    return list(zip(a.tolist(), b.tolist(), strict=True))


def arithmetic_problems(seed: int, num_train: int, num_eval: int,
                        max_digits: int = 4) -> tuple[list[Problem], list[Problem]]:
    """Disjoint training and held-out sets, deterministic from `seed`."""
    capacity = (10**max_digits) ** 2
    if num_train + num_eval > capacity // 2:
        raise ValueError(f"{num_train + num_eval} problems requested from a space of {capacity}")
    rng = np.random.default_rng(seed)
    seen: set[tuple[int, int]] = set()
    ordered: list[tuple[int, int]] = []
    while len(ordered) < num_train + num_eval:
        for pair in _sample_pairs(rng, 2 * (num_train + num_eval), max_digits):
            if pair not in seen:
                seen.add(pair)
                ordered.append(pair)
                if len(ordered) == num_train + num_eval:
                    break
    problems = [arithmetic_problem(a, b) for a, b in ordered]
    return problems[:num_train], problems[num_train:]


# Field names as the usual math datasets publish them; the first one present in a file's first
# row is used. DAPO-Math-17k (verl parquet): `prompt` (a chat list), `reward_model.ground_truth`,
# `extra_info.index`; MATH500: `problem`, `answer`, `unique_id`; AIME / AMC: `problem` or
# `question`, `answer`, sometimes `id`; OlympiadBench: `final_answer`.
PROMPT_FIELDS = ("prompt", "problem", "question")
ANSWER_FIELDS = ("answer", "reward_model.ground_truth", "final_answer")
ID_FIELDS = ("id", "unique_id", "extra_info.index")


def load_problem_file(path: str | Path, *, id_field: str | None = None,
                      prompt_field: str | None = None,
                      answer_field: str | None = None) -> list[Problem]:
    """Read a jsonl or parquet file of problems (e.g. DAPO-Math-17k, MATH500, AIME).

    A field not named is detected from the first row (`PROMPT_FIELDS`, `ANSWER_FIELDS`,
    `ID_FIELDS`); without an id field the row index is the id. Nested fields are addressed
    with dots (`reward_model.ground_truth`), and a prompt stored as a chat message list uses
    its last user message.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"problem file not found: {p}")
    rows = _read_rows(p)
    if not rows:
        return []
    prompt_field = prompt_field or _detect(rows[0], PROMPT_FIELDS, "prompt", p)
    answer_field = answer_field or _detect(rows[0], ANSWER_FIELDS, "answer", p)
    id_field = id_field or next((f for f in ID_FIELDS if _field(rows[0], f, p, 0, None)
                                 is not None), None)
    problems = []
    for i, row in enumerate(rows):
        prompt = _field(row, prompt_field, p, i)
        if isinstance(prompt, list):  # chat format: [{"role": ..., "content": ...}, ...]
            users = [m["content"] for m in prompt if m.get("role") == "user"]
            prompt = users[-1] if users else prompt[-1]["content"]
        answer = _field(row, answer_field, p, i)
        pid = str(i) if id_field is None else _field(row, id_field, p, i, default=str(i))
        problems.append(Problem(id=str(pid), prompt=str(prompt), answer=str(answer),
                                difficulty=str(row.get("level", row.get("difficulty", "")))))
    ids = [q.id for q in problems]
    if len(set(ids)) != len(ids):
        raise ValueError(f"problem file {p}: ids in field {id_field!r} are not unique")
    return problems


def _read_rows(p: Path) -> list[dict]:
    if p.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(p).to_pylist()
    if p.suffix not in (".jsonl", ".json"):
        raise ValueError(f"problem file {p}: unsupported format (use .jsonl or .parquet)")
    rows = []
    with p.open() as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{p}:{lineno}: not valid JSON: {e}") from None
    return rows


def _detect(row: dict, names: tuple[str, ...], what: str, path: Path) -> str:
    for name in names:
        if _field(row, name, path, 0, None) is not None:
            return name
    raise ValueError(f"{path}: no {what} field found (looked for {', '.join(names)}; fields: "
                     f"{sorted(row)}); name it with task.{what}_field")


_MISSING = object()


def _field(row: dict, name: str, path: Path, index: int, default: object = _MISSING) -> object:
    node: object = row
    for part in name.split("."):
        # A null counts as missing: parquet stores a field absent from some rows as null.
        if not isinstance(node, dict) or node.get(part) is None:
            if default is not _MISSING:
                return default
            raise ValueError(f"{path}: row {index} has no field {name!r} "
                             f"(fields: {sorted(row)})")
        node = node[part]
    return node


def load_task(cfg: TaskConfig) -> tuple[list[Problem], list[Problem]]:
    """(training problems, held-out problems) of a task config."""
    if cfg.kind == "arithmetic":
        return arithmetic_problems(cfg.seed, cfg.num_problems, cfg.num_eval_problems,
                                   cfg.max_digits)
    if cfg.kind == "math-rehearsal":  # generated, then read like any dataset file
        from tasks.math_rehearsal import rehearsal_files

        train_path, held_out_path = rehearsal_files(cfg)
        return load_problem_file(train_path), load_problem_file(held_out_path)
    fields = dict(id_field=cfg.id_field, prompt_field=cfg.prompt_field,
                  answer_field=cfg.answer_field)  # None: detected per file
    train = load_problem_file(cfg.path, **fields)  # type: ignore[arg-type]
    held_out = load_problem_file(cfg.eval_path, **fields) if cfg.eval_path else []
    return train, held_out
