"""The embedded default model: a tiny Qwen2 warm-started on the built-in arithmetic task.

Built offline (character tokenizer from `tokenizers`, model from a config), deterministic
from its seed, cached under a key of every setting that shapes it, written atomically (a
half-built directory is never reused: `launch/cache.py`). The warm start stops where
per-problem pass rates are spread between 0 and 1 (ENVIRONMENT.md: ~600 steps), so RL has
signal from step one.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from launch.cache import cache_key, ensure_model

VOCAB = ["<pad>", "<eos>", "<bos>", *"0123456789", "+", "=", " "]
PAD, EOS, BOS = 0, 1, 2
ARCH = dict(hidden_size=128, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64)  # head_dim 32: vLLM CPU supports it
WARM_START = dict(lr=1e-3, batch=128, max_digits=4)
WARM_START_STEPS = 600
BUILD_VERSION = 1  # bump when the recipe changes, so caches are rebuilt


def model_key(steps: int, seed: int) -> str:
    return cache_key(BUILD_VERSION, VOCAB, ARCH, WARM_START, steps, seed)


def build_tokenizer():
    """Character-level fast tokenizer over the task alphabet (16 tokens)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                   bos_token="<bos>", unk_token="<pad>")


def build_model(seed: int, **arch):
    """A randomly initialised Qwen2 over the task vocabulary (ARCH unless overridden)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(vocab_size=len(VOCAB), tie_word_embeddings=True, bos_token_id=BOS,
                      eos_token_id=EOS, pad_token_id=PAD, rope_theta=10000.0,
                      torch_dtype="float32", **{**ARCH, **arch})
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(cfg)


def build_sized_model(out: str | Path, seed: int = 0, **arch) -> Path:
    """An untrained model of a chosen size (benchmarks of weight sync and training speed)."""
    out = Path(out)
    if not (out / "config.json").is_file():
        out.mkdir(parents=True, exist_ok=True)
        build_model(seed, **arch).save_pretrained(out, safe_serialization=True)
        build_tokenizer().save_pretrained(out)
    return out


def encode(text: str) -> list[int]:
    return [VOCAB.index(c) for c in text]


def supervised_batch(rng: np.random.Generator, batch: int, max_digits: int):
    """Token ids and completion-only loss labels of random `a+b=` problems."""
    import torch

    from tasks.problems import _sample_pairs

    seqs, starts = [], []
    for a, b in _sample_pairs(rng, batch, max_digits):
        prompt = encode(f"{a}+{b}=")
        seqs.append(prompt + encode(str(a + b)[::-1]) + [EOS])
        starts.append(len(prompt))
    width = max(map(len, seqs))
    ids = torch.full((batch, width), PAD, dtype=torch.long)
    labels = torch.full((batch, width), -100, dtype=torch.long)
    for i, (s, p) in enumerate(zip(seqs, starts, strict=True)):
        ids[i, : len(s)] = torch.tensor(s)
        labels[i, p : len(s)] = torch.tensor(s[p:])
    return ids, labels


def warm_start(model, steps: int, seed: int, progress: bool = True) -> list[float]:
    import torch

    from launch.progress import Progress

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed + 1)
    opt = torch.optim.AdamW(model.parameters(), lr=WARM_START["lr"])
    losses = []
    model.train()
    bar = Progress(steps, "warm start", enabled=progress)
    for _ in bar:
        ids, labels = supervised_batch(rng, WARM_START["batch"], WARM_START["max_digits"])
        loss = model(input_ids=ids, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        bar.note = f"loss {losses[-1]:.3f}"
    model.eval()
    return losses


def ensure_embedded_model(cache_dir: str | Path, steps: int | None = None, seed: int = 0,
                          progress: bool = True) -> Path:
    """Path of the warm-started tiny model (WARM_START_STEPS unless `steps`), building it if
    it is not cached yet."""
    steps = WARM_START_STEPS if steps is None else steps

    def build():
        model = build_model(seed)
        losses = warm_start(model, steps, seed, progress)
        return model, build_tokenizer(), {"steps": steps, "seed": seed,
                                          "final_loss": losses[-1] if losses else None}

    return ensure_model(Path(cache_dir) / f"tiny-arith-{model_key(steps, seed)}", build)
