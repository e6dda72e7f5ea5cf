"""Allocator + two real vLLM actor processes + a test receiver standing in for the learner.

Everything real: vLLM's CPU build, ZeroMQ over loopback TCP, separate processes. The tests
share one stack and run in file order (each continues where the previous one stopped).
"""

from __future__ import annotations

import json
import os
import pickle
import signal
import time
from collections import Counter

import numpy as np
import pytest
import torch
from conftest import Proc, make_config, wait_for

from launch.config import load_config
from launch.harness import LearnerStandIn
from protocol.idset import IdSet
from protocol.messages import RolloutGroup
from tasks.problems import load_task
from tasks.scoring import Verifier

B, N_MEAN, N_MIN, N_MAX = 8, 12, 4, 24
TEMPERATURE = 0.8


@pytest.fixture(scope="module")
def stack(tiny_model, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("actors_stack")
    cfg_path = make_config(
        run_dir, tiny_model, preset="dynamo",
        task={"num_problems": 16, "num_eval_problems": 8},
        allocator={"batch_prompts": B, "n_mean": N_MEAN, "n_min": N_MIN, "n_max": N_MAX,
                   "initial_budget": N_MIN, "lease_s": 6.0, "max_staleness": 2,
                   "snapshot_every_s": 0.5},
        actor={"temperature": TEMPERATURE, "prefetch_grants": 4, "max_batch_grants": 4,
               "heartbeat_s": 0.5, "heap_trim_s": 2.0},
        learner={"prompts_per_step": B}, network={"curve": False})
    cfg = load_config(cfg_path)
    receiver = LearnerStandIn(cfg, gate=0)
    alloc = Proc("allocator", cfg_path)
    actors = [Proc("actor", cfg_path, "--index", str(i)) for i in range(2)]
    yield {"cfg": cfg, "receiver": receiver, "alloc": alloc, "actors": actors,
           "run_dir": run_dir, "model": tiny_model}
    for p in [*actors, alloc]:
        p.stop()
    receiver.close()


def _tokenizer(model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model)


def test_every_group_has_its_grants_samples_and_verified_rewards(stack):
    groups = stack["receiver"].wait_groups(2 * B)
    problems = {p.id: p for p in load_task(stack["cfg"].task)[0]}
    tok, verifier = _tokenizer(stack["model"]), Verifier(timeout_s=5.0)
    per_round: dict[int, int] = Counter()
    for g in groups:
        assert g.problem_id in problems
        p = problems[g.problem_id]
        assert tok.decode(g.prompt_token_ids.tolist()) == p.prompt
        assert N_MIN <= g.n <= N_MAX
        for s in g.samples():
            text = tok.decode(s.token_ids.tolist(), skip_special_tokens=True)
            assert s.reward == verifier.score("reversed-integer", text, p.answer)
        per_round[g.grant_id // B] += g.n
    # Rounds whose groups all arrived sum exactly to the round budget B * n_mean.
    complete = [r for r in per_round if sum(1 for g in groups if g.grant_id // B == r) == B]
    assert complete and all(per_round[r] == B * N_MEAN for r in complete)
    assert len({g.grant_id for g in groups}) == len(groups)


def _recompute(model_dir_or_model, g: RolloutGroup) -> tuple[np.ndarray, np.ndarray]:
    """Behaviour log-probs vs transformers' log-softmax(logits / T) at the sampled tokens."""
    model = model_dir_or_model
    got, want = [], []
    for s in g.samples():
        ids = torch.tensor(np.concatenate([g.prompt_token_ids, s.token_ids]).astype(np.int64))
        with torch.no_grad():
            logits = model(input_ids=ids[None]).logits[0, :-1].float() / TEMPERATURE
        lp = torch.log_softmax(logits, -1)
        p = len(g.prompt_token_ids)
        tgt = ids[p:]
        want.append(lp[p - 1:len(ids) - 1].gather(-1, tgt[:, None])[:, 0].numpy())
        got.append(s.logprobs)
    return np.concatenate(got), np.concatenate(want)


def test_behaviour_logprobs_match_a_transformers_recompute(stack):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(stack["model"], dtype=torch.float32).eval()
    groups = [g for g in stack["receiver"].snapshot() if g.token_versions.max() == 0][:6]
    got, want = zip(*(_recompute(model, g) for g in groups), strict=True)
    got, want = np.concatenate(got), np.concatenate(want)
    # fp32 on both sides; differences come from kernel order only. Tolerance 2e-3 nats.
    assert got.size > 50
    assert np.abs(got - want).max() < 2e-3, np.abs(got - want).max()


def test_streamed_stats_shift_later_budgets_towards_uncertain_problems(stack):
    rx = stack["receiver"]
    # The gate held the allocator at one epoch (pacing window 2B = 16 problems); open it
    # once every first-epoch report has landed, so epoch-2 budgets see all of them.
    wait_for(lambda: json.loads((stack["run_dir"] / "allocator_status.json").read_text())
             ["counters"].get("report_accepted", 0) >= 2 * B, 60, "epoch-1 reports")
    rx.gate = None
    groups = rx.wait_groups(4 * B)  # two epochs of the 16-problem set
    first = {}
    for g in groups:
        if g.grant_id < 2 * B:
            first[g.problem_id] = float(g.rewards.mean())
    second = [g for g in groups if 2 * B <= g.grant_id < 4 * B]
    # Uncertain in the allocator's sense: some successes, below the mastery threshold.
    mixed = [g.n for g in second if 0 < first[g.problem_id] < 0.85]
    pure = [g.n for g in second if first[g.problem_id] in (0.0, 1.0)]
    assert mixed and pure, (first, [g.n for g in second])
    # docs/DESIGN.md §2: variance priority -> uncertain problems get more than mastered/unsolved.
    assert np.mean(mixed) > N_MEAN > np.mean(pure)
    status = json.loads((stack["run_dir"] / "allocator_status.json").read_text())
    assert status["stats"]["problems_seen"] == 16


def test_new_weights_are_applied_in_place_and_stamped_on_later_tokens(stack):
    from transformers import AutoModelForCausalLM

    rx = stack["receiver"]
    model = AutoModelForCausalLM.from_pretrained(stack["model"], dtype=torch.float32).eval()
    torch.manual_seed(0)
    with torch.no_grad():  # a visibly different policy: perturb every weight matrix
        for p in model.parameters():
            if p.ndim == 2:
                p.add_(0.05 * torch.randn_like(p))
    n_before = len(rx.snapshot())
    stack["v1"] = model
    rx.publisher.publish(1, list(model.named_parameters()), chunk_bytes=256 << 10)
    rx.version = 1  # the allocator now issues work at version 1
    wait_for(lambda: any(g.token_versions.min() == 1 for g in rx.snapshot()[n_before:]),
             120, "a group generated entirely with version 1")
    later = rx.snapshot()[n_before:]
    for g in later:
        for s in g.samples():  # versions never go back within a sample
            assert np.all(np.diff(s.versions) >= 0)
    v1 = [g for g in later if g.token_versions.min() == 1][:4]
    got, want = zip(*(_recompute(model, g) for g in v1), strict=True)
    assert np.abs(np.concatenate(got) - np.concatenate(want)).max() < 2e-3
    # Once a group is entirely v1, every group issued after it is too.
    first_v1 = min(g.grant_id for g in v1)
    wait_for(lambda: len(rx.snapshot()) > len(later) + n_before + B, 120, "more groups")
    assert all(g.token_versions.min() == 1 for g in rx.snapshot()
               if g.grant_id > first_v1 + 2 * B)


def test_tokens_of_samples_in_flight_at_a_swap_carry_the_version_that_produced_them(stack):
    """A sample generating when v1 arrived keeps its KV (computed by v0) and continues with v1.
    Its tokens stamped 0 must be exactly v0's log-probs; those stamped 1 exactly what v1 gives
    on top of v0's KV of the earlier positions (the stamp marks where the weights changed)."""
    from transformers import AutoModelForCausalLM

    v0 = AutoModelForCausalLM.from_pretrained(stack["model"], dtype=torch.float32).eval()
    v1 = stack["v1"]
    straddling = [(g, s) for g in stack["receiver"].snapshot() for s in g.samples()
                  if s.versions.min() == 0 and s.versions.max() == 1]
    assert straddling, "no sample was in flight when the weights changed"
    worst = 0.0
    for g, s in straddling[:8]:
        c = int(np.argmax(s.versions == 1))  # first token generated with v1
        assert c > 0 and np.all(s.versions[c:] == 1) and np.all(s.versions[:c] == 0)
        ids = torch.tensor(np.concatenate([g.prompt_token_ids, s.token_ids]).astype(np.int64))
        p = len(g.prompt_token_ids)
        with torch.no_grad():
            # v0 processed the prompt and tokens 0..c-2 (their logits gave tokens 0..c-1)...
            out0 = v0(input_ids=ids[None, :p + c - 1], use_cache=True)
            lp0 = torch.log_softmax(out0.logits[0].float() / TEMPERATURE, -1)
            # ...v1 processed token c-1 onwards (giving tokens c..), attending to v0's KV
            out1 = v1(input_ids=ids[None, p + c - 1:-1], past_key_values=out0.past_key_values)
            lp1 = torch.log_softmax(out1.logits[0].float() / TEMPERATURE, -1)
        want = np.concatenate([
            lp0[p - 1:p + c - 1].gather(-1, ids[p:p + c, None])[:, 0].numpy(),
            lp1.gather(-1, ids[p + c:, None])[:, 0].numpy()])
        worst = max(worst, float(np.abs(s.logprobs - want).max()))
    assert worst < 2e-3, worst

    def stamps() -> list[dict]:
        return [json.loads(p.read_text().splitlines()[-1])
                for p in sorted(stack["run_dir"].glob("metrics_actor*.jsonl"))]
    # the stamps are vLLM's own per-token weight versions, and the swap counts agree
    wait_for(lambda: all(m["native_version_stamps"] > 0 for m in stamps()), 15,
             "vLLM's weight versions on every actor's samples")
    assert all(m["version_stamp_disagreements"] == 0 for m in stamps()), stamps()
    # each actor reports its C heap and trims it on schedule (actors/heap.py; what a trim
    # returns is proven against the kernel's RSS in test_heap.py)
    wait_for(lambda: all(m.get("heap_trims", 0) >= 2 for m in stamps()), 15, "heap trims")
    assert all(m["heap_in_use_mib"] > 100 and m["rss_mib"] > m["heap_in_use_mib"]
               for m in stamps()), stamps()


def test_sigkilled_actor_work_is_reissued_and_counted_once(stack):
    rx, actors, run_dir = stack["receiver"], stack["actors"], stack["run_dir"]

    def state():
        with (run_dir / "allocator_state.pkl").open("rb") as f:
            return pickle.load(f)

    victim = json.loads((run_dir / "metrics_actor0.jsonl").read_text().splitlines()[-1])["actor"]
    # Kill actor 0 while it holds grants (it always prefetches).
    os.kill(actors[0].p.pid, signal.SIGKILL)
    actors[0].p.wait()
    time.sleep(1.0)  # a snapshot (every 0.5 s) taken after its death, before its leases expire
    held = {g["grant_id"] for g in state()["grants"] if g["actor_id"] == victim}
    assert held, "the victim held no grant when killed"
    wait_for(lambda: state()["counters"].get("leases_expired", 0) >= 1, 60, "a lease expiry")
    # Its grants are re-issued to the survivor and delivered, each exactly once.
    wait_for(lambda: held <= {g.grant_id for g in rx.snapshot()}, 180, "the re-issued work")
    ids = [g.grant_id for g in rx.snapshot()]
    assert len(ids) == len(set(ids)), "a group was delivered twice"
    s = state()
    assert set(ids) <= set(IdSet.from_ranges(s["formed"]))
    wait_for(lambda: held <= set(IdSet.from_ranges(state()["completed"])), 30,
             "the re-issued grants to complete")
