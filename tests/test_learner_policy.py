"""The chunked LM-head path (learner/policy.py) against the full-logits path it replaces:
the same log-probs and entropies, and the same gradients, to float32 rounding."""

from __future__ import annotations

import pytest
import torch

from learner.objective import logprobs_and_entropy
from learner.policy import Policy, chunk_tokens_for, n_chunks_for


def small_lm(vocab: int, tied: bool, attn: str = "sdpa"):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=vocab, hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                      tie_word_embeddings=tied, max_position_embeddings=128)
    cfg._attn_implementation = attn
    lm = Qwen2ForCausalLM(cfg).float()
    assert lm.config._attn_implementation == attn
    return lm


def full_logits_path(lm, ids, targets, mask, temperature):
    """What the learner computed before: [S, L, V] logits / T, then per-token log π, H."""
    logits = lm(input_ids=ids).logits[:, :-1].float() / temperature
    return logprobs_and_entropy(logits, targets)


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("n_chunks", [1, 3, 7])
def test_chunked_logprobs_entropy_and_gradients_equal_the_full_logits_path(tied, n_chunks):
    lm = small_lm(vocab=1000, tied=tied)
    g = torch.Generator().manual_seed(1)
    S, T, temperature = 3, 20, 0.7
    ids = torch.randint(0, 1000, (S, T), generator=g)
    targets = ids[:, 1:]
    mask = torch.zeros(S, T - 1, dtype=torch.bool)
    mask[0, 5:19] = True  # completions of different lengths after prompts of different lengths
    mask[1, 2:9] = True
    mask[2, 10:12] = True
    weights = torch.randn(S, T - 1, generator=g)

    lp_ref, h_ref = full_logits_path(lm, ids, targets, mask, temperature)
    (torch.where(mask, lp_ref * weights, 0.0).sum()).backward()
    grads_ref = {n: p.grad.clone() for n, p in lm.named_parameters()}
    lm.zero_grad()

    pol = Policy(lm, temperature)
    lp, h = pol(ids, targets, mask, n_chunks)
    (torch.where(mask, lp * weights, 0.0).sum()).backward()
    assert not h.requires_grad
    torch.testing.assert_close(lp[mask], lp_ref[mask], rtol=0, atol=1e-5)
    torch.testing.assert_close(h[mask], h_ref[mask], rtol=0, atol=1e-5)
    assert (lp[~mask] == 0).all() and (h[~mask] == 0).all()
    for n, p in lm.named_parameters():
        # float32 sums in another order: differences relative to the tensor's largest entry
        scale = float(grads_ref[n].abs().max())
        torch.testing.assert_close(p.grad, grads_ref[n], rtol=1e-4, atol=1e-5 * scale,
                                   msg=lambda m, n=n: f"{n}: {m}")


def test_chunk_size_bounds_the_logits_whatever_the_vocabulary():
    # one float32 [chunk, V] tensor is about the configured MiB, at 32k and at 152k
    for vocab in (32_000, 152_064):
        c = chunk_tokens_for(vocab, 64.0)
        assert 0.5 * 64 <= c * vocab * 4 / 2**20 <= 64
    assert n_chunks_for(0, 100) == 1 and n_chunks_for(250, 100) == 3


def _groups(prompt_lens, completion_lens, vocab, seed=0):
    """Rollout groups with the given prompt lengths and per-sample completion lengths."""
    import numpy as np

    from protocol.messages import RolloutGroup

    rng = np.random.default_rng(seed)
    out = []
    for i, (p, lens) in enumerate(zip(prompt_lens, completion_lens, strict=True)):
        lens = np.asarray(lens, dtype=np.int32)
        total = int(lens.sum())
        out.append(RolloutGroup(
            grant_id=i, lease_id=1, problem_id=f"p{i}", actor_id="t",
            prompt_token_ids=rng.integers(1, vocab, size=p).astype(np.int32),
            completion_token_ids=rng.integers(1, vocab, size=total).astype(np.int32),
            completion_lengths=lens, behaviour_logprobs=np.zeros(total, np.float32),
            token_versions=np.zeros(total, np.int32), rewards=np.zeros(len(lens), np.float32),
            finished=np.ones(len(lens), bool), gen_seconds=0.0))
    return out


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("rows", [None, [0, 2, 3, 5, 6]])
def test_each_prompt_run_once_gives_the_full_rows_log_probs_entropies_and_gradients(rows, attn):
    """learner.share_prompts: a group's prompt runs once and its samples attend to its keys
    and values. Prompts of different lengths, groups of different sizes and completion
    lengths (one token included), and a micro-batch holding part of a group each; with
    either attention kernel the learner may use (learner.attn_implementation)."""
    from learner.batch import build_batch

    lm = small_lm(vocab=50, tied=True, attn=attn)
    policy = Policy(lm, temperature=0.7)
    batch = build_batch(_groups([3, 9, 5], [[4, 1, 6], [2, 7], [5, 5, 3, 1]], vocab=50))
    if rows is not None:
        batch = batch.rows(torch.tensor(rows))
    grads = []
    outs = []
    for shared in (False, True):
        lm.zero_grad()
        extra = (batch.prompt_lens, batch.group_ids) if shared else ()
        lp, H = policy(batch.input_ids, batch.targets, batch.mask, 2, *extra)
        (lp * torch.linspace(0.5, 1.5, lp.numel()).view_as(lp)).sum().backward()
        outs.append((lp.detach(), H))
        grads.append([p.grad.clone() for p in lm.parameters()])
    (lp_full, H_full), (lp_shared, H_shared) = outs
    assert torch.allclose(lp_full, lp_shared, atol=1e-5)
    assert torch.allclose(H_full, H_shared, atol=1e-5)
    assert (lp_shared[~batch.mask] == 0).all()
    for a, b in zip(*grads, strict=True):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)


def test_eager_and_sdpa_attention_give_the_same_log_probs_and_gradients():
    """learner.attn_implementation changes the kernels, not the arithmetic: the shared-prompt
    path under eager attention equals the full rows under SDPA to float32 rounding."""
    from learner.batch import build_batch

    batch = build_batch(_groups([3, 9, 5], [[4, 1, 6], [2, 7], [5, 5, 3, 1]], vocab=50))
    outs = []
    for attn, extra in (("sdpa", ()), ("eager", (batch.prompt_lens, batch.group_ids))):
        lm = small_lm(vocab=50, tied=True, attn=attn)  # same seed: same weights
        lp, H = Policy(lm, temperature=0.7)(batch.input_ids, batch.targets, batch.mask, 2,
                                            *extra)
        lp.sum().backward()
        outs.append((lp.detach(), H, [p.grad.clone() for p in lm.parameters()]))
    (lp_a, H_a, g_a), (lp_b, H_b, g_b) = outs
    assert torch.allclose(lp_a, lp_b, atol=1e-5) and torch.allclose(H_a, H_b, atol=1e-5)
    for a, b in zip(g_a, g_b, strict=True):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)
