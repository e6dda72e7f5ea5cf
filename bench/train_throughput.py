"""Learner training throughput and MFU: the real Trainer (DeepSpeed + DynaMO objective).

Builds a model from a config (default: the Qwen2.5-0.5B shape, random weights, no download),
feeds the learner synthetic rollout groups with the shape of a real RL batch (prompts x n
samples of varied length, binary rewards, behaviour log-probs) and times whole optimizer
steps: πold recompute (mini-batches after the first), forward/backward over micro-batches,
optimizer step(s).

FLOPs per processed token (N = parameters, the tied LM head counted once; L layers, d
hidden size, s the sequence length; causal attention halves the score/value products):
    training pass  6N + 6·L·d·s     (forward + backward)
    πold recompute 2N + 2·L·d·s     (forward only; all mini-batches but the first)
MFU = training-pass FLOPs per second / the device's dense bf16 peak (the usual definition);
"step FLOP utilisation" also counts the recompute. Final line: JSON.

    python bench/train_throughput.py                     # on a GPU: bf16, NCCL
    python bench/train_throughput.py --preset tiny --steps 2 --warmup 1   # CPU smoke run
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

PRESETS = {
    # Qwen2.5-0.5B's published shape (494M parameters with the tied embedding).
    "qwen2.5-0.5b": dict(vocab_size=151936, hidden_size=896, intermediate_size=4864,
                         num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                         max_position_embeddings=32768, tie_word_embeddings=True),
    # the embedded model (configs/default.toml) and bench/throughput.py's 25M model
    "embedded": dict(vocab_size=16, hidden_size=128, intermediate_size=512, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                     tie_word_embeddings=True),
    "25M": dict(vocab_size=16, hidden_size=512, intermediate_size=2048, num_hidden_layers=6,
                num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=64,
                tie_word_embeddings=True),
    "tiny": dict(vocab_size=512, hidden_size=128, intermediate_size=512, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                 tie_word_embeddings=True),
}
# Dense bf16 peak (no sparsity) by device name, TFLOP/s.
PEAK_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0, "L40S": 362.1}


def build_model_dir(out: Path, arch: dict, seed: int) -> tuple[Path, int]:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(pad_token_id=0, bos_token_id=1, eos_token_id=2, rope_theta=1e6, **arch)
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(out, safe_serialization=True)
    return out, n_params


def synthetic_groups(rng: np.random.Generator, prompts: int, n: int, prompt_len: int,
                     lo: int, hi: int, vocab: int):
    from protocol.messages import RolloutGroup

    groups = []
    for g in range(prompts):
        lengths = rng.integers(lo, hi + 1, size=n).astype(np.int32)
        total = int(lengths.sum())
        groups.append(RolloutGroup(
            grant_id=g, lease_id=g, problem_id=f"p{g}", actor_id="bench",
            prompt_token_ids=rng.integers(3, vocab, size=prompt_len).astype(np.int32),
            completion_token_ids=rng.integers(3, vocab, size=total).astype(np.int32),
            completion_lengths=lengths,
            behaviour_logprobs=(-rng.exponential(2.0, size=total)).astype(np.float32),
            token_versions=np.zeros(total, dtype=np.int32),
            rewards=rng.integers(0, 2, size=n).astype(np.float32),
            finished=np.ones(n, dtype=bool), gen_seconds=0.0))
        # at least one success and one failure: every group carries signal
        groups[-1].rewards[0], groups[-1].rewards[-1] = 1.0, 0.0
    return groups


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="qwen2.5-0.5b")
    ap.add_argument("--dtype", choices=["bf16", "fp32"], default=None,
                    help="default: bf16 on a GPU, fp32 on CPU")
    ap.add_argument("--zero-stage", type=int, default=0)
    ap.add_argument("--prompts", type=int, default=32, help="groups per step")
    ap.add_argument("--n", type=int, default=8, help="samples per group")
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--min-len", type=int, default=256, help="shortest completion")
    ap.add_argument("--max-len", type=int, default=1024, help="longest completion")
    ap.add_argument("--micro-batch", type=int, default=8, help="sequences per micro-batch")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps")
    ap.add_argument("--steps", type=int, default=3, help="timed steps")
    ap.add_argument("--peak-tflops", type=float, default=None,
                    help="dense bf16 peak of the device (default: looked up by name)")
    ap.add_argument("--mini-batch", type=int, default=None,
                    help="groups per optimizer update (default: all, one update per step)")
    ap.add_argument("--micro-batch-tokens", type=int, default=None,
                    help="token budget of a micro-batch (default: --micro-batch rows)")
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--attn", choices=["sdpa", "eager", "flash_attention_2"],
                    default="sdpa", help="learner.attn_implementation")
    ap.add_argument("--profile", action="store_true",
                    help="after the timed steps, profile one more and print the top kernels")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    from learner.config import LearnerConfig
    from learner.objective import PRESETS as OBJECTIVES
    from learner.trainer import Trainer, init_distributed

    cuda = torch.cuda.is_available()
    dtype = args.dtype or ("bf16" if cuda else "fp32")
    if args.preset in ("embedded", "25M") or (args.preset == "tiny" and not cuda):
        args.prompt_len, args.min_len, args.max_len = min(args.prompt_len, 32), \
            min(args.min_len, 16), min(args.max_len, 64)
    args.min_len = min(args.min_len, args.max_len)
    init_distributed()
    arch = PRESETS[args.preset]
    device_name = torch.cuda.get_device_name() if cuda else "cpu"
    peak = args.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in device_name), None)
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        model_dir, n_params = build_model_dir(Path(tmp) / "model", arch, args.seed)
        print(f"built {args.preset}: {n_params / 1e6:.1f}M parameters in "
              f"{time.perf_counter() - t:.1f}s", flush=True)
        cfg = LearnerConfig(prompts_per_step=args.prompts, micro_batch_seqs=args.micro_batch,
                            mini_batch_prompts=args.mini_batch,
                            micro_batch_tokens=args.micro_batch_tokens,
                            gradient_checkpointing=args.gradient_checkpointing,
                            dtype=dtype, attn_implementation=args.attn,
                            zero_stage=args.zero_stage, lr=1e-6, warmup_steps=0,
                            seed=args.seed)
        trainer = Trainer(cfg, OBJECTIVES["dynamo"], str(model_dir), temperature=1.0)
    rng = np.random.default_rng(args.seed)
    L, d = arch["num_hidden_layers"], arch["hidden_size"]
    rows = []
    for i in range(args.warmup + args.steps):
        groups = synthetic_groups(rng, args.prompts, args.n, args.prompt_len, args.min_len,
                                  args.max_len, arch["vocab_size"])
        seq_lens = np.concatenate([args.prompt_len + g.completion_lengths
                                   for g in groups]).astype(np.int64)
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        stats = trainer.step(groups)
        if cuda:
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        tokens = int(seq_lens.sum())
        train_flops = float(((6 * n_params + 6 * L * d * seq_lens) * seq_lens).sum())
        # πold is recomputed for every mini-batch but the first (which takes it from its own
        # forward pass)
        n_mini = -(-args.prompts // (args.mini_batch or args.prompts))
        recompute_flops = float(((2 * n_params + 2 * L * d * seq_lens) * seq_lens).sum()) \
            * (n_mini - 1) / n_mini
        row = {"step": i, "timed": i >= args.warmup, "seconds": dt, "tokens": tokens,
               "completion_tokens": int(stats["train_tokens"]),
               "train_flops": train_flops, "recompute_flops": recompute_flops,
               **{k: stats[k] for k in ("time/recompute", "time/fwd_bwd", "time/optimizer")},
               "finite": bool(np.isfinite(stats["grad_norm"]))}
        rows.append(row)
        print(f"step {i}{'' if row['timed'] else ' (warm-up)'}: {dt:.2f}s, "
              f"{tokens / dt:,.0f} tok/s (recompute {row['time/recompute']:.2f}s, "
              f"fwd+bwd {row['time/fwd_bwd']:.2f}s, optimizer {row['time/optimizer']:.2f}s)",
              flush=True)
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        groups = synthetic_groups(rng, args.prompts, args.n, args.prompt_len, args.min_len,
                                  args.max_len, arch["vocab_size"])
        with profile(activities=acts) as prof:
            trainer.step(groups)
            if cuda:
                torch.cuda.synchronize()
        key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
        print(prof.key_averages().table(sort_by=key, row_limit=18, max_name_column_width=60),
              flush=True)
    timed = [r for r in rows if r["timed"]]
    secs = sum(r["seconds"] for r in timed)
    tok = sum(r["tokens"] for r in timed)
    result = {
        "device": device_name, "preset": args.preset, "params": n_params, "dtype": dtype,
        "zero_stage": args.zero_stage, "mini_batch": args.mini_batch,
        "micro_batch_tokens": args.micro_batch_tokens,
        "gradient_checkpointing": args.gradient_checkpointing,
        "attn_implementation": trainer.lm.config._attn_implementation,
        "backend": torch.distributed.get_backend(),
        "micro_batch": args.micro_batch, "sequences_per_step": args.prompts * args.n,
        "mean_seq_len": tok / max(len(timed), 1) / (args.prompts * args.n),
        "steps_timed": len(timed), "seconds_per_step": secs / len(timed),
        "tokens_per_s": tok / secs,
        "completion_tokens_per_s": sum(r["completion_tokens"] for r in timed) / secs,
        "recompute_share": sum(r["time/recompute"] for r in timed) / secs,
        "optimizer_share": sum(r["time/optimizer"] for r in timed) / secs,
        "peak_tflops": peak,
        "achieved_train_tflops": sum(r["train_flops"] for r in timed) / secs / 1e12,
        "all_finite": all(r["finite"] for r in rows),
    }
    if cuda:
        result["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    if peak:
        result["mfu"] = result["achieved_train_tflops"] / peak
        result["step_flop_utilisation"] = sum(
            r["train_flops"] + r["recompute_flops"] for r in timed) / secs / 1e12 / peak
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
