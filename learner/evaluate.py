"""Held-out evaluation inside the learner: greedy decoding with the training weights.

Cheap for small models (KV-cache batched `generate`); real models are evaluated with vLLM by
`dynamo-rl eval` instead (set `learner.eval_every = 0`).
"""

from __future__ import annotations

from collections import defaultdict

import torch

from tasks.problems import Problem
from tasks.verifiers import Verifier


@torch.no_grad()
def greedy_accuracy(model, tokenizer, problems: list[Problem], verifier_name: str, *,
                    max_new_tokens: int, batch_size: int = 256) -> dict[str, float]:
    """Greedy accuracy overall and per difficulty bucket (`eval/acc`, `eval/acc_<bucket>`)."""
    verifier = Verifier()
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    correct: dict[str, list[float]] = defaultdict(list)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    for i in range(0, len(problems), batch_size):
        chunk = problems[i:i + batch_size]
        ids = [tokenizer.encode(p.prompt, add_special_tokens=False) for p in chunk]
        width = max(map(len, ids))
        inp = torch.full((len(ids), width), pad, dtype=torch.long)
        att = torch.zeros_like(inp)
        for r, seq in enumerate(ids):  # left padding for generation
            inp[r, width - len(seq):] = torch.tensor(seq)
            att[r, width - len(seq):] = 1
        out = model.generate(input_ids=inp.to(device), attention_mask=att.to(device),
                             max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=pad, eos_token_id=tokenizer.eos_token_id)
        for p, row in zip(chunk, out[:, width:].tolist(), strict=True):
            text = tokenizer.decode(row, skip_special_tokens=True)
            score = verifier.score(verifier_name, text, p.answer)
            correct["all"].append(score)
            if p.difficulty:
                correct[p.difficulty].append(score)
    if was_training:
        model.train()
    res = {f"eval/acc_{k}" if k != "all" else "eval/acc": sum(v) / len(v)
           for k, v in sorted(correct.items())}
    return res
