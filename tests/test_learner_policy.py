"""The chunked LM-head path (learner/policy.py) against the full-logits path it replaces:
the same log-probs and entropies, and the same gradients, to float32 rounding."""

from __future__ import annotations

import pytest
import torch

from learner.objective import logprobs_and_entropy
from learner.policy import Policy, chunk_tokens_for, n_chunks_for


def small_lm(vocab: int, tied: bool):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=vocab, hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                      tie_word_embeddings=tied, max_position_embeddings=128)
    return Qwen2ForCausalLM(cfg).float()


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
