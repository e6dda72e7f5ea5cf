"""The CPU rehearsal of the math recipe: generated word problems in the DAPO-Math-17k and
MATH500 schemas, the offline BPE tokenizer with a Qwen-style chat template, and a short real
run of `dynamo-rl run` and `dynamo-rl eval` on configs/math-rehearsal.toml."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import REPO

from launch.config import load_config
from launch.ports import free_ports
from tasks.config import TaskConfig
from tasks.math_rehearsal import (
    HELD_OUT_FILE,
    TRAIN_FILE,
    ensure_rehearsal_files,
    problem_sets,
    word_problems,
)
from tasks.problems import load_task
from tasks.prompts import MATH_TEMPLATE, PromptFormat, render_prompt, resolved_prompt_format
from tasks.verifiers import check_math, extract_boxed

CONFIG = REPO / "configs" / "math-rehearsal.toml"

# --- problems and files --------------------------------------------------------------------


def test_problem_sets_are_a_pure_function_of_the_seed_and_disjoint() -> None:
    train, held_out = problem_sets(0, 300, 100)
    assert (train, held_out) == problem_sets(0, 300, 100)
    assert train != problem_sets(1, 300, 100)[0]
    texts = [p.problem for p in train + held_out]
    assert len(texts) == 400 and len(set(texts)) == 400


def test_worked_solutions_are_right_and_need_math_verify_equivalence() -> None:
    problems = word_problems(np.random.default_rng(0), 200)
    assert all(check_math(p.solution, p.answer) for p in problems)
    # Stated in another form than the reference (\frac{3}{4} vs 3/4 vs 0.75, 3 + 5x vs 5x + 3)
    # and still correct: string equality would score these 0.
    differ = [p for p in problems if extract_boxed(p.solution) != p.answer]
    assert len(differ) >= 20
    assert any("." in extract_boxed(p.solution) for p in differ)
    assert any("x" in p.answer for p in differ)
    assert not any(check_math(p.solution, f"{p.answer} + 1") for p in problems[:50])
    assert {p.subject for p in problems} == {"Prealgebra", "Algebra"}
    assert {p.level for p in problems} == {1, 2, 3, 4, 5}


def test_files_follow_the_dapo_and_math500_schemas_and_load_without_field_flags(
        tmp_path: Path) -> None:
    train_path, held_path = ensure_rehearsal_files(tmp_path, 0, 50, 20)
    assert (train_path.name, held_path.name) == (TRAIN_FILE, HELD_OUT_FILE)
    dapo = pq.read_table(train_path).to_pylist()
    assert set(dapo[0]) == {"data_source", "prompt", "ability", "reward_model", "extra_info"}
    assert dapo[0]["prompt"][0]["role"] == "user" and dapo[0]["ability"] == "MATH"
    math500 = [json.loads(line) for line in held_path.read_text().splitlines()]
    assert set(math500[0]) == {"problem", "solution", "answer", "subject", "level", "unique_id"}

    train, held_out = load_task(TaskConfig(kind="math-rehearsal", data_dir=tmp_path,
                                           num_problems=50, num_eval_problems=20))
    assert [q.id for q in train] == [r["extra_info"]["index"] for r in dapo]
    assert [q.answer for q in train] == [r["reward_model"]["ground_truth"] for r in dapo]
    assert [q.prompt for q in train] == [r["prompt"][0]["content"] for r in dapo]
    assert [(q.id, q.prompt, q.answer, q.difficulty) for q in held_out] == [
        (r["unique_id"], r["problem"], r["answer"], str(r["level"])) for r in math500]

    mtime = train_path.stat().st_mtime_ns  # cached: found, not rewritten
    assert ensure_rehearsal_files(tmp_path, 0, 50, 20) == (train_path, held_path)
    assert train_path.stat().st_mtime_ns == mtime


def test_rehearsal_task_uses_the_math_format_and_verifier_and_refuses_file_paths() -> None:
    task = TaskConfig(kind="math-rehearsal")
    assert resolved_prompt_format(task) == PromptFormat(MATH_TEMPLATE, None, None)
    assert task.verifier_name == "math"
    with pytest.raises(ValueError, match="writes its own files"):
        TaskConfig(kind="math-rehearsal", path=Path(__file__))


# --- the model -----------------------------------------------------------------------------


def test_tokenizer_is_small_byte_level_bpe_with_a_qwen_chat_template(math_model: Path) -> None:
    from transformers import AutoConfig, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(math_model)
    assert 256 < len(tok) <= 1024
    text = "naïve ∑ 😀 \\frac{3}{4}\n\t12345"  # bytes it never saw in training
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
    assert all(len(tok.encode(s, add_special_tokens=False)) == 1
               for s in ("<|im_start|>", "<|im_end|>"))
    assert tok.eos_token == "<|im_end|>"
    fmt = PromptFormat(MATH_TEMPLATE, "Be brief.", True)
    assert render_prompt(tok, "What is 1/2 + 1/4?", fmt) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 1/2 + 1/4?\n"
        "Please reason step by step, and put your final answer within \\boxed{}.<|im_end|>\n"
        "<|im_start|>assistant\n")
    cfg = AutoConfig.from_pretrained(math_model)
    assert cfg.hidden_size // cfg.num_attention_heads in (32, 64, 80, 96, 112, 128)
    assert cfg.eos_token_id == tok.eos_token_id


# --- the real stack ------------------------------------------------------------------------

STEPS, EVAL_PROBLEMS = 4, 64


def cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "launch.cli", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def rehearsal(math_model: Path, tmp_path_factory) -> Path:
    """configs/math-rehearsal.toml run for a few steps (the embedded model is math_model)."""
    run_dir = tmp_path_factory.mktemp("rehearsal")
    a, r, w = free_ports(3)
    res = cli("run", str(CONFIG), "--run_dir", str(run_dir), "--network.allocator_port", str(a),
              "--network.rollout_port", str(r), "--network.weights_port", str(w),
              "--learner.total_steps", str(STEPS), "--learner.eval_every", str(STEPS),
              "--learner.checkpoint_every", str(STEPS),
              "--task.num_eval_problems", str(EVAL_PROBLEMS))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert f"[run] model .cache/models/{math_model.name}" in res.stdout
    return run_dir


def test_rehearsal_trains_with_the_chat_template_and_math_rewards(rehearsal: Path) -> None:
    recs = [json.loads(line) for line in (rehearsal / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in recs if r["step"] > 0]
    assert [r["step"] for r in steps] == list(range(1, STEPS + 1))
    # Several optimizer updates per rollout batch (fewer when all-equal groups are skipped).
    assert steps[-1]["version"] == sum(r["updates"] for r in steps)
    assert 1 < max(r["updates"] for r in steps) <= load_config(CONFIG).learner.updates_per_batch
    rewards = [r["reward/mean"] for r in steps]
    # The warm start is partial: rewards well inside (0, 1), so groups carry signal.
    assert 0.15 < np.mean(rewards) < 0.85, rewards
    assert max(r["zero_signal_frac"] for r in steps) < 0.9
    evals = [r for r in recs if "eval/pass1" in r]
    assert [r["step"] for r in evals] == [0, STEPS]
    assert evals[-1]["eval/pass1"] >= evals[0]["eval/pass1"] - 0.05, evals  # no collapse
    actor_log = (rehearsal / "logs" / "actor0.log").read_text()
    sent = re.search(r"first prompt as sent \(problem [^)]*\): '(.*)'", actor_log)
    assert sent and sent.group(1).startswith("<|im_start|>user\\n")
    assert sent.group(1).endswith("\\\\boxed{}.<|im_end|>\\n<|im_start|>assistant\\n")


# opt-in (-m slow, 79 s): `dynamo-rl eval` on a math500 file runs in the default suite in
# test_evaluate; this one checks it renders the rehearsal's chat template as training did
@pytest.mark.slow
def test_eval_scores_the_rehearsal_on_its_math500_file_in_the_training_format(
        rehearsal: Path, tmp_path: Path) -> None:
    held_out = ensure_rehearsal_files(REPO / ".cache" / "data", 0, 2048, EVAL_PROBLEMS)[1]
    out = tmp_path / "eval.json"
    res = cli("eval", str(CONFIG), "--model", str(rehearsal), "--bench",
              f"math500={held_out}", "--k", "4", "--temperature", "1.0", "--top-p", "1.0",
              "--workers", "1", "--out", str(out))
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads(out.read_text())
    bench = report["benchmarks"]["math500"]
    assert bench["problems"] == EVAL_PROBLEMS
    assert bench["prompt_format"] == {"template": MATH_TEMPLATE, "system_prompt": None,
                                      "chat_template": None}
    first = json.loads(held_out.read_text().splitlines()[0])["problem"]
    assert report["prompt_examples"]["math500"] == (
        f"<|im_start|>user\n{MATH_TEMPLATE.replace('{problem}', first)}<|im_end|>\n"
        "<|im_start|>assistant\n")
    assert bench["verifier_errors"] == bench["verifier_timeouts"] == 0
    assert bench["truncated_frac"] < 0.1
    # The learner's held-out pass@1 of the same checkpoint, same problems, same template
    # (HF generate there, vLLM here): equal up to sampling noise.
    recs = [json.loads(line) for line in (rehearsal / "metrics.jsonl").read_text().splitlines()]
    learner = [r for r in recs if "eval/pass1" in r][-1]["eval/pass1"]
    assert abs(bench["pass@1"] - learner) < 0.15, (bench["pass@1"], learner)
    assert 0.1 < bench["pass@1"] < 0.9
