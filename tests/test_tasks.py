"""Problem sets (built-in arithmetic, jsonl/parquet files) and answer verifiers."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tasks import verifiers
from tasks.config import TaskConfig
from tasks.problems import Problem, arithmetic_problems, load_problem_file, load_task
from tasks.verifiers import Verifier, check_integer, check_math, check_reversed_integer

# --- built-in arithmetic -----------------------------------------------------------------


def test_arithmetic_set_is_a_pure_function_of_the_seed() -> None:
    assert arithmetic_problems(3, 200, 50) == arithmetic_problems(3, 200, 50)
    assert arithmetic_problems(3, 200, 50)[0] != arithmetic_problems(4, 200, 50)[0]


def test_arithmetic_train_and_held_out_are_disjoint_and_sized() -> None:
    train, held_out = arithmetic_problems(0, 500, 100)
    assert (len(train), len(held_out)) == (500, 100)
    ids = [p.id for p in train + held_out]
    assert len(set(ids)) == len(ids)


def test_arithmetic_problems_are_correct_sums_in_every_difficulty_bucket() -> None:
    train, _ = arithmetic_problems(0, 400, 10, max_digits=4)
    assert {p.difficulty for p in train} == {"d1", "d2", "d3", "d4"}
    for p in train:
        a, b = p.prompt.removesuffix("=").split("+")
        assert int(p.answer) == int(a) + int(b)
        assert p.difficulty == f"d{max(len(a), len(b))}"


def test_arithmetic_refuses_more_problems_than_the_space_holds() -> None:
    with pytest.raises(ValueError, match="space of 100"):
        arithmetic_problems(0, 40, 20, max_digits=1)


def test_load_task_of_the_default_config_is_the_arithmetic_set() -> None:
    cfg = TaskConfig(num_problems=30, num_eval_problems=5)
    assert load_task(cfg) == arithmetic_problems(0, 30, 5)


# --- files -------------------------------------------------------------------------------


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_parquet(path: Path, rows: list[dict]) -> Path:
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


WRITERS = {"jsonl": write_jsonl, "parquet": write_parquet}

# DAPO-Math-17k's shape: chat prompt, nested ground truth, id under extra_info.
DAPO_ROWS = [
    {"prompt": [{"role": "system", "content": "be brief"},
                {"role": "user", "content": f"What is {i}+{i}?"}],
     "reward_model": {"ground_truth": str(2 * i), "style": "rule"},
     "extra_info": {"index": f"q{i}"}}
    for i in range(3)
]


@pytest.mark.parametrize("fmt", WRITERS)
def test_file_with_custom_nested_fields_and_chat_prompts_loads(tmp_path: Path, fmt: str) -> None:
    path = WRITERS[fmt](tmp_path / f"dapo.{fmt}", DAPO_ROWS)
    got = load_problem_file(path, id_field="extra_info.index", prompt_field="prompt",
                            answer_field="reward_model.ground_truth")
    assert got == [Problem(id=f"q{i}", prompt=f"What is {i}+{i}?", answer=str(2 * i))
                   for i in range(3)]


@pytest.mark.parametrize("fmt", WRITERS)
def test_missing_id_falls_back_to_row_index(tmp_path: Path, fmt: str) -> None:
    rows = [{"problem": "1+1", "solution": 2, "level": "Level 1"},
            {"problem": "2+2", "solution": 4, "level": "Level 2"}]
    path = WRITERS[fmt](tmp_path / f"plain.{fmt}", rows)
    got = load_problem_file(path, prompt_field="problem", answer_field="solution")
    assert got == [Problem("0", "1+1", "2", "Level 1"), Problem("1", "2+2", "4", "Level 2")]


@pytest.mark.parametrize("fmt", WRITERS)
def test_duplicate_ids_are_rejected(tmp_path: Path, fmt: str) -> None:
    rows = [{"id": "a", "prompt": "x", "answer": "1"}, {"id": "a", "prompt": "y", "answer": "2"}]
    with pytest.raises(ValueError, match="not unique"):
        load_problem_file(WRITERS[fmt](tmp_path / f"dup.{fmt}", rows))


@pytest.mark.parametrize("fmt", WRITERS)
def test_missing_field_error_names_the_field_and_row(tmp_path: Path, fmt: str) -> None:
    # Parquet has no "absent": a field missing from one row is stored as null.
    rows = [{"id": "a", "prompt": "x", "reward_model": {"ground_truth": "1"}},
            {"id": "b", "prompt": "y", "reward_model": {"style": "rule"}}]
    path = WRITERS[fmt](tmp_path / f"gap.{fmt}", rows)
    with pytest.raises(ValueError, match=r"row 1 has no field 'reward_model\.ground_truth'"):
        load_problem_file(path, answer_field="reward_model.ground_truth")


def test_bad_json_line_error_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "x", "answer": "1"}\n\n{"prompt": \n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:3: not valid JSON"):
        load_problem_file(path)


def test_unsupported_format_and_missing_file_are_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        load_problem_file(tmp_path / "none.jsonl")
    (tmp_path / "p.csv").write_text("prompt,answer\n")
    with pytest.raises(ValueError, match="unsupported format"):
        load_problem_file(tmp_path / "p.csv")


def test_load_task_reads_train_and_eval_files(tmp_path: Path) -> None:
    train = write_jsonl(tmp_path / "train.jsonl", [{"q": "a", "a": "1"}, {"q": "b", "a": "2"}])
    held = write_parquet(tmp_path / "eval.parquet", [{"q": "c", "a": "3"}])
    cfg = TaskConfig(kind="file", path=train, eval_path=held, prompt_field="q", answer_field="a")
    got_train, got_held = load_task(cfg)
    assert [p.prompt for p in got_train] == ["a", "b"]
    assert got_held == [Problem("0", "c", "3")]
    assert cfg.verifier_name == "math"


# --- verifiers ---------------------------------------------------------------------------


@pytest.mark.parametrize(("completion", "answer", "ok"), [
    ("21", "12", True), (" 21\n", "12", True), ("0", "0", True), ("12", "12", False),
    ("21 ", "21", False), ("2a1", "12", False), ("", "0", False), ("-21", "-12", False)])
def test_reversed_integer_accepts_only_the_reversed_digits(completion: str, answer: str,
                                                           ok: bool) -> None:
    assert check_reversed_integer(completion, answer) is ok


@pytest.mark.parametrize(("completion", "answer", "ok"), [
    ("42", "42", True), ("the answer is -7.", "-7", True), ("3 then 4", "4", False),
    ("no digits", "1", False)])
def test_integer_checks_the_first_integer(completion: str, answer: str, ok: bool) -> None:
    assert check_integer(completion, answer) is ok


@pytest.mark.parametrize(("completion", "answer", "ok"), [
    ("so \\boxed{\\frac{1}{2}}", "0.5", True),
    ("\\boxed{0.5}", "\\frac{1}{2}", True),
    ("\\boxed{2}", "3", False),
    ("\\boxed{1} then \\boxed{3}", "3", True),  # the last boxed answer counts
    ("the answer is 2", "2", False),  # no boxed answer
])
def test_math_compares_the_boxed_answer_by_value(completion: str, answer: str, ok: bool) -> None:
    assert check_math(completion, answer) is ok


def test_math_verifier_scores_correct_answers_off_the_main_thread() -> None:
    v = Verifier(timeout_s=30)
    assert v.score("math", "\\boxed{\\frac{1}{2}}", "0.5") == 1.0
    assert v.score("math", "\\boxed{2}", "3") == 0.0
    assert v.counters == {}


@given(name=st.sampled_from(["integer", "reversed-integer", "unknown"]),
       completion=st.text(), answer=st.text())
def test_score_never_raises_and_is_zero_or_one(name: str, completion: str, answer: str) -> None:
    assert Verifier().score(name, completion, answer) in (0.0, 1.0)


def test_checker_errors_score_zero_and_are_counted() -> None:
    v = Verifier()
    assert v.score("integer", "1", "not a number") == 0.0
    assert v.counters["verifier_error"] == 1


def test_unknown_verifier_scores_zero_and_is_counted() -> None:
    v = Verifier()
    assert v.score("regex", "1", "1") == 0.0
    assert v.counters["unknown_verifier"] == 1


def test_slow_math_check_times_out_and_is_counted(monkeypatch: pytest.MonkeyPatch) -> None:
    def slow(completion: str, answer: str) -> bool:
        time.sleep(1.0)
        return True

    monkeypatch.setitem(verifiers.CHECKERS, "math", slow)
    v = Verifier(timeout_s=0.05)
    start = time.monotonic()
    assert v.score("math", "\\boxed{1}", "1") == 0.0
    assert time.monotonic() - start < 0.9
    assert v.counters["verifier_timeout"] == 1
