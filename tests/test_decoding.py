"""Tests of megatron_mdm.decoding: the one loop, the KV cache (prefix, dual), parallel unmasking rules.

References, each independent of the code under test:
* the sampler as it was before the decoding package (``legacy_sampling.py``, frozen): cache off and
  the schedule rule, or threshold 1.0 / a vanishing factor with one token per step, must equal it token
  for token, on a toy mixer and on the exported Hugging Face model;
* the uncached decoding: a cache re-recorded at every step must equal it token for token;
* a fresh full forward: the cached K/V (recomputed here from the k/v projections captured by hooks and
  RoPE in float64) and the logits of a window served from a cache recorded on the same input, to 1e-5;
* plain-Python loops for the threshold and factor counts (Fast-dLLM's rules as written in its paper).
The Megatron backend gets the same checks in one spawned process (``megatron_decoding_job``).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from dist import run_distributed
from legacy_sampling import generate as legacy_generate
from test_sampling import MASK, Recorder, TinyBidirectional, V

from megatron_mdm.decoding import generate
from megatron_mdm.decoding.backends.hf import HFForward
from megatron_mdm.decoding.unmasking import count_factor, count_threshold

REPO = Path(__file__).resolve().parents[1]


def tiny_mdm(seed: int, vocab: int = 16, mask_id: int = MASK, sharp: float = 1.0):
    """A random 2-layer GQA bidirectional Llama (the exported class), head scaled by ``sharp``."""
    from megatron_mdm.hf.modeling.configuration_mdm import MDMConfig
    from megatron_mdm.hf.modeling.modeling_mdm import MDMForMaskedLM

    torch.manual_seed(seed)
    cfg = MDMConfig(mask_token_id=mask_id, vocab_size=vocab, hidden_size=32, intermediate_size=64,
                    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                    rope_theta=100.0)
    model = MDMForMaskedLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0, 0.3)
        model.lm_head.weight.mul_(sharp)
    return model


def plain(model):
    """The model as a plain LogitsFn (full forward, every position), as before the decoding package."""
    def fn(ids):
        with torch.no_grad():
            return model(input_ids=ids).logits.float()
    return fn


def _prompts(b: int, lo: int, hi: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, MASK, (int(torch.randint(lo, hi + 1, (), generator=g)),), generator=g).tolist()
            for _ in range(b)]


def _seed() -> int:
    return int(torch.randint(0, 10_000, ()))


# ---- cache off, schedule rule: today's sampler -----------------------------------------------------

SETTINGS = [
    {"remasking": "low_confidence", "temperature": 0.0, "cfg_scale": 0.0},
    {"remasking": "low_confidence", "temperature": 0.9, "cfg_scale": 1.5, "top_k": 5},
    {"remasking": "random", "temperature": 1.0, "cfg_scale": 0.0},
    {"remasking": "margin", "temperature": 0.0, "cfg_scale": 0.7, "eos_id": 9},
    {"remasking": "entropy", "temperature": 0.5, "cfg_scale": 0.0, "top_p": 0.8, "eos_id": 9},
]


@pytest.mark.parametrize("kw", SETTINGS)
def test_cache_off_equals_legacy_sampler(kw):
    """Rows grouped by prompt length (the toy model) as the legacy sampler; the HF model decodes prompts of
    several lengths as one padded batch (tested below), so it gets prompts of one length here."""
    seed = _seed()
    toy = TinyBidirectional(seed=seed)
    hf = tiny_mdm(seed, vocab=V + 5)  # padded vocabulary: logits beyond V are dropped
    prompts = _prompts(4, 2, 5, seed)
    for model, new, rows in ((toy, toy, prompts), (plain(hf), HFForward(hf), _prompts(4, 4, 4, seed))):
        for gen, steps, block in ((8, 4, 4), (12, 12, 3)):
            args = dict(kw, gen_length=gen, steps=steps, block_length=block, mask_id=MASK, vocab_size=V)
            ref = legacy_generate(model, rows, **args, generator=torch.Generator().manual_seed(seed))
            out = generate(new, rows, **args, generator=torch.Generator().manual_seed(seed))
            assert torch.equal(out.tokens, ref.tokens), (kw, gen, steps, block)
            assert out.num_forward == ref.num_forward


PADDED = [
    {"cache": "none"}, {"cache": "prefix", "cfg_scale": 0.7}, {"cache": "dual", "remasking": "margin"},
    {"cache": "dual", "threshold": 0.5, "eos_id": 9}, {"cache": "prefix", "factor": 1.0, "refresh_interval": 2},
]


@pytest.mark.parametrize("kw", PADDED)
def test_padded_batch_gives_each_row_its_tokens_alone(kw):
    """Prompts of several lengths in one left-padded batch (the pad keys masked, positions per row) decode to the
    tokens each prompt gets alone (greedy: no random stream to share), in fewer forwards."""
    seed = _seed()
    fn = HFForward(tiny_mdm(seed, sharp=3.0))
    assert fn.supports_padding
    prompts = _prompts(5, 1, 6, seed)
    args = dict(kw, gen_length=12, steps=12, block_length=4, mask_id=MASK, vocab_size=V)
    batch = generate(fn, prompts, **args)
    for i, p in enumerate(prompts):
        alone = generate(fn, [p], **args)
        assert batch.tokens[i, : len(p) + 12].tolist() == alone.tokens[0].tolist(), (kw, i)
        assert batch.forwards_per_row[i] == alone.forwards_per_row[0]
    if "threshold" not in kw and "factor" not in kw and "eos_id" not in kw:
        assert batch.num_forward == 12  # one batch, not one per prompt length


@pytest.mark.parametrize("remasking", ["low_confidence", "margin"])
def test_threshold_one_and_vanishing_factor_are_one_token_per_step(remasking):
    seed = _seed()
    prompts = _prompts(3, 3, 3, seed)
    hf = tiny_mdm(seed, vocab=V)
    for model, new in ((TinyBidirectional(seed=seed),) * 2, (plain(hf), HFForward(hf))):
        for temperature in (0.0, 1.0):
            args = {"gen_length": 8, "block_length": 4, "mask_id": MASK, "remasking": remasking,
                    "temperature": temperature, "cfg_scale": 0.5}
            ref = legacy_generate(model, prompts, steps=8, **args, generator=torch.Generator().manual_seed(seed))
            for rule in ({"threshold": 1.0}, {"factor": 1e-12}):
                out = generate(new, prompts, steps=2, **args, **rule, generator=torch.Generator().manual_seed(seed))
                assert torch.equal(out.tokens, ref.tokens), (rule, temperature)
                assert out.num_forward == ref.num_forward and out.forwards_per_row == [8, 8, 8]


# ---- the parallel unmasking rules ----------------------------------------------------------------


def _threshold_by_hand(scores: list[float], thr: float) -> int:
    if not scores:
        return 0
    return max(1, sum(1 for c in scores if c > thr))


def _factor_by_hand(scores: list[float], factor: float) -> int:
    """Fast-dLLM's factor rule: the largest n with (n + 1)(1 - c_n) <= factor, sorted c, n >= 1."""
    c = sorted(scores, reverse=True)
    n = 1 if c else 0
    for j in range(2, len(c) + 1):
        if (j + 1) * (1 - c[j - 1]) <= factor * (1 + 1e-12):
            n = j
        else:
            break
    return n


def test_threshold_and_factor_counts_match_plain_loops():
    g = torch.Generator().manual_seed(_seed())
    for _ in range(200):
        rows, n = int(torch.randint(1, 4, (), generator=g)), int(torch.randint(1, 9, (), generator=g))
        score = torch.rand(rows, n, generator=g, dtype=torch.float64) ** 0.3
        cand = torch.rand(rows, n, generator=g) < 0.7
        thr, factor = float(torch.rand((), generator=g)), float(torch.rand((), generator=g) * 3)
        ct, cf = count_threshold(score, cand, thr).tolist(), count_factor(score, cand, factor).tolist()
        for i in range(rows):
            scores = score[i][cand[i]].tolist()
            assert ct[i] == _threshold_by_hand(scores, thr)
            assert cf[i] == _factor_by_hand(scores, factor)


def test_threshold_unmasks_every_confident_position_each_step():
    model = TinyBidirectional(seed=_seed())
    with torch.no_grad():
        model.out.mul_(3.0)  # confident enough that several positions pass
    rec = Recorder(model)
    thr, gen, p = 0.6, 12, 3
    out = generate(rec, [[1, 2, 3]], gen_length=gen, steps=gen, block_length=4, mask_id=MASK, threshold=thr)
    states = rec.inputs + [out.tokens]
    assert out.num_forward == len(rec.inputs) < gen  # parallel: fewer forwards than tokens
    for before, after in zip(states[:-1], states[1:]):
        masked = before[0] == MASK
        blk = (int(masked.nonzero()[0]) - p) // 4  # the block being decoded
        in_block = torch.zeros_like(masked)
        in_block[p + 4 * blk : p + 4 * (blk + 1)] = True
        probs = torch.softmax(model(before)[0, :, :MASK].double(), dim=-1)  # [s, V - 1]: mask excluded
        conf = probs.max(dim=-1).values
        expected = max(1, int((masked & in_block & (conf > thr)).sum()))
        filled = before[0] != after[0]
        assert int(filled.sum()) == expected
        assert bool((filled <= (masked & in_block)).all())
        assert torch.equal(after[0][filled], probs.argmax(-1)[filled])


# ---- the KV cache ------------------------------------------------------------------------------------


def _rope(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotate-half RoPE in float64. x: [b, heads, s, d]."""
    d = x.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = positions.double()[:, None] * inv[None, :]  # [s, d/2]
    cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()
    x = x.double()
    rot = torch.cat([-x[..., d // 2 :], x[..., : d // 2]], dim=-1)
    return x * cos + rot * sin


def test_cached_kv_and_window_logits_equal_a_fresh_forward():
    model = tiny_mdm(_seed(), sharp=3.0)
    fn = HFForward(model)
    x = torch.randint(0, MASK, (3, 20))
    x[:, 9:] = MASK  # a prompt, a partly decoded block, masked suffix
    x[:, 11] = 4
    lo, hi = 8, 12
    captured = {}
    hooks = [m.register_forward_hook(lambda mod, a, out, key=(i, kind): captured.__setitem__(key, out))
             for i, layer in enumerate(model.model.layers)
             for kind, m in (("k", layer.self_attn.k_proj), ("v", layer.self_attn.v_proj))]
    full = fn(x)  # a fresh forward, no cache anywhere
    for h in hooks:
        h.remove()
    for mode in ("dual", "prefix"):
        cache = fn.new_cache()
        cache.record(lo, hi if mode == "dual" else None)
        recorded = fn.forward(x, select=slice(lo, hi), cache=cache)
        assert torch.allclose(recorded, full[:, lo:hi], atol=1e-5)
        for i in range(2):
            k = captured[(i, "k")].view(3, 20, 2, 8).transpose(1, 2)  # [b, kv heads, s, d]
            v = captured[(i, "v")].view(3, 20, 2, 8).transpose(1, 2)
            k = _rope(k, torch.arange(20), 100.0)
            ck, cv = cache.keys[i], cache.values[i]  # the recording forward's own K/V, whole sequence
            assert torch.allclose(ck.double(), k, atol=1e-5)
            assert torch.allclose(cv.double(), v.double(), atol=1e-5)
            kept = {i: (ck[:, :, :lo].clone(), ck[:, :, hi:].clone())}
        cache.window(lo, hi if mode == "dual" else 20)
        window = x[:, lo:hi] if mode == "dual" else x[:, lo:]
        got = fn.forward(window, select=None if mode == "dual" else slice(0, hi - lo), start=lo, cache=cache)
        assert torch.allclose(got, full[:, lo:hi], atol=1e-5), mode
        # the window wrote its K/V in place: the cached prefix (and, dual, suffix) are untouched
        before, after = kept[1], cache.keys[1]
        assert torch.equal(after[:, :, :lo], before[0])
        if mode == "dual":
            assert torch.equal(after[:, :, hi:], before[1])
    # a token of the block changes: the window sees it, the stale cached suffix does not
    y = x.clone()
    y[:, 10] = 5
    got = fn.forward(y[:, lo:hi], start=lo, cache=cache_dual(fn, x, lo, hi))
    assert not torch.allclose(got, full[:, lo:hi], atol=1e-3)
    mask = torch.rand(3, 20) < 0.3
    assert torch.allclose(fn.forward(x, select=mask), full[mask], atol=1e-6)


def cache_dual(fn, x, lo, hi):
    cache = fn.new_cache()
    cache.record(lo, hi)
    fn.forward(x, select=slice(lo, hi), cache=cache)
    cache.window(lo, hi)
    return cache


@pytest.mark.parametrize("shift", [False, True])
def test_window_logits_of_the_loop_equal_its_full_forward(shift):
    """The loop's window forwards (prefix, dual; CFG; a --shift-logits model, whose windows start one
    position earlier) give the logits of its recording full forward when nothing changed in between."""
    from megatron_mdm.decoding.loop import _BlockForward, _Settings

    model = tiny_mdm(_seed(), sharp=3.0)
    model.config.shift_logits = shift
    fn = HFForward(model)
    assert fn.shift == shift
    x = torch.randint(0, MASK, (2, 20))
    x[:, 12:] = MASK
    pm = torch.zeros_like(x, dtype=torch.bool)
    pm[:, :6] = True
    for cache in ("prefix", "dual"):
        for cfg_scale in (0.0, 1.5):
            s = _Settings(12, 4, 4, 0.0, None, None, "low_confidence", cfg_scale, MASK, None, V, cache, None, None,
                          None)
            fwd = _BlockForward(fn, s, pm)
            for lo in (0, 8, 12, 16):  # lo = 0: a shifted window cannot start earlier
                full = fwd.logits(x, lo, lo + 4, refresh=True)  # [b, 4, V]
                window = fwd.logits(x, lo, lo + 4, refresh=False)
                # float32 logits of magnitude ~20, amplified (1 + w) times by CFG: 1e-5 relative
                where = f"{cache} cfg {cfg_scale} lo {lo}"
                torch.testing.assert_close(window, full, atol=1e-4, rtol=1e-5, msg=lambda m, w=where: f"{w}: {m}")
    if shift:  # entry i comes from the network's output at position i - 1
        s = _Settings(12, 4, 4, 0.0, None, None, "low_confidence", 0.0, MASK, None, V, "dual", None, None, None)
        aligned = _BlockForward(fn, s, pm).logits(x, 8, 12, refresh=True)[..., :MASK]
        model.config.shift_logits = False
        raw = HFForward(model)(x)[:, 7:11, :MASK]
        assert torch.allclose(aligned, raw, atol=1e-5)


@pytest.mark.parametrize("cache", ["prefix", "dual"])
def test_cache_refreshed_every_step_equals_no_cache(cache):
    seed = _seed()
    fn = HFForward(tiny_mdm(seed, sharp=3.0))
    prompts = _prompts(3, 2, 5, seed)
    for kw in ({"temperature": 0.0, "cfg_scale": 0.0}, {"temperature": 1.0, "cfg_scale": 1.5},
               {"temperature": 0.0, "cfg_scale": 0.5, "threshold": 0.5}, {"temperature": 0.7, "factor": 1.0}):
        args = dict(kw, gen_length=12, steps=12, block_length=4, mask_id=MASK, vocab_size=V, eos_id=9)
        ref = generate(fn, prompts, **args, generator=torch.Generator().manual_seed(seed))
        out = generate(fn, prompts, **args, cache=cache, refresh_interval=1,
                       generator=torch.Generator().manual_seed(seed))
        assert torch.equal(out.tokens, ref.tokens), kw
        assert out.num_forward == ref.num_forward and out.forwards_per_row == ref.forwards_per_row


def test_cached_decoding_fills_everything_and_counts_forwards():
    seed = _seed()
    fn = HFForward(tiny_mdm(seed, sharp=4.0))
    prompts = _prompts(4, 2, 5, seed)
    rec = Recorder(fn)  # a plain function around it: no cache support
    with pytest.raises(ValueError, match="KV cache"):
        generate(rec, prompts, gen_length=8, steps=8, mask_id=MASK, cache="dual")
    for cache in ("prefix", "dual"):
        sched = generate(fn, prompts, gen_length=16, steps=16, block_length=4, mask_id=MASK, vocab_size=V,
                         cache=cache)
        assert sched.num_forward == 16  # prompts of several lengths: one padded batch
        fast = generate(fn, prompts, gen_length=16, steps=16, block_length=4, mask_id=MASK, vocab_size=V,
                        cache=cache, threshold=0.3)
        for out in (sched, fast):
            for row, p in zip(out.tokens.tolist(), out.prompt_lengths):
                assert MASK not in row[p : p + 16] and max(row[p : p + 16]) < V
        assert all(4 <= n <= 16 for n in fast.forwards_per_row)
        assert fast.num_forward <= sched.num_forward


def test_forwards_per_row_with_eos():
    eos = 9

    def rigged(ids):  # row 0: EOS right away at its first generated position; row 1: never EOS
        lg = torch.zeros(*ids.shape, V)
        lg[..., 1] = 5.0
        lg[0, 2, eos] = 50.0
        return lg

    out = generate(rigged, [[0, 0], [0, 0]], gen_length=8, steps=8, block_length=4, mask_id=MASK, eos_id=eos,
                   progress=True)  # the bar is off without a terminal; its updates still run
    assert out.forwards_per_row == [1, 8] and out.num_forward == 8
    assert out.completions() == [[], [1] * 8]


def test_invalid_settings():
    model = TinyBidirectional()
    bad = [({"threshold": 0.9, "factor": 1.0}, "one of them"), ({"threshold": 0.9, "remasking": "entropy"}, "0, 1"),
           ({"threshold": 1.5}, "threshold"), ({"factor": 0.0}, "factor"), ({"cache": "full"}, "cache"),
           ({"cache": "dual", "refresh_interval": 0}, "refresh_interval")]
    for kw, msg in bad:
        with pytest.raises(ValueError, match=msg):
            generate(model, [[1]], gen_length=4, steps=4, mask_id=MASK, **kw)


# ---- mdm-generate ----------------------------------------------------------------------------------

WORDS = ["the", "cat", "dog", "sat", "ran", "on", "mat", "a", "is", "red", "blue", "big"]


def make_mdm_dir(path: Path, seed: int) -> Path:
    """An exported-style MDM directory: MDMForMaskedLM weights of ``model_type`` eurobert (as mdm-convert writes a
    plain Llama MDM), the shipped code, a word-level tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[EOS]", "[MASK]"]
    vocab = {w: i for i, w in enumerate(specials + WORDS)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="[PAD]", unk_token="[UNK]", eos_token="[EOS]",
                                  mask_token="[MASK]")
    from megatron_mdm.hf import modeling as hf_modeling

    model = tiny_mdm(seed, vocab=len(vocab), mask_id=3, sharp=4.0)
    model.config.eos_token_id = 2
    model.save_pretrained(path)
    for name, src in hf_modeling.shipped_files().items():  # what mdm-convert to-hf ships
        shutil.copy(src, path / name)
    tok.save_pretrained(path)
    config = json.loads((path / "config.json").read_text())
    config.update(model_type=hf_modeling.STOCK_MODEL_TYPE, auto_map=hf_modeling.AUTO_MAP)
    (path / "config.json").write_text(json.dumps(config))
    return path


def _cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "megatron_mdm.cli.generate", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300, check=False, stdin=subprocess.DEVNULL)


def test_cli_generate_cache_threshold_and_forwards(tmp_path):
    d = make_mdm_dir(tmp_path / "mdm", _seed())
    base = ["--model", str(d), "--prompt", "the cat", "--prompt", "a dog is", "--gen-length", "8",
            "--steps", "8", "--block-length", "4", "--no-eos-stop", "--json"]
    p = _cli([*base, "--cache", "dual", "--threshold", "0.3"], tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    # (a tokenizer prompt about remote code may precede the JSON on stdout: another issue's business)
    rows = [json.loads(x[x.index("{"):]) for x in p.stdout.splitlines() if "{" in x]
    assert [r["prompt"] for r in rows] == ["the cat", "a dog is"]
    assert all(len(r["ids"]) == 8 and 3 not in r["ids"] and 2 <= r["forwards"] <= 8 for r in rows)



def test_cli_generate_bad_decoding_flags_one_line(tmp_path, capsys):
    from megatron_mdm.cli.generate import main

    for flags, msg in ((["--threshold", "0.5", "--factor", "1"], "threshold and factor"),
                       (["--threshold", "0.5", "--remasking", "random"], "remasking"),
                       (["--block-length", "3"], "block_length")):
        # checked before the model is loaded: the directory need not exist
        assert main(["--model", str(tmp_path / "none"), "--gen-length", "8", *flags]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("mdm-generate: error:") and msg in err[0]


# ---- the Megatron backend ------------------------------------------------------------------------


def megatron_decoding_job(rank: int, world: int, seed: int) -> dict:
    """MegatronForward: window logits and K/V vs a fresh forward, refresh-every-step = no cache, legacy."""
    from megatron_mdm import runtime
    from megatron_mdm.config import Config
    from megatron_mdm.decoding.backends.megatron import MegatronForward
    from megatron_mdm.models.build import build_model

    cfg = Config()
    cfg.model.num_query_groups = 2
    cfg.model.rotary_base = 100
    cfg.data.seq_length = 32
    runtime.init_distributed(cfg.parallel, cfg.model.num_layers)
    runtime.set_seed(seed)
    model = build_model(cfg, V, causal=False)[0].eval()
    with torch.no_grad():
        model.output_layer.weight.mul_(100.0)  # confident predictions: threshold steps unmask several
    fn = MegatronForward([model])
    out: dict = {}
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, MASK, (2, 20), generator=g)
    x[:, 10:] = MASK
    lo, hi = 8, 12
    qkv = {}
    hooks = [layer.self_attention.linear_qkv.register_forward_hook(
        lambda m, a, o, i=i: qkv.__setitem__(i, o[0])) for i, layer in enumerate(model.decoder.layers)]
    full = fn(x)  # [b, s, padded V]
    for h in hooks:
        h.remove()
    errs = []
    for mode in ("dual", "prefix"):
        cache = fn.new_cache()
        cache.record(lo, hi if mode == "dual" else None)
        errs.append(float((fn.forward(x, select=slice(lo, hi), cache=cache) - full[:, lo:hi]).abs().max()))
        for i in range(cfg.model.num_layers):
            # linear_qkv rows per query group: [q heads of the group..., k, v], head dim 16
            mixed = qkv[i].view(20, 2, 2, 4 * 16)  # [s, b, groups, (2 q + k + v) * d]
            k = _rope(mixed[..., 32:48].permute(1, 2, 0, 3), torch.arange(20), 100.0).permute(2, 0, 1, 3)
            v = mixed[..., 48:64]
            ck, cv = cache.keys[i], cache.values[i]  # the recording forward's K/V, whole sequence
            errs += [float((ck.double() - k).abs().max()), float((cv - v).abs().max())]
        cache.window(lo, hi if mode == "dual" else 20)
        window = x[:, lo:hi] if mode == "dual" else x[:, lo:]
        got = fn.forward(window, select=None if mode == "dual" else slice(0, hi - lo), start=lo, cache=cache)
        errs.append(float((got - full[:, lo:hi]).abs().max()))
    sel = torch.rand(2, 20, generator=g) < 0.4
    errs.append(float((fn.forward(x, select=sel) - full[sel]).abs().max()))
    out["max_err"] = max(errs)
    prompts = _prompts(3, 2, 4, seed)
    same = []
    for kw in ({"temperature": 0.0, "cfg_scale": 0.0}, {"temperature": 1.0, "cfg_scale": 1.5},
               {"temperature": 0.0, "cfg_scale": 0.0, "threshold": 0.6}):
        args = dict(kw, gen_length=12, steps=12, block_length=4, mask_id=MASK, vocab_size=V)
        ref = generate(fn, prompts, **args, generator=torch.Generator().manual_seed(seed))
        for cache in ("prefix", "dual"):
            got = generate(fn, prompts, **args, cache=cache, refresh_interval=1,
                           generator=torch.Generator().manual_seed(seed))
            same.append(torch.equal(got.tokens, ref.tokens) and got.num_forward == ref.num_forward)
        if "threshold" not in kw:
            out["schedule_forwards"] = ref.num_forward  # one token per step: steps x prompt-length groups
            legacy = legacy_generate(lambda ids: model(ids, torch.arange(ids.shape[1])[None], None), prompts, **args,
                                     generator=torch.Generator().manual_seed(seed))
            same.append(torch.equal(legacy.tokens, ref.tokens))
        else:
            out["threshold_forwards"] = ref.num_forward
    fast = generate(fn, prompts, gen_length=12, steps=12, block_length=4, mask_id=MASK, vocab_size=V, cache="dual",
                    threshold=0.6)
    out["dual_filled"] = all(MASK not in r[p : p + 12] for r, p in zip(fast.tokens.tolist(), fast.prompt_lengths))
    out["same"] = same
    return out


@pytest.mark.dist
def test_megatron_backend_cache_and_selection():
    r = run_distributed(megatron_decoding_job, 1, _seed())[0]
    assert r["max_err"] <= 1e-5, r
    assert all(r["same"]) and len(r["same"]) == 8, r
    # the threshold unmasks several tokens in some steps: fewer forwards than the schedule's one per token (the
    # prompts' lengths are drawn, and each length is its own batch: 12 forwards per distinct length)
    assert r["dual_filled"] and r["threshold_forwards"] < r["schedule_forwards"], r
    assert math.isfinite(r["max_err"])


def test_cli_generate_beyond_the_trained_length(tmp_path):
    """Hostile case (issue 21): a prompt longer than the length the model was trained on ran without a word. A
    rotary-position model warns with both numbers; a BERT (learned positions: there are no more) is one line."""
    from test_eval import make_hf_dir

    prompt = " ".join(WORDS[i % len(WORDS)] for i in range(60))
    d = make_mdm_dir(tmp_path / "mdm", _seed())
    p = _cli(["--model", str(d), "--prompt", "the cat", "--prompt", prompt, "--gen-length", "8", "--steps", "8",
              "--no-eos-stop", "--json", "--no-progress"], tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    warnings = [ln for ln in p.stderr.splitlines() if ln.startswith("mdm-generate: warning:")]
    assert warnings == ["mdm-generate: warning: prompt 2 is 60 tokens, with --gen-length 8 68 positions, more than "
                        "the 64 the model was trained on (max_position_embeddings): expect degraded samples"], p.stderr
    bert = make_hf_dir(tmp_path / "bert", seed=0)  # 64 learned positions
    p = _cli(["--model", str(bert), "--prompt", prompt, "--gen-length", "8", "--steps", "8"], tmp_path)
    errors = [ln for ln in p.stderr.splitlines() if ln.startswith("mdm-generate")]
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-3000:]
    assert errors == ["mdm-generate: error: --prompt: prompt 1 is 60 tokens, with --gen-length 8 68 positions, more "
                      "than the 64 the model has (max_position_embeddings): shorten the prompt or --gen-length"]
