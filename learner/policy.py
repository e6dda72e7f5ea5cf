"""The policy as the learner trains it: log π and entropy of the sampled completion tokens,
without ever materialising [S, L, V] logits.

`Policy` wraps the HF causal LM so that DeepSpeed (all ZeRO stages) sees one module whose
forward returns what the objective needs. Its forward runs the transformer body once, keeps
the last hidden state of the completion positions only (`mask`), and applies the LM head to
them in chunks of `chunk_tokens` positions. Each chunk is checkpointed: the forward keeps only
the chunk's hidden states, and backward recomputes the chunk's logits (a single chunk is kept
for backward instead: it fits the budget). So the logits alive at any time are about
[chunk_tokens, V] in float32, whatever S, L and V are.

Invariants:
- Exact: log π and H equal those of the full-logits path (logits / T, float32 log-softmax) to
  float32 rounding, and so do the gradients (tests/test_learner_policy.py).
- The number of LM-head calls per forward is `n_chunks`, chosen by the caller and identical
  on every rank (empty chunks included): under ZeRO-3 every call gathers the head's
  parameters collectively, so the calls must pair up across ranks.
- Entropies carry no gradient.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint


def chunk_tokens_for(vocab_size: int, chunk_mib: float) -> int:
    """Positions per LM-head chunk so that one float32 [chunk, V] tensor is ~chunk_mib MiB."""
    return max(16, int(chunk_mib * (1 << 20) // (4 * vocab_size)))


def n_chunks_for(n_tokens: int, chunk_tokens: int) -> int:
    return max(1, math.ceil(n_tokens / chunk_tokens))


def _head_logp_entropy(head: nn.Module, h: Tensor, tokens: Tensor, temperature: float
                       ) -> tuple[Tensor, Tensor]:
    """log π of `tokens` (with grad) and entropy (detached) from hidden states h [N, D]."""
    logits = head(h).float() / temperature  # [N, V], the distribution actually sampled from
    lse = torch.logsumexp(logits, dim=-1)
    logp = logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1) - lse
    with torch.no_grad():
        p_logp = torch.log_softmax(logits, dim=-1)
        ent = -torch.where(p_logp > -torch.inf, p_logp.exp() * p_logp, 0.0).sum(-1)
    return logp, ent


def chunked_logp_entropy(head: nn.Module, h: Tensor, tokens: Tensor, temperature: float,
                         n_chunks: int) -> tuple[Tensor, Tensor]:
    """(log π [N] with grad, H [N] detached) over h [N, D] in exactly `n_chunks` head calls."""
    bounds = torch.linspace(0, h.shape[0], n_chunks + 1).round().long().tolist()
    logps, ents = [], []
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        if torch.is_grad_enabled() and n_chunks > 1:  # one chunk: its logits fit the budget
            lp, en = checkpoint(_head_logp_entropy, head, h[a:b], tokens[a:b], temperature,
                                use_reentrant=False)
        else:
            lp, en = _head_logp_entropy(head, h[a:b], tokens[a:b], temperature)
        logps.append(lp)
        ents.append(en.detach())
    return torch.cat(logps), torch.cat(ents)


class Policy(nn.Module):
    """HF causal LM -> per-token log π and entropy of the masked (completion) positions."""

    def __init__(self, lm: nn.Module, temperature: float) -> None:
        super().__init__()
        self.lm = lm
        self.temperature = temperature

    def forward(self, input_ids: Tensor, targets: Tensor, mask: Tensor, n_chunks: int
                ) -> tuple[Tensor, Tensor]:
        """input_ids [S, T], targets/mask [S, T-1] -> (log π, H) [S, T-1], 0 off the mask.

        Rows are right-padded, so under causal attention no real token sees a pad: the
        padding mask changes nothing we read, and leaving it out lets SDPA take its fused
        causal kernel.
        """
        body = self.lm.get_decoder() if hasattr(self.lm, "get_decoder") else self.lm.model
        hidden = body(input_ids=input_ids).last_hidden_state[:, :-1]  # [S, T-1, D]
        h = hidden[mask]  # [N, D]: completion positions only
        logp, ent = chunked_logp_entropy(self.lm.get_output_embeddings(), h, targets[mask],
                                         self.temperature, n_chunks)
        logp_full = torch.zeros(mask.shape, dtype=logp.dtype, device=logp.device)
        ent_full = torch.zeros(mask.shape, dtype=ent.dtype, device=ent.device)
        return logp_full.masked_scatter(mask, logp), ent_full.masked_scatter(mask, ent)
