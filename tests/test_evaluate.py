"""`dynamo-rl eval`: pass@k estimator, checkpoint resolution, benchmark formats, prompts,
and a real vLLM run of the tiny model on the built-in held-out set and a MATH500-style file."""

from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from launch.config import ConfigError, RunConfig
from launch.evaluate import (
    benchmarks_of,
    load_benchmark,
    main,
    pass_at_k,
    prefill_waves,
    resolve_model,
)
from tasks.prompts import MATH_TEMPLATE, PromptFormat, resolved_prompt_format

# --- pass@k ------------------------------------------------------------------------------


@pytest.mark.parametrize("n", range(1, 8))
def test_pass_at_k_equals_brute_force_over_all_k_subsets(n: int) -> None:
    for c, k in itertools.product(range(n + 1), range(1, n + 1)):
        subsets = list(itertools.combinations(range(n), k))  # samples 0..c-1 are correct
        hit = sum(any(i < c for i in s) for s in subsets) / len(subsets)
        assert pass_at_k(n, c, k) == pytest.approx(hit, abs=1e-12), (n, c, k)


def test_pass_at_1_is_the_fraction_correct_and_pass_at_n_any_correct() -> None:
    assert pass_at_k(32, 8, 1) == pytest.approx(0.25)
    assert pass_at_k(32, 1, 32) == 1.0 and pass_at_k(32, 0, 32) == 0.0


@pytest.mark.parametrize("n, c, k", [(4, 5, 1), (4, 1, 5), (4, 1, 0), (0, 0, 1)])
def test_pass_at_k_rejects_impossible_counts(n: int, c: int, k: int) -> None:
    with pytest.raises(ValueError):
        pass_at_k(n, c, k)


def test_prefill_waves_keep_order_and_fit_the_budget_unless_one_request_exceeds_it() -> None:
    # vLLM's CPU build crashes when a seeded request's prefill is split over engine steps.
    assert prefill_waves([30, 30, 30, 50, 10], 60) == [slice(0, 2), slice(2, 3), slice(3, 5)]
    assert prefill_waves([100, 10, 10], 60) == [slice(0, 1), slice(1, 3)]
    assert prefill_waves([], 60) == []


# --- checkpoints ---------------------------------------------------------------------------


def fake_checkpoint(run: Path, tag: str = "step0000005", model: Path | None = None) -> Path:
    hf = run / "checkpoints" / tag / "hf"
    if model is None:
        hf.mkdir(parents=True)
        (hf / "config.json").write_text("{}")
    else:
        shutil.copytree(model, hf)
    (run / "checkpoints" / "LATEST").write_text(tag)
    return hf


def test_model_resolves_from_run_dir_checkpoints_folder_tag_and_hf_dir(tmp_path: Path) -> None:
    hf = fake_checkpoint(tmp_path / "run")
    for p in (tmp_path / "run", tmp_path / "run" / "checkpoints", hf.parent, hf):
        assert resolve_model(p) == hf
    with pytest.raises(ConfigError, match="not an HF model directory"):
        resolve_model(tmp_path)


# --- benchmark formats ---------------------------------------------------------------------


def write_rows(path: Path, rows: list[dict]) -> Path:
    if path.suffix == ".parquet":
        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
@pytest.mark.parametrize("name, row, prompt, answer", [
    ("math500", {"problem": "P", "answer": "\\frac{1}{2}", "unique_id": "u"}, "P", "\\frac{1}{2}"),
    ("aime24", {"id": 1, "problem": "P", "answer": 204}, "P", "204"),
    ("aime25", {"question": "P", "answer": "70"}, "P", "70"),
    ("amc23", {"question": "P", "answer": 27.0}, "P", "27.0"),
    ("minerva", {"problem": "P", "solution": "so $\\boxed{3\\times 10^8}$."}, "P",
     "3\\times 10^8"),
    ("olympiadbench", {"id": 7, "question": "P", "final_answer": ["$1$", "$\\sqrt{2}$"]}, "P",
     "$1$, $\\sqrt{2}$"),
    ("other", {"prompt": [{"role": "user", "content": "P"}],
               "reward_model": {"ground_truth": "5"}}, "P", "5"),
])
def test_known_benchmark_formats_are_detected(tmp_path: Path, suffix: str, name: str, row: dict,
                                              prompt: str, answer: str) -> None:
    problems, dups = load_benchmark(name, write_rows(tmp_path / f"b{suffix}", [row]))
    assert [(q.prompt, q.answer) for q in problems] == [(prompt, answer)] and dups == 0


def test_repeated_rows_are_dropped_and_counted(tmp_path: Path) -> None:
    rows = [{"problem": f"P{i % 3}", "answer": str(i % 3)} for i in range(9)]
    problems, dups = load_benchmark("aime24", write_rows(tmp_path / "a.jsonl", rows))
    assert [q.prompt for q in problems] == ["P0", "P1", "P2"] and dups == 6


def test_missing_answer_field_error_names_the_candidates(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="looked for answer, solution"):
        load_benchmark("minerva", write_rows(tmp_path / "m.jsonl", [{"problem": "P"}]))


# --- prompts -------------------------------------------------------------------------------


def test_benchmarks_take_the_training_format_files_with_math_defaults(tmp_path: Path) -> None:
    bench = write_rows(tmp_path / "math500.jsonl", [{"problem": "P", "answer": "1"}])
    arith = RunConfig()
    got = {b.name: b.prompt_format for b in benchmarks_of(arith, ["arithmetic",
                                                                   f"math500={bench}"])}
    # A model trained on the built-in task is asked its own sums bare, math files with CoT.
    assert got["arithmetic"] == PromptFormat() == resolved_prompt_format(arith.task)
    assert got["math500"] == PromptFormat(MATH_TEMPLATE, None, None)
    # A model trained on a file is evaluated on exactly its training format.
    trained = RunConfig.model_validate({"task": {
        "kind": "file", "path": str(bench), "prompt_template": "Q: {problem}",
        "system_prompt": "Be brief.", "chat_template": False}})
    [b] = benchmarks_of(trained, [f"math500={bench}"])
    assert b.prompt_format == resolved_prompt_format(trained.task) == PromptFormat(
        "Q: {problem}", "Be brief.", False)


# --- the command, for real -----------------------------------------------------------------


def test_eval_rejects_bad_benchmarks_before_starting_an_engine(tmp_path: Path, capsys) -> None:
    model = fake_checkpoint(tmp_path / "run")
    for bench, why in (("aime24", "expected NAME=FILE"),
                       (f"aime24={tmp_path}/no.jsonl", "not found"),
                       ("arithmetic", "not the built-in")):
        task = ["--task.kind", "file", "--task.path", __file__] if bench == "arithmetic" else []
        assert main(["--model", str(model), "--bench", bench, *task]) == 2
        assert why in capsys.readouterr().err
    assert main(["--model", str(tmp_path), "--bench", "arithmetic"]) == 2
    assert "not an HF model directory" in capsys.readouterr().err


def test_eval_scores_a_checkpoint_on_held_out_arithmetic_and_a_math500_file(
        tiny_model: Path, tmp_path: Path, capsys) -> None:
    hf = fake_checkpoint(tmp_path / "run", model=tiny_model)
    math500 = write_rows(tmp_path / "math500.jsonl", [
        {"problem": "1+2=", "answer": "3", "unique_id": "test/a/1.json"},
        {"problem": "12+30=", "answer": "42", "unique_id": "test/a/2.json"},
        {"problem": "1+2=", "answer": "3", "unique_id": "test/a/3.json"},  # repeat: dropped
        {"problem": "9" * 70, "answer": "9", "unique_id": "test/a/4.json"},  # > 64 tokens
    ])
    out = tmp_path / "results.json"
    rc = main(["--model", str(tmp_path / "run"), "--bench", "arithmetic",
               "--bench", f"math500={math500}", "--k", "4", "--greedy", "--temperature", "1.0",
               "--top-p", "1.0", "--task.prompt_template", "{problem}", "--out", str(out),
               "--task.num_eval_problems", "64", "--network.curve", "false"])
    assert rc == 0
    stdout = capsys.readouterr().out
    lines = stdout.splitlines()
    table, summary = lines[-5:-1], json.loads(lines[-1])  # the last lines: table, then JSON
    assert table[0].split() == ["benchmark", "problems", "pass@1", "pass@4", "greedy",
                                "too_long", "errors", "timeouts", "truncated"]
    assert [line.split()[0] for line in table[1:]] == ["arithmetic", "math500", "average"]
    assert summary["model"] == str(hf) and summary["k"] == 4

    arith, math = summary["benchmarks"]["arithmetic"], summary["benchmarks"]["math500"]
    assert arith["problems"] == 64 and arith["verifier"] == "reversed-integer"
    # The warm-started tiny model solves a good share of its held-out sums.
    assert 0.1 < arith["pass@1"] <= arith["pass@k"] <= 1 and arith["greedy"] > 0.1
    assert (math["problems"], math["duplicates_dropped"], math["prompt_too_long"]) == (3, 1, 1)
    assert math["verifier"] == "math" and math["pass@1"] == math["pass@k"] == 0.0
    assert math["prompt_format"] == {"template": "{problem}", "system_prompt": None,
                                     "chat_template": None}
    assert math["verifier_errors"] == math["verifier_timeouts"] == 0

    full = json.loads(out.read_text())
    assert full["benchmarks"] == summary["benchmarks"]
    per = full["per_problem"]
    assert len(per["arithmetic"]) == 64 and all(0 <= p["correct"] <= 4 for p in per["arithmetic"])
    assert sum(p["correct"] for p in per["arithmetic"]) / (4 * 64) == arith["pass@1"]
    assert [p["too_long"] for p in per["math500"]] == [False, False, True]
    assert full["prompt_examples"]["math500"] == "1+2="
