"""The learner's objective: DynaMO token level on top of decoupled PPO (docs/DESIGN.md §3).

Pure torch: tensors in, tensors out; no sockets, no DeepSpeed, no optimizer.

Layout: a micro-batch is S response sequences padded to length L. Per-token tensors are
[S, L]; `mask` [S, L] (bool) marks the valid response tokens; per-sequence tensors are [S].

Invariants this module keeps:
- Padding (mask False) never reaches the loss, its gradient, or a statistic, whatever values
  the padded positions hold (NaN and ±inf included).
- Only the loss carries gradient, and only through `logp` (log πθ of the sampled tokens).
  Advantages, entropies, modulation factors, IS weights and statistics are detached.
- The loss is a sum over valid tokens divided by `n_tokens_total`, so gradients accumulated
  over micro-batches with the batch's token count equal the full-batch token-mean gradient.
- H_min/H_max (β_comp) and max Ξ (β_stab) are micro-batch statistics, as in the paper's
  code: with modulation on, the loss depends on how the batch is cut into micro-batches.
  `Extremes` passes them in from a wider scope instead (the whole optimizer update).
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import torch
from torch import Tensor

from learner.config import LearnerConfig
from learner.presets import PRESET_TABLE, AllocationRule, Preset, allocation_rule  # noqa: F401

ISMode = Literal["tis", "bypass", "mask"]
_LEARNER = LearnerConfig.model_fields

ADV_EPS = 1e-6  # the ε in A = (r - mean) / (std + ε)


# --------------------------------------------------------------------------------------------
# Configuration and presets
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ObjectiveConfig:
    """Every knob of the token-level objective; defaults are the paper's (docs/DESIGN.md §3)."""

    modulation: bool = True  # apply A_t = A·β_comp·β_stab (False: plain GRPO advantages)
    alpha: float = 0.2  # α of β_comp
    lambda_min: float = 0.6  # λ_min of β_stab: the smallest factor the stabiliser applies
    gamma: float = 50.0  # γ of β_stab: steepness of the sigmoid
    tau: float = 0.99  # τ of β_stab: normalised entropy change at which β_stab is halfway
    eps_low: float = 0.2  # ε_low: PPO clip below 1
    eps_high: float = 0.28  # ε_high: PPO clip above 1 (clip-higher)
    dual_clip_c: float = 10.0  # c: dual clip, loss of an A<0 token is at most c·|A|
    # The off-policy fields are also learner settings: their defaults live in LearnerConfig.
    # is_mode: truncated IS, bypass (πold := μ), or mask
    is_mode: ISMode = _LEARNER["is_mode"].default
    # C: tis truncation of exp(logπold - logμ)
    is_cap: float = _LEARNER["is_cap"].default
    # a, b: mask mode keeps tokens with a <= exp(logπold - logμ) <= b
    mask_low: float = _LEARNER["mask_low"].default
    mask_high: float = _LEARNER["mask_high"].default
    # Drop all-equal-reward groups when batching (zero_signal_mask); kept, they only add
    # zero-advantage tokens to the token-mean denominator.
    skip_zero_signal: bool = _LEARNER["skip_zero_signal"].default
    # Control experiment: A > 0 tokens get this constant instead of β_comp (β_stab unchanged),
    # to tell the entropy-aware compensation from a plain up-weighting of positive advantages.
    comp_constant: float | None = None

    def __post_init__(self) -> None:
        if not (0.0 < self.eps_low < 1.0 and self.eps_high > 0.0):
            raise ValueError(f"need 0 < eps_low < 1 and eps_high > 0, got {self}")
        if self.dual_clip_c <= 1.0 + self.eps_high:
            raise ValueError(f"dual_clip_c must exceed 1 + eps_high, got {self.dual_clip_c}")
        if not 0.0 < self.mask_low <= self.mask_high:
            raise ValueError(f"need 0 < mask_low <= mask_high, got {self}")
        if self.is_cap <= 0.0:
            raise ValueError(f"is_cap must be positive, got {self.is_cap}")


PRESETS: dict[Preset, ObjectiveConfig] = {
    name: ObjectiveConfig(modulation=modulation)
    for name, (_, modulation) in PRESET_TABLE.items()
}


# --------------------------------------------------------------------------------------------
# Sequence level: group-relative advantage
# --------------------------------------------------------------------------------------------


def _group_index(group_ids: Tensor) -> tuple[Tensor, int]:
    """Dense group index 0..G-1 for arbitrary (not necessarily contiguous) ids."""
    uniq, idx = torch.unique(group_ids, return_inverse=True)
    return idx, uniq.numel()


def _flat_groups(rewards: Tensor, idx: Tensor, n_groups: int) -> Tensor:
    """[G] bool: the group's rewards are all equal (it carries no learning signal)."""
    hi = rewards.new_full((n_groups,), -torch.inf).scatter_reduce(0, idx, rewards, "amax")
    lo = rewards.new_full((n_groups,), torch.inf).scatter_reduce(0, idx, rewards, "amin")
    return hi == lo


def zero_signal_mask(rewards: Tensor, group_ids: Tensor) -> Tensor:
    """[S] bool: the sequence belongs to a group whose rewards are all equal.

    For `ObjectiveConfig.skip_zero_signal`: the batch builder drops these sequences.
    """
    idx, n_groups = _group_index(group_ids)
    return _flat_groups(rewards.double(), idx, n_groups)[idx]


def group_advantages(rewards: Tensor, group_ids: Tensor) -> tuple[Tensor, int]:
    """GRPO advantage per sequence, and the number of zero-signal groups.

    rewards [S] float, group_ids [S] long (any values, in any order); groups have size >= 2.
    std is the *sample* (unbiased, n-1) standard deviation, i.e. torch.std, the convention of
    the reference implementation. Groups with all-equal rewards get exactly 0.
    """
    idx, n_groups = _group_index(group_ids)
    r = rewards.double()
    count = r.new_zeros(n_groups).index_add_(0, idx, torch.ones_like(r))
    if bool((count < 2).any()):
        raise ValueError("every group needs at least 2 sequences for a sample std")
    mean = r.new_zeros(n_groups).index_add_(0, idx, r) / count
    dev = r - mean[idx]
    std = (r.new_zeros(n_groups).index_add_(0, idx, dev.square()) / (count - 1)).sqrt()
    flat = _flat_groups(r, idx, n_groups)
    # Eq. A = (r - mean_G r) / (std_G r + 1e-6), exactly 0 for flat groups
    adv = torch.where(flat[idx], 0.0, dev / (std[idx] + ADV_EPS))
    return adv.to(torch.float32), int(flat.sum())


# --------------------------------------------------------------------------------------------
# Per-token log-probabilities and entropies from logits
# --------------------------------------------------------------------------------------------


def _at_least_fp32(x: Tensor) -> Tensor:
    """bf16/fp16 logits are upcast (log-probs and ratios need the precision); fp64 is kept."""
    return x.float() if x.element_size() < 4 else x


def sampled_logprobs(logits: Tensor, tokens: Tensor) -> Tensor:
    """log π of the sampled tokens: logits [..., V], tokens [...] (valid ids) -> [...].

    Computed as logit[token] - logsumexp(logits): no [..., V] log-softmax is kept for backward.
    """
    x = _at_least_fp32(logits)
    return x.gather(-1, tokens.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(x, dim=-1)


@torch.no_grad()
def token_entropy(logits: Tensor) -> Tensor:
    """Full-vocabulary entropy H = -Σ_v π_v log π_v: logits [..., V] -> [...], detached.

    Via log_softmax (stable for large logits); vocabulary entries at -inf contribute 0.
    """
    logp = torch.log_softmax(_at_least_fp32(logits), dim=-1)
    p = logp.exp()
    return -torch.where(p > 0, p * logp, 0.0).sum(-1)


def logprobs_and_entropy(
    logits: Tensor, tokens: Tensor, chunk_len: int = 256
) -> tuple[Tensor, Tensor]:
    """(log π of sampled tokens with grad, entropy detached) for logits [S, L, V], in one pass.

    Works through `chunk_len` positions at a time, so the float32 temporaries are
    [S, chunk_len, V] rather than [S, L, V]. Logits must already be divided by the sampling
    temperature (μ is the distribution actually sampled from); tokens must be valid ids on
    padding too (use the pad id).
    """
    logps, ents = [], []
    for x, t in zip(logits.split(chunk_len, dim=1), tokens.split(chunk_len, dim=1), strict=True):
        logps.append(sampled_logprobs(x, t))
        ents.append(token_entropy(x))
    return torch.cat(logps, dim=1), torch.cat(ents, dim=1)


# --------------------------------------------------------------------------------------------
# Token level: advantage modulation
# --------------------------------------------------------------------------------------------


def _masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    return torch.where(mask, x, 0.0).sum() / mask.sum().clamp(min=1)


def _log_ratio(logp: Tensor, logp_old: Tensor, mask: Tensor) -> Tensor:
    """logπθ - logπold on valid tokens, 0 on padding (so ratio 1 and no NaN there)."""
    return torch.where(mask, logp - logp_old, 0.0)


@dataclasses.dataclass(frozen=True)
class Extremes:
    """H_min, H_max and max Ξ taken over a scope wider than one micro-batch."""

    h_min: float
    h_max: float
    xi_max: float


def beta_comp(H: Tensor, adv_seq: Tensor, mask: Tensor, alpha: float = 0.2,
              h_range: tuple[float, float] | None = None) -> Tensor:
    """Compensation factor [S, L]: boosts confident (low-entropy) tokens of correct answers.

    H_min, H_max over the valid tokens of the micro-batch (or `h_range`, from a wider scope).
    If H_max == H_min the relative entropy is undefined and β_comp = 1 everywhere (no token is
    more confident than another).
    """
    H = H.detach()
    if h_range is None:
        h_min = H.masked_fill(~mask, torch.inf).amin()
        h_max = H.masked_fill(~mask, -torch.inf).amax()
    else:
        h_min, h_max = (torch.tensor(v, dtype=H.dtype, device=H.device) for v in h_range)
    span = h_max - h_min
    spread = span > 0
    rel = torch.where(spread, (h_max - H) / torch.where(spread, span, 1.0), 0.0).clamp(0, 1)
    positive = (adv_seq.detach() > 0).unsqueeze(-1) & mask
    # Eq. β_comp_t = 1 + α (H_max - H_t) / (H_max - H_min) where A > 0, else 1
    return torch.where(positive, 1.0 + alpha * rel, 1.0)


def entropy_change(
    logp: Tensor,
    H: Tensor,
    ratio: Tensor,
    adv_seq: Tensor,
    mask: Tensor,
    eps_low: float = 0.2,
    eps_high: float = 0.28,
) -> Tensor:
    """Ξ_t = |ΔH_t| [S, L]: first-order estimate of how much the token moves the entropy.

    logp: log π of the sampled token, ratio: πθ/πold, adv_seq [S]: group advantage A.
    0 on padding and on clipped tokens.
    """
    logp, H, ratio = logp.detach(), H.detach(), ratio.detach()
    A = adv_seq.detach().unsqueeze(-1)
    # Eq. ξ_t = 1[unclipped]·ratio_t·A
    unclipped = ((A > 0) & (ratio <= 1 + eps_high)) | ((A < 0) & (ratio >= 1 - eps_low))
    xi = torch.where(unclipped & mask, ratio * A, 0.0)
    # Eq. Λ_t = log π_t + H_t, and π_t Λ_t on valid tokens
    pi_lambda = torch.where(mask, logp.exp() * (logp + H), 0.0)
    seq_mean = pi_lambda.sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1)
    # Eq. ΔH_t = -ξ_t (π_t Λ_t - mean_seq π Λ);  Ξ_t = |ΔH_t|
    return (-xi * (pi_lambda - seq_mean)).abs()


def beta_stab_curve(
    x: Tensor | float, lambda_min: float = 0.6, gamma: float = 50.0, tau: float = 0.99
) -> Tensor:
    """β_stab as a function of the normalised entropy change x (floats evaluated in fp64)."""
    x = x if isinstance(x, Tensor) else torch.tensor(x, dtype=torch.float64)
    # Eq. β_stab = λ_min + (1 - λ_min) / (1 + exp(γ (x - τ)))
    return lambda_min + (1.0 - lambda_min) * torch.sigmoid(-gamma * (x - tau))


def beta_stab(
    Xi: Tensor,
    mask: Tensor,
    lambda_min: float = 0.6,
    gamma: float = 50.0,
    tau: float = 0.99,
    xi_max: float | None = None,
) -> Tensor:
    """Stabiliser [S, L]: damps the tokens that change the entropy most in the micro-batch
    (or relative to `xi_max`, from a wider scope).

    If max Ξ == 0 (no token moves the entropy) x = 0 everywhere, so β_stab ≈ 1.
    """
    Xi = torch.where(mask, Xi.detach(), 0.0)
    xi_max = Xi.amax() if xi_max is None else torch.tensor(xi_max, dtype=Xi.dtype,
                                                            device=Xi.device)
    # Eq. x_t = Ξ_t / max Ξ  (micro-batch valid tokens)
    x = torch.where(xi_max > 0, Xi / torch.where(xi_max > 0, xi_max, 1.0), 0.0)
    return beta_stab_curve(x, lambda_min, gamma, tau)


def modulated_advantage(
    adv_seq: Tensor,
    logp: Tensor,
    logp_old: Tensor,
    H: Tensor,
    mask: Tensor,
    cfg: ObjectiveConfig,
    extremes: Extremes | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """(A_t, β_comp, β_stab), each [S, L] and detached, from the group advantage A [S]."""
    ratio = _log_ratio(logp.detach(), logp_old.detach(), mask).exp()
    if cfg.comp_constant is None:
        b_comp = beta_comp(H, adv_seq, mask, cfg.alpha,
                           None if extremes is None else (extremes.h_min, extremes.h_max))
    else:
        positive = (adv_seq.detach() > 0).unsqueeze(-1) & mask
        b_comp = torch.where(positive, cfg.comp_constant, 1.0).to(H.dtype)
    Xi = entropy_change(logp, H, ratio, adv_seq, mask, cfg.eps_low, cfg.eps_high)
    b_stab = beta_stab(Xi, mask, cfg.lambda_min, cfg.gamma, cfg.tau,
                       None if extremes is None else extremes.xi_max)
    # Eq. A_t = A · β_comp_t · β_stab_t
    adv_t = adv_seq.detach().unsqueeze(-1) * b_comp * b_stab
    return adv_t, b_comp, b_stab


@torch.no_grad()
def local_extremes(logp: Tensor, H: Tensor, logp_old: Tensor, adv_seq: Tensor, mask: Tensor,
                   cfg: ObjectiveConfig) -> tuple[float, float, float]:
    """(H_min, H_max, max Ξ) over this micro-batch's valid tokens (±inf/0 if it has none);
    combine over a scope with min/max to build `Extremes`."""
    if not bool(mask.any()):
        return float("inf"), float("-inf"), 0.0
    ratio = _log_ratio(logp, logp_old, mask).exp()
    Xi = entropy_change(logp, H, ratio, adv_seq, mask, cfg.eps_low, cfg.eps_high)
    return (float(H.masked_fill(~mask, torch.inf).amin()),
            float(H.masked_fill(~mask, -torch.inf).amax()),
            float(torch.where(mask, Xi, 0.0).amax()))


# --------------------------------------------------------------------------------------------
# Off-policy correction: behaviour policy μ (actors) vs πold (learner at step start)
# --------------------------------------------------------------------------------------------


def is_weights(
    logp_old: Tensor,
    logp_behaviour: Tensor,
    mask: Tensor,
    mode: ISMode = "tis",
    cap: float = 2.0,
    mask_low: float = 0.5,
    mask_high: float = 2.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-token importance weights w [S, L] (0 on padding) and mismatch statistics.

    tis: w = min(ρ, C) with ρ = exp(logπold - logμ) (decoupled PPO).
    bypass: w = 1; the caller uses μ as πold.
    mask: w = 1 if a <= ρ <= b else 0 (IcePop style).
    Stats (detached 0-dim tensors, means over valid tokens): is/mean_abs_dlogp = E|logπold -
    logμ|; is/kl_k3 = E[ρ - 1 - log ρ], the k3 estimate of KL(μ ‖ πold) (tokens are drawn from
    μ); is/frac_truncated = share of tokens truncated (tis) or zeroed (mask), 0 for bypass.
    """
    log_rho = _log_ratio(logp_old.detach(), logp_behaviour.detach(), mask)
    rho = log_rho.exp()
    if mode == "tis":
        # Eq. w_t = min(exp(logπold_t - logμ_t), C)
        w, changed = rho.clamp(max=cap), rho > cap
    elif mode == "mask":
        keep = (rho >= mask_low) & (rho <= mask_high)
        w, changed = keep.to(rho.dtype), ~keep
    elif mode == "bypass":
        w, changed = torch.ones_like(rho), torch.zeros_like(mask)
    else:
        raise ValueError(f"unknown IS mode {mode!r}")
    stats = {
        "is/mean_abs_dlogp": _masked_mean(log_rho.abs(), mask),
        "is/kl_k3": _masked_mean(rho - 1.0 - log_rho, mask),
        "is/frac_truncated": _masked_mean(changed.to(rho.dtype), mask),
    }
    return torch.where(mask, w, 0.0), stats


# --------------------------------------------------------------------------------------------
# PPO surrogate with clip-higher and dual clip
# --------------------------------------------------------------------------------------------


def ppo_loss(
    logp: Tensor,
    logp_old: Tensor,
    adv_t: Tensor,
    w: Tensor,
    mask: Tensor,
    eps_low: float = 0.2,
    eps_high: float = 0.28,
    dual_clip_c: float = 10.0,
    n_tokens_total: int | float | Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Σ_valid w_t·loss_t / n_tokens_total (scalar with grad through logp) and statistics.

    n_tokens_total: valid tokens of the whole batch the gradient is accumulated over (default:
    this micro-batch's). Under data parallelism that averages gradients over W ranks, pass
    the global count divided by W. Stats are detached fractions of this micro-batch's valid
    tokens: clip/low (A<0, ratio < 1-ε_low), clip/high (A>0, ratio > 1+ε_high), clip/dual
    (A<0, capped at c·|A|), and ratio/mean.
    """
    adv_t, w = adv_t.detach(), w.detach()
    # Eq. ratio_t = exp(logπθ_t - logπold_t)
    ratio = _log_ratio(logp, logp_old.detach(), mask).exp()
    # Eq. loss_t = -min(ratio·A_t, clip(ratio, 1-ε_low, 1+ε_high)·A_t)
    loss_t = torch.maximum(-ratio * adv_t, -ratio.clamp(1 - eps_low, 1 + eps_high) * adv_t)
    # Eq. dual clip: for A_t < 0, loss_t = min(loss_t, -c·A_t), i.e. at most c·|A_t|
    dual_cap = -dual_clip_c * adv_t
    dual = (adv_t < 0) & (loss_t > dual_cap)
    loss_t = torch.where(dual, dual_cap, loss_t)
    # Eq. token-mean over all valid tokens of the batch, each weighted by w_t
    n = mask.sum().clamp(min=1) if n_tokens_total is None else n_tokens_total
    loss = torch.where(mask, w * loss_t, 0.0).sum() / n

    r = ratio.detach()
    stats = {
        "clip/low": _masked_mean(((adv_t < 0) & (r < 1 - eps_low)).float(), mask),
        "clip/high": _masked_mean(((adv_t > 0) & (r > 1 + eps_high)).float(), mask),
        "clip/dual": _masked_mean(dual.float(), mask),
        "ratio/mean": _masked_mean(r, mask),
        "ratio/min": r.masked_fill(~mask, torch.inf).amin(),
        "ratio/max": r.masked_fill(~mask, -torch.inf).amax(),
    }
    return loss, stats


# --------------------------------------------------------------------------------------------
# Everything composed for one micro-batch
# --------------------------------------------------------------------------------------------


def dynamo_loss(
    logp: Tensor,
    H: Tensor,
    logp_old: Tensor,
    logp_behaviour: Tensor,
    adv_seq: Tensor,
    mask: Tensor,
    cfg: ObjectiveConfig,
    n_tokens_total: int | float | Tensor | None = None,
    extremes: Extremes | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Loss of one micro-batch (scalar, grad through logp) and its detached statistics.

    logp [S, L]: log πθ of the sampled tokens (with grad); H [S, L]: entropy of πθ;
    logp_old [S, L]: the learner's recompute at the start of the step (ignored by the loss in
    bypass mode, where πold := μ, but still compared with μ in the is/ statistics);
    logp_behaviour [S, L]: μ from the actors; adv_seq [S]: group_advantages().
    """
    w, stats = is_weights(
        logp_old, logp_behaviour, mask, cfg.is_mode, cfg.is_cap, cfg.mask_low, cfg.mask_high
    )
    if cfg.is_mode == "bypass":
        logp_old = logp_behaviour
    if cfg.modulation:
        adv_t, b_comp, b_stab = modulated_advantage(adv_seq, logp, logp_old, H, mask, cfg,
                                                    extremes)
    else:
        adv_t = adv_seq.detach().unsqueeze(-1).expand_as(mask)
        b_comp = b_stab = torch.ones_like(adv_t)
    loss, ppo_stats = ppo_loss(
        logp, logp_old, adv_t, w, mask, cfg.eps_low, cfg.eps_high, cfg.dual_clip_c,
        n_tokens_total,
    )
    stats |= ppo_stats
    positive = (adv_seq.detach() > 0).unsqueeze(-1) & mask
    stats |= {
        "beta_comp/mean": _masked_mean(b_comp, mask),
        "beta_comp/max": b_comp.masked_fill(~mask, -torch.inf).amax(),
        "beta_stab/mean": _masked_mean(b_stab, mask),
        "beta_stab/min": b_stab.masked_fill(~mask, torch.inf).amin(),
        "beta_stab/frac_below_0.99": _masked_mean((b_stab < 0.99).float(), mask),
        "entropy/mean": _masked_mean(H.detach(), mask),
        # sums, not means: the trainer divides Σ over micro-batches (β_comp acts on A > 0 only)
        "beta_comp/pos_sum": torch.where(positive, b_comp, 0.0).sum(),
        "beta_comp/pos_count": positive.sum().float(),
    }
    return loss, stats
