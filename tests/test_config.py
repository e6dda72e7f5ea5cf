"""Run configuration: TOML + CLI overrides, validation messages, dump round trip."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from launch.config import ConfigError, RunConfig, dump_config, load_config, parse_overrides
from launch.runtime import split_overrides


def write(tmp_path: Path, text: str, name: str = "run.toml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def error_of(path: Path | None = None, overrides: list[str] | None = None) -> str:
    with pytest.raises(ConfigError) as e:
        load_config(path, overrides)
    return str(e.value)


# --- loading and overriding ------------------------------------------------------------


def test_defaults_load_without_a_file() -> None:
    assert load_config() == RunConfig()


def test_checked_in_default_config_is_valid() -> None:
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "default.toml")
    assert cfg.allocator.batch_prompts * cfg.allocator.n_min <= cfg.allocator.round_total


def test_toml_values_reach_their_sections(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, 'preset = "grpo"\n[learner]\nlr = 3e-6\n'
                                      "betas = [0.8, 0.9]\n[network]\ncurve = false\n"))
    assert cfg.preset == "grpo"
    assert cfg.learner.lr == 3e-6
    assert cfg.learner.betas == (0.8, 0.9)
    assert cfg.network.curve is False


@pytest.mark.parametrize("args", [["--learner.lr", "1e-6"], ["--learner.lr=1e-6"]])
def test_override_forms_with_and_without_equals_agree(args: list[str]) -> None:
    assert parse_overrides(args) == {"learner": {"lr": 1e-6}}
    assert load_config(None, args).learner.lr == 1e-6


def test_overrides_parse_booleans_arrays_numbers_and_strings() -> None:
    got = parse_overrides(["--network.curve", "false", "--learner.betas", "[0.9, 0.95]",
                           "--learner.total_steps=7", "--actor.dtype", "bfloat16",
                           "--run-dir", "runs/x", "--task.prompt_field", '"0"'])
    assert got == {"network": {"curve": False}, "learner": {"betas": [0.9, 0.95],
                                                            "total_steps": 7},
                   "actor": {"dtype": "bfloat16"}, "run_dir": "runs/x",
                   "task": {"prompt_field": "0"}}


def test_overrides_win_over_the_file_and_keep_its_other_fields(tmp_path: Path) -> None:
    path = write(tmp_path, "[learner]\nlr = 3e-6\ntotal_steps = 9\n")
    cfg = load_config(path, ["--learner.lr", "1e-5"])
    assert (cfg.learner.lr, cfg.learner.total_steps) == (1e-5, 9)


def test_override_without_value_or_dashes_is_an_error() -> None:
    with pytest.raises(ConfigError, match="missing value"):
        parse_overrides(["--learner.lr"])
    with pytest.raises(ConfigError, match="'learner.lr'"):
        parse_overrides(["learner.lr", "1"])


# --- dump round trip ---------------------------------------------------------------------


def test_dump_of_the_default_config_loads_back_equal(tmp_path: Path) -> None:
    cfg = load_config(None, ["--allocator.rule", "std", "--allocator.stats_half_life", "64",
                             "--mode", "sync", "--learner.lr", "1e-6"])
    assert load_config(write(tmp_path, dump_config(cfg))) == cfg


@settings(max_examples=50, deadline=None)
@given(run_dir=st.text(min_size=1, max_size=20).filter(lambda s: s.strip() not in ("", ".")),
       dtype=st.text(max_size=20), lr=st.floats(1e-12, 1e3), steps=st.integers(1, 10**12),
       eager=st.booleans(), betas=st.tuples(st.floats(0, 1), st.floats(0, 1)))
def test_dump_round_trips_any_strings_and_numbers(run_dir: str, dtype: str, lr: float,
                                                  steps: int, eager: bool,
                                                  betas: tuple[float, float]) -> None:
    cfg = RunConfig.model_validate({
        "run_dir": run_dir, "actor": {"dtype": dtype, "enforce_eager": eager},
        "learner": {"lr": lr, "total_steps": steps, "betas": betas}})
    assert RunConfig.model_validate(tomllib.loads(dump_config(cfg))) == cfg


# --- errors ------------------------------------------------------------------------------


def test_unknown_field_error_names_the_field() -> None:
    assert "allocator.batch_size" in error_of(None, ["--allocator.batch_size", "4"])
    assert "nonsense" in error_of(None, ["--nonsense", "1"])


def test_infeasible_budget_error_states_the_numbers() -> None:
    msg = error_of(None, ["--allocator.batch_prompts", "4", "--allocator.n_mean", "6",
                          "--allocator.n_min", "8"])
    assert "allocator" in msg
    assert "B*n_min = 32" in msg and "total = 24" in msg


def test_unknown_preset_is_rejected_listing_the_choices() -> None:
    msg = error_of(None, ["--preset", "ppo"])
    assert "preset" in msg and "'grpo'" in msg and "'dynamo'" in msg


def test_model_path_without_hf_config_is_rejected(tmp_path: Path) -> None:
    msg = error_of(None, ["--model.path", str(tmp_path / "missing")])
    assert "model.path" in msg and str(tmp_path / "missing") in msg


def test_model_path_with_hf_config_is_accepted(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    assert load_config(None, ["--model.path", str(tmp_path)]).model.path == tmp_path


def test_missing_task_file_is_rejected_naming_it(tmp_path: Path) -> None:
    missing = tmp_path / "train.jsonl"
    msg = error_of(None, ["--task.kind", "file", "--task.path", str(missing)])
    assert "task.path" in msg and str(missing) in msg
    assert "task.path is required" in error_of(None, ["--task.kind", "file"])


def test_bad_toml_is_a_config_error_naming_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "[learner\nlr = 1\n")
    msg = error_of(path)
    assert str(path) in msg and "not valid TOML" in msg


def test_missing_config_file_is_a_config_error(tmp_path: Path) -> None:
    assert "config file not found" in error_of(tmp_path / "nope.toml")


def test_cross_field_errors_are_reported() -> None:
    assert "max_tokens" in error_of(None, ["--actor.max_tokens", "64",
                                           "--actor.max_model_len", "64"])
    assert "ports must differ" in error_of(None, ["--network.rollout_port", "5710"])


def test_flash_attention_in_float32_is_refused_naming_both_settings() -> None:
    msg = error_of(None, ["--learner.attn_implementation", "flash_attention_2"])
    assert "learner.attn_implementation" in msg and "learner.dtype" in msg
    ok = load_config(None, ["--learner.attn_implementation", "flash_attention_2",
                            "--learner.dtype", "bf16"])
    assert ok.learner.attn_implementation == "flash_attention_2"


def test_flash_attention_without_a_gpu_is_refused_at_start_up() -> None:
    import torch

    from learner.trainer import attention_kernels

    assert attention_kernels("eager", torch.device("cpu")) == "eager"
    with pytest.raises(ValueError, match="flash_attention_2.*needs a GPU"):
        attention_kernels("flash_attention_2", torch.device("cpu"))


# --- derived settings --------------------------------------------------------------------


@pytest.mark.parametrize(("preset", "rule"), [("grpo", "uniform"), ("dynamo", "variance"),
                                              ("alloc-only", "variance"),
                                              ("modulation-only", "uniform")])
def test_budget_rule_follows_the_preset(preset: str, rule: str) -> None:
    assert load_config(None, ["--preset", preset]).budget_rule == rule


def test_explicit_budget_rule_beats_the_preset() -> None:
    assert load_config(None, ["--preset", "grpo", "--allocator.rule", "std"]).budget_rule == "std"


def test_sync_mode_means_zero_staleness() -> None:
    assert load_config(None, ["--allocator.max_staleness", "3"]).max_staleness == 3
    assert load_config(None, ["--allocator.max_staleness", "3", "--mode", "sync"]
                       ).max_staleness == 0


# --- CLI ---------------------------------------------------------------------------------


def test_cli_separates_overrides_from_its_own_arguments() -> None:
    own, overrides = split_overrides(["actor", "cfg.toml", "--learner.lr", "1e-6", "--index",
                                      "3", "--preset=grpo", "--run-dir", "runs/a.b",
                                      "--resume=runs/x.y"])
    assert own == ["actor", "cfg.toml", "--index", "3", "--resume=runs/x.y"]
    assert overrides == ["--learner.lr", "1e-6", "--preset=grpo", "--run-dir", "runs/a.b"]
    assert load_config(None, overrides).run_dir == Path("runs/a.b")


@pytest.mark.parametrize(("overrides", "names"), [
    (["--learner.zero_stage", "2", "--learner.grad_variance_every", "5"],
     ["learner.grad_variance_every", "zero_stage"]),
    (["--learner.ranks", "2", "--learner.grad_variance_every", "5"],
     ["learner.grad_variance_every", "ranks = 2"]),
    (["--learner.ranks", "2", "--learner.zero_stage", "3", "--learner.eval_every", "10"],
     ["learner.eval_every", "zero_stage = 3"]),
    (["--learner.prompts_per_step", "32", "--learner.mini_batch_prompts", "12"],
     ["learner.prompts_per_step = 32", "learner.mini_batch_prompts = 12"]),
    (["--learner.mini_batch_prompts", "8", "--allocator.max_staleness", "2"],
     ["allocator.max_staleness = 2", "4 optimizer updates"]),
    (["--allocator.actor_silence_s", "5", "--actor.heartbeat_s", "2"],
     ["allocator.actor_silence_s = 5", "actor.heartbeat_s = 2"]),
])
def test_learner_configs_that_cannot_run_are_refused_naming_the_fields(overrides, names):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    for name in names:
        assert name in str(e.value), str(e.value)


def test_sync_mode_accepts_mini_batches_and_the_paper_shape_passes() -> None:
    cfg = load_config(None, ["--mode", "sync", "--learner.mini_batch_prompts", "8"])
    assert cfg.learner.updates_per_batch == 4 and cfg.max_staleness == 0
    cfg = load_config(None, ["--learner.mini_batch_prompts", "8", "--learner.ppo_epochs", "2",
                             "--allocator.max_staleness", "16"])
    assert cfg.learner.updates_per_batch == 8


def test_colocated_engines_ask_for_a_share_of_the_gpu_unless_told() -> None:
    from launch.config import COLOCATED_GPU_SHARE

    assert load_config(None, []).actor.gpu_memory_utilization == 0.85
    cfg = load_config(None, ["--placement", "colocated"])
    assert cfg.actor.gpu_memory_utilization == COLOCATED_GPU_SHARE < 0.5
    cfg = load_config(None, ["--placement", "colocated", "--actor.gpu_memory_utilization", "0.3"])
    assert cfg.actor.gpu_memory_utilization == 0.3
