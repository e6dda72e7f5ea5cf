"""Generated math word problems with short worked solutions: the CPU rehearsal of the math
recipe (`task.kind = "math-rehearsal"`).

Guarantees:
- A problem set is a pure function of its seed: every process that needs it (allocator,
  learner, `dynamo-rl eval`) writes or finds the identical files.
- The training set is written in DAPO-Math-17k's parquet schema and the held-out set in
  MATH500's jsonl schema, so the rehearsal loads them through the same code as the real
  datasets (`tasks.problems.load_problem_file`). Training and held-out problems are disjoint.
- Some answers are fractions or expressions, and the worked solutions (the warm start's
  targets) state them in equivalent forms (`\\frac{3}{4}`, `3/4`, `0.75`; `5x + 3`,
  `3 + 5x`): a reward needs math-verify's equivalence, not string equality.
- Files are written to a temporary directory and renamed into place: a half-written set is
  never read.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np

from tasks.config import TaskConfig

GENERATOR_VERSION = 1  # bump when the problems change, so cached files are rewritten
TRAIN_FILE, HELD_OUT_FILE = "dapo-math.parquet", "math500.jsonl"

NAMES = ("Ana", "Ben", "Cara", "Dev", "Eli", "Fay", "Gus", "Ivy", "Jon", "Kim")
ITEMS = ("apples", "books", "coins", "cards", "pens", "shells", "stamps", "marbles")


@dataclass(frozen=True, slots=True)
class WordProblem:
    problem: str
    solution: str  # worked solution ending in \boxed{...}
    answer: str  # the reference answer as the dataset states it
    subject: str  # MATH's subject names
    level: int  # 1 (easiest) to 5


def _number(rng: np.random.Generator, max_digits: int = 2) -> int:
    # Digit count first, so one- and two-digit operands are equally common.
    d = int(rng.integers(1, max_digits + 1))
    return int(rng.integers(1 if d == 1 else 10 ** (d - 1), 10**d))


def _level(*operands: int) -> int:
    return 1 + sum(x >= 10 for x in operands)


def _latex(q: Fraction) -> str:
    if q.denominator == 1:
        return str(q.numerator)
    sign = "-" if q < 0 else ""
    return f"{sign}\\frac{{{abs(q.numerator)}}}{{{q.denominator}}}"


def _plain(q: Fraction) -> str:
    return str(q.numerator) if q.denominator == 1 else f"{q.numerator}/{q.denominator}"


def _decimal(q: Fraction) -> str | None:
    """Exact decimal of q when it terminates within two places, else None."""
    if (q * 100).denominator != 1:
        return None
    return f"{float(q):.2f}".rstrip("0").rstrip(".")


def _stated(rng: np.random.Generator, q: Fraction) -> str:
    """q as a solution may state it: LaTeX fraction, a/b, or a terminating decimal."""
    forms = [_latex(q), _plain(q)] + ([d] if (d := _decimal(q)) is not None else [])
    return forms[int(rng.integers(len(forms)))]


def _reference(rng: np.random.Generator, q: Fraction) -> str:
    """q as a dataset states it (both styles occur in DAPO-Math-17k and MATH500)."""
    return _latex(q) if rng.random() < 0.5 else _plain(q)


def _add(rng: np.random.Generator) -> WordProblem:
    a, b = _number(rng), _number(rng)
    name, item = NAMES[int(rng.integers(len(NAMES)))], ITEMS[int(rng.integers(len(ITEMS)))]
    return WordProblem(f"{name} has {a} {item} and finds {b} more. How many {item} does "
                       f"{name} have now?", f"{a} + {b} = {a + b}. \\boxed{{{a + b}}}",
                       str(a + b), "Prealgebra", _level(a, b))


def _subtract(rng: np.random.Generator) -> WordProblem:
    a, b = sorted((_number(rng), _number(rng)), reverse=True)
    name, item = NAMES[int(rng.integers(len(NAMES)))], ITEMS[int(rng.integers(len(ITEMS)))]
    return WordProblem(f"{name} had {a} {item} and gave away {b}. How many {item} are left?",
                       f"{a} - {b} = {a - b}. \\boxed{{{a - b}}}", str(a - b), "Prealgebra",
                       _level(a, b))


def _multiply(rng: np.random.Generator) -> WordProblem:
    a, b = int(rng.integers(2, 10)), _number(rng)
    item = ITEMS[int(rng.integers(len(ITEMS)))]
    return WordProblem(f"There are {a} boxes with {b} {item} in each box. How many {item} "
                       f"are there in all?", f"{a} * {b} = {a * b}. \\boxed{{{a * b}}}",
                       str(a * b), "Prealgebra", 1 + _level(b))


def _share(rng: np.random.Generator) -> WordProblem:
    a, b = int(rng.integers(1, 13)), int(rng.integers(2, 9))
    q = Fraction(a, b)
    name = NAMES[int(rng.integers(len(NAMES)))]
    return WordProblem(f"{name} shares {a} pizzas equally among {b} friends. How much pizza "
                       f"does each friend get?",
                       f"{a} / {b} = {_plain(q)}. \\boxed{{{_stated(rng, q)}}}",
                       _reference(rng, q), "Prealgebra", 2 if q.denominator == 1 else 3)


def _equation(rng: np.random.Generator) -> WordProblem:
    a, b, c = int(rng.integers(2, 10)), _number(rng), _number(rng)
    x = Fraction(c - b, a)
    reduced = "" if x.denominator == a else f" = {_plain(x)}"  # c - b over a is in lowest terms
    return WordProblem(f"Solve for x: {a}x + {b} = {c}.",
                       f"{a}x = {c} - {b} = {c - b}, so x = {c - b}/{a}{reduced}. "
                       f"\\boxed{{{_stated(rng, x)}}}",
                       _reference(rng, x), "Algebra", 3 if x.denominator == 1 else 4)


def _fraction_sum(rng: np.random.Generator) -> WordProblem:
    q, s = int(rng.integers(2, 7)), int(rng.integers(2, 7))
    p, r = int(rng.integers(1, q)), int(rng.integers(1, s))
    total = Fraction(p, q) + Fraction(r, s)
    reduced = "" if total.denominator == q * s else f" = {_plain(total)}"
    return WordProblem(f"What is {p}/{q} + {r}/{s}?",
                       f"{p}/{q} + {r}/{s} = {p * s}/{q * s} + {r * q}/{q * s} = "
                       f"{p * s + r * q}/{q * s}{reduced}. "
                       f"\\boxed{{{_stated(rng, total)}}}",
                       _reference(rng, total), "Prealgebra", 5)


def _simplify(rng: np.random.Generator) -> WordProblem:
    a, b, c = int(rng.integers(2, 10)), int(rng.integers(2, 10)), _number(rng)
    k = a + b
    stated = f"{k}x + {c}" if rng.random() < 0.5 else f"{c} + {k}x"
    return WordProblem(f"Simplify {a}x + {c} + {b}x.",
                       f"{a}x + {b}x = {k}x. \\boxed{{{stated}}}", f"{k}x + {c}", "Algebra",
                       1 + _level(c))


KINDS: tuple[Callable[[np.random.Generator], WordProblem], ...] = (
    _add, _subtract, _multiply, _share, _equation, _fraction_sum, _simplify)


def word_problems(rng: np.random.Generator, count: int) -> list[WordProblem]:
    """`count` problems, kinds drawn uniformly (repeats possible)."""
    return [KINDS[int(k)](rng) for k in rng.integers(len(KINDS), size=count)]


def problem_sets(seed: int, num_train: int, num_eval: int
                 ) -> tuple[list[WordProblem], list[WordProblem]]:
    """Disjoint training and held-out sets (distinct problem texts), deterministic from seed."""
    rng = np.random.default_rng([seed, GENERATOR_VERSION])
    seen: set[str] = set()
    out: list[WordProblem] = []
    for _ in range(100):
        for p in word_problems(rng, num_train + num_eval):
            if p.problem not in seen and len(out) < num_train + num_eval:
                seen.add(p.problem)
                out.append(p)
        if len(out) == num_train + num_eval:
            return out[:num_train], out[num_train:]
    raise ValueError(f"could not draw {num_train + num_eval} distinct problems")


def dapo_rows(problems: list[WordProblem], seed: int) -> list[dict]:
    """DAPO-Math-17k's verl schema. The user message holds the bare problem: the rehearsal
    puts training and held-out problems to the model in one template (tasks.prompts)."""
    rng = np.random.default_rng([seed, GENERATOR_VERSION, 1])
    return [{"data_source": "math_dapo",
             "prompt": [{"role": "user", "content": p.problem}],
             "ability": "MATH",
             "reward_model": {"style": "rule", "ground_truth": p.answer},
             "extra_info": {"index": str(uuid.UUID(bytes=rng.bytes(16), version=4))}}
            for p in problems]


def math500_rows(problems: list[WordProblem]) -> list[dict]:
    """MATH500's schema: problem, solution, answer, subject, level, unique_id."""
    return [{"problem": p.problem, "solution": p.solution, "answer": p.answer,
             "subject": p.subject, "level": p.level,
             "unique_id": f"test/{p.subject.lower()}/{i}.json"}
            for i, p in enumerate(problems)]


def rehearsal_files(task: TaskConfig) -> tuple[Path, Path]:
    """(training parquet, held-out jsonl) of a `math-rehearsal` task, written if not there yet."""
    return ensure_rehearsal_files(task.data_dir, task.seed, task.num_problems,
                                  task.num_eval_problems)


def ensure_rehearsal_files(data_dir: str | Path, seed: int, num_train: int,
                           num_eval: int) -> tuple[Path, Path]:
    """(training parquet, held-out jsonl) of the rehearsal set, written if not there yet."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = Path(data_dir) / f"math-rehearsal-v{GENERATOR_VERSION}-s{seed}-{num_train}-{num_eval}"
    paths = out / TRAIN_FILE, out / HELD_OUT_FILE
    if all(p.is_file() for p in paths):
        return paths
    train, held_out = problem_sets(seed, num_train, num_eval)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(dapo_rows(train, seed)), tmp / TRAIN_FILE)
    (tmp / HELD_OUT_FILE).write_text("".join(json.dumps(r) + "\n"
                                             for r in math500_rows(held_out)))
    try:
        tmp.rename(out)
    except OSError:  # another process wrote the same set first
        shutil.rmtree(tmp, ignore_errors=True)
    return paths
