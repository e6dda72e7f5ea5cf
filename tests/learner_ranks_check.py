"""Child script for tests/test_learner_ranks.py: one learner rank training synthetic rollout
batches with a real DeepSpeed engine (gloo), started once per rank with RANK/WORLD_SIZE set.

Every rank trains the same batches (groups sampled from the model itself, so μ is the
model's own distribution), and writes RESULT_DIR/rank{r}.json with, per step, the stats, a
CRC-32C of the gathered weights and, on rank 0, whether the weights it published equal the
gathered model. Unequal data is built in: few groups with very different lengths.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import torch


def synthetic_groups(model, rng: np.random.Generator, n_groups: int, lengths: list[int],
                     n: int = 4, temperature: float = 1.0):
    """Groups with completions sampled from `model`, behaviour log-probs from the same
    weights, rewards alternating (every group carries signal)."""
    from protocol.messages import RolloutGroup

    out = []
    for g in range(n_groups):
        length = lengths[g % len(lengths)]
        prompt = torch.tensor([[2, *rng.integers(3, 13, size=4).tolist(), 13]])
        with torch.no_grad():
            seqs = model.generate(prompt.repeat(n, 1), do_sample=True, temperature=temperature,
                                  top_k=0, top_p=1.0, max_new_tokens=length,
                                  min_new_tokens=length, return_dict_in_generate=True,
                                  output_logits=True)
        comp = seqs.sequences[:, prompt.shape[1]:]
        logits = torch.stack(seqs.logits, dim=1).float() / temperature
        lp = torch.log_softmax(logits, -1).gather(-1, comp[..., None])[..., 0]
        rewards = np.array([1.0, 0.0] * (n // 2), dtype=np.float32)
        rng.shuffle(rewards)
        out.append(RolloutGroup(
            grant_id=g, lease_id=g, problem_id=f"p{g}", actor_id="check",
            prompt_token_ids=prompt[0].numpy().astype(np.int32),
            completion_token_ids=comp.reshape(-1).numpy().astype(np.int32),
            completion_lengths=np.full(n, comp.shape[1], dtype=np.int32),
            behaviour_logprobs=lp.reshape(-1).numpy().astype(np.float32),
            token_versions=np.zeros(comp.numel(), dtype=np.int32),
            rewards=rewards, finished=np.ones(n, dtype=bool), gen_seconds=0.0))
    return out


def main() -> int:
    model_dir, out_dir, spec = sys.argv[1], Path(sys.argv[2]), json.loads(sys.argv[3])
    from crc32c import crc32c
    from transformers import AutoModelForCausalLM

    from learner.config import LearnerConfig
    from learner.objective import PRESETS
    from learner.trainer import Trainer, init_distributed
    from protocol.weights import pack_weights, unpack_weights

    rank, world = init_distributed()
    cfg = LearnerConfig(**spec["learner"])
    trainer = Trainer(cfg, PRESETS[spec.get("preset", "dynamo")], model_dir, temperature=1.0)
    ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    rng = np.random.default_rng(spec.get("seed", 0))
    steps = []
    for _ in range(spec["steps"]):
        groups = synthetic_groups(ref, rng, spec["groups"], spec["lengths"])
        for g in groups:
            g.token_versions[:] = trainer.version
        stats = trainer.step(groups)
        published = {}

        def consume(named, published=published):
            ann, blob = pack_weights(named, trainer.version, 1 << 20,
                                     total_bytes=trainer.weight_bytes())
            published.update({n: t.clone() for n, t in unpack_weights(ann, blob)})

        agree = trainer.for_each_weight(consume, check_replicas=True)
        crc = 0
        for _, t in trainer.gathered_weights():
            crc = crc32c(t.detach().contiguous().view(torch.uint8).numpy(), crc)
        rec = {"version": trainer.version, "stats": stats, "agree": agree, "crc": crc}
        if rank == 0:
            # the published blob against the gathered model, tensor by tensor
            gathered = {n: t.clone() for n, t in trainer.gathered_weights()}
            rec["published_equals_gathered"] = (
                published.keys() == gathered.keys()
                and all(torch.equal(published[n], gathered[n]) for n in gathered))
        else:
            for _ in trainer.gathered_weights():
                pass
        steps.append(rec)
        # the model that generated the next batch is the one just trained (on-policy start)
        ref.load_state_dict({n: t.clone() for n, t in trainer.gathered_weights()}, strict=False)
    if spec.get("save"):
        trainer.save(out_dir / "ckpt", "step1", {"version": trainer.version}, model_dir)
    attn = trainer.lm.config._attn_implementation  # the kernels this rank's model runs
    (out_dir / f"rank{rank}.json").write_text(json.dumps({"world": world, "steps": steps,
                                                             "attn": attn}))
    torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    sys.exit(main())
