"""A real actor process with actor.weight_loader = "vllm_api" and the broadcast weights
backend: allocator + one vLLM actor + a learner stand-in whose publisher broadcasts. The
version reaches the engine's worker through vLLM's weight-transfer API, and the tokens keep
their version stamps (samples in flight at the swap included)."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch
from conftest import Proc, make_config, wait_for

from launch.config import load_config
from launch.harness import LearnerStandIn
from launch.ports import free_ports

B = 4
TEMPERATURE = 0.8


# tp1 is opt-in (-m slow, 31 s): tp2 runs the same path through vLLM's multiprocess executor
@pytest.fixture(scope="module", params=[pytest.param(1, marks=pytest.mark.slow), 2],
                ids=["tp1", "tp2"])
def stack(request, tiny_model, tmp_path_factory):
    """tp2: a tensor-parallel engine (vLLM's multiprocess executor, one worker per core on
    this CPU machine), each worker a chain rank of its own in the broadcast group."""
    tp = request.param
    run_dir = tmp_path_factory.mktemp(f"actor_vllm_api_tp{tp}")
    cfg_path = make_config(
        run_dir, tiny_model, preset="grpo",
        task={"num_problems": 16, "num_eval_problems": 8},
        allocator={"batch_prompts": B, "n_mean": 8, "n_min": 8, "n_max": 8,
                   "initial_budget": 8, "lease_s": 6.0, "max_staleness": 2},
        actor={"temperature": TEMPERATURE, "prefetch_grants": 4, "max_batch_grants": 4,
               "heartbeat_s": 0.5, "weight_loader": "vllm_api", "tensor_parallel_size": tp},
        learner={"prompts_per_step": B},
        network={"curve": False, "weights_backend": "broadcast",
                 "weights_group_port": free_ports(1)[0], "broadcast_timeout_s": 20.0})
    cfg = load_config(cfg_path)
    receiver = LearnerStandIn(cfg, gate=0)
    alloc = Proc("allocator", cfg_path)
    actor = Proc("actor", cfg_path, "--index", "0")
    yield {"cfg": cfg, "receiver": receiver, "alloc": alloc, "actor": actor,
           "run_dir": run_dir, "model": tiny_model, "tp": tp}
    for p in (actor, alloc):
        p.stop()
    receiver.close()


def actor_metrics(run_dir) -> dict:
    lines = (run_dir / "metrics_actor0.jsonl").read_text().splitlines()
    return json.loads(lines[-1]) if lines else {}


def test_a_broadcast_version_arrives_through_vllms_api_with_version_stamps(stack):
    from transformers import AutoModelForCausalLM

    rx, pub = stack["receiver"], stack["receiver"].publisher
    wait_for(lambda: len(rx.snapshot()) >= 2, 180, "groups generated with version 0")
    wait_for(lambda: any(p.offered for p in list(pub._peers.values())), 30,
             "the actor's offer to join the broadcast group")
    v0 = AutoModelForCausalLM.from_pretrained(stack["model"], dtype=torch.float32).eval()
    v1 = AutoModelForCausalLM.from_pretrained(stack["model"], dtype=torch.float32).eval()
    torch.manual_seed(0)
    with torch.no_grad():  # a visibly different policy
        for p in v1.parameters():
            if p.ndim == 2:
                p.add_(0.05 * torch.randn_like(p))
    n_before = len(rx.snapshot())
    pub.publish(1, list(v1.named_parameters()), chunk_bytes=256 << 10)
    rx.gate = None  # the learner consumed what it received (a version needs consumed groups)
    rx.version = 1
    wait_for(lambda: any(g.token_versions.min() == 1 for g in rx.snapshot()[n_before:]),
             180, "a group generated entirely with version 1")
    # one broadcast, received by the engine's worker through vLLM's API, no ZeroMQ chunks
    assert pub.counters["broadcasts"] == 1 and pub.counters["chunks_sent"] == 0, pub.counters
    assert pub._world == 1 + stack["tp"]  # the learner and one chain rank per engine worker
    time.sleep(2.5)  # the actor's next metrics line
    m = actor_metrics(stack["run_dir"])
    assert m["weights_vllm_api"] == 1 and m["broadcast_versions_received"] == 1, m
    assert m.get("broadcast_broadcast_failures", 0) == 0 and m["version"] == 1, m
    # the stamps come from vLLM's own per-token weight versions, and our swap counts agree
    assert m["native_version_stamps"] > 0 and m["version_stamp_disagreements"] == 0, m
    assert "by broadcast through vLLM's API" in stack["actor"].text()
    later = rx.snapshot()[n_before:]
    for g in later:
        for s in g.samples():  # versions never go back within a sample
            assert np.all(np.diff(s.versions) >= 0)
    # tokens stamped 1 are v1's log-probs; a sample in flight at the swap: v0's, then v1's
    # on top of v0's KV of the earlier positions
    checked, worst = 0, 0.0
    for g in later:
        for s in g.samples():
            c = int(np.argmax(s.versions == 1)) if s.versions.max() == 1 else len(s.versions)
            ids = torch.tensor(np.concatenate([g.prompt_token_ids, s.token_ids]).astype(np.int64))
            p = len(g.prompt_token_ids)
            with torch.no_grad():
                if c == 0:
                    out1 = v1(input_ids=ids[None, :-1])
                    want = torch.log_softmax(out1.logits[0, p - 1:].float() / TEMPERATURE, -1)
                    want = want.gather(-1, ids[p:, None])[:, 0].numpy()
                elif c < len(s.versions):
                    out0 = v0(input_ids=ids[None, :p + c - 1], use_cache=True)
                    lp0 = torch.log_softmax(out0.logits[0].float() / TEMPERATURE, -1)
                    out1 = v1(input_ids=ids[None, p + c - 1:-1],
                              past_key_values=out0.past_key_values)
                    lp1 = torch.log_softmax(out1.logits[0].float() / TEMPERATURE, -1)
                    want = np.concatenate([
                        lp0[p - 1:p + c - 1].gather(-1, ids[p:p + c, None])[:, 0].numpy(),
                        lp1.gather(-1, ids[p + c:, None])[:, 0].numpy()])
                else:
                    continue  # entirely v0: covered by test_actors_stack
            worst = max(worst, float(np.abs(s.logprobs - want).max()))
            checked += 1
            if checked >= 12:
                break
    assert checked > 0
    assert worst < 2e-3, worst
