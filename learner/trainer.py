"""The learner's training core: DeepSpeed on rollout batches (docs/DESIGN.md §3, §5-7).

One rollout batch = `prompts_per_step` groups (rank 0 pulls them and broadcasts them, so every
rank holds the whole batch). It is cut into mini-batches of `mini_batch_prompts` groups (a
seeded permutation, the same on every rank), one optimizer update each, `ppo_epochs` times,
all against the πold of the batch start: the paper's structure, where the ratio πθ/πold moves
away from 1 after the first update so that the clip and β_stab act.

Policy version = optimizer updates taken. A batch moves it by up to `updates_per_batch`; the
staleness bound (`allocator.max_staleness`) and the actors' per-token version stamps count the
same unit. Weights are published once per batch, after its last update.

Invariants:
- πold is computed once per batch with the batch-start weights: for the first mini-batch it
  is its own first forward pass (detached; the weights that would recompute it are the very
  weights it trains), for the others a no-grad pass before the first update.
- Every rank trains its share of whole groups of each mini-batch and runs the same number of
  forward/backward passes per update (zero-weight `dummy_batch` passes pad the difference),
  with the same number of LM-head chunks each, because ZeRO-2/3 run collectives in every
  forward/backward. The loss of each update is the token-mean over all ranks' valid tokens.
- Under ZeRO-3 every rank enters each parameter gather (publishing, checkpoints, replica
  checks) together, one module at a time: no rank holds a second full copy of the model.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import math
import os
import resource
import shutil
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from crc32c import crc32c

from learner.batch import (
    Batch,
    build_batch,
    dummy_batch,
    micro_batches,
    micro_batches_by_length,
    mini_batches,
    shard,
)
from learner.config import LearnerConfig, check_learner
from learner.objective import (
    Extremes,
    ObjectiveConfig,
    dynamo_loss,
    group_advantages,
    local_extremes,
    zero_signal_mask,
)
from learner.policy import Policy, chunk_tokens_for, n_chunks_for
from protocol.listen import listening_store
from protocol.messages import RolloutGroup

log = logging.getLogger("dynamo.learner")


def init_distributed() -> tuple[int, int]:
    """Rank and world size; a lone process gets the env DeepSpeed needs (no mpi4py)."""
    for k, v in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"),
                 ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(k, v)
    # DeepSpeed's JIT-built ops, per Python environment: two environments sharing one build
    # directory rebuild it in turn, and a build killed half-way there leaves a lock file on
    # which every later learner would wait for ever.
    # (`bootstrap.sh` compiles them there ahead of the first run: launch/prepare.py)
    from launch.prepare import extensions_dir, shm_op_built

    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(extensions_dir()))
    if not torch.cuda.is_available() and not shm_op_built():
        log.warning("DeepSpeed's shared-memory op is not built for this environment yet "
                    "(%s): compiling it now, once (1-3 minutes on one core; "
                    "`python -m launch.prepare` does it ahead of a run)", extensions_dir())
    if "MASTER_PORT" not in os.environ:
        from launch.ports import free_ports

        os.environ["MASTER_PORT"] = str(free_ports(1)[0])
    if torch.cuda.is_available():
        # one GPU per rank; object collectives under NCCL use the current device
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]) % torch.cuda.device_count())
    else:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":  # torchrun's agent has one
        # Our own rendezvous store, listening on MASTER_ADDR only (env:// would listen on
        # every interface); DeepSpeed then adopts the initialised default group.
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        timeout = datetime.timedelta(minutes=30)  # DeepSpeed's default
        if rank == 0:
            store = listening_store(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                                    timeout_s=timeout.total_seconds(), world=world)
        else:
            store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                                  world, is_master=False, timeout=timeout)
        dist.init_process_group(backend, store=store, rank=rank, world_size=world,
                                timeout=timeout)
    deepspeed.init_distributed(dist_backend=backend)
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


def attention_kernels(setting: str, device: torch.device) -> str:
    """The HF `attn_implementation` for `learner.attn_implementation`, refused at start-up
    where it cannot run."""
    if setting == "flash_attention_2":
        import importlib.util

        if device.type != "cuda" or importlib.util.find_spec("flash_attn") is None:
            raise ValueError("learner.attn_implementation = 'flash_attention_2' needs a GPU "
                             "and the flash-attn package; use 'sdpa'")
    return setting


def warmup_lambda(warmup: int):
    """Linear warm-up to the peak learning rate, then constant (docs/DESIGN.md §4)."""
    return lambda step: min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0


def peak_memory_mib(device: torch.device) -> float:
    """Peak memory of this process so far: the accelerator's allocator, or RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class _Agg:
    """Per-step statistics over micro-batches and updates: token-weighted means, min/max for
    min/max keys, sums for *_sum/*_count keys."""

    def __init__(self) -> None:
        self.vals: dict[str, list[tuple[float, float]]] = {}

    def add(self, stats: dict[str, Any], weight: float) -> None:
        for k, v in stats.items():
            self.vals.setdefault(k, []).append((float(v), weight))

    def result(self) -> dict[str, float]:
        out = {}
        for k, pairs in self.vals.items():
            v = np.array([p[0] for p in pairs])
            w = np.array([p[1] for p in pairs])
            if k.endswith(("_sum", "_count")):
                out[k] = float(v.sum())
            elif k.endswith("/max") or "max_abs" in k:
                out[k] = float(v.max())
            elif k.endswith("/min"):
                out[k] = float(v.min())
            else:
                out[k] = float((v * w).sum() / max(w.sum(), 1.0))
        if "beta_comp/pos_count" in out:
            out["beta_comp/mean_pos"] = out.pop("beta_comp/pos_sum") / max(
                out.pop("beta_comp/pos_count"), 1.0)
        return out


def current_version_mismatch(batches: list[Batch | None], logp_old: list[torch.Tensor | None],
                             version: int) -> dict[str, float]:
    """Health check of the whole pipeline: tokens sampled with exactly the weights πold was
    computed with must have μ == πold up to numerics. Only samples generated wholly with these
    weights: a sample that straddles a weight swap keeps KV computed by the old weights."""
    worst, n = 0.0, 0
    for b, lo in zip(batches, logp_old, strict=True):
        if b is None or lo is None:
            continue
        whole = (b.versions == version) | ~b.mask
        cur = b.mask & whole.all(dim=1, keepdim=True)
        if cur.any():
            worst = max(worst, float((lo - b.logp_behaviour).abs()[cur].max()))
            n += int(cur.sum())
    if not n:
        return {}
    return {"mismatch/current_version_max_abs": worst,
            "mismatch/current_version_tokens": float(n)}


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
        problems = check_learner(cfg, self.world)
        if problems:
            raise ValueError("learner configuration cannot run: " + "; ".join(problems))
        torch.manual_seed(cfg.seed)
        self.device = torch.device("cuda", torch.cuda.current_device()) \
            if torch.cuda.is_available() else torch.device("cpu")
        model = AutoModelForCausalLM.from_pretrained(
            model_path, dtype=torch.float32,
            attn_implementation=attention_kernels(cfg.attn_implementation, self.device))
        if cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False})
        self.chunk_tokens = chunk_tokens_for(model.config.vocab_size, cfg.logits_chunk_mib)
        # each group's prompt runs once per micro-batch (learner/policy.py); HF's gradient
        # checkpointing drops the prompts' keys and values, so it runs the full rows instead
        # (a sliding-window layer's cache keeps only its window: full rows there too)
        self.share_prompts = cfg.share_prompts and not cfg.gradient_checkpointing and all(
            t == "full_attention" for t in getattr(model.config, "layer_types", None)
            or ["full_attention"])
        decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
        no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
        # fused: one kernel over all parameters instead of a loop of small ops per tensor
        # (25M model on two CPU cores: 162 ms -> 22 ms per step, docs/BENCHMARKS.md)
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                 {"params": no_decay, "weight_decay": 0.0}],
                                lr=cfg.lr, betas=cfg.betas,
                                fused=self.device.type in ("cpu", "cuda"))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_lambda(cfg.warmup_steps))
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=Policy(model, temperature), optimizer=opt, lr_scheduler=sched,
            config=deepspeed_config(cfg))
        self.lm = self.engine.module.lm  # the HF model (partitioned under ZeRO-3)
        # (name, dtype, full shape) of every parameter, as published and saved
        self.specs = [(n, p.dtype, tuple(getattr(p, "ds_shape", p.shape)))
                      for n, p in self.lm.named_parameters()]
        self.pad_id = model.config.pad_token_id or 0
        self.version = 0

    # ------------------------------------------------------------------ forward
    def _forward(self, mb: Batch, n_chunks: int, module=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(log π, H) [S, T-1] of the micro-batch's completion tokens."""
        dev = self.device
        shared = (mb.prompt_lens.to(dev), mb.group_ids.to(dev)) if self.share_prompts else ()
        return (module or self.engine)(mb.input_ids.to(dev), mb.targets.to(dev),
                                       mb.mask.to(dev), n_chunks, *shared)

    def _plan(self, batch: Batch | None) -> tuple[list[torch.Tensor], int, int]:
        """This rank's micro-batches of `batch`, the number every rank runs (the most any
        rank has) and the LM-head chunks per pass (the most any rank needs)."""
        parts = [] if batch is None else micro_batches_by_length(
            batch, self.cfg.micro_batch_seqs, self.cfg.micro_batch_tokens)
        most_tokens = max((int(batch.mask[idx].sum()) for idx in parts), default=0)
        plan = torch.tensor([len(parts), n_chunks_for(most_tokens, self.chunk_tokens)],
                            device=self.device)
        if self.world > 1:
            dist.all_reduce(plan, op=dist.ReduceOp.MAX)
        return parts, int(plan[0]), int(plan[1])

    def _passes(self, batch: Batch | None, parts: list[torch.Tensor], n: int
                ) -> Iterator[tuple[Batch, torch.Tensor | None]]:
        """`n` micro-batches: this rank's (with their row indices), then dummies."""
        for i in range(n):
            if i < len(parts):
                assert batch is not None
                yield batch.rows(parts[i]), parts[i]
            else:
                yield dummy_batch(self.pad_id), None

    @torch.no_grad()
    def _recompute(self, batch: Batch | None, logp_old: torch.Tensor | None) -> None:
        """Fill logp_old [S, T-1] with log πold (the current weights) for every row."""
        parts, n, n_chunks = self._plan(batch)
        for mb, idx in self._passes(batch, parts, n):
            lp, _ = self._forward(mb, n_chunks)
            if idx is not None:
                assert logp_old is not None
                logp_old[idx, : lp.shape[1]] = lp.float().cpu()

    @torch.no_grad()
    def _update_extremes(self, batch: Batch | None, logp_old: torch.Tensor | None,
                         adv: torch.Tensor | None) -> Extremes:
        """H_min, H_max and max Ξ over the whole update, all ranks (one no-grad pass)."""
        parts, n, n_chunks = self._plan(batch)
        acc = [math.inf, math.inf, 0.0]  # H_min, -H_max, max Ξ: all reduced with MIN/MAX
        for mb, idx in self._passes(batch, parts, n):
            lp, H = self._forward(mb, n_chunks)
            if idx is None:
                continue
            w = lp.shape[1]
            lo, hi, xi = local_extremes(lp.float(), H, logp_old[idx, :w].to(self.device),
                                        adv[idx].to(self.device), mb.mask.to(self.device),
                                        self.objective)
            acc = [min(acc[0], lo), min(acc[1], -hi), max(acc[2], xi)]
        t = torch.tensor(acc[:2], dtype=torch.float64, device=self.device)
        x = torch.tensor([acc[2]], dtype=torch.float64, device=self.device)
        if self.world > 1:
            dist.all_reduce(t, op=dist.ReduceOp.MIN)
            dist.all_reduce(x, op=dist.ReduceOp.MAX)
        return Extremes(h_min=float(t[0]), h_max=-float(t[1]), xi_max=float(x[0]))

    # ------------------------------------------------------------------ one batch
    def step(self, groups: list[RolloutGroup]) -> dict[str, float]:
        """Train on one rollout batch (every rank passes the whole batch): its optimizer
        updates, each on this rank's share of whole groups of one mini-batch."""
        t0 = time.perf_counter()
        cfg = self.cfg
        stats: dict[str, float] = {}
        self._opt_time, self._grad_norms = 0.0, []
        version0 = self.version
        rewards_all = np.concatenate([g.rewards for g in groups]) if groups else np.zeros(0)
        gid = np.repeat(np.arange(len(groups)), [g.n for g in groups])
        flat = zero_signal_mask(torch.from_numpy(rewards_all), torch.from_numpy(gid)) \
            if groups else torch.zeros(0, dtype=torch.bool)
        zero_groups = {int(i) for i in np.unique(gid[flat.numpy()])}
        stats["zero_signal_groups"] = float(len(zero_groups))
        stats["signal_samples"] = float(sum(g.n for i, g in enumerate(groups)
                                            if i not in zero_groups))
        kept = [g for i, g in enumerate(groups)
                if not (self.objective.skip_zero_signal and i in zero_groups)]
        minis = mini_batches(len(kept), cfg.groups_per_update,
                             seed=cfg.seed * 1_000_003 + self.version)
        local = []  # this rank's Batch (or None) of each mini-batch
        for idx in minis:
            mine = shard([kept[i] for i in idx], self.rank, self.world)
            local.append(build_batch(mine, self.pad_id) if mine else None)
        counts = torch.tensor([0 if b is None else b.num_tokens for b in local] or [0],
                              dtype=torch.float64, device=self.device)
        if self.world > 1:
            dist.all_reduce(counts)
        tokens = counts.tolist()
        if not minis or sum(tokens) == 0:
            stats["skipped_step"] = 1.0  # nothing carries signal: no update, same version
            stats["updates"] = 0.0
            return stats
        t1 = time.perf_counter()
        bypass = self.objective.is_mode == "bypass"
        logp_old: list[torch.Tensor | None] = [
            None if b is None else (b.logp_behaviour if bypass
                                    else torch.zeros(b.mask.shape, dtype=torch.float32))
            for b in local]
        advs = [None if b is None else group_advantages(b.rewards, b.group_ids)[0]
                for b in local]
        every = cfg.grad_variance_every  # one rank, ZeRO <= 1 (checked at start-up)
        variance_due = bool(every) and self.version % every == 0 and local[0] is not None
        if not bypass:  # πold of mini-batches 2.. now; the first one's from its own forward
            for b, lo in zip(local[1 if not variance_due else 0:],
                             logp_old[1 if not variance_due else 0:], strict=True):
                self._recompute(b, lo)
        if variance_due:
            stats.update(self.split_half_variance(local[0], logp_old[0], advs[0]))
        t2 = time.perf_counter()
        agg = _Agg()
        updates = 0
        self.engine.train()
        for epoch in range(cfg.ppo_epochs):
            for m, b in enumerate(local):
                if tokens[m] == 0:
                    continue  # no rank has a signal token in this mini-batch
                # πold of the first mini-batch comes from its own first forward
                fresh = epoch == 0 and m == 0 and not bypass and not variance_due
                self._update(b, logp_old[m], advs[m], tokens[m], fresh, agg)
                updates += 1
        t3 = time.perf_counter()
        stats.update(agg.result())
        if not bypass:
            stats.update(current_version_mismatch(local, logp_old, version0))
        stats.update({
            "updates": float(updates),
            "grad_norm": float(np.mean(self._grad_norms)),
            "grad_norm/max": float(np.max(self._grad_norms)),
            "lr": float(self.scheduler.get_last_lr()[0]),
            "train_tokens": float(sum(tokens)),
            "memory/peak_mib": peak_memory_mib(self.device),
            "time/prepare": t1 - t0, "time/recompute": t2 - t1, "time/fwd_bwd": t3 - t2,
            "time/optimizer": self._opt_time,
        })
        stats["time/fwd_bwd"] -= self._opt_time
        return stats

    def _update(self, batch: Batch | None, logp_old: torch.Tensor | None,
                adv: torch.Tensor | None, n_tokens: float, fresh: bool, agg: _Agg) -> None:
        """One optimizer update on this rank's part of a mini-batch (all ranks call it)."""
        dev = self.device
        # DeepSpeed averages gradients over ranks, so each rank divides by global / world.
        denom = n_tokens / self.world
        extremes = None
        if self.objective.modulation and self.cfg.dynamo_stats_scope == "update":
            if fresh and batch is not None:
                assert logp_old is not None
                self._recompute(batch, logp_old)  # needed for Ξ before any loss
                fresh = False
            elif fresh:
                self._recompute(None, None)
                fresh = False
            extremes = self._update_extremes(batch, logp_old, adv)
        parts, n, n_chunks = self._plan(batch)
        for i, (mb, idx) in enumerate(self._passes(batch, parts, n)):
            self.engine.set_gradient_accumulation_boundary(i == n - 1)
            logp, H = self._forward(mb, n_chunks)
            if idx is None:  # padding pass: a real forward/backward, weighted 0
                self.engine.backward(logp.sum() * 0.0)
                continue
            assert logp_old is not None and adv is not None and batch is not None
            w = mb.mask.shape[1]
            if fresh:
                logp_old[idx, :w] = logp.detach().float().cpu()
            loss, s = dynamo_loss(logp, H, logp_old[idx, :w].to(dev), mb.logp_behaviour.to(dev),
                                  adv[idx].to(dev), mb.mask.to(dev), self.objective,
                                  n_tokens_total=denom, extremes=extremes)
            self.engine.backward(loss)
            agg.add(s, float(mb.mask.sum()))
        t = time.perf_counter()
        partitioned = self.cfg.zero_stage >= 2  # gradients live in the ZeRO partitions
        if not partitioned:
            self._grad_norms.append(self._local_grad_norm())
        self.engine.step()
        if partitioned:
            norm = self.engine.get_global_grad_norm()
            self._grad_norms.append(float(norm) if norm is not None else float("nan"))
        self._opt_time += time.perf_counter() - t
        self.version += 1

    def split_half_variance(self, batch: Batch, logp_old: torch.Tensor,
                            adv: torch.Tensor) -> dict[str, float]:
        """Diagnostic: the gradient of `batch` computed separately on two halves of its groups
        (even / odd group ids). With g = (g_A + g_B) / 2, E||g_A - g_B||^2 / 4 estimates the
        total variance tr Var(g) of the update's gradient; also reported relative to ||g||^2.
        Costs one extra forward/backward; no parameter changes. One rank, ZeRO stage <= 1."""
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
                logp, H = self._forward(mb, n_chunks_for(mb.num_tokens, self.chunk_tokens),
                                        module)
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
    def _local_grad_norm(self) -> float:
        """L2 norm of the accumulated (rank-averaged) gradient, before clipping; ZeRO <= 1."""
        sq = torch.zeros((), dtype=torch.float64, device=self.device)
        for p in self.engine.module.parameters():
            if p.grad is not None:
                sq += p.grad.detach().double().pow(2).sum()
        return float(sq.sqrt())

    # ------------------------------------------------------------------ weights
    def gathered_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(HF name, full tensor) of every parameter, in `self.specs` order. Under ZeRO-3
        every rank must consume the iterator to its end (each module's parameters are
        gathered collectively while its tensors are read, then released)."""
        lm = self.lm
        if self.cfg.zero_stage != 3:
            yield from ((n, p.detach()) for n, p in lm.named_parameters())
            return
        import deepspeed

        owner = {}  # parameter -> the module that holds it first, as named_parameters does
        for mod_name, mod in lm.named_modules():
            for _, p in mod.named_parameters(recurse=False):
                owner.setdefault(id(p), mod_name)
        done: set[int] = set()
        for mod_name, mod in lm.named_modules():
            params = [(n, p) for n, p in mod.named_parameters(recurse=False)
                      if owner[id(p)] == mod_name and id(p) not in done]
            if not params:
                continue
            with deepspeed.zero.GatheredParameters([p for _, p in params], modifier_rank=None):
                for n, p in params:
                    done.add(id(p))
                    yield (f"{mod_name}.{n}" if mod_name else n), p.detach()

    def weight_bytes(self) -> int:
        return sum(math.prod(shape) * dt.itemsize for _, dt, shape in self.specs)

    def for_each_weight(self, consume=None, check_replicas: bool = False) -> bool:
        """Walk every full parameter once on every rank (the gathers are collective), hand
        them to `consume` (an iterator consumer, e.g. the weight publisher) on rank 0, and
        with `check_replicas` compare a CRC-32C of every rank's copy. Returns whether the
        ranks agree (True when not checked)."""
        crc = 0

        def walk():
            nonlocal crc
            for name, t in self.gathered_weights():
                if check_replicas:
                    crc = crc32c(t.detach().cpu().contiguous().view(torch.uint8).numpy(), crc)
                yield name, t

        it = walk()
        if consume is not None and self.rank == 0:
            consume(it)
        for _ in it:  # other ranks (or what the consumer left) still take part in gathers
            pass
        if not (check_replicas and self.world > 1):
            return True
        crcs: list[int | None] = [None] * self.world
        dist.all_gather_object(crcs, crc)
        return len(set(crcs)) == 1

    def named_weights(self) -> list[tuple[str, torch.Tensor]]:
        """Every (HF name, tensor) as one list (one rank, or ZeRO <= 2; tests and tools)."""
        return [(n, t.clone() if self.cfg.zero_stage == 3 else t)
                for n, t in self.gathered_weights()]

    def _write_hf(self, hf: Path, shard_bytes: int = 2 << 30) -> None:
        """All ranks: write the HF model directory from the gathered weights, shard by shard
        (rank 0 writes; at most one shard of copies is held)."""
        from safetensors.torch import save_file

        plan: list[list[str]] = [[]]
        size = 0
        for name, dt, shape in self.specs:
            nb = math.prod(shape) * dt.itemsize
            if plan[-1] and size + nb > shard_bytes:
                plan.append([])
                size = 0
            plan[-1].append(name)
            size += nb
        files = ["model.safetensors"] if len(plan) == 1 else [
            f"model-{i + 1:05d}-of-{len(plan):05d}.safetensors" for i in range(len(plan))]
        shard_of = {n: i for i, names in enumerate(plan) for n in names}

        def write(it) -> None:
            hf.mkdir(parents=True, exist_ok=True)
            cur, idx = {}, 0
            for name, t in it:
                if shard_of[name] != idx:
                    save_file(cur, str(hf / files[idx]), metadata={"format": "pt"})
                    cur, idx = {}, shard_of[name]
                cur[name] = t.detach().cpu().clone().contiguous()
            save_file(cur, str(hf / files[idx]), metadata={"format": "pt"})
            if len(files) > 1:
                (hf / "model.safetensors.index.json").write_text(json.dumps({
                    "metadata": {"total_size": self.weight_bytes()},
                    "weight_map": {n: files[shard_of[n]] for n, _, _ in self.specs}}, indent=1))
            self.lm.config.save_pretrained(hf)
            if getattr(self.lm, "generation_config", None) is not None:
                self.lm.generation_config.save_pretrained(hf)

        self.for_each_weight(write)

    # ------------------------------------------------------------------ checkpoints
    def save(self, root: Path, tag: str, client_state: dict[str, Any], tokenizer_src: str,
             extra_files: list[Path] = ()) -> Path:
        """All ranks: DeepSpeed state and the gathered HF model; rank 0: HF model dir,
        extras, a SHA-256 manifest of every file, then the LATEST pointer.

        LATEST is replaced atomically only after everything else (manifest included) is on
        disk, so a kill during a save leaves the previous checkpoint the one that resumes.
        """
        self.engine.save_checkpoint(str(root), tag=tag, client_state=client_state,
                                    save_latest=False)
        self._write_hf(root / tag / "hf")
        dist.barrier()  # every rank's shard is written before the manifest is
        if self.rank == 0:
            hf = root / tag / "hf"
            for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                         "vocab.json", "merges.txt", "chat_template.jinja"):
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
                 counters: Counter, extra: dict[str, Any], trained_from: int | None = None
                 ) -> dict[str, Any]:
    """One JSON-able metrics record of a learner step (one rollout batch), which took the
    policy from version `trained_from` to `version`; staleness is measured from
    `trained_from`, the weights that computed πold (default: one update before `version`)."""
    trained_from = version - 1 if trained_from is None else trained_from
    rewards = np.concatenate([g.rewards for g in groups]) if groups else np.zeros(0)
    sizes = np.array([g.n for g in groups]) if groups else np.zeros(0, int)
    staleness = np.concatenate([trained_from - g.token_versions for g in groups]) \
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
