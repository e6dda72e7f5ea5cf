"""The broadcast backend through vLLM's weight-transfer API (actor.weight_loader = "vllm_api",
actors/transfer_engine.py), on the real vLLM CPU engine with a real learner-side publisher
(run in a child process: see the helper), and the configuration that selects it."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from conftest import REPO
from pydantic import ValidationError

from actors.config import ActorConfig
from actors.engine import check_weight_loader, cpu_tensor_parallel_binding

HELPER = Path(__file__).with_name("transfer_engine_check.py")


def test_broadcast_versions_arrive_through_vllms_api_and_equal_a_direct_load(tiny_model):
    proc = subprocess.run([sys.executable, str(HELPER), str(tiny_model)], capture_output=True,
                          text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    # both versions came by one broadcast each, received by the engine's own worker
    assert out["publisher"] == {"groups_formed": 1, "broadcasts": 2}, out
    assert out["member"] == {"groups_joined": 1, "versions_received": 2}, out
    assert out["via_zmq"] == [] and out["engine_version"] == 2
    assert out["v1_changed_outputs"] and out["v2_changed_outputs"]  # not vacuous
    # the worker holds exactly the published tensors, and generates as vLLM's own reload
    # of the same weights (and as transformers' greedy decode of them)
    assert out["v1_embedding_exact"] and out["v2_embedding_exact"]
    assert all(out["v1_tokens_equal_vllm_reload"]), out
    assert out["v1_max_dlogp_vs_vllm_reload"] <= 1e-5, out
    assert all(out["v2_tokens_equal_transformers"]), out
    # a broadcast this worker cannot take leaves the model as it was, re-asked over ZeroMQ
    assert out["stray_applied"] == [] and out["stray_left_model"]
    assert out["stray_reasked_over_zmq"]
    # a version that came over ZeroMQ loads through the same API
    assert out["inline_embedding_exact"] and all(out["inline_tokens_equal_transformers"])


def test_weight_loader_selection_and_refusals():
    assert ActorConfig().weight_loader == "packed"  # the CPU default (docs/WEIGHTS.md)
    assert ActorConfig(weight_loader="vllm_api").weight_loader == "vllm_api"
    with pytest.raises(ValidationError):
        ActorConfig(weight_loader="nccl")
    check_weight_loader("vllm_api", 2)  # tensor parallelism goes through vLLM's API
    with pytest.raises(ValueError, match="needs actor.weight_loader"):
        check_weight_loader("packed", 2)
    with pytest.raises(ValueError, match="expected one of"):
        check_weight_loader("ipc", 1)


def test_cpu_tensor_parallel_workers_get_equal_shares_of_the_actors_cores():
    assert cpu_tensor_parallel_binding(2, "0-3") == "0,1|2,3"
    assert cpu_tensor_parallel_binding(3, "4,5,6,7,8,9,10") == "4,5|6,7|8,9"
    assert cpu_tensor_parallel_binding(2, "0|1") == "0|1"  # already split: kept
    with pytest.raises(ValueError, match="needs at least 2 CPU cores"):
        cpu_tensor_parallel_binding(2, "3")


def test_run_config_refuses_tensor_parallel_actors_without_vllm_api():
    from launch.config import RunConfig

    with pytest.raises(ValidationError, match="needs actor.weight_loader"):
        RunConfig(actor={"tensor_parallel_size": 2})
    RunConfig(actor={"tensor_parallel_size": 2, "weight_loader": "vllm_api"})
    RunConfig(actor={"tensor_parallel_size": 2, "weight_loader": "vllm_api"},
              network={"weights_backend": "broadcast"})  # one chain rank per worker


def test_plugin_is_declared_for_vllm_workers_and_registers_once():
    """TP workers are other processes: vLLM registers our backend there through the
    `vllm.general_plugins` entry point (read here from pyproject.toml; the installed metadata
    follows it at the next `pip install -e .`)."""
    meta = tomllib.loads((REPO / "pyproject.toml").read_text())
    plugins = meta["project"]["entry-points"]["vllm.general_plugins"]
    assert plugins == {"dynamo_rl": "actors.vllm_plugin:register"}
    from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory

    from actors.transfer_engine import ChainTransferEngine
    from actors.vllm_plugin import BACKEND, register

    register()
    register()  # idempotent: vLLM loads plugins again in every process it starts
    assert WeightTransferEngineFactory._registry[BACKEND]() is ChainTransferEngine
