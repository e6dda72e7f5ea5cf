"""Problem sets (built-in arithmetic, jsonl/parquet files, dataset schemas detected) and
answer checkers (integers, math answers boxed or on an `Answer:` line)."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pydantic import ValidationError

from tasks.config import TaskConfig
from tasks.problems import Problem, arithmetic_problems, load_problem_file, load_task
from tasks.verifiers import (
    check_integer,
    check_math,
    check_reversed_integer,
    extract_answer,
)

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


# DAPO-Math-17k's instruction (its prompts ask for the answer on a last `Answer:` line).
DAPO_COT = ("Let's compute. 3 of 4 slices are left, so the share is 3/4.\n\n"
            "Answer: {}")


@pytest.mark.parametrize(("completion", "answer", "ok"), [
    (DAPO_COT.format("\\frac{3}{4}"), "0.75", True),  # equal by value, not by text
    (DAPO_COT.format("0.75"), "\\frac{3}{4}", True),
    (DAPO_COT.format("$\\frac{3}{4}$."), "3/4", True),  # math delimiters, final period
    ("**Answer:** 12", "12", True),  # markdown bold
    ("answer: 12\nsome trailing words", "12", True),  # the last Answer: line, not the last line
    (DAPO_COT.format("0.7"), "0.75", False),
    ("The answer is 12", "12", False),  # neither format
])
def test_math_accepts_dapo_answer_lines_by_default(completion: str, answer: str,
                                                   ok: bool) -> None:
    assert check_math(completion, answer) is ok  # a direct call: extraction "either"


def test_either_extraction_takes_the_answer_stated_last() -> None:
    boxed_then_line = "\\boxed{5}\nAnswer: 7"
    line_then_boxed = "Answer: 7\nOn reflection, \\boxed{5}"
    assert extract_answer(boxed_then_line) == "7" and extract_answer(line_then_boxed) == "5"
    # A completion hedging between two answers is judged by its final one only.
    assert check_math(boxed_then_line, "7") and not check_math(boxed_then_line, "5")
    assert check_math(line_then_boxed, "5") and not check_math(line_then_boxed, "7")


def test_extraction_modes_read_only_their_format() -> None:
    boxed, line = "so \\boxed{\\frac{3}{4}}", "work\nAnswer: 3/4"
    assert check_math(boxed, "0.75", "boxed") and not check_math(line, "0.75", "boxed")
    assert check_math(line, "0.75", "answer_line") and not check_math(boxed, "0.75",
                                                                       "answer_line")
    assert extract_answer("Answer:\nnothing on that line", "answer_line") is None


# --- dataset schemas as published, loaded without field flags ------------------------------

DAPO_PROMPT = ("Solve the following math problem step by step. The last line of your response "
               "should be of the form Answer: $Answer (without quotes) where $Answer is the "
               "answer to the problem.\n\n{}\n\nRemember to put your answer on its own line "
               "after \"Answer:\".")
SCHEMAS = {
    # DAPO-Math-17k (parquet): chat prompt, ground truth and index nested, extra columns.
    "dapo.parquet": [
        {"data_source": "math_dapo",
         "prompt": [{"role": "user", "content": DAPO_PROMPT.format(f"Compute {i}+{i}.")}],
         "ability": "MATH", "reward_model": {"ground_truth": str(2 * i), "style": "rule"},
         "extra_info": {"index": f"9a{i}-uuid"}} for i in range(3)],
    # MATH500 (jsonl): the solution field must not be taken for the answer.
    "math500.jsonl": [
        {"problem": f"What is $\\frac{{{i}}}{{4}}$?", "solution": f"It is \\boxed{{{i}/4}}.",
         "answer": f"\\frac{{{i}}}{{4}}", "subject": "Algebra", "level": i + 1,
         "unique_id": f"test/algebra/{i}.json"} for i in range(1, 4)],
    # AIME (jsonl): integer answers, an id column.
    "aime24.jsonl": [{"id": 60 + i, "problem": f"Find {i}.", "solution": "...", "answer": i}
                     for i in range(3)],
    # AMC23 (jsonl): `question`, float answers, no id.
    "amc23.jsonl": [{"question": f"Find {i}.", "answer": float(i)} for i in range(3)],
}
EXPECTED = {
    "dapo.parquet": [(f"9a{i}-uuid", DAPO_PROMPT.format(f"Compute {i}+{i}."), str(2 * i), "")
                     for i in range(3)],
    "math500.jsonl": [(f"test/algebra/{i}.json", f"What is $\\frac{{{i}}}{{4}}$?",
                       f"\\frac{{{i}}}{{4}}", str(i + 1)) for i in range(1, 4)],
    "aime24.jsonl": [(str(60 + i), f"Find {i}.", str(i), "") for i in range(3)],
    "amc23.jsonl": [(str(i), f"Find {i}.", f"{float(i)}", "") for i in range(3)],
}


@pytest.mark.parametrize("name", SCHEMAS)
def test_published_math_dataset_schemas_load_without_field_flags(tmp_path: Path,
                                                                 name: str) -> None:
    path = WRITERS[name.rsplit(".", 1)[1]](tmp_path / name, SCHEMAS[name])
    train, _ = load_task(TaskConfig(kind="file", path=path))
    assert [(q.id, q.prompt, q.answer, q.difficulty) for q in train] == EXPECTED[name]


def test_field_flags_override_the_detected_schema(tmp_path: Path) -> None:
    rows = [{"prompt": "templated 1", "question": "bare 1", "answer": "1", "gold": "one"}]
    path = write_jsonl(tmp_path / "both.jsonl", rows)
    assert load_problem_file(path)[0].prompt == "templated 1"  # first candidate present
    got = load_task(TaskConfig(kind="file", path=path, prompt_field="question",
                               answer_field="gold", id_field="answer"))[0]
    assert got == [Problem(id="1", prompt="bare 1", answer="one")]


def test_undetectable_schema_error_names_the_candidates_and_the_flag(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "odd.jsonl", [{"text": "x", "answer": "1"}])
    with pytest.raises(ValueError, match=r"no prompt field found \(looked for prompt, problem, "
                       r"question; fields: \['answer', 'text'\]\); name it with task\.prompt"):
        load_problem_file(path)


def test_prompt_template_without_the_problem_placeholder_is_refused() -> None:
    with pytest.raises(ValidationError, match="must contain {problem}"):
        TaskConfig(prompt_template="Solve it step by step.")
