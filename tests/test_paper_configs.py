"""The checked-in Qwen2.5-Math configs carry the paper's hyper-parameters (docs/DESIGN.md §4) and
read DAPO-Math-17k with the right fields. Their model and data paths are placeholders, so
the tests point them at a tiny DAPO-format parquet and a fake HF model directory."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from launch.config import ConfigError, load_config
from tasks.problems import load_task

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SIZES = {"qwen2.5-math-1.5b.toml": 2, "qwen2.5-math-7b.toml": 3}  # file -> ZeRO stage


@pytest.fixture
def local_paths(tmp_path: Path) -> list[str]:
    rows = [{"data_source": "math_dapo",
             "prompt": [{"role": "user", "content": f"Solve {i}+{i}. Answer: $Answer"}],
             "ability": "MATH", "reward_model": {"ground_truth": str(2 * i), "style": "rule"},
             "extra_info": {"index": f"uuid-{i}"}} for i in range(3)]
    data = tmp_path / "dapo-math-17k.parquet"
    pq.write_table(pa.Table.from_pylist(rows), data)
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    return ["--task.path", str(data), "--model.path", str(model)]


@pytest.mark.parametrize("name", SIZES)
def test_paper_config_has_the_papers_hyper_parameters(name: str, local_paths: list[str]) -> None:
    cfg = load_config(CONFIGS / name, local_paths)
    lr, al, ac = cfg.learner, cfg.allocator, cfg.actor
    assert (lr.lr, lr.warmup_steps, lr.weight_decay, lr.grad_clip) == (1e-6, 10, 0.1, 1.0)
    # 512 prompts per rollout batch, one optimizer update per mini-batch of 32 prompts: 16
    # updates (policy versions) per batch, and a staleness bound that admits one batch in
    # flight.
    assert (al.batch_prompts, lr.prompts_per_step, lr.mini_batch_prompts) == (512, 512, 32)
    assert lr.updates_per_batch == 16 and cfg.max_staleness >= 16
    assert (al.n_mean, al.n_min, al.n_max) == (16, 8, 24) and al.round_total == 512 * 16
    assert (ac.temperature, ac.top_p) == (1.0, 1.0)
    assert (ac.dtype, lr.dtype, lr.zero_stage) == ("bfloat16", "bf16", SIZES[name])
    assert ac.max_tokens < ac.max_model_len <= 4096  # Qwen2.5-Math's context
    assert (lr.eval_every, lr.checkpoint_every, cfg.network.curve) == (0, 5, True)
    assert cfg.preset == "dynamo" and cfg.budget_rule == "variance"


@pytest.mark.parametrize("name", SIZES)
def test_paper_config_reads_dapo_math_fields(name: str, local_paths: list[str]) -> None:
    train, held_out = load_task(load_config(CONFIGS / name, local_paths).task)
    assert [(p.id, p.prompt, p.answer) for p in train] == [
        (f"uuid-{i}", f"Solve {i}+{i}. Answer: $Answer", str(2 * i)) for i in range(3)]
    assert held_out == []


@pytest.mark.parametrize("name", SIZES)
def test_paper_config_placeholder_paths_fail_clearly(name: str) -> None:
    with pytest.raises(ConfigError, match="task.path: no such file"):
        load_config(CONFIGS / name)
