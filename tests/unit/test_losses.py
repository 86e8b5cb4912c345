"""distill.losses: properties (zero, non-negative, symmetric), references (F.kl_div, TRL's GKD loss,
F.cross_entropy), exact masking, bf16, and argument errors. Tiny random tensors, CPU only."""

import os
import re

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from distill.losses import (
    LossParts,
    distillation_loss,
    forward_kl,
    generalized_jsd,
    hidden_state_loss,
    reverse_kl,
    token_mask,
    topk_kl,
)

SETTINGS = settings(max_examples=40, deadline=None, database=None)
BETAS = [0.0, 0.1, 0.5, 0.9, 1.0]


def randn(*shape, seed=0, scale=1.0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(dtype)


def random_mask(b, l, seed=0):
    g = torch.Generator().manual_seed(seed + 1)
    mask = torch.rand(b, l, generator=g) < 0.6
    mask[0, 0] = True  # at least one counted token
    return mask


def full_topk(teacher_logits):
    """The whole vocabulary as a 'top-k' (K = V), sorted like a real teacher's answer."""
    logprobs = F.log_softmax(teacher_logits, dim=-1)
    ids = logprobs.argsort(dim=-1, descending=True)
    return ids, logprobs.gather(-1, ids)


def all_kl_losses(s, t, **kw):
    """name -> loss for every logits-vs-logits loss (topk with the full vocabulary)."""
    ids, lp = full_topk(t)
    out = {
        "forward": forward_kl(s, t, **kw),
        "reverse": reverse_kl(s, t, **kw),
        "topk": topk_kl(s, ids, lp, **kw),
    }
    out |= {f"jsd{beta}": generalized_jsd(s, t, beta=beta, **kw) for beta in BETAS}
    return out


def kl_div_reference(log_target_of, log_input_of, mask, temperature):
    """Masked token mean of F.kl_div(input, target).sum(-1) * T**2 (= KL(target || input))."""
    inp = F.log_softmax(log_input_of / temperature, dim=-1)
    tgt = F.log_softmax(log_target_of / temperature, dim=-1)
    per_token = F.kl_div(inp, tgt, log_target=True, reduction="none").sum(-1)
    return per_token[mask].mean() * temperature**2


@pytest.fixture(scope="module")
def trl_gjsd():
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from trl.experimental.gkd import GKDTrainer  # a dev dependency: fail, don't skip, if missing

    return GKDTrainer.generalized_jsd_loss


# --- properties ---------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [0.5, 1.0, 3.0])
def test_zero_on_identical_inputs(temperature):
    s = randn(2, 3, 7, scale=3)
    for name, loss in all_kl_losses(s, s.clone(), temperature=temperature).items():
        assert loss.item() == pytest.approx(0.0, abs=1e-5), name
    h = [randn(2, 3, 5, seed=i) for i in range(3)]
    for kind in ("mse", "cosine"):
        assert hidden_state_loss(h, h, {0: 0, 2: 2}, kind=kind).item() == pytest.approx(0, abs=1e-6)


@SETTINGS
@given(
    b=st.integers(1, 3),
    l=st.integers(1, 4),
    v=st.integers(2, 9),
    temperature=st.floats(0.25, 4.0),
    scale=st.floats(0.1, 10.0),
    seed=st.integers(0, 2**16),
)
def test_non_negative_on_random_inputs(b, l, v, temperature, scale, seed):
    s, t = randn(b, l, v, seed=seed, scale=scale), randn(b, l, v, seed=seed + 7, scale=scale)
    mask = random_mask(b, l, seed)
    losses = all_kl_losses(s, t, temperature=temperature, mask=mask)
    k = max(1, v // 2)  # a real top-k: part of the vocabulary only
    ids, lp = full_topk(t)
    losses["topk_half"] = topk_kl(s, ids[..., :k], lp[..., :k], temperature=temperature, mask=mask)
    for name, loss in losses.items():
        assert loss.dim() == 0 and torch.isfinite(loss), name
        assert loss.item() >= -1e-5, name


@SETTINGS
@given(v=st.integers(2, 9), temperature=st.floats(0.25, 4.0), seed=st.integers(0, 2**16))
def test_jsd_symmetric_at_half(v, temperature, seed):
    s, t = randn(2, 3, v, seed=seed, scale=3), randn(2, 3, v, seed=seed + 1, scale=3)
    a = generalized_jsd(s, t, beta=0.5, temperature=temperature)
    b = generalized_jsd(t, s, beta=0.5, temperature=temperature)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# --- references ---------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0, 5.0])
def test_forward_and_reverse_kl_match_kl_div(temperature):
    s, t = randn(3, 5, 11, seed=1, scale=2), randn(3, 5, 11, seed=2, scale=2)
    mask = random_mask(3, 5)
    got = forward_kl(s, t, temperature=temperature, mask=mask)
    torch.testing.assert_close(got, kl_div_reference(t, s, mask, temperature))
    got = reverse_kl(s, t, temperature=temperature, mask=mask)
    torch.testing.assert_close(got, kl_div_reference(s, t, mask, temperature))
    # mask=None counts every token
    full = torch.ones(3, 5, dtype=torch.bool)
    torch.testing.assert_close(forward_kl(s, t), kl_div_reference(t, s, full, 1.0))


def test_temperature_squared_factor_is_applied():
    # For small differences KL at temperature T is ~ Var(s - t) / (2 T**2): times T**2 it
    # tends to a constant. Without the T**2 factor these would differ 4x.
    s, t = randn(2, 4, 16, seed=3), randn(2, 4, 16, seed=4)
    limit = ((s - t) - (s - t).mean(-1, keepdim=True)).pow(2).mean(-1).mean() / 2
    at_20 = forward_kl(s, t, temperature=20.0)
    at_40 = forward_kl(s, t, temperature=40.0)
    assert at_20.item() == pytest.approx(limit.item(), rel=0.05)
    assert at_40.item() == pytest.approx(limit.item(), rel=0.02)
    assert reverse_kl(s, t, temperature=40.0).item() == pytest.approx(limit.item(), rel=0.02)


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("masked", [False, True])
def test_generalized_jsd_matches_trl_at_temperature_one(trl_gjsd, beta, masked):
    s, t = randn(3, 6, 13, seed=5, scale=2), randn(3, 6, 13, seed=6, scale=2)
    mask = random_mask(3, 6) if masked else torch.ones(3, 6, dtype=torch.bool)
    labels = torch.where(mask, torch.randint(0, 13, (3, 6)), -100)
    # TRL's "batchmean" with labels divides by the number of labels != -100: a token mean.
    expected = trl_gjsd(s, t, labels=labels, beta=beta, reduction="batchmean")
    got = generalized_jsd(s, t, beta=beta, mask=mask if masked else None)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_generalized_jsd_is_trl_times_t_squared(trl_gjsd, beta):
    s, t = randn(2, 4, 9, seed=7, scale=2), randn(2, 4, 9, seed=8, scale=2)
    labels = torch.zeros(2, 4, dtype=torch.long)
    expected = 9.0 * trl_gjsd(s, t, labels=labels, beta=beta, temperature=3.0)
    torch.testing.assert_close(generalized_jsd(s, t, beta=beta, temperature=3.0), expected)


def test_jsd_endpoints_are_forward_and_reverse_kl():
    s, t = randn(2, 3, 8, seed=9, scale=2), randn(2, 3, 8, seed=10, scale=2)
    torch.testing.assert_close(generalized_jsd(s, t, beta=0.0), forward_kl(s, t))
    torch.testing.assert_close(generalized_jsd(s, t, beta=1.0), reverse_kl(s, t))


def test_forward_kl_handles_zero_teacher_probabilities():
    s = randn(2, 3, 6, seed=11, scale=2).requires_grad_()
    t = randn(2, 3, 6, seed=12, scale=2)
    t[..., :2] = float("-inf")  # the teacher gives these tokens probability exactly 0
    t.requires_grad_()
    loss = forward_kl(s, t)
    log_p, log_q = F.log_softmax(t[..., 2:], -1), F.log_softmax(s, -1)[..., 2:]
    expected = (log_p.exp() * (log_p - log_q)).sum(-1).mean()
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert torch.isfinite(s.grad).all() and torch.isfinite(t.grad).all()


# --- top-k teachers -----------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_topk_kl_with_full_vocabulary_equals_forward_kl(temperature):
    s, t = randn(2, 4, 10, seed=13, scale=3), randn(2, 4, 10, seed=14, scale=3)
    mask = random_mask(2, 4)
    ids, lp = full_topk(t)
    got = topk_kl(s, ids, lp, temperature=temperature, mask=mask)
    torch.testing.assert_close(got, forward_kl(s, t, temperature=temperature, mask=mask))


def test_topk_kl_by_hand_and_padding_ignored():
    s = randn(1, 2, 8, seed=15, scale=2)
    ids = torch.tensor([[[3, 0, 5], [7, 1, 2]]])
    lp = torch.log(torch.tensor([[[0.5, 0.2, 0.1], [0.6, 0.3, 0.05]]]))
    temperature = 2.0
    p = F.softmax(lp / temperature, dim=-1)  # renormalised over the top-k
    log_q = F.log_softmax(s / temperature, dim=-1).gather(-1, ids)  # student not renormalised
    expected = (p * (p.log() - log_q)).sum(-1).mean() * temperature**2
    got = topk_kl(s, ids, lp, temperature=temperature)
    torch.testing.assert_close(got, expected)
    # two padding conventions: -inf logprob (with any id) and a negative id (with any logprob)
    pad_ids = torch.cat([ids, torch.tensor([[[4, -1], [6, -1]]])], dim=-1)
    pad_lp = torch.cat([lp, torch.tensor([[[float("-inf"), 0.0], [float("-inf"), -0.1]]])], -1)
    torch.testing.assert_close(topk_kl(s, pad_ids, pad_lp, temperature=temperature), expected)


def test_topk_kl_token_without_entries_contributes_zero():
    s = randn(1, 2, 5, seed=16).requires_grad_()
    ids = torch.tensor([[[1, 2], [-1, -1]]])
    lp = torch.tensor([[[-0.5, -1.5], [float("-inf"), float("-inf")]]])
    loss = topk_kl(s, ids, lp)
    only_first = topk_kl(s[:, :1], ids[:, :1], lp[:, :1])
    torch.testing.assert_close(loss, only_first / 2)
    loss.backward()
    assert torch.isfinite(s.grad).all()


# --- masking, dtypes, gradients ----------------------------------------------------------------


def test_masking_is_exact_with_garbage_in_masked_positions():
    b, l, v, d = 2, 5, 9, 6
    s, t = randn(b, l, v, seed=17, scale=2), randn(b, l, v, seed=18, scale=2)
    ids, lp = full_topk(t)
    hs, ht = [randn(b, l, d, seed=19)], [randn(b, l, d, seed=20)]
    mask = random_mask(b, l)

    def compact(x):  # [B, L, ...] -> [1, N, ...]: the counted tokens only
        return x[mask].unsqueeze(0)

    expected = {
        **all_kl_losses(compact(s), compact(t), temperature=2.0),
        "mse": hidden_state_loss([compact(hs[0])], [compact(ht[0])], {0: 0}),
        "cosine": hidden_state_loss([compact(hs[0])], [compact(ht[0])], {0: 0}, kind="cosine"),
    }

    garbage = ~mask
    s = s.masked_fill(garbage[..., None], 1e4).requires_grad_()
    t = t.masked_fill(garbage[..., None], -1e4)
    t[garbage] = t[garbage].index_fill(-1, torch.tensor([0]), 3e4)
    hs = [hs[0].masked_fill(garbage[..., None], 1e4).requires_grad_()]
    ht = [ht[0].masked_fill(garbage[..., None], -1e4)]
    got = all_kl_losses(s, t, temperature=2.0, mask=mask)
    got["topk"] = topk_kl(
        s,
        ids.masked_fill(garbage[..., None], 10**9),
        lp.masked_fill(garbage[..., None], 7.0),
        temperature=2.0,
        mask=mask,
    )  # masked ids out of the vocabulary are never gathered
    got["mse"] = hidden_state_loss(hs, ht, {0: 0}, mask=mask)
    got["cosine"] = hidden_state_loss(hs, ht, {0: 0}, kind="cosine", mask=mask)
    for name, want in expected.items():
        torch.testing.assert_close(got[name], want, msg=name)
        got[name].backward()
    assert torch.isfinite(s.grad).all() and (s.grad[garbage] == 0).all()
    assert torch.isfinite(hs[0].grad).all() and (hs[0].grad[garbage] == 0).all()


def test_no_counted_tokens_gives_zero_with_gradient():
    s = randn(1, 3, 4).requires_grad_()
    loss = forward_kl(s, randn(1, 3, 4, seed=1), mask=torch.zeros(1, 3, dtype=torch.bool))
    assert loss.item() == 0.0
    loss.backward()
    assert (s.grad == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gradients_finite_in_input_dtype(dtype):
    b, l, v = 2, 3, 12
    s32, t32 = randn(b, l, v, seed=21, scale=8), randn(b, l, v, seed=22, scale=8)
    s, t = s32.to(dtype), t32.to(dtype)
    mask = random_mask(b, l)
    labels = torch.where(mask, torch.randint(0, v, (b, l)), -100)
    ids, lp = full_topk(t.float())
    loss_fns = {
        "forward": lambda x: forward_kl(x, t, temperature=2.0, mask=mask),
        "reverse": lambda x: reverse_kl(x, t, temperature=2.0, mask=mask),
        "jsd": lambda x: generalized_jsd(x, t, beta=0.3, temperature=2.0, mask=mask),
        "topk": lambda x: topk_kl(x, ids[..., :4], lp[..., :4].to(dtype), mask=mask),
        "distill": lambda x: distillation_loss(x, t, labels, alpha=0.5, temperature=2.0).total,
    }
    for name, fn in loss_fns.items():
        x = s.clone().requires_grad_()
        loss = fn(x)
        assert loss.dtype == torch.float32 and torch.isfinite(loss), name
        # bf16 inputs are computed exactly as their float32 upcast
        torch.testing.assert_close(loss, fn(x.detach().float()), msg=name)
        loss.backward()
        assert x.grad.dtype == dtype and torch.isfinite(x.grad).all(), name
        assert x.grad.abs().sum() > 0, name

    proj = torch.nn.ModuleDict({"1": torch.nn.Linear(4, 6)})
    hs = [randn(b, l, 4, seed=i, dtype=dtype).requires_grad_() for i in range(2)]
    ht = [randn(b, l, 6, seed=10 + i, dtype=dtype) for i in range(2)]
    for kind in ("mse", "cosine"):
        loss = hidden_state_loss(hs, ht, {1: 1}, proj, kind=kind, mask=mask)
        loss.backward()
        assert torch.isfinite(loss) and hs[1].grad.dtype == dtype
        assert torch.isfinite(hs[1].grad).all() and hs[1].grad.abs().sum() > 0
        assert torch.isfinite(proj["1"].weight.grad).all()


# --- distillation_loss --------------------------------------------------------------------------


def test_distillation_loss_alpha_endpoints_and_mix():
    s, t = randn(2, 5, 7, seed=23, scale=2), randn(2, 5, 7, seed=24, scale=2)
    labels = torch.randint(0, 7, (2, 5))
    labels[0, :2] = -100
    mask = token_mask(labels)
    ce = F.cross_entropy(s.reshape(-1, 7), labels.reshape(-1), ignore_index=-100)

    soft_only = distillation_loss(s, t, labels, alpha=1.0, temperature=2.0)
    assert isinstance(soft_only, LossParts)
    torch.testing.assert_close(soft_only.total, forward_kl(s, t, temperature=2.0, mask=mask))
    torch.testing.assert_close(soft_only.hard, ce)

    hard_only = distillation_loss(s, t, labels, alpha=0.0, temperature=2.0, kind="reverse")
    torch.testing.assert_close(hard_only.total, ce)
    torch.testing.assert_close(hard_only.soft, reverse_kl(s, t, temperature=2.0, mask=mask))

    mixed = distillation_loss(s, t, labels, alpha=0.3, temperature=1.5, kind="jsd", beta=0.2)
    soft = generalized_jsd(s, t, beta=0.2, temperature=1.5, mask=mask)
    torch.testing.assert_close(mixed.soft, soft)
    torch.testing.assert_close(mixed.total, 0.3 * soft + 0.7 * ce)


@pytest.mark.parametrize(
    ("kwargs", "value"),
    [
        ({"kind": "bogus"}, "'bogus'"),
        ({"alpha": 1.5}, "1.5"),
        ({"alpha": -0.1}, "-0.1"),
        ({"temperature": 0.0}, "0.0"),
        ({"temperature": -2.0}, "-2.0"),
        ({"kind": "jsd", "beta": 1.2}, "1.2"),
    ],
)
def test_distillation_loss_bad_arguments(kwargs, value):
    s = randn(1, 2, 3)
    labels = torch.zeros(1, 2, dtype=torch.long)
    args = {"alpha": 0.5, "temperature": 1.0} | kwargs
    with pytest.raises(ValueError, match=re.escape(value)):
        distillation_loss(s, s, labels, **args)


def test_loss_functions_reject_bad_arguments():
    s = randn(1, 2, 3)
    with pytest.raises(ValueError, match="temperature must be > 0, got 0"):
        forward_kl(s, s, temperature=0)
    with pytest.raises(ValueError, match="beta must be in the range"):
        generalized_jsd(s, s, beta=-0.5)
    with pytest.raises(ValueError, match=re.escape("(1, 2, 3)")):
        reverse_kl(s, randn(1, 2, 4))
    with pytest.raises(ValueError, match="mask shape"):
        forward_kl(s, s, mask=torch.ones(2, 1, dtype=torch.bool))


# --- hidden states ------------------------------------------------------------------------------


def test_hidden_state_loss_values_and_layer_map_forms():
    hs = [randn(2, 3, 4, seed=i) for i in range(3)]
    ht = [randn(2, 3, 4, seed=10 + i) for i in range(5)]
    mse = ((hs[1] - ht[2]).pow(2).mean() + (hs[2] - ht[4]).pow(2).mean()) / 2
    torch.testing.assert_close(hidden_state_loss(hs, ht, {1: 2, 2: 4}), mse)
    torch.testing.assert_close(hidden_state_loss(hs, ht, [(1, 2), (2, 4)]), mse)
    cos = 1 - F.cosine_similarity(hs[1], ht[2], dim=-1).mean()
    torch.testing.assert_close(hidden_state_loss(hs, ht, {1: 2}, kind="cosine"), cos)
    # cosine ignores scale; mse does not
    doubled = [2 * h for h in hs]
    torch.testing.assert_close(
        hidden_state_loss(doubled, hs, {1: 1}, kind="cosine"), torch.tensor(0.0), atol=1e-6, rtol=0
    )
    assert hidden_state_loss(doubled, hs, {1: 1}).item() > 0.1


def test_hidden_state_loss_projection_when_widths_differ():
    hs = [randn(2, 3, 4, seed=i) for i in range(2)]
    ht = [randn(2, 3, 8, seed=10 + i) for i in range(2)]
    with pytest.raises(
        ValueError, match=r"student layer 1 has width 4 .* teacher layer 0 has width 8"
    ):
        hidden_state_loss(hs, ht, {1: 0})
    proj = torch.nn.ModuleDict({"1": torch.nn.Linear(4, 8)})
    got = hidden_state_loss(hs, ht, {1: 0}, proj)
    torch.testing.assert_close(got, (proj["1"](hs[1]) - ht[0]).pow(2).mean())
    got.backward()
    assert proj["1"].weight.grad is not None


def test_hidden_state_loss_bad_arguments():
    h = [randn(1, 2, 3)]
    with pytest.raises(ValueError, match="'l1'"):
        hidden_state_loss(h, h, {0: 0}, kind="l1")
    with pytest.raises(ValueError, match="layer_map is empty"):
        hidden_state_loss(h, h, {})
