"""Held-out evaluation inside the learner, with the training weights.

Reports greedy accuracy and sampled pass@1 (mean reward of k samples per problem at the
training temperature), overall and per difficulty bucket. Cheap for small models (batched
KV-cache `generate`); real models are evaluated with vLLM by `dynamo-rl eval` instead (set
`learner.eval_every = 0`).

Prompts are encoded as given (no special tokens added): the launcher hands the learner its
held-out problems already rendered in the actors' format (`tasks.prompts.render_problems`),
so the model is evaluated on the prompts it is trained on.
"""

from __future__ import annotations

from collections import defaultdict

import torch

from tasks.config import TaskConfig
from tasks.problems import Problem
from tasks.scoring import Verifier


@torch.no_grad()
def _scores(model, tokenizer, problems: list[Problem], verifier: Verifier, verifier_name: str,
            *, sample: bool, k: int, temperature: float, max_new_tokens: int, batch_size: int
            ) -> dict[str, list[float]]:
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    out: dict[str, list[float]] = defaultdict(list)
    for i in range(0, len(problems), batch_size):
        chunk = problems[i:i + batch_size]
        ids = [tokenizer.encode(p.prompt, add_special_tokens=False) for p in chunk]
        width = max(map(len, ids))
        inp = torch.full((len(ids), width), pad, dtype=torch.long)
        att = torch.zeros_like(inp)
        for r, seq in enumerate(ids):  # left padding for generation
            inp[r, width - len(seq):] = torch.tensor(seq)
            att[r, width - len(seq):] = 1
        kw = dict(do_sample=True, temperature=temperature, top_p=1.0, top_k=0,
                  num_return_sequences=k) if sample else dict(do_sample=False)
        gen = model.generate(input_ids=inp.to(device), attention_mask=att.to(device),
                             max_new_tokens=max_new_tokens, pad_token_id=pad,
                             eos_token_id=tokenizer.eos_token_id, **kw)
        rows = gen[:, width:].tolist()
        reps = k if sample else 1
        scores = verifier.score_many([
            (verifier_name, tokenizer.decode(rows[j * reps + r], skip_special_tokens=True),
             p.answer) for j, p in enumerate(chunk) for r in range(reps)])
        for j, p in enumerate(chunk):
            score = sum(scores[j * reps:(j + 1) * reps]) / reps
            out["all"].append(score)
            if p.difficulty:
                out[p.difficulty].append(score)
    return out


def evaluate_held_out(model, tokenizer, problems: list[Problem], verifier_name: str, *,
                      max_new_tokens: int, temperature: float, k: int = 4,
                      batch_size: int = 256, seed: int = 1234,
                      task: TaskConfig | None = None) -> dict[str, float]:
    """`eval/acc[_bucket]` (greedy) and `eval/pass1[_bucket]` (k samples at temperature),
    scored with the task's verifier time limit and answer extraction (as the actors do)."""
    task = task or TaskConfig()
    was_training = model.training
    model.eval()
    res: dict[str, float] = {}
    with Verifier(task.verifier_timeout_s, answer_extraction=task.answer_extraction) as verifier:
        greedy = _scores(model, tokenizer, problems, verifier, verifier_name, sample=False, k=1,
                         temperature=1.0, max_new_tokens=max_new_tokens, batch_size=batch_size)
        state = torch.get_rng_state()
        torch.manual_seed(seed)  # the same sampling noise at every evaluation
        sampled = _scores(model, tokenizer, problems, verifier, verifier_name, sample=True, k=k,
                          temperature=temperature, max_new_tokens=max_new_tokens,
                          batch_size=max(1, batch_size // k))
        torch.set_rng_state(state)
    for name, table in (("acc", greedy), ("pass1", sampled)):
        for bucket, v in sorted(table.items()):
            res[f"eval/{name}" if bucket == "all" else f"eval/{name}_{bucket}"] = sum(v) / len(v)
    # standard error of pass@1 over problems (each problem's k samples averaged first)
    per_problem = sampled["all"]
    mean = sum(per_problem) / len(per_problem)
    var = sum((x - mean) ** 2 for x in per_problem) / max(len(per_problem) - 1, 1)
    res["eval/pass1_se"] = (var / len(per_problem)) ** 0.5
    if was_training:
        model.train()
    return res
