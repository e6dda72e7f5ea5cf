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


def shared_prompt_hidden(body: nn.Module, input_ids: Tensor, mask: Tensor, prompt_lens: Tensor,
                         group_ids: Tensor) -> Tensor:
    """The hidden states that predict the completion tokens ([N, D], in `hidden[mask]`
    order), with each group's prompt run once instead of once per sample.

    Two calls of the transformer body: (1) the distinct prompts of the micro-batch,
    right-padded, keeping their keys and values; (2) every completion, attending to its
    prompt's keys and values (gathered per row) and causally to itself, at positions
    prompt_len + j. The first completion token is predicted from the prompt's last hidden
    state. The same arithmetic as the full rows (causal attention: a prompt never sees a
    completion), fewer tokens: a group of n samples runs its prompt once, not n times, and
    gradients from all n reach the prompt's activations through its keys and values.
    """
    from transformers import DynamicCache

    S, T = input_ids.shape
    dev = input_ids.device
    uniq, inv = torch.unique(group_ids.to(dev), return_inverse=True)  # inv: row -> prompt
    rows = torch.arange(S, device=dev)
    rep = torch.full((len(uniq),), S, dtype=torch.long, device=dev).scatter_reduce(
        0, inv, rows, reduce="amin")  # the first row of each prompt
    plen_row = prompt_lens.to(dev)
    plen = plen_row[rep]
    P = int(plen.max())
    p_valid = torch.arange(P, device=dev)[None, :] < plen[:, None]  # [U, P]
    p_ids = torch.where(p_valid, input_ids[rep, :P], 0)
    out = body(input_ids=p_ids, attention_mask=p_valid.long(), use_cache=True)
    hp = out.last_hidden_state  # [U, P, D]
    kv = [(layer.keys[inv], layer.values[inv]) for layer in out.past_key_values.layers]

    clen = mask.sum(1).to(dev)  # [S] completion tokens of each row
    L = max(int(clen.max()), 1)
    j = torch.arange(L, device=dev)
    c_valid = j[None, :] < clen[:, None]  # [S, L]
    src = (plen_row[:, None] + j[None, :]).clamp(max=T - 1)
    c_ids = torch.where(c_valid, input_ids.gather(1, src), 0)
    hc = body(input_ids=c_ids, attention_mask=torch.cat([p_valid[inv], c_valid], 1).long(),
              position_ids=plen_row[:, None] + j[None, :],
              past_key_values=DynamicCache(ddp_cache_data=kv), use_cache=True
              ).last_hidden_state  # [S, L, D]
    first = hp[inv, plen_row - 1]  # [S, D]: the prompt's last position predicts token 0
    return torch.cat([first[:, None], hc[:, :-1]], 1)[c_valid]


class Policy(nn.Module):
    """HF causal LM -> per-token log π and entropy of the masked (completion) positions."""

    def __init__(self, lm: nn.Module, temperature: float) -> None:
        super().__init__()
        self.lm = lm
        self.temperature = temperature

    def forward(self, input_ids: Tensor, targets: Tensor, mask: Tensor, n_chunks: int,
                prompt_lens: Tensor | None = None, group_ids: Tensor | None = None
                ) -> tuple[Tensor, Tensor]:
        """input_ids [S, T], targets/mask [S, T-1] -> (log π, H) [S, T-1], 0 off the mask.

        Rows are right-padded, so under causal attention no real token sees a pad: the
        padding mask changes nothing we read, and the full-row path leaves it out so that SDPA
        takes its fused causal kernel. With `prompt_lens` and `group_ids` ([S]; rows of one
        group share their prompt) each prompt is run once (`shared_prompt_hidden`).
        """
        body = self.lm.get_decoder() if hasattr(self.lm, "get_decoder") else self.lm.model
        if prompt_lens is None:
            hidden = body(input_ids=input_ids).last_hidden_state[:, :-1]  # [S, T-1, D]
            h = hidden[mask]  # [N, D]: completion positions only
        else:
            assert group_ids is not None
            h = shared_prompt_hidden(body, input_ids, mask, prompt_lens, group_ids)
        logp, ent = chunked_logp_entropy(self.lm.get_output_embeddings(), h, targets[mask],
                                         self.temperature, n_chunks)
        logp_full = torch.zeros(mask.shape, dtype=logp.dtype, device=logp.device)
        ent_full = torch.zeros(mask.shape, dtype=ent.dtype, device=ent.device)
        return logp_full.masked_scatter(mask, logp), ent_full.masked_scatter(mask, ent)
