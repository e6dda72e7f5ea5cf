"""The learner objective against hand computations and the equations of docs/DESIGN.md §3."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from learner.objective import (
    PRESETS,
    ObjectiveConfig,
    allocation_rule,
    beta_comp,
    beta_stab,
    beta_stab_curve,
    dynamo_loss,
    entropy_change,
    group_advantages,
    is_weights,
    logprobs_and_entropy,
    ppo_loss,
    sampled_logprobs,
    token_entropy,
    zero_signal_mask,
)

GRPO = PRESETS["grpo"]
DYNAMO = PRESETS["dynamo"]


def _batch(s: int = 4, n: int = 6, v: int = 11, seed: int = 0):
    """Random logits (leaf with grad), sampled tokens and a ragged mask."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(s, n, v, generator=g, dtype=torch.float64).requires_grad_()
    tokens = torch.randint(0, v, (s, n), generator=g)
    lengths = torch.randint(2, n + 1, (s,), generator=g)
    mask = torch.arange(n) < lengths.unsqueeze(-1)
    return logits, tokens, mask, g


# ---- β_stab ------------------------------------------------------------------------------


def test_beta_stab_curve_matches_reference_values():
    assert float(beta_stab_curve(0.9)) == pytest.approx(0.99560, abs=1e-5)
    assert float(beta_stab_curve(0.99)) == pytest.approx(0.8, abs=1e-12)
    assert float(beta_stab_curve(1.0)) == pytest.approx(0.75102, abs=1e-5)


def test_beta_stab_normalises_by_largest_valid_entropy_change():
    Xi = torch.tensor([[0.0, 0.9, 1.8], [1.0, 2.0, 50.0]])
    mask = torch.tensor([[True, True, True], [True, True, False]])  # 50.0 is padding
    b = beta_stab(Xi, mask)
    assert b[1, 1].item() == pytest.approx(0.75102, abs=1e-5)  # x = 1: the max valid Ξ
    assert b[1, 0].item() == pytest.approx(float(beta_stab_curve(0.5)), abs=1e-6)
    assert b[0, 2].item() == pytest.approx(0.99560, abs=1e-5)  # x = 0.9
    assert b[0, 0].item() == pytest.approx(1.0, abs=1e-6)


def test_beta_stab_is_about_one_when_no_token_changes_entropy():
    b = beta_stab(torch.zeros(2, 3), torch.ones(2, 3, dtype=torch.bool))
    assert torch.isfinite(b).all()
    assert torch.allclose(b, torch.ones_like(b), atol=1e-6)


# ---- group advantages ------------------------------------------------------------------


def test_group_advantages_hand_checked_for_sizes_2_5_8():
    # interleaved, non-contiguous ids: group 7 (size 2), 3 (size 5), 42 (size 8)
    ids = torch.tensor([3, 42, 7, 3, 42, 42, 3, 7, 42, 3, 42, 42, 3, 42, 42])
    rewards = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0,
                            0.0, 1.0, 0.0])
    adv, n_zero = group_advantages(rewards, ids)
    assert n_zero == 0
    # size 2, r = (1, 0): mean 0.5, sample std sqrt(0.5)
    a2 = 0.5 / (math.sqrt(0.5) + 1e-6)
    # size 5, r = (1, 0, 0, 0, 0): mean 0.2, sample var (0.64 + 4·0.04)/4 = 0.2
    s5 = math.sqrt(0.2) + 1e-6
    # size 8, r = four 1s and four 0s: mean 0.5, sample var 8·0.25/7
    s8 = math.sqrt(2.0 / 7.0) + 1e-6
    expected = {7: (a2, -a2), 3: (0.8 / s5, -0.2 / s5), 42: (0.5 / s8, -0.5 / s8)}
    for i in range(len(ids)):
        pos, neg = expected[int(ids[i])]
        want = pos if rewards[i] > 0 else neg
        assert adv[i].item() == pytest.approx(want, rel=1e-6)


def test_all_equal_reward_groups_get_exactly_zero_and_are_counted():
    # in fp64, mean(0.1, 0.1, 0.1) != 0.1: without the flat-group rule A would be ~1e-11
    ids = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2])
    rewards = torch.tensor([0.1, 0.1, 0.1, 1.0, 0.0] + [0.7] * 8, dtype=torch.float64)
    adv, n_zero = group_advantages(rewards, ids)
    assert n_zero == 2
    assert torch.equal(adv[:3], torch.zeros(3)) and torch.equal(adv[5:], torch.zeros(8))
    assert adv[3] > 0 > adv[4]
    assert zero_signal_mask(rewards, ids).tolist() == [True] * 3 + [False] * 2 + [True] * 8


@settings(max_examples=40, deadline=None)
@given(st.lists(st.lists(st.sampled_from([0.0, 0.25, 1.0]), min_size=2, max_size=7),
                min_size=1, max_size=6))
def test_group_advantages_equal_per_group_torch_std(groups: list[list[float]]):
    rewards = torch.tensor([r for grp in groups for r in grp])
    ids = torch.tensor([10 * i for i, grp in enumerate(groups) for _ in grp])
    adv, n_zero = group_advantages(rewards, ids)
    want = []
    for grp in groups:
        r = torch.tensor(grp, dtype=torch.float64)
        flat = bool((r == r[0]).all())
        want.append(torch.zeros_like(r) if flat else (r - r.mean()) / (r.std() + 1e-6))
    assert torch.allclose(adv.double(), torch.cat(want), atol=1e-6)
    assert n_zero == sum(len(set(grp)) == 1 for grp in groups)


def test_group_of_one_is_rejected():
    with pytest.raises(ValueError, match="at least 2"):
        group_advantages(torch.tensor([1.0, 0.0, 1.0]), torch.tensor([0, 0, 1]))


# ---- log-probs and entropy ---------------------------------------------------------------


def test_token_entropy_matches_direct_computation():
    logits, _, _, _ = _batch()
    p = torch.softmax(logits.detach(), -1)
    direct = -(p * p.log()).sum(-1)
    assert torch.allclose(token_entropy(logits).double(), direct, atol=1e-5)
    assert token_entropy(torch.zeros(7)).item() == pytest.approx(math.log(7), abs=1e-6)
    # huge logits and -inf entries (masked vocabulary) stay finite
    x = torch.tensor([1000.0, 1000.0, -torch.inf, 0.0])
    assert token_entropy(x).item() == pytest.approx(math.log(2), abs=1e-5)


def test_chunked_logprobs_and_entropy_equal_unchunked_with_same_gradient():
    logits, tokens, _, _ = _batch(n=7)
    logp_full = torch.log_softmax(logits, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    (g_full,) = torch.autograd.grad(logp_full.sum(), logits)
    logp, H = logprobs_and_entropy(logits, tokens, chunk_len=3)
    (g,) = torch.autograd.grad(logp.sum(), logits)
    assert not H.requires_grad
    assert torch.allclose(logp.double(), logp_full, atol=1e-5)
    assert torch.allclose(H, token_entropy(logits))
    assert torch.allclose(g.double(), g_full, atol=1e-5)
    assert torch.equal(sampled_logprobs(logits, tokens), logp)


# ---- on-policy reduction to GRPO ---------------------------------------------------------


def test_on_policy_grpo_gradient_equals_hand_written_grpo():
    logits, tokens, mask, g = _batch()
    adv_seq = torch.randn(4, generator=g)
    logp = sampled_logprobs(logits, tokens)
    old = logp.detach()
    w, _ = is_weights(old, old, mask)
    assert torch.equal(w[mask], torch.ones(int(mask.sum()), dtype=w.dtype))

    loss, _ = dynamo_loss(logp, token_entropy(logits), old, old, adv_seq, mask, GRPO)
    (grad,) = torch.autograd.grad(loss, logits, retain_graph=True)

    ratio = torch.exp(logp - logp.detach())
    hand = -(adv_seq.unsqueeze(-1) * ratio)[mask].sum() / mask.sum()  # token-mean of -A·ratio
    (grad_hand,) = torch.autograd.grad(hand, logits)
    assert loss.item() == pytest.approx(hand.item(), abs=1e-6)
    assert torch.allclose(grad, grad_hand, atol=1e-7)


# ---- β_comp ------------------------------------------------------------------------------


def test_beta_comp_boosts_confident_correct_token_and_leaves_negative_tokens_unchanged():
    logits, tokens, _, _ = _batch(s=2, n=4, v=9)
    mask = torch.ones(2, 4, dtype=torch.bool)
    with torch.no_grad():  # position (0, 0): a confident, correct token (lowest entropy)
        logits[0, 0] = 0.0
        logits[0, 0, tokens[0, 0]] = 6.0
    adv_seq = torch.tensor([1.0, -1.0])
    logp = sampled_logprobs(logits, tokens)
    H = token_entropy(logits)
    assert H[0, 0] == H.min()
    ones = torch.ones_like(H)
    b = beta_comp(H, adv_seq, mask, alpha=0.2)

    def grad_for(adv_t: torch.Tensor) -> torch.Tensor:
        loss, _ = ppo_loss(logp, logp.detach(), adv_t, ones, mask)
        return torch.autograd.grad(loss, logits, retain_graph=True)[0]

    plain = grad_for(adv_seq.unsqueeze(-1) * ones)
    comp = grad_for(adv_seq.unsqueeze(-1) * b)
    norm_gain = comp.norm(dim=-1) / plain.norm(dim=-1)
    assert norm_gain[0, 0].item() == pytest.approx(1.2, rel=1e-9)  # 1 + α at H = H_min
    assert (norm_gain[0] >= 1.0 - 1e-12).all()
    assert (b[0] >= 1.0).all() and (b[0] <= 1.2 + 1e-12).all()
    assert torch.equal(comp[1], plain[1])  # A < 0: untouched
    assert torch.equal(b[1], torch.ones(4))


def test_beta_comp_is_one_when_all_entropies_are_equal_and_ignores_padding():
    mask = torch.tensor([[True, True, False]])
    H = torch.tensor([[0.7, 0.7, float("nan")]])
    b = beta_comp(H, torch.tensor([2.0]), mask)
    assert torch.equal(b, torch.ones(1, 3))
    H = torch.tensor([[0.5, 1.5, -100.0]])  # the padded -100 must not become H_min
    b = beta_comp(H, torch.tensor([2.0]), mask)
    assert b[0, :2].tolist() == pytest.approx([1.2, 1.0])


# ---- entropy change ----------------------------------------------------------------------


def test_entropy_change_matches_hand_computation():
    logp = torch.log(torch.tensor([[0.5, 0.25, 0.9], [0.2, 0.6, 0.3]]))
    H = torch.tensor([[1.0, 2.0, 0.3], [1.5, 0.5, 9.0]])
    ratio = torch.tensor([[1.0, 1.1, 1.5], [0.7, 0.9, 1.0]])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    adv = torch.tensor([2.0, -1.0])
    Xi = entropy_change(logp, H, ratio, adv, mask, eps_low=0.2, eps_high=0.28)

    pl = (logp.exp() * (logp + H))
    m0, m1 = pl[0].mean(), pl[1, :2].mean()
    # row 0 (A > 0): token 2 has ratio 1.5 > 1.28, clipped, ξ = 0
    want0 = [abs(1.0 * 2.0 * (pl[0, 0] - m0)), abs(1.1 * 2.0 * (pl[0, 1] - m0)), 0.0]
    # row 1 (A < 0): token 0 has ratio 0.7 < 0.8, clipped; token 2 is padding
    want1 = [0.0, abs(0.9 * -1.0 * (pl[1, 1] - m1)), 0.0]
    assert Xi.tolist() == [pytest.approx([float(x) for x in want0], rel=1e-5),
                           pytest.approx([float(x) for x in want1], rel=1e-5)]


# ---- PPO clipping ------------------------------------------------------------------------


def _ppo_at(log_ratio: float, adv: float) -> tuple[float, float]:
    """(loss, d loss / d logp) of a single valid token."""
    logp = torch.tensor([[log_ratio]], dtype=torch.float64, requires_grad=True)
    loss, _ = ppo_loss(logp, torch.zeros(1, 1, dtype=torch.float64),
                       torch.tensor([[adv]], dtype=torch.float64),
                       torch.ones(1, 1, dtype=torch.float64), torch.ones(1, 1, dtype=torch.bool))
    (grad,) = torch.autograd.grad(loss, logp)
    return loss.item(), grad.item()


@pytest.mark.parametrize(
    ("ratio", "adv", "loss", "grad"),
    [
        (1.1, 2.0, -2.2, -2.2),  # inside the band: -ratio·A, d/dlogp = -ratio·A
        (1.5, 2.0, -1.28 * 2.0, 0.0),  # A > 0 above 1 + ε_high: clipped, no gradient
        (0.5, 2.0, -1.0, -1.0),  # A > 0 below 1 - ε_low: unclipped (min picks ratio·A)
        (0.5, -2.0, 0.8 * 2.0, 0.0),  # A < 0 below 1 - ε_low: clipped, no gradient
        (3.0, -2.0, 6.0, 6.0),  # A < 0 above the band, below c: unclipped, loss ratio·|A|
        (40.0, -2.0, 20.0, 0.0),  # A < 0, ratio > c = 10: dual clip caps at c·|A|
    ],
)
def test_ppo_loss_clip_higher_and_dual_clip(ratio: float, adv: float, loss: float, grad: float):
    got_loss, got_grad = _ppo_at(math.log(ratio), adv)
    assert got_loss == pytest.approx(loss, rel=1e-9)
    assert got_grad == pytest.approx(grad, abs=1e-9)


def test_ppo_loss_reports_clip_fractions():
    log_ratio = torch.log(torch.tensor([[1.5, 1.0, 0.5, 40.0]]))
    adv = torch.tensor([[1.0, 1.0, -1.0, -1.0]])
    mask = torch.ones(1, 4, dtype=torch.bool)
    _, stats = ppo_loss(log_ratio, torch.zeros(1, 4), adv, torch.ones(1, 4), mask)
    assert stats["clip/high"].item() == pytest.approx(0.25)
    assert stats["clip/low"].item() == pytest.approx(0.25)
    assert stats["clip/dual"].item() == pytest.approx(0.25)
    assert stats["ratio/mean"].item() == pytest.approx((1.5 + 1.0 + 0.5 + 40.0) / 4)


# ---- micro-batch accumulation -----------------------------------------------------------


def test_micro_batch_accumulation_with_global_token_count_equals_full_batch():
    logits, tokens, mask, g = _batch(s=6, n=5)
    adv_seq = torch.randn(6, generator=g, dtype=torch.float64)
    logp_old = sampled_logprobs(logits, tokens).detach() + 0.3 * torch.randn(6, 5, generator=g)
    logp_mu = logp_old + 0.5 * torch.randn(6, 5, generator=g)
    H = token_entropy(logits)

    def loss_of(rows: slice, n_tokens: int | None) -> torch.Tensor:
        logp = sampled_logprobs(logits[rows], tokens[rows])
        loss, _ = dynamo_loss(logp, H[rows], logp_old[rows], logp_mu[rows], adv_seq[rows],
                              mask[rows], GRPO, n_tokens)
        return loss

    full = loss_of(slice(None), None)
    (g_full,) = torch.autograd.grad(full, logits)
    n_total = int(mask.sum())
    parts = [loss_of(slice(0, 2), n_total), loss_of(slice(2, 6), n_total)]
    for p in parts:
        p.backward()
    assert sum(p.item() for p in parts) == pytest.approx(full.item(), rel=1e-10)
    assert torch.allclose(logits.grad, g_full, atol=1e-12)


# ---- off-policy correction ---------------------------------------------------------------


def test_tis_truncates_weights_at_cap():
    rho = torch.tensor([[0.5, 1.5, 3.0, 100.0]])
    mask = torch.tensor([[True, True, True, False]])
    w, stats = is_weights(rho.log(), torch.zeros(1, 4), mask, "tis", cap=2.0)
    assert w[0].tolist() == pytest.approx([0.5, 1.5, 2.0, 0.0])
    assert stats["is/frac_truncated"].item() == pytest.approx(1 / 3)
    d = rho[0, :3].log()
    assert stats["is/mean_abs_dlogp"].item() == pytest.approx(d.abs().mean().item())
    assert stats["is/kl_k3"].item() == pytest.approx((d.exp() - 1 - d).mean().item())


def test_mask_mode_zeroes_tokens_outside_band():
    rho = torch.tensor([[0.3, 0.5, 1.0, 2.0, 2.5]])
    mask = torch.ones(1, 5, dtype=torch.bool)
    w, stats = is_weights(rho.log(), torch.zeros(1, 5), mask, "mask", mask_low=0.5, mask_high=2.0)
    assert w.tolist() == [[0.0, 1.0, 1.0, 1.0, 0.0]]
    assert stats["is/frac_truncated"].item() == pytest.approx(0.4)


def test_bypass_uses_behaviour_logprobs_as_old_policy():
    logits, tokens, mask, g = _batch()
    adv_seq = torch.randn(4, generator=g, dtype=torch.float64)
    logp = sampled_logprobs(logits, tokens)
    mu = logp.detach() + 0.4 * torch.randn(4, 6, generator=g)
    stale_recompute = logp.detach() - 0.9  # must not enter the bypass loss
    H = token_entropy(logits)
    cfg = dataclasses.replace(GRPO, is_mode="bypass")
    loss, stats = dynamo_loss(logp, H, stale_recompute, mu, adv_seq, mask, cfg)
    ones = torch.ones_like(logp)
    want, _ = ppo_loss(logp, mu, adv_seq.unsqueeze(-1) * ones, ones, mask)
    assert loss.item() == pytest.approx(want.item(), rel=1e-12)
    assert stats["is/frac_truncated"].item() == 0.0
    assert stats["is/mean_abs_dlogp"].item() > 0.0  # still reports the μ / recompute gap


def test_padding_never_reaches_loss_gradient_or_stats():
    logits, tokens, mask, g = _batch()
    adv_seq = torch.randn(4, generator=g, dtype=torch.float64)
    logp = sampled_logprobs(logits, tokens)
    old = logp.detach() + 0.1 * torch.randn(4, 6, generator=g)
    mu = old + 0.1 * torch.randn(4, 6, generator=g)
    H = token_entropy(logits)
    clean, _ = dynamo_loss(logp, H, old, mu, adv_seq, mask, DYNAMO)
    (g_clean,) = torch.autograd.grad(clean, logits, retain_graph=True)

    junk = torch.tensor([float("nan"), float("inf"), -float("inf")])
    fill = junk[torch.arange(mask.numel()) % 3].view_as(mask).double()
    dirty = [torch.where(mask, x, fill) for x in (old, mu, H)]
    loss, stats = dynamo_loss(logp, *dirty[2:], *dirty[:2], adv_seq, mask, DYNAMO)
    (g_dirty,) = torch.autograd.grad(loss, logits)
    assert loss.item() == pytest.approx(clean.item(), rel=1e-12)
    assert torch.equal(g_dirty, g_clean)
    assert all(torch.isfinite(v).all() for v in stats.values())


# ---- composition and presets -------------------------------------------------------------


def test_dynamo_loss_reports_modulation_range():
    logits, tokens, mask, g = _batch(s=6, n=8, seed=3)
    adv_seq = torch.tensor([1.0, -1.0, 0.5, -0.5, 2.0, -2.0], dtype=torch.float64)
    logp = sampled_logprobs(logits, tokens)
    _, stats = dynamo_loss(logp, token_entropy(logits), logp.detach(), logp.detach(), adv_seq,
                           mask, DYNAMO)
    assert stats["beta_comp/max"].item() == pytest.approx(1.2)  # some A>0 token sits at H_min
    assert 1.0 < stats["beta_comp/mean"].item() < 1.2
    assert stats["beta_stab/min"].item() == pytest.approx(0.75102, abs=1e-5)  # the max-Ξ token
    assert 0.75 < stats["beta_stab/mean"].item() < 1.0
    _, plain = dynamo_loss(logp, token_entropy(logits), logp.detach(), logp.detach(), adv_seq,
                           mask, GRPO)
    assert plain["beta_comp/max"].item() == plain["beta_stab/min"].item() == 1.0


def test_presets_share_one_allocation_and_modulation_table():
    assert {p: allocation_rule(p) for p in PRESETS} == {
        "grpo": "uniform", "dynamo": "variance", "alloc-only": "variance",
        "modulation-only": "uniform",
    }
    assert {p: c.modulation for p, c in PRESETS.items()} == {
        "grpo": False, "dynamo": True, "alloc-only": False, "modulation-only": True,
    }
    assert PRESETS["alloc-only"] == PRESETS["grpo"]
    assert PRESETS["modulation-only"] == PRESETS["dynamo"]


def test_config_rejects_dual_clip_inside_the_clip_band():
    with pytest.raises(ValueError, match="dual_clip_c"):
        ObjectiveConfig(dual_clip_c=1.1)
