"""Micro-batching of the learner: length-sorted micro-batches and mask-free causal attention
give the same log-probs as the padded, masked forward they replace."""

from __future__ import annotations

import numpy as np
import torch

from learner.batch import build_batch, micro_batches_by_length
from learner.objective import sampled_logprobs
from protocol.messages import RolloutGroup


def _groups(rng: np.random.Generator, n_groups: int = 5, n: int = 4) -> list[RolloutGroup]:
    out = []
    for g in range(n_groups):
        lengths = rng.integers(1, 20, size=n).astype(np.int32)
        total = int(lengths.sum())
        out.append(RolloutGroup(
            grant_id=g, lease_id=g, problem_id=f"p{g}", actor_id="t",
            prompt_token_ids=rng.integers(3, 16, size=int(rng.integers(3, 9))).astype(np.int32),
            completion_token_ids=rng.integers(0, 16, size=total).astype(np.int32),
            completion_lengths=lengths, behaviour_logprobs=np.zeros(total, np.float32),
            token_versions=np.zeros(total, np.int32),
            rewards=rng.integers(0, 2, size=n).astype(np.float32),
            finished=np.ones(n, dtype=bool), gen_seconds=0.0))
    return out


def test_micro_batches_by_length_cover_every_row_once_longest_first():
    batch = build_batch(_groups(np.random.default_rng(1)))
    parts = micro_batches_by_length(batch, 3)
    rows = torch.cat(parts)
    assert sorted(rows.tolist()) == list(range(batch.mask.shape[0]))
    lengths = batch.attention_mask.sum(1)[rows]
    assert bool((lengths[:-1] >= lengths[1:]).all())
    assert all(len(p) <= 3 for p in parts)


def test_mask_free_forward_on_right_padded_rows_equals_the_masked_forward():
    from launch.embedded_model import build_model

    model = build_model(seed=0).eval()
    batch = build_batch(_groups(np.random.default_rng(2)))
    with torch.no_grad():
        masked = model(input_ids=batch.input_ids,
                       attention_mask=batch.attention_mask).logits[:, :-1]
        free = model(input_ids=batch.input_ids).logits[:, :-1]
        # and per length-sorted micro-batch, each trimmed to its own longest row
        out = torch.zeros(batch.mask.shape)
        for idx in micro_batches_by_length(batch, 4):
            mb = batch.rows(idx)
            lp = sampled_logprobs(model(input_ids=mb.input_ids).logits[:, :-1], mb.targets)
            out[idx, :lp.shape[1]] = lp
    ref = sampled_logprobs(masked, batch.targets)
    m = batch.mask
    assert m.sum() > 50 and (batch.attention_mask == 0).any()  # there is padding to ignore
    torch.testing.assert_close(sampled_logprobs(free, batch.targets)[m], ref[m],
                               atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[m], ref[m], atol=1e-5, rtol=1e-5)
