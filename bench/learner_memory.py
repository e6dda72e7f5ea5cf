"""Activation memory of one training micro-batch vs vocabulary size: the learner's chunked
LM-head path (learner/policy.py) against the full-logits path it replaced.

For each vocabulary (32k and 152k by default) and each path, a fresh process builds a small
Qwen2 (hidden 256, 2 layers), runs one warm-up forward/backward (so parameters and gradients
are allocated), then measures one more: the peak memory during its forward + backward minus
what was held just before it (parameters, gradients, inputs). On CPU the peak is the
process's peak RSS (VmHWM, reset through /proc/self/clear_refs; every allocation of 64 KiB
or more is mmapped, so freed memory leaves RSS at once); on a GPU, torch's allocator peak.

    python bench/learner_memory.py                    # 4 sequences x 1,024 tokens
    python bench/learner_memory.py --seqs 8           # needs ~16 GiB for the full path at 152k

Target (issue 13): with the chunked path, the 152k activation peak is at most 1.5x the 32k
one. Final line: JSON with `activation_peak_mib` (per path, per vocabulary) and
`ratio_152k_to_32k` (per path).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def measure(vocab: int, path: str, seqs: int, seq_len: int, prompt_len: int,
            chunk_mib: float) -> float:
    """MiB of activation peak of one micro-batch (runs in this process)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from learner.objective import logprobs_and_entropy
    from learner.policy import Policy, chunk_tokens_for, n_chunks_for

    cuda = torch.cuda.is_available()
    dev = torch.device("cuda" if cuda else "cpu")
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=vocab, hidden_size=256, intermediate_size=512,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      tie_word_embeddings=True, max_position_embeddings=seq_len)
    lm = Qwen2ForCausalLM(cfg).float().to(dev)
    ids = torch.randint(0, vocab, (seqs, seq_len), device=dev)
    targets = ids[:, 1:]
    mask = torch.zeros(seqs, seq_len - 1, dtype=torch.bool, device=dev)
    mask[:, prompt_len - 1:] = True
    adv = torch.randn(seqs, 1, device=dev)
    policy = Policy(lm, temperature=1.0)
    n_chunks = n_chunks_for(int(mask.sum()), chunk_tokens_for(vocab, chunk_mib))

    def step() -> None:
        if path == "chunked":
            logp, _ = policy(ids, targets, mask, n_chunks)
        else:  # the learner before: [S, L, V] logits, float32, divided by T
            logits = lm(input_ids=ids).logits[:, :-1].float() / 1.0
            logp, _ = logprobs_and_entropy(logits, targets)
        (-(torch.where(mask, logp * adv, 0.0)).sum() / mask.sum()).backward()

    step()  # warm-up: gradients allocated
    for p in lm.parameters():
        p.grad.zero_()
    if cuda:
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak RSS to the current RSS
    before = _status_kib("VmRSS")
    step()
    return (_status_kib("VmHWM") - before) / 1024


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--vocabs", type=int, nargs="+", default=[32_000, 152_064])
    ap.add_argument("--paths", nargs="+", default=["full", "chunked"],
                    choices=["full", "chunked"])
    ap.add_argument("--seqs", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--chunk-mib", type=float, default=64.0,
                    help="learner.logits_chunk_mib of the chunked path")
    ap.add_argument("--one", nargs=2, metavar=("VOCAB", "PATH"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(measure(int(args.one[0]), args.one[1], args.seqs, args.seq_len,
                      args.prompt_len, args.chunk_mib))
        return
    peaks: dict[str, dict[str, float]] = {p: {} for p in args.paths}
    print(f"{args.seqs} sequences x {args.seq_len} tokens ({args.seq_len - args.prompt_len} "
          f"completion), hidden 256, 2 layers; activation peak of one micro-batch, MiB")
    print(f"{'path':>8} " + " ".join(f"{v:>10}" for v in args.vocabs) + "   ratio")
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "2"}
    for path in args.paths:
        for v in args.vocabs:
            out = subprocess.run(
                [sys.executable, __file__, "--one", str(v), path, "--seqs", str(args.seqs),
                 "--seq-len", str(args.seq_len), "--prompt-len", str(args.prompt_len),
                 "--chunk-mib", str(args.chunk_mib)],
                cwd=ROOT, env=env, capture_output=True, text=True, check=True)
            peaks[path][str(v)] = float(out.stdout.strip().splitlines()[-1])
        row = [peaks[path][str(v)] for v in args.vocabs]
        print(f"{path:>8} " + " ".join(f"{x:>10.0f}" for x in row) + f"   {row[-1] / row[0]:.2f}")
    lo, hi = str(min(args.vocabs)), str(max(args.vocabs))
    ratios = {p: peaks[p][hi] / peaks[p][lo] for p in args.paths}
    print(json.dumps({"seqs": args.seqs, "seq_len": args.seq_len, "chunk_mib": args.chunk_mib,
                      "activation_peak_mib": peaks, "ratio_152k_to_32k": ratios}))


if __name__ == "__main__":
    main()
