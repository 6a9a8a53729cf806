"""Tests of megatron_mdm.decoding.loop (the sampler): schedule, blocks, prompt, CFG, determinism, EOS, sampling law."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_mdm.decoding.logits import apply_cfg, model_logits
from megatron_mdm.decoding.loop import generate
from megatron_mdm.decoding.unmasking import num_transfer_tokens

V, MASK = 11, 10  # ids 0..9 are words, 10 is the mask token


class TinyBidirectional(torch.nn.Module):
    """A small random bidirectional mixer: every logit depends on every input position."""

    def __init__(self, vocab: int = V, hidden: int = 16, max_len: int = 64, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.emb = torch.nn.Parameter(torch.randn(vocab, hidden, generator=g, dtype=torch.float64))
        self.pos = torch.nn.Parameter(torch.randn(max_len, hidden, generator=g, dtype=torch.float64))
        self.mix = torch.nn.Parameter(torch.randn(hidden, hidden, generator=g, dtype=torch.float64) / 4)
        self.out = torch.nn.Parameter(torch.randn(hidden, vocab, generator=g, dtype=torch.float64))
        self.requires_grad_(False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.emb[ids] + self.pos[: ids.shape[1]]  # [b, s, h]
        ctx = torch.tanh(h).mean(dim=1, keepdim=True) @ self.mix  # [b, 1, h]
        return torch.tanh(h + ctx) @ self.out * 3.0  # [b, s, V]


class Recorder:
    """LogitsFn wrapper that keeps a copy of every input batch."""

    def __init__(self, fn):
        self.fn, self.inputs = fn, []

    def __call__(self, ids):
        self.inputs.append(ids.clone())
        return self.fn(ids)


@pytest.fixture
def model():
    return TinyBidirectional(seed=int(torch.randint(0, 10_000, ()).item()))


def _prompts(b: int, lo: int, hi: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, MASK, (int(torch.randint(lo, hi + 1, (), generator=g)),), generator=g).tolist()
            for _ in range(b)]


@pytest.mark.parametrize("remasking", ["low_confidence", "random", "margin", "entropy"])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_all_masks_filled_and_prompt_kept(model, remasking, temperature):
    prompts = _prompts(4, 1, 5, seed=7)
    out = generate(model, prompts, gen_length=8, steps=4, block_length=4, mask_id=MASK, temperature=temperature,
                   remasking=remasking, generator=torch.Generator().manual_seed(3))
    for i, p in enumerate(prompts):
        row = out.tokens[i].tolist()
        assert row[: len(p)] == p
        assert MASK not in row[len(p) : len(p) + 8]
        assert out.completions()[i] == row[len(p) : len(p) + 8]


def test_linear_schedule_matches_hand_count():
    for m in range(20):
        for k in range(1, 8):
            plan = num_transfer_tokens(torch.tensor([m]), k)[0].tolist()
            expected = [m // k + (1 if s < m % k else 0) for s in range(k)]
            assert plan == expected and sum(plan) == m


@pytest.mark.parametrize("gen_length,steps,block", [(12, 5, None), (12, 6, 4), (9, 9, 3)])
def test_schedule_and_blocks(model, gen_length, steps, block):
    rec = Recorder(model)
    prompt = _prompts(1, 3, 3, seed=11)
    p = 3
    out = generate(rec, prompt * 2, gen_length, steps, MASK, block_length=block, remasking="random",
                   generator=torch.Generator().manual_seed(0))
    blk = block or gen_length
    per_block = steps // (gen_length // blk)
    assert len(rec.inputs) == steps == out.num_forward
    states = [x for x in rec.inputs] + [out.tokens]
    for j in range(steps):
        b, s = divmod(j, per_block)
        planned = blk // per_block + (1 if s < blk % per_block else 0)
        before = (states[j] == MASK).sum(dim=1)
        after = (states[j + 1] == MASK).sum(dim=1)
        assert (before - after).tolist() == [planned, planned]
        # nothing beyond the current block is unmasked after this step
        assert bool((states[j + 1][:, p + (b + 1) * blk :] == MASK).all())
        # earlier blocks are complete when a block starts
        assert not bool((states[j][:, p : p + b * blk] == MASK).any())


def test_cfg_zero_equals_no_cfg_and_uses_one_batched_forward(model):
    prompts = _prompts(3, 4, 4, seed=5)
    kw = {"gen_length": 6, "steps": 6, "mask_id": MASK, "temperature": 0.8, "remasking": "low_confidence"}
    a = generate(model, prompts, **kw, generator=torch.Generator().manual_seed(1))
    b = generate(model, prompts, **kw, cfg_scale=0.0, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a.tokens, b.tokens)
    rec = Recorder(model)
    c = generate(rec, prompts, **kw, cfg_scale=1.5, generator=torch.Generator().manual_seed(1))
    assert len(rec.inputs) == 6 and all(x.shape[0] == 6 for x in rec.inputs)
    for x in rec.inputs:  # second half: same sequence with the prompt masked
        assert torch.equal(x[3:, 4:], x[:3, 4:]) and bool((x[3:, :4] == MASK).all())
    assert not torch.equal(a.tokens, c.tokens)


def test_cfg_formula_against_manual_combination(model):
    ids = torch.tensor([[1, 2, 3, MASK, MASK]])
    pm = torch.tensor([[True, True, True, False, False]])
    w = 0.7
    cond = model(ids)
    uncond = model(ids.masked_fill(pm, MASK))
    expected = uncond + (w + 1) * (cond - uncond)
    got = model_logits(model, ids, MASK, None, w, pm)
    assert torch.allclose(got[..., :MASK], expected[..., :MASK], atol=1e-12)
    assert bool(torch.isinf(got[..., MASK]).all())
    assert torch.equal(apply_cfg(cond, uncond, 0.0), cond)


def test_deterministic_reproducible_across_wrappers(model):
    prompts = _prompts(5, 2, 6, seed=13)

    def f64(ids):
        return model(ids)

    model32 = TinyBidirectional().float()
    model32.load_state_dict({k: v.float() for k, v in model.state_dict().items()})

    def f32_one_row_at_a_time(ids):
        return torch.cat([model32(ids[i : i + 1]) for i in range(ids.shape[0])])

    for remasking in ("low_confidence", "margin", "entropy"):
        kw = {"gen_length": 8, "steps": 4, "block_length": 4, "mask_id": MASK, "remasking": remasking, "cfg_scale": 0.5}
        a = generate(f64, prompts, **kw)
        b = generate(f64, prompts, **kw)
        c = generate(f32_one_row_at_a_time, prompts, **kw)
        assert torch.equal(a.tokens, b.tokens) and torch.equal(a.tokens, c.tokens)
        # a row of a mixed-length batch equals that row generated alone
        alone = generate(f64, prompts[:1], **kw)
        assert alone.tokens[0, : len(prompts[0]) + 8].tolist() == a.tokens[0, : len(prompts[0]) + 8].tolist()


def test_padded_vocab_and_mask_never_predicted(model):
    def padded(ids):  # huge logits on the mask id and on 5 padding ids
        lg = model(ids)
        lg[..., MASK] = 1e4
        return torch.cat([lg, torch.full((*lg.shape[:2], 5), 1e4, dtype=lg.dtype)], dim=-1)

    out = generate(padded, [[1, 2]], gen_length=6, steps=3, mask_id=MASK, vocab_size=V, temperature=1.0,
                   generator=torch.Generator().manual_seed(0))
    ref = generate(model, [[1, 2]], gen_length=6, steps=3, mask_id=MASK, vocab_size=V, temperature=1.0,
                   generator=torch.Generator().manual_seed(0))
    assert torch.equal(out.tokens, ref.tokens) and int(out.tokens.max()) < MASK


def test_top_k_one_and_tiny_top_p_equal_greedy(model):
    prompts = _prompts(2, 3, 3, seed=2)
    kw = {"gen_length": 6, "steps": 3, "mask_id": MASK}
    greedy = generate(model, prompts, **kw)
    k1 = generate(model, prompts, **kw, temperature=2.0, top_k=1, generator=torch.Generator().manual_seed(0))
    p0 = generate(model, prompts, **kw, temperature=2.0, top_p=1e-6, generator=torch.Generator().manual_seed(0))
    assert torch.equal(greedy.tokens, k1.tokens) and torch.equal(greedy.tokens, p0.tokens)


def test_temperature_sampling_law(model):
    """One masked position, one step: the frequencies follow softmax(logits / T)."""
    n, temp = 20000, 0.7
    out = generate(model, [[3, 4]] * n, gen_length=1, steps=1, mask_id=MASK, temperature=temp,
                   generator=torch.Generator().manual_seed(0))
    freq = torch.bincount(out.tokens[:, 2], minlength=V).double() / n
    logits = model(torch.tensor([[3, 4, MASK]]))[0, 2].double()
    logits[MASK] = -math.inf
    p = torch.softmax(logits / temp, dim=-1)
    assert float((freq - p).abs().max()) < 4 * math.sqrt(0.25 / n)


def test_eos_stop():
    eos = 9
    calls = []

    def rigged(ids):  # predicts EOS with certainty at generated position 2, else a confident "1"
        calls.append(ids.clone())
        lg = torch.zeros(*ids.shape, V)
        lg[..., 1] = 5.0
        lg[:, 4, eos] = 50.0  # prompt length 2 -> position 4 is the third generated token
        return lg

    out = generate(rigged, [[0, 0]], gen_length=8, steps=8, mask_id=MASK, eos_id=eos)
    row = out.tokens[0].tolist()
    assert row[:2] == [0, 0] and row[2:4] == [1, 1] and row[4:] == [eos] * 6
    # the EOS is unmasked first; the row ends once the two positions before it are filled: 3 forwards
    assert out.num_forward == 3 and out.completions() == [[1, 1]]
    assert all(MASK in c[0, 5:].tolist() for c in calls)  # the tail was never sampled
    no_stop = generate(rigged, [[0, 0]], gen_length=8, steps=8, mask_id=MASK)
    assert no_stop.num_forward == 8 and no_stop.tokens[0, 5:].tolist() == [1] * 5


def test_invalid_arguments(model):
    with pytest.raises(ValueError, match="block_length"):
        generate(model, [[1]], gen_length=6, steps=3, mask_id=MASK, block_length=4)
    with pytest.raises(ValueError, match="multiple"):
        generate(model, [[1]], gen_length=6, steps=3, mask_id=MASK, block_length=3)
    with pytest.raises(ValueError, match="remasking"):
        generate(model, [[1]], gen_length=6, steps=3, mask_id=MASK, remasking="nope")
