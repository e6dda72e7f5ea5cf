"""The learner process: DeepSpeed training on streamed rollout groups (DESIGN.md §3).

One step: take `prompts_per_step` groups (rank 0 pulls them and broadcasts; each rank
trains on its share of whole groups), recompute πold in micro-batches, accumulate the DynaMO
loss over micro-batches (the batch token-mean is exact across micro-batches and ranks), step
the optimizer. Policy version = optimizer steps taken. After each step rank 0 publishes the
weights, reports progress to the allocator and logs one metrics line; every k steps all
ranks write a checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import zmq

from learner.batch import Batch, build_batch, micro_batches, micro_batches_by_length
from learner.config import LearnerConfig
from learner.objective import (
    ObjectiveConfig,
    dynamo_loss,
    group_advantages,
    logprobs_and_entropy,
    sampled_logprobs,
    zero_signal_mask,
)
from protocol.messages import Heartbeat, LearnerProgress, RolloutGroup

log = logging.getLogger("dynamo.learner")


def init_distributed() -> tuple[int, int]:
    """Rank and world size; a lone process gets the env DeepSpeed needs (no mpi4py)."""
    for k, v in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"),
                 ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(k, v)
    if "MASTER_PORT" not in os.environ:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    if torch.cuda.is_available():
        # one GPU per rank; object collectives under NCCL use the current device
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]) % torch.cuda.device_count())
    else:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), dist.get_world_size()


def deepspeed_config(cfg: LearnerConfig) -> dict[str, Any]:
    return {
        "train_micro_batch_size_per_gpu": 1,  # we batch ourselves; DS only sees micro-steps
        "gradient_accumulation_steps": 1,
        "gradient_clipping": cfg.grad_clip,
        "zero_optimization": {"stage": cfg.zero_stage},
        "bf16": {"enabled": cfg.dtype == "bf16"},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


def warmup_lambda(warmup: int):
    """Linear warm-up to the peak learning rate, then constant (DESIGN.md §4)."""
    return lambda step: min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0


class Trainer:
    """DeepSpeed engine + the DynaMO objective. Socket-free: groups in, metrics out."""

    def __init__(self, cfg: LearnerConfig, objective: ObjectiveConfig, model_path: str, *,
                 temperature: float) -> None:
        import deepspeed
        from transformers import AutoModelForCausalLM

        self.cfg = cfg
        self.objective = objective
        self.temperature = temperature
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        torch.manual_seed(cfg.seed)
        self.device = torch.device("cuda", torch.cuda.current_device()) \
            if torch.cuda.is_available() else torch.device("cpu")
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
        decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
        no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                 {"params": no_decay, "weight_decay": 0.0}],
                                lr=cfg.lr, betas=cfg.betas)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_lambda(cfg.warmup_steps))
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=opt, lr_scheduler=sched, config=deepspeed_config(cfg))
        self.pad_id = model.config.pad_token_id or 0
        self.version = 0

    # ------------------------------------------------------------------ forward
    def _logits(self, mb: Batch, module) -> torch.Tensor:
        # Rows are right-padded, so under causal attention no real token sees a pad: the
        # padding mask changes nothing we read (pad positions are masked out of the loss).
        # Leaving it out lets SDPA take its fused causal kernel instead of a masked one.
        out = module(input_ids=mb.input_ids.to(self.device))
        return out.logits[:, :-1].float() / self.temperature

    @torch.no_grad()
    def recompute_logprobs(self, batch: Batch) -> torch.Tensor:
        """log πold of every target token with the weights at the start of the step."""
        out = torch.zeros(batch.mask.shape, dtype=torch.float32)
        for sl in micro_batches_by_length(batch, self.cfg.micro_batch_seqs):
            mb = batch.rows(sl)
            lp = sampled_logprobs(self._logits(mb, self.engine.module), mb.targets.to(self.device))
            out[sl, : lp.shape[1]] = lp.cpu()
        return out

    # ------------------------------------------------------------------ one step
    def step(self, groups: list[RolloutGroup]) -> dict[str, float]:
        """One optimizer step on this rank's share `groups` (may be empty)."""
        t0 = time.perf_counter()
        stats: dict[str, float] = {}
        if groups:
            rewards_all = np.concatenate([g.rewards for g in groups])
            gid = np.repeat(np.arange(len(groups)), [g.n for g in groups])
            flat = zero_signal_mask(torch.from_numpy(rewards_all), torch.from_numpy(gid))
            zero_groups = {int(i) for i in np.unique(gid[flat.numpy()])}
        else:
            zero_groups = set()
        train_groups = [g for i, g in enumerate(groups)
                        if not (self.objective.skip_zero_signal and i in zero_groups)]
        batch = build_batch(train_groups, self.pad_id) if train_groups else None
        n_local = batch.num_tokens if batch is not None else 0
        # NCCL reduces only device tensors; gloo takes CPU ones (self.device is either)
        n_global = torch.tensor([float(n_local)], device=self.device)
        dist.all_reduce(n_global)
        n_global_f = float(n_global.item())
        stats["zero_signal_groups"] = float(len(zero_groups))
        stats["signal_samples"] = float(sum(g.n for i, g in enumerate(groups)
                                            if i not in zero_groups))
        if n_global_f == 0:
            # Nothing carries signal on any rank: no update, the version does not move.
            stats["skipped_step"] = 1.0
            return stats
        # DeepSpeed averages gradients over ranks, so each rank divides by global / world.
        denom = n_global_f / self.world
        t1 = time.perf_counter()
        if batch is not None:
            if self.objective.is_mode == "bypass":
                logp_old = batch.logp_behaviour
            else:
                logp_old = self.recompute_logprobs(batch)
                # Health check of the whole pipeline: tokens sampled with exactly the weights
                # we hold must have μ == πold up to numerics.
                # Only samples generated wholly with these weights: a sample that straddles a
                # weight swap keeps KV computed by the old weights in its context.
                whole = (batch.versions == self.version) | ~batch.mask
                cur = batch.mask & whole.all(dim=1, keepdim=True)
                if cur.any():
                    d = (logp_old - batch.logp_behaviour).abs()[cur]
                    stats["mismatch/current_version_max_abs"] = float(d.max())
                    stats["mismatch/current_version_tokens"] = float(cur.sum())
            adv, _ = group_advantages(batch.rewards, batch.group_ids)
            slices = micro_batches_by_length(batch, self.cfg.micro_batch_seqs)
            every = self.cfg.grad_variance_every
            if every and self.version % every == 0 and self.world == 1 \
                    and self.cfg.zero_stage <= 1:
                stats.update(self.split_half_variance(batch, logp_old, adv))
        else:
            slices = []
        t2 = time.perf_counter()
        agg: dict[str, list[float]] = {}
        self.engine.train()
        if not slices:  # this rank has no data: a zero loss keeps the collectives in step
            self.engine.set_gradient_accumulation_boundary(True)
            loss = sum(p.sum() for p in self.engine.module.parameters()) * 0.0
            self.engine.backward(loss)
        for i, sl in enumerate(slices):
            assert batch is not None
            mb = batch.rows(sl)
            w = mb.mask.shape[1]
            self.engine.set_gradient_accumulation_boundary(i == len(slices) - 1)
            logits = self._logits(mb, self.engine)
            logp, H = logprobs_and_entropy(logits, mb.targets.to(self.device))
            dev = self.device
            loss, s = dynamo_loss(logp, H, logp_old[sl, :w].to(dev), mb.logp_behaviour.to(dev),
                                  adv[sl].to(dev), mb.mask.to(dev), self.objective,
                                  n_tokens_total=denom)
            self.engine.backward(loss)
            weight = float(mb.mask.sum())
            for k, v in s.items():
                agg.setdefault(k, []).extend([float(v), weight])
        t3 = time.perf_counter()
        grad_norm = self._grad_norm()
        self.engine.step()
        self.version += 1
        t4 = time.perf_counter()
        for k, vals in agg.items():  # token-weighted over micro-batches
            v, wts = np.array(vals[0::2]), np.array(vals[1::2])
            stats[k] = float((v * wts).sum() / max(wts.sum(), 1.0)) if "max" not in k and \
                "min" not in k else float(v.max() if "max" in k else v.min())
        if self.world > 1:
            stats["dp/weights_identical"] = float(self.ranks_agree())
        stats.update({
            "grad_norm": grad_norm,
            "lr": float(self.scheduler.get_last_lr()[0]),
            "train_tokens": n_global_f,
            "time/prepare": t1 - t0, "time/recompute": t2 - t1, "time/fwd_bwd": t3 - t2,
            "time/optimizer": t4 - t3,
        })
        return stats

    def split_half_variance(self, batch: Batch, logp_old: torch.Tensor,
                            adv: torch.Tensor) -> dict[str, float]:
        """Diagnostic: the step's gradient computed separately on two halves of its groups
        (even / odd group ids). With g = (g_A + g_B) / 2, E||g_A - g_B||^2 / 4 estimates the
        total variance tr Var(g) of the step's gradient; also reported relative to ||g||^2.
        Costs one extra forward/backward of the batch; no parameter changes."""
        module = self.engine.module
        params = [p for p in module.parameters() if p.requires_grad]
        halves = []
        for parity in (0, 1):
            rows = torch.nonzero(batch.group_ids % 2 == parity).flatten()
            if rows.numel() == 0:
                return {}
            half = batch.rows(rows)
            n_tok = max(half.num_tokens, 1)
            grads = [torch.zeros_like(p) for p in params]
            for sl in micro_batches(half.mask.shape[0], self.cfg.micro_batch_seqs):
                mb = half.rows(sl)
                w = mb.mask.shape[1]
                idx = rows[sl]
                logits = self._logits(mb, module)
                logp, H = logprobs_and_entropy(logits, mb.targets.to(self.device))
                loss, _ = dynamo_loss(logp, H, logp_old[idx, :w].to(self.device),
                                      mb.logp_behaviour.to(self.device),
                                      adv[idx].to(self.device), mb.mask.to(self.device),
                                      self.objective, n_tokens_total=n_tok)
                for acc, g in zip(grads, torch.autograd.grad(loss, params, allow_unused=True),
                                  strict=True):
                    if g is not None:
                        acc += g.detach()
            halves.append(grads)
        diff = sum(float((a - b).double().pow(2).sum()) for a, b in zip(*halves, strict=True))
        mean = sum(float(((a + b) / 2).double().pow(2).sum()) for a, b in zip(*halves,
                                                                               strict=True))
        var = diff / 4
        return {"grad/split_half_var": var, "grad/mean_sq_norm": mean,
                "grad/relative_var": var / max(mean, 1e-30)}

    @torch.no_grad()
    def _grad_norm(self) -> float:
        """Global L2 norm of the accumulated gradient, before clipping."""
        if self.cfg.zero_stage >= 2:  # gradients live in the ZeRO partitions
            norm = self.engine.get_global_grad_norm()
            return float(norm) if norm is not None else float("nan")
        sq = torch.zeros((), dtype=torch.float64, device=self.device)
        for p in self.engine.module.parameters():
            if p.grad is not None:
                sq += p.grad.detach().double().pow(2).sum()
        return float(sq.sqrt())

    @torch.no_grad()
    def ranks_agree(self) -> bool:
        """Whether every data-parallel rank holds bit-identical weights (stage 0-2)."""
        if self.cfg.zero_stage == 3:
            return True  # partitioned by design; the gathered copy is what is published
        import hashlib

        h = hashlib.sha256()
        for p in self.engine.module.parameters():
            h.update(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        digests: list[str | None] = [None] * self.world
        dist.all_gather_object(digests, h.hexdigest())
        return len(set(digests)) == 1

    def named_weights(self):
        """(HF name, tensor) of every parameter, gathered under ZeRO-3."""
        module = self.engine.module
        if self.cfg.zero_stage == 3:
            import deepspeed

            params = list(module.parameters())
            with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
                return [(n, p.detach().clone()) for n, p in module.named_parameters()]
        return [(n, p.detach()) for n, p in module.named_parameters()]

    # ------------------------------------------------------------------ checkpoints
    def save(self, root: Path, tag: str, client_state: dict[str, Any], tokenizer_src: str,
             extra_files: list[Path] = ()) -> Path:
        """All ranks: DeepSpeed state; rank 0: HF model dir, extras, a SHA-256 manifest of
        every file, then the LATEST pointer.

        LATEST is replaced atomically only after everything else (manifest included) is on
        disk, so a kill during a save leaves the previous checkpoint the one that resumes.
        """
        self.engine.save_checkpoint(str(root), tag=tag, client_state=client_state,
                                    save_latest=False)
        dist.barrier()  # every rank's shard is written before the manifest is
        if self.rank == 0:
            hf = root / tag / "hf"
            weights = dict(self.named_weights())
            self.engine.module.save_pretrained(hf, state_dict=weights, safe_serialization=True)
            for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                         "vocab.json", "merges.txt", "generation_config.json"):
                src = Path(tokenizer_src) / name
                if src.is_file() and not (hf / name).exists():
                    shutil.copy(src, hf / name)
            for f in extra_files:
                if f.is_file():
                    shutil.copy(f, root / tag / f.name)
            (root / tag / "learner_state.json").write_text(json.dumps(client_state))
            write_manifest(root / tag)
            tmp = root / "LATEST.tmp"
            tmp.write_text(tag)
            os.replace(tmp, root / "LATEST")
        dist.barrier()
        return root / tag

    def load(self, root: Path) -> dict[str, Any] | None:
        """Resume from the newest checkpoint whose files match its manifest (LATEST first);
        a corrupt or half-written one is reported and skipped."""
        box: list[str | None] = [None]
        if self.rank == 0:
            box[0] = pick_checkpoint(root)
        if self.world > 1:
            dist.broadcast_object_list(box, src=0)
        tag = box[0]
        if tag is None:
            return None
        _, client_state = self.engine.load_checkpoint(str(root), tag=tag)
        self.version = int(client_state["version"])
        return client_state


MANIFEST = "manifest.sha256.json"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_manifest(ckpt: Path) -> None:
    files = sorted(p for p in ckpt.rglob("*") if p.is_file() and p.name != MANIFEST)
    manifest = {str(p.relative_to(ckpt)): _sha256(p) for p in files}
    tmp = ckpt / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=0))
    os.replace(tmp, ckpt / MANIFEST)


def verify_checkpoint(ckpt: Path) -> str | None:
    """None if every file matches the manifest, else what is wrong."""
    mf = ckpt / MANIFEST
    if not mf.is_file():
        return f"{ckpt.name}: no {MANIFEST} (incomplete save)"
    for rel, digest in json.loads(mf.read_text()).items():
        p = ckpt / rel
        if not p.is_file():
            return f"{ckpt.name}: missing {rel}"
        if _sha256(p) != digest:
            return f"{ckpt.name}: checksum mismatch in {rel}"
    return None


def pick_checkpoint(root: Path) -> str | None:
    latest = root / "LATEST"
    if not latest.is_file():
        return None
    first = latest.read_text().strip()
    others = sorted((p.name for p in root.iterdir() if p.is_dir() and p.name != first),
                    reverse=True)
    for tag in [first, *others]:
        problem = verify_checkpoint(root / tag)
        if problem is None:
            return tag
        log.error("checkpoint not usable, trying an older one: %s", problem)
    raise RuntimeError(f"no checkpoint in {root} passes its checksums")


def metrics_line(step: int, version: int, groups: list[RolloutGroup], stats: dict[str, float],
                 counters: Counter, extra: dict[str, Any]) -> dict[str, Any]:
    """One JSON-able metrics record of a learner step."""
    rewards = np.concatenate([g.rewards for g in groups]) if groups else np.zeros(0)
    sizes = np.array([g.n for g in groups]) if groups else np.zeros(0, int)
    staleness = np.concatenate([version - 1 - g.token_versions for g in groups]) \
        if groups else np.zeros(0, int)
    gen_tokens = sum(g.num_tokens for g in groups)
    rec: dict[str, Any] = {
        "step": step, "version": version, "time": time.time(),
        "reward/mean": float(rewards.mean()) if rewards.size else math.nan,
        "accuracy/train": float((rewards > 0).mean()) if rewards.size else math.nan,
        "samples": int(sizes.sum()), "groups": len(groups), "gen_tokens": gen_tokens,
        "train_tokens": 0.0,  # replaced by the step's count unless the step was skipped
        "zero_signal_frac": stats.get("zero_signal_groups", 0.0) / max(len(groups), 1),
        "budget/min": int(sizes.min()) if sizes.size else 0,
        "budget/mean": float(sizes.mean()) if sizes.size else 0.0,
        "budget/max": int(sizes.max()) if sizes.size else 0,
        "budget/hist": np.bincount(sizes).tolist() if sizes.size else [],
        "staleness/hist": np.bincount(np.maximum(staleness, 0)).tolist() if staleness.size
        else [],
        "staleness/max": int(staleness.max()) if staleness.size else 0,
        "dropped/stale": counters.get("dropped_stale", 0),
        "dropped/duplicate": counters.get("dropped_duplicate", 0),
        "rejected": {k.removeprefix("rejected_"): v for k, v in counters.items()
                     if k.startswith("rejected_")},
    }
    rec.update({k: v for k, v in stats.items() if k != "zero_signal_groups"})
    rec.update(extra)
    return rec


def send_progress(sock: zmq.Socket, version: int, counters: Counter, sender: str) -> None:
    """Progress to the allocator, with a heartbeat whose `sent_at` lets the allocator sample
    this process's wall-clock offset (for aligning traces across nodes)."""
    from protocol.sockets import send

    msgs = (LearnerProgress(version=version, consumed_groups=counters.get("consumed", 0),
                            consumed_samples=counters.get("consumed_samples", 0),
                            dropped_stale=counters.get("dropped_stale", 0)),
            Heartbeat(sender=sender, role="learner", sent_at=time.time(),
                      policy_version=version, in_flight=[]))
    for msg in msgs:
        try:
            send(sock, msg, zmq.NOBLOCK)
        except zmq.Again:
            pass  # the allocator is away; the next progress message carries the same totals
