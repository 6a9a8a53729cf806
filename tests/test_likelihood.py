"""Tests of megatron_mdm.likelihood against exact references computed by enumerating all masks."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from megatron_mdm.likelihood import (
    chain_rule_loglik,
    mc_conditional_loglik,
    mc_conditional_loglik_candidates,
    mc_elbo,
)

V, MASK, EPS = 6, 5, 1e-3  # ids 0..4 are words, 5 is the mask token


class TinyBidirectional(torch.nn.Module):
    """Small random bidirectional mixer over a 6-token vocabulary (float64)."""

    def __init__(self, seed: int, hidden: int = 8, max_len: int = 16):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.emb = torch.nn.Parameter(torch.randn(V, hidden, generator=g, dtype=torch.float64))
        self.pos = torch.nn.Parameter(torch.randn(max_len, hidden, generator=g, dtype=torch.float64))
        self.mix = torch.nn.Parameter(torch.randn(hidden, hidden, generator=g, dtype=torch.float64))
        self.out = torch.nn.Parameter(torch.randn(hidden, V, generator=g, dtype=torch.float64))
        self.requires_grad_(False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.emb[ids] + self.pos[: ids.shape[1]]  # [b, s, h]
        ctx = torch.tanh(h).mean(dim=1, keepdim=True) @ self.mix  # [b, 1, h]
        return torch.tanh(h + ctx) @ self.out * 2.0  # [b, s, V]


@pytest.fixture
def model():
    return TinyBidirectional(seed=int(torch.randint(0, 10_000, ()).item()))


def _seqs(b: int, s: int) -> torch.Tensor:
    return torch.randint(0, MASK, (b, s))


def weight(k: int, n: int, eps: float = EPS) -> float:
    """E_{t~U(eps,1)}[(1/t) t^k (1-t)^(n-k)] in closed form (binomial expansion of (1-t)^(n-k))."""
    total = sum(math.comb(n - k, m) * (-1) ** m * (1 - eps ** (k + m)) / (k + m) for m in range(n - k + 1))
    return total / (1 - eps)


def log_probs(model, ids: list[int], cfg: float = 0.0, prompt_len: int = 0) -> torch.Tensor:
    """log p(. | ids) [s, V], mask token excluded, with CFG computed by hand."""
    x = torch.tensor([ids])
    lg = model(x)[0].clone()
    if cfg:
        un = x.clone()
        un[0, :prompt_len] = MASK
        lu = model(un)[0]
        lg = lu + (cfg + 1) * (lg - lu)
    lg[:, MASK] = -math.inf
    return torch.log_softmax(lg, dim=-1)


def exact_weighted_nll(model, seq: list[int], eligible: list[int], cfg: float = 0.0, prompt_len: int = 0) -> float:
    """E_t E_mask[(1/t) sum_{masked} -log p(x_j | x_t)] by enumerating every subset of ``eligible``."""
    n, total = len(eligible), 0.0
    for k in range(1, n + 1):
        for subset in itertools.combinations(eligible, k):
            noisy = [MASK if i in subset else tok for i, tok in enumerate(seq)]
            lp = log_probs(model, noisy, cfg, prompt_len)
            total += weight(k, n) * sum(-float(lp[j, seq[j]]) for j in subset)
    return total


def test_weight_closed_form():
    # E_t[(1/t) E[#masked]] = E_t[(1/t) n t] = n
    for n in range(1, 6):
        assert math.isclose(sum(math.comb(n, k) * k * weight(k, n) for k in range(1, n + 1)), n, rel_tol=1e-12)


@pytest.mark.parametrize("t_sampling", ["uniform", "antithetic"])
def test_mc_elbo_converges_to_exact(model, t_sampling):
    tokens = _seqs(2, 3)
    r = mc_elbo(model, tokens, MASK, num_samples=20000, t_sampling=t_sampling, eps=EPS,
                generator=torch.Generator().manual_seed(int(torch.randint(0, 2**31, ()))), batch_size=8192)
    for i in range(2):
        exact = exact_weighted_nll(model, tokens[i].tolist(), [0, 1, 2]) / 3
        assert 0 < float(r.stderr[i]) < 0.03 * exact
        assert abs(float(r.nll_per_token[i]) - exact) < 4.5 * float(r.stderr[i]), (float(r.nll_per_token[i]), exact)
    assert torch.allclose(r.perplexity_bound, torch.exp(r.nll_per_token))
    assert r.samples.shape == (2, 20000)


def test_mc_elbo_with_loss_mask_and_padded_vocab(model):
    tokens = _seqs(1, 4)
    loss_mask = torch.tensor([[1, 0, 1, 1]])

    def padded(ids):  # padded vocabulary with huge logits that must be ignored, and a huge mask logit
        lg = model(ids).clone()
        lg[..., MASK] = 1e3
        return torch.cat([lg, torch.full((*lg.shape[:2], 3), 1e3, dtype=lg.dtype)], dim=-1)

    r = mc_elbo(padded, tokens, MASK, num_samples=20000, loss_mask=loss_mask, vocab_size=V,
                generator=torch.Generator().manual_seed(int(torch.randint(0, 2**31, ()))))
    exact = exact_weighted_nll(model, tokens[0].tolist(), [0, 2, 3]) / 3
    assert int(r.num_tokens[0]) == 3
    assert abs(float(r.nll_per_token[0]) - exact) < 4.5 * float(r.stderr[0])


@pytest.mark.parametrize("cfg", [0.0, 0.8])
def test_mc_conditional_converges_to_exact(model, cfg):
    prompt, completion = _seqs(1, 2)[0].tolist(), _seqs(1, 3)[0].tolist()
    r = mc_conditional_loglik(model, prompt, completion, MASK, num_samples=20000, cfg_scale=cfg,
                              generator=torch.Generator().manual_seed(int(torch.randint(0, 2**31, ()))))
    exact = -exact_weighted_nll(model, prompt + completion, [2, 3, 4], cfg, prompt_len=2)
    assert 0 < r.stderr < 0.03 * abs(exact) and r.num_tokens == 3
    assert abs(r.loglik - exact) < 4.5 * r.stderr, (r.loglik, exact)


@pytest.mark.parametrize("cfg", [0.0, 0.8])
def test_candidates_share_draws_and_equal_single_calls(model, cfg):
    seed = int(torch.randint(0, 2**31, ()))
    prompt = _seqs(1, 2)[0].tolist()
    cands = [c.tolist() for c in _seqs(4, 3)]
    many = mc_conditional_loglik_candidates(model, prompt, cands, MASK, 32, cfg_scale=cfg,
                                            generator=torch.Generator().manual_seed(seed), batch_size=10)
    for c, r in zip(cands, many):
        one = mc_conditional_loglik(model, prompt, c, MASK, 32, cfg_scale=cfg,
                                    generator=torch.Generator().manual_seed(seed))
        assert r.loglik == pytest.approx(one.loglik, rel=1e-12) and r.stderr == pytest.approx(one.stderr, rel=1e-9)
    # each estimate still converges to its exact value
    big = mc_conditional_loglik_candidates(model, prompt, cands[:2], MASK, 20000, cfg_scale=cfg,
                                           generator=torch.Generator().manual_seed(seed))
    for c, r in zip(cands[:2], big):
        exact = -exact_weighted_nll(model, prompt + c, [2, 3, 4], cfg, prompt_len=2)
        assert abs(r.loglik - exact) < 4.5 * r.stderr, (r.loglik, exact)
    with pytest.raises(ValueError, match="one length"):
        mc_conditional_loglik_candidates(model, prompt, [[0, 1], [0]], MASK, 4)


def test_mc_is_reproducible_with_a_seed(model):
    tokens = _seqs(2, 5)
    a = mc_elbo(model, tokens, MASK, 64, generator=torch.Generator().manual_seed(3))
    b = mc_elbo(model, tokens, MASK, 64, generator=torch.Generator().manual_seed(3), batch_size=7)
    assert torch.allclose(a.samples, b.samples)


def chain_by_hand(model, prompt, completion, order, cfg=0.0):
    """Explicit step-by-step chain rule."""
    p, c = len(prompt), len(completion)
    x = prompt + [MASK] * c
    total, remaining = 0.0, list(range(p, p + c))
    for step in range(c):
        lp = log_probs(model, x, cfg, p)
        if order == "left_to_right":
            i = p + step
        else:
            best = [float(lp[j].max()) for j in remaining]
            i = remaining[best.index(max(best))]
        total += float(lp[i, completion[i - p]])
        x[i] = completion[i - p]
        remaining.remove(i)
    return total


@pytest.mark.parametrize("order", ["left_to_right", "greedy"])
@pytest.mark.parametrize("cfg", [0.0, 1.3])
def test_chain_rule_equals_hand_sum(model, order, cfg):
    prompt, completion = _seqs(1, 3)[0].tolist(), _seqs(1, 4)[0].tolist()
    r = chain_rule_loglik(model, prompt, completion, MASK, order=order, cfg_scale=cfg, batch_size=3)
    assert math.isclose(r.loglik, chain_by_hand(model, prompt, completion, order, cfg), rel_tol=1e-9, abs_tol=1e-9)
    assert r.loglik < 0


def test_chain_rule_is_greedy_flag(model):
    prompt = _seqs(1, 2)[0].tolist()
    x = prompt + [MASK] * 3
    for _ in range(3):  # build the completion greedy decoding would produce
        lp = log_probs(model, x)
        masked = [j for j in range(len(x)) if x[j] == MASK]
        conf = [float(lp[j].max()) for j in masked]
        j = masked[conf.index(max(conf))]
        x[j] = int(lp[j].argmax())
    greedy_completion = x[2:]
    assert chain_rule_loglik(model, prompt, greedy_completion, MASK, order="greedy").is_greedy
    other = [(t + 1) % MASK for t in greedy_completion]
    assert not chain_rule_loglik(model, prompt, other, MASK, order="greedy").is_greedy


def test_single_token_completion_is_exact_for_both(model):
    """With one completion token the MC bound is exact: log p(x | prompt) for every draw."""
    prompt, tok = _seqs(1, 3)[0].tolist(), int(torch.randint(0, MASK, ()))
    truth = float(log_probs(model, prompt + [MASK])[3, tok])
    mc = mc_conditional_loglik(model, prompt, [tok], MASK, 16, eps=0.0, generator=torch.Generator().manual_seed(0))
    # every draw masks the single token with prob t, weighted 1/t: the mean is exact in expectation only
    assert abs(mc.loglik - truth) < 4.5 * mc.stderr + 1e-9
    assert math.isclose(chain_rule_loglik(model, prompt, [tok], MASK).loglik, truth, rel_tol=1e-12)


def test_rejects_mask_token_in_data(model):
    with pytest.raises(ValueError, match="mask token"):
        mc_elbo(model, torch.tensor([[0, MASK, 1]]), MASK, 4)
    with pytest.raises(ValueError, match="order"):
        chain_rule_loglik(model, [0], [1], MASK, order="random")
