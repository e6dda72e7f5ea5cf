"""Colocated placement on a GPU: vLLM's sleep mode hands the engine's memory to the learner
beside it and takes it back, with the weights the learner published.

Marked `gpu`: skipped (never faked) where no CUDA device exists. On a GPU machine:
    python -m pytest -m gpu tests/test_gpu_colocated.py
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import REPO, make_config

from launch.ports import free_ports

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def test_a_sleeping_engine_frees_its_memory_and_wakes_with_new_weights(tiny_model):
    import gc

    from transformers import AutoModelForCausalLM
    from vllm import SamplingParams

    from actors.engine import Engine

    eng = Engine(str(tiny_model), max_model_len=64, max_tokens=12, temperature=1e-4,
                 top_p=1.0, seed=0, kv_cache_gib=0.25, gpu_memory_utilization=0.3,
                 sleep_mode=True)
    params = SamplingParams(temperature=0.0, max_tokens=12, logprobs=0, ignore_eos=True)
    prompts = [[3, 5, 7, 4, 9], [2, 6, 6, 8]]

    def generate(eng: Engine) -> list[tuple[list[int], list[float]]]:
        outs = eng.llm.generate([{"prompt_token_ids": p} for p in prompts], params,
                                use_tqdm=False)
        return [(list(o.outputs[0].token_ids),
                 [next(iter(d.values())).logprob for d in o.outputs[0].logprobs])
                for o in outs]

    try:
        before = generate(eng)
        free_awake = torch.cuda.mem_get_info()[0]
        eng.sleep()
        free_asleep = torch.cuda.mem_get_info()[0]
        total = torch.cuda.mem_get_info()[1]
        # the KV cache (most of its 30 % share) goes back to the device
        assert free_asleep - free_awake > 0.2 * total, (free_awake, free_asleep, total)
        eng.wake_up()
        # level 1 kept the weights in host memory: the same kernels give the same tokens
        assert [t for t, _ in generate(eng)] == [t for t, _ in before]
        hf = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
        g = torch.Generator().manual_seed(1)
        new = [(n, (p.detach() + 0.05 * torch.randn(p.shape, generator=g)).contiguous())
               for n, p in hf.named_parameters()]
        eng.sleep()  # new weights go into an engine that slept: the colocated cycle
        eng.wake_up()
        eng.load_weights(new, 1)
        got = generate(eng)
        with torch.no_grad():
            for (_, p), (_, t) in zip(hf.named_parameters(), new, strict=True):
                p.copy_(t)
            # transformers' log-probs of the tokens the engine chose, teacher-forced: equal
            # within GPU kernel tolerance (TF32 / attention backends may flip exact ties, so
            # tokens are not compared with an independent greedy decode)
            for p, (toks, lps) in zip(prompts, got, strict=True):
                ids = torch.tensor([p + toks])
                logp = torch.log_softmax(hf(ids).logits[0, len(p) - 1:-1].float(), -1)
                want = logp.gather(1, torch.tensor(toks)[:, None])[:, 0]
                assert torch.allclose(torch.tensor(lps), want, atol=2e-2), (lps, want)
        assert [t for t, _ in got] != [t for t, _ in before]  # the new weights changed them
    finally:
        eng.llm.llm_engine.engine_core.shutdown()  # its share of the GPU back for later tests
        del eng
        gc.collect()
        torch.cuda.empty_cache()


@pytest.mark.parametrize("launcher", ["run", "cluster"])
def test_colocated_run_on_one_gpu_sleeps_between_batches_and_trains(tiny_model, tmp_path,
                                                                   launcher):
    """Through `dynamo-rl run --placement colocated`, and through `launch/cluster.sh
    --colocated` on a one-node host file (the learner rank and the actor on this node's GPU;
    the flag alone sets the placement)."""
    run_dir = tmp_path / "colo"
    # the engine sleeps as soon as it has no work: a tiny model's learner step on a GPU is
    # shorter than the default 0.5 s of idle time before a sleep
    sections = dict(actor={"sleep_after_s": 0.0},
                    allocator={"batch_prompts": 32, "n_mean": 8, "n_min": 4, "n_max": 16},
                    learner={"total_steps": 16, "prompts_per_step": 32, "lr": 2e-4,
                             "eval_every": 16, "checkpoint_every": 16})
    if launcher == "run":
        cfg = make_config(run_dir, tiny_model, placement="colocated", **sections)
        cmd = [sys.executable, "-m", "launch.cli", "run", str(cfg)]
    else:
        cfg = make_config(run_dir, tiny_model, **sections)
        (tmp_path / "hosts").write_text("localhost slots=1\n")
        cmd = [str(REPO / "launch/cluster.sh"), "--config", str(cfg), "--hostfile",
               str(tmp_path / "hosts"), "--learner-nodes", "1", "--actor-nodes", "1",
               "--colocated", "--run-dir", str(run_dir), "--python", sys.executable,
               "--master-port", str(free_ports(1)[0])]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    lines = (run_dir / "metrics_actor0.jsonl").read_text().splitlines()
    actor = json.loads(lines[-1])
    # the engine slept while the learner trained and woke for each new batch
    assert actor.get("engine_sleeps", 0) >= 8 and actor.get("engine_wake_ups", 0) >= 8, actor
    steps = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert max(s["step"] for s in steps) == 16
