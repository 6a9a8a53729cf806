"""The MDM and ARM objectives against float64 references and exact enumeration (no Megatron needed)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from megatron_mdm.config import ObjectiveConfig
from megatron_mdm.objective import (
    ARMObjective,
    MDMObjective,
    build_objective,
    forward_mask,
    mask_generator,
    sample_t,
)

MASK, PAD = 7, 6


def _fresh_seed() -> int:
    return int(torch.randint(0, 2**31 - 1, (1,)).item())


def _ref_loss_f64(logits, tokens, masked, t):
    """sum over masked positions of CE / t, divided by B*S, in float64 with plain torch."""
    logp = torch.log_softmax(logits.double(), dim=-1)  # [b, s, V]
    ce = -logp.gather(-1, tokens[..., None]).squeeze(-1)  # [b, s]
    b, s = tokens.shape
    total = 0.0
    for i in range(b):
        for j in range(s):
            if masked[i, j]:
                total += ce[i, j].item() / t[i].item()
    return total / (b * s)


def test_mdm_loss_matches_float64_reference():
    g = torch.Generator().manual_seed(_fresh_seed())
    b, s, v = 5, 11, 9
    tokens = torch.randint(0, 6, (b, s), generator=g)
    obj = MDMObjective(ObjectiveConfig(random_length_prob=0.0), MASK, PAD)
    batch = obj.prepare(tokens, None, g)
    assert batch.t is not None and ((batch.t >= 1e-3) & (batch.t < 1)).all()
    masked = batch.inputs == MASK
    assert torch.equal(batch.labels, tokens)  # targets are the clean tokens, never the mask
    logits = torch.randn(b, s, v, generator=g)
    ce = F.cross_entropy(logits.reshape(-1, v), batch.labels.reshape(-1), reduction="none").view(b, s)
    loss_sum, num = obj.loss(batch, ce)
    assert int(num) == b * s
    ref = _ref_loss_f64(logits, tokens, masked, batch.t)
    assert float(loss_sum / num) == pytest.approx(ref, rel=1e-5)


def _exact_weight(k: int, s: int, eps: float) -> float:
    """E_{t~U(eps,1)}[ t^k (1-t)^(s-k) / t ] in float64, by exact polynomial integration (k >= 1)."""
    poly = np.polynomial.Polynomial([1.0])
    for _ in range(s - k):
        poly = poly * np.polynomial.Polynomial([1.0, -1.0])
    poly = poly * np.polynomial.Polynomial([0.0] * (k - 1) + [1.0])
    integ = poly.integ()
    return float((integ(1.0) - integ(eps)) / (1.0 - eps))


class _TinyBidirectional(torch.nn.Module):
    """logits depend on the whole (noisy) sequence: a token embedding plus a mean context vector."""

    def __init__(self, vocab: int, dim: int, g: torch.Generator):
        super().__init__()
        self.emb = torch.randn(vocab, dim, generator=g, dtype=torch.float64)
        self.ctx = torch.randn(dim, dim, generator=g, dtype=torch.float64)
        self.out = torch.randn(dim, vocab, generator=g, dtype=torch.float64)

    def forward(self, x):  # [b, s] -> [b, s, V]
        e = self.emb[x]
        h = torch.tanh(e + (e.mean(1, keepdim=True) @ self.ctx))
        return h @ self.out


@pytest.mark.parametrize("t_sampling", ["uniform", "antithetic"])
def test_mdm_monte_carlo_mean_matches_exact_enumeration(t_sampling):
    g = torch.Generator().manual_seed(_fresh_seed())
    s, vocab, eps = 4, 8, 1e-3  # MASK = 7 is part of the model's vocabulary
    model = _TinyBidirectional(vocab, 6, g)
    x0 = torch.randint(0, 6, (1, s), generator=g)
    # exact: sum over all 2^s masks of P(mask | t) integrated over t, times the 1/t-weighted CE
    exact = 0.0
    for pattern in itertools.product([0, 1], repeat=s):
        k = sum(pattern)
        if k == 0:
            continue
        m = torch.tensor(pattern, dtype=torch.bool)[None]
        xt = torch.where(m, torch.full_like(x0, MASK), x0)
        logp = torch.log_softmax(model(xt), -1)
        ce = -logp.gather(-1, x0[..., None]).squeeze(-1)
        exact += float(ce[m].sum()) * _exact_weight(k, s, eps) / s
    # Monte Carlo through the objective: many independent copies of the sequence in one batch
    n = 40000
    obj = MDMObjective(ObjectiveConfig(eps=eps, t_sampling=t_sampling, random_length_prob=0.0), MASK, PAD)
    batch = obj.prepare(x0.expand(n, s).clone(), None, g)
    logp = torch.log_softmax(model(batch.inputs), -1)
    ce = -logp.gather(-1, batch.labels[..., None]).squeeze(-1)  # [n, s]
    per_seq = (ce * batch.weights.double()).sum(1) / s  # [n]
    mc, stderr = per_seq.mean().item(), per_seq.std().item() / math.sqrt(n)
    assert abs(mc - exact) < 4 * stderr + 1e-9, (mc, exact, stderr)


def test_antithetic_t_is_stratified():
    g = torch.Generator().manual_seed(_fresh_seed())
    b, eps = 16, 1e-3
    t = sample_t(b, eps, g, antithetic=True).double()
    u = (t - eps) / (1 - eps)
    strata = torch.sort(torch.floor(u * b)).values
    assert torch.equal(strata, torch.arange(b, dtype=torch.float64))


def test_loss_mask_positions_never_masked_and_out_of_loss():
    g = torch.Generator().manual_seed(_fresh_seed())
    b, s = 64, 12
    tokens = torch.randint(0, 6, (b, s), generator=g)
    loss_mask = torch.ones(b, s)
    loss_mask[:, :5] = 0  # a prompt
    loss_mask[:, -2:] = 0  # padding
    obj = MDMObjective(ObjectiveConfig(random_length_prob=0.0), MASK, PAD)
    batch = obj.prepare(tokens, loss_mask, g)
    assert torch.equal(batch.inputs[:, :5], tokens[:, :5])
    assert torch.equal(batch.inputs[:, -2:], tokens[:, -2:])
    assert (batch.weights[loss_mask == 0] == 0).all()
    assert int(batch.num_tokens) == int(loss_mask.sum())
    assert (batch.inputs[:, 5:-2] == MASK).any()


def test_mask_token_never_a_target():
    g = torch.Generator().manual_seed(_fresh_seed())
    obj = MDMObjective(ObjectiveConfig(), MASK, PAD)
    tokens = torch.randint(0, 6, (8, 10), generator=g)
    for _ in range(20):
        batch = obj.prepare(tokens, None, g)
        assert not (batch.labels == MASK).any()
        # wherever the input is masked, the target is the original (non-mask) token
        assert torch.equal(batch.labels[batch.inputs == MASK], tokens[batch.inputs == MASK])
    bad = tokens.clone()
    bad[0, 3] = MASK
    with pytest.raises(ValueError, match="mask token"):
        obj.prepare(bad, None, g)


def test_random_length_trick_pads_tail_out_of_loss():
    g = torch.Generator().manual_seed(_fresh_seed())
    b, s = 32, 16
    tokens = torch.randint(0, 6, (b, s), generator=g)
    obj = MDMObjective(ObjectiveConfig(random_length_prob=1.0), MASK, PAD)
    batch = obj.prepare(tokens, None, g)
    is_pad = batch.labels == PAD
    # every row is a prefix followed by pads; pads carry no weight and are not masked
    lengths = (~is_pad).sum(1)
    for i in range(b):
        assert not is_pad[i, : lengths[i]].any() and is_pad[i, lengths[i]:].all()
        assert torch.equal(batch.labels[i, : lengths[i]], tokens[i, : lengths[i]])
    assert (batch.weights[is_pad] == 0).all() and (batch.inputs[is_pad] == PAD).all()
    assert int(batch.num_tokens) == int(lengths.sum())
    assert lengths.min() >= 1 and lengths.float().std() > 0


def test_arm_next_token_targets():
    g = torch.Generator().manual_seed(_fresh_seed())
    tokens = torch.randint(0, 6, (3, 9), generator=g)
    obj = build_objective(ObjectiveConfig(objective="arm"), MASK, PAD)
    assert isinstance(obj, ARMObjective) and obj.causal
    batch = obj.prepare(tokens, None, g)
    assert torch.equal(batch.inputs, tokens)
    assert torch.equal(batch.labels[:, :-1], tokens[:, 1:])
    assert (batch.weights[:, -1] == 0).all() and (batch.weights[:, :-1] == 1).all()
    assert int(batch.num_tokens) == 3 * 8
    logits = torch.randn(3, 9, 11, generator=g)
    ce = F.cross_entropy(logits.reshape(-1, 11), batch.labels.reshape(-1), reduction="none").view(3, 9)
    loss_sum, num = obj.loss(batch, ce)
    ref = -torch.log_softmax(logits.double(), -1)[:, :-1].gather(-1, tokens[:, 1:, None]).mean()
    assert float(loss_sum / num) == pytest.approx(float(ref), rel=1e-6)


def test_mask_generator_depends_on_its_arguments_only():
    a = torch.rand(4, generator=mask_generator(1, 2, 3))
    b = torch.rand(4, generator=mask_generator(1, 2, 3))
    c = torch.rand(4, generator=mask_generator(1, 2, 4))
    d = torch.rand(4, generator=mask_generator(1, 3, 3))
    assert torch.equal(a, b) and not torch.equal(a, c) and not torch.equal(a, d)


def test_forward_mask_rate_matches_t():
    g = torch.Generator().manual_seed(_fresh_seed())
    tokens = torch.zeros(4, 20000, dtype=torch.long)
    t = torch.tensor([0.1, 0.3, 0.6, 0.95])
    noisy, masked = forward_mask(tokens, t, MASK, g)
    rate = masked.float().mean(1)
    assert torch.allclose(rate, t, atol=0.015)
    assert torch.equal(noisy == MASK, masked)
