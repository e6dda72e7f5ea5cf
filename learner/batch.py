"""Rollout groups -> padded training tensors (pure; no sockets, no DeepSpeed).

Invariants:
- Each sequence is prompt + completion; `mask` marks exactly the completion tokens, and
  per-token tensors are aligned so that position t holds the token predicted from t-1.
- Samples keep their group id, so advantages are normalised within the group they were
  generated in, whatever the group sizes.
- `shard` splits by whole groups, so every data-parallel rank normalises complete groups;
  it balances rows (then tokens), so ranks plan about as many micro-batches. The trainer pads
  the difference with zero-weight micro-batches (`dummy_batch`), since ZeRO-2/3 run
  collectives in every forward/backward and every rank must run as many.
- `mini_batches` cuts a rollout batch into optimizer updates by whole groups, the same way on
  every rank (a seeded permutation), so ranks agree on which groups each update trains.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from protocol.messages import RolloutGroup


@dataclass(slots=True)
class Batch:
    input_ids: torch.Tensor  # [S, T] prompt + completion, right-padded
    attention_mask: torch.Tensor  # [S, T]
    targets: torch.Tensor  # [S, T-1] next tokens (input_ids shifted left)
    mask: torch.Tensor  # [S, T-1] bool: target is a completion token
    logp_behaviour: torch.Tensor  # [S, T-1] μ of each completion token (0 elsewhere)
    versions: torch.Tensor  # [S, T-1] policy version of each completion token (-1 elsewhere)
    rewards: torch.Tensor  # [S]
    group_ids: torch.Tensor  # [S]
    prompt_lens: torch.Tensor  # [S] prompt tokens of each row (rows of a group share them)

    @property
    def num_tokens(self) -> int:
        return int(self.mask.sum())

    def rows(self, idx: torch.Tensor | slice) -> Batch:
        """Sub-batch of sequences, trimmed to its own longest sequence."""
        am = self.attention_mask[idx]
        width = max(int(am.sum(1).max()), 2) if am.numel() else 2
        return Batch(self.input_ids[idx][:, :width], am[:, :width],
                     self.targets[idx][:, :width - 1], self.mask[idx][:, :width - 1],
                     self.logp_behaviour[idx][:, :width - 1], self.versions[idx][:, :width - 1],
                     self.rewards[idx], self.group_ids[idx], self.prompt_lens[idx])


def build_batch(groups: list[RolloutGroup], pad_id: int = 0) -> Batch:
    seqs, comp_start, lps, vers, rewards, gids = [], [], [], [], [], []
    for gi, g in enumerate(groups):
        prompt = g.prompt_token_ids
        o = g.offsets
        for i in range(g.n):
            s, e = int(o[i]), int(o[i + 1])
            seqs.append(np.concatenate([prompt, g.completion_token_ids[s:e]]))
            comp_start.append(len(prompt))
            lps.append(g.behaviour_logprobs[s:e])
            vers.append(g.token_versions[s:e])
            rewards.append(float(g.rewards[i]))
            gids.append(gi)
    S = len(seqs)
    T = max(max(len(s) for s in seqs), 2)
    input_ids = torch.full((S, T), pad_id, dtype=torch.long)
    attn = torch.zeros((S, T), dtype=torch.long)
    mask = torch.zeros((S, T - 1), dtype=torch.bool)
    logp_b = torch.zeros((S, T - 1), dtype=torch.float32)
    versions = torch.full((S, T - 1), -1, dtype=torch.long)
    for r, (seq, p, lp, v) in enumerate(zip(seqs, comp_start, lps, vers, strict=True)):
        n = len(seq)
        input_ids[r, :n] = torch.from_numpy(seq.astype(np.int64))
        attn[r, :n] = 1
        # target index t predicts input_ids[t+1]; completion token j sits at input p+j
        mask[r, p - 1:n - 1] = True
        logp_b[r, p - 1:n - 1] = torch.from_numpy(np.asarray(lp, dtype=np.float32))
        versions[r, p - 1:n - 1] = torch.from_numpy(np.asarray(v, dtype=np.int64))
    return Batch(input_ids, attn, input_ids[:, 1:].clone(), mask, logp_b, versions,
                 torch.tensor(rewards, dtype=torch.float32), torch.tensor(gids),
                 torch.tensor(comp_start, dtype=torch.long))


def shard(groups: list[RolloutGroup], rank: int, world: int) -> list[RolloutGroup]:
    """This rank's share of whole groups, balanced by rows first, then tokens (greedy)."""
    order = sorted(range(len(groups)), key=lambda i: (-groups[i].n, -groups[i].num_tokens, i))
    rows, toks = [0] * world, [0] * world
    mine: list[int] = []
    for i in order:
        r = min(range(world), key=lambda k: (rows[k], toks[k], k))
        rows[r] += groups[i].n
        toks[r] += groups[i].num_tokens
        if r == rank:
            mine.append(i)
    return [groups[i] for i in sorted(mine)]


def mini_batches(n_groups: int, groups_per_update: int, seed: int) -> list[list[int]]:
    """Group indices of each optimizer update: a seeded permutation cut into
    ceil(n / groups_per_update) parts of near-equal size (identical on every rank)."""
    if n_groups == 0:
        return []
    perm = np.random.default_rng(seed).permutation(n_groups)
    parts = -(-n_groups // groups_per_update)
    return [sorted(int(i) for i in p) for p in np.array_split(perm, parts)]


def micro_batches(n_rows: int, size: int) -> list[slice]:
    return [slice(i, min(i + size, n_rows)) for i in range(0, n_rows, size)]


def micro_batches_by_length(batch: Batch, size: int,
                            max_tokens: int | None = None) -> list[torch.Tensor]:
    """Row indices of micro-batches of similar length (longest first): each micro-batch is
    trimmed to its own longest row, so grouping by length wastes little compute on padding.
    Row order does not matter to the loss: advantages follow each row's group id.

    With `max_tokens`, a micro-batch holds as many rows as fit in rows x longest <= max_tokens
    (at least one row; `size` still caps the rows), as verl's dynamic batch size does.
    """
    lengths = batch.attention_mask.sum(1)
    order = torch.argsort(lengths, descending=True, stable=True)
    if max_tokens is None:
        return [order[i:i + size] for i in range(0, len(order), size)]
    out, start = [], 0
    while start < len(order):
        width = max(int(lengths[order[start]]), 1)  # longest row of this micro-batch
        rows = max(1, min(size, max_tokens // width))
        out.append(order[start:start + rows])
        start += rows
    return out


def dummy_batch(pad_id: int = 0) -> Batch:
    """One two-token row whose only target counts nowhere in the loss (the caller weights it
    by 0): it keeps a rank with less data in step with the collectives of the others."""
    ids = torch.full((1, 2), pad_id, dtype=torch.long)
    return Batch(ids, torch.ones_like(ids), ids[:, 1:].clone(),
                 torch.ones((1, 1), dtype=torch.bool), torch.zeros((1, 1)),
                 torch.full((1, 1), -1, dtype=torch.long),
                 torch.zeros(1), torch.zeros(1, dtype=torch.long), torch.ones(1, dtype=torch.long))
