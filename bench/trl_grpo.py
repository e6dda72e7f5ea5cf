"""The peer in bench/throughput.py: TRL's GRPOTrainer on the same model, task and batch shape.

Runs in a separate benchmark environment, never a dependency of the project: TRL and the
packages it needs beyond ours are installed into `.cache/bench-trl` (`--install`) and put on
PYTHONPATH for this script only. Generation is transformers' `generate` (TRL's default
without vLLM), on every core of the machine; each step samples `--prompts` prompts x
`--samples` completions and takes one optimizer update (the same as `dynamo-rl run` with one
update per batch), no KL term, the run config's learning rate, temperature and completion
length, rewards from our own verifier of the task.

Prints one JSON line: completions/s in the training loop (from the end of the first step to
the end of the last, as bench/throughput.py reads our runs), wall time of the whole script,
start-up (script start to the end of the first step), and the final model's directory (so
the caller scores both final models with the same `dynamo-rl eval`).

    python bench/trl_grpo.py --install
    PYTHONPATH=.cache/bench-trl python bench/trl_grpo.py configs/default.toml --steps 120 \
        --out /tmp/trl-model
"""

from __future__ import annotations

import time

T0 = time.time()

import argparse  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PEER_DIR = ROOT / ".cache" / "bench-trl"
# TRL and what it needs that our environment does not have; pinned so figures are comparable
PEER_PACKAGES = ("trl==1.16.0", "accelerate==1.15.0", "datasets==5.2.0", "pandas",
                 "multiprocess", "xxhash", "python-dateutil", "tzdata")


def install() -> None:
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target",
                    str(PEER_DIR), *PEER_PACKAGES], check=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("config", nargs="?", default=str(ROOT / "configs/default.toml"))
    ap.add_argument("--install", action="store_true", help=f"install TRL into {PEER_DIR}")
    ap.add_argument("--model", help="model dir (default: the config's)")
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--prompts", type=int, default=32, help="prompts per step")
    ap.add_argument("--samples", type=int, default=8, help="completions per prompt")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--attn", choices=["sdpa", "eager"], default="sdpa",
                    help="the model's attention kernels (transformers' default: sdpa)")
    ap.add_argument("--out", required=False, help="write the final model here")
    args = ap.parse_args()
    if args.install:
        install()
        return 0
    sys.path.insert(0, str(ROOT))
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from launch.config import load_config
    from launch.runtime import model_path
    from tasks.problems import load_task
    from tasks.scoring import Verifier

    cfg = load_config(args.config)
    path = args.model or str(model_path(cfg))
    train, _ = load_task(cfg.task)
    data = Dataset.from_list([{"prompt": p.prompt, "answer": p.answer} for p in train])
    verifier, name = Verifier(timeout_s=cfg.task.verifier_timeout_s), cfg.task.verifier_name

    def reward(completions: list[str], answer: list[str], **_: object) -> list[float]:
        return [verifier.score(name, c, a) for c, a in zip(completions, answer, strict=True)]

    step_end: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, *_a, **_k):
            step_end.append(time.time())

    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                 attn_implementation=args.attn)
    out = Path(args.out or f"/tmp/trl-grpo-{args.seed}")
    conf = GRPOConfig(
        output_dir=str(out / "trainer"), per_device_train_batch_size=args.prompts * args.samples,
        gradient_accumulation_steps=1, num_generations=args.samples,
        max_completion_length=cfg.actor.max_tokens, temperature=cfg.actor.temperature,
        top_p=cfg.actor.top_p, learning_rate=cfg.learner.lr, beta=0.0, max_steps=args.steps,
        lr_scheduler_type="constant_with_warmup", warmup_steps=cfg.learner.warmup_steps,
        logging_steps=10**6, save_strategy="no", report_to="none", use_cpu=True, bf16=False,
        seed=args.seed, dataloader_num_workers=0, disable_tqdm=True)
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=conf, train_dataset=data,
                          processing_class=tok, callbacks=[Clock()])
    trainer.train()
    trainer.model.save_pretrained(out)
    tok.save_pretrained(out)
    per_step = args.prompts * args.samples
    loop_s = step_end[-1] - step_end[0]
    print(json.dumps({"model_dir": str(out), "steps": len(step_end),
                      "completions_per_s": per_step * (len(step_end) - 1) / loop_s,
                      "wall_s": time.time() - T0, "startup_s": step_end[0] - T0,
                      "threads": torch.get_num_threads(),
                      "attn_implementation": args.attn}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
