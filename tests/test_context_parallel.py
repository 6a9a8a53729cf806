"""Context parallelism on the local spec (SDPAttention all-gathers K/V over the CP group).

* The attention core at CP=2 against an explicit float64 softmax over the full sequence (outputs,
  and q/k/v gradients after the K/V gradient reduce-scatter), MDM (no mask) and causal, with GQA;
  RoPE on a CP rank against the float64 formula at the tokens' global positions.
* Training: CP=2 (and TP=2 x CP=2) equals CP=1 in loss and gradient norm, MDM and ARM.
* Checkpoints: saved at CP=2 and resumed at CP=1, and the reverse, continue as the uninterrupted run.

The training runs share their process launches (a module fixture) because spawning gloo processes
that import Megatron-core is what costs time here.
"""

from __future__ import annotations

import math

import pytest
import torch
from dist import run_distributed
from jobs import VOCAB, tiny_cfg, train_job

RTOL = 2e-4  # float32 sums in another order (gathered key order, split sequence), over 4 Adam steps
ITERS = 4  # save at 2, resume to 4


# ---- jobs (module level: run in spawned gloo processes) ----------------------------------------------


def _reference_attention(q, k, v, causal: bool, scale: float) -> torch.Tensor:
    """Explicit float64 softmax attention; q [s, b, nq, d], k/v [s, b, nkv, d] -> [s, b, nq*d]."""
    s, b, nq, d = q.shape
    group = nq // k.shape[2]
    heads = torch.arange(nq) // group  # query head h reads kv head h // group (Megatron's GQA layout)
    scores = torch.einsum("sbhd,tbhd->bhst", q, k[:, :, heads]) * scale
    if causal:
        scores = scores.masked_fill(torch.ones(s, s, dtype=torch.bool).triu(1), float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    out = torch.einsum("bhst,tbhd->sbhd", probs, v[:, :, heads])
    return out.reshape(s, b, nq * d)


def _cp_slice(x: torch.Tensor) -> torch.Tensor:
    """This CP rank's part of a sequence-first tensor, by Megatron's own batch split."""
    from megatron.core.utils import get_batch_on_this_cp_rank

    return get_batch_on_this_cp_rank({"x": x.transpose(0, 1)})["x"].transpose(0, 1)


def attention_and_rope_job(rank: int, world: int) -> dict:
    """CP=2: SDPAttention vs the float64 reference, and RoPE positions vs the float64 formula."""
    from megatron.core.transformer.enums import AttnMaskType

    from megatron_mdm import runtime
    from megatron_mdm.models.attention import SDPAttention
    from megatron_mdm.models.build import build_model, transformer_config

    cfg = tiny_cfg(context_parallel_size=world)
    runtime.init_distributed(cfg.parallel, cfg.model.num_layers)
    runtime.set_seed(1)
    tconf = transformer_config(cfg, use_te=False)
    g = torch.Generator().manual_seed(1234)  # the same full-sequence tensors on every rank
    s, b, nq, nkv, d = 16, 2, 4, 2, 8
    q, k, v = (torch.randn(s, b, n, d, generator=g, dtype=torch.float64) for n in (nq, nkv, nkv))
    upstream = torch.randn(s, b, nq * d, generator=g, dtype=torch.float64)
    scale = 1.0 / math.sqrt(d)
    out = {}
    for mt in (AttnMaskType.no_mask, AttnMaskType.causal):
        full = [x.clone().requires_grad_() for x in (q, k, v)]
        ref = _reference_attention(*full, mt == AttnMaskType.causal, scale)
        (ref * upstream).sum().backward()
        local = [_cp_slice(x).clone().requires_grad_() for x in (q, k, v)]
        attn = SDPAttention(tconf, 1, mt, "self", softmax_scale=scale)
        got = attn(*local, None)
        (got * _cp_slice(upstream)).sum().backward()  # the sum over ranks is the full loss
        errs = {"out": (got - _cp_slice(ref)).abs().max().item()}
        for name, x, xf in zip("qkv", local, full):
            errs["d" + name] = (x.grad - _cp_slice(xf.grad)).abs().max().item()
        out[mt.name] = errs
    # RoPE: what GPTModel computes for this rank's slice, vs the formula at the global positions
    model = build_model(cfg, VOCAB, causal=False)[0]
    rope = model.rotary_pos_emb
    local_input = torch.zeros(s // world, b, cfg.model.hidden_size)
    emb = rope(rope.get_rotary_seq_len(None, model.decoder, local_input, model.config, None))
    pos = _cp_slice(torch.arange(s, dtype=torch.float64)[:, None])[:, 0]  # global positions held here
    hd = cfg.model.hidden_size // cfg.model.num_attention_heads
    inv_freq = 1.0 / cfg.model.rotary_base ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    freqs = pos[:, None] * inv_freq[None, :]
    want = torch.cat([freqs, freqs], dim=-1)
    out["rope"] = (emb.reshape(s // world, hd).double() - want).abs().max().item()
    out["positions"] = pos.tolist()
    return out


def train_runs_job(rank: int, world: int, runs: list) -> list:
    """Several trainings one after the other in the same processes (each its own parallel state)."""
    from megatron.core.num_microbatches_calculator import destroy_num_microbatches_calculator

    results = []
    for overrides in runs:
        results.append(train_job(rank, world, overrides))
        destroy_num_microbatches_calculator()
    return results


# ---- tests -----------------------------------------------------------------------------------------


def _close(a, b, rtol=RTOL):
    assert len(a) == len(b), (a, b)
    for x, y in zip(a, b):
        assert abs(x - y) <= rtol * max(abs(x), abs(y)), (a, b)


@pytest.mark.dist
def test_cp_attention_and_rope_match_full_sequence_float64():
    results = run_distributed(attention_and_rope_job, 2)
    for rank, r in enumerate(results):
        for mask in ("no_mask", "causal"):
            for what, err in r[mask].items():
                assert err < 1e-12, (rank, mask, what, err)
        assert r["rope"] < 1e-5, (rank, r["rope"])
    # rank 0 holds chunks 0 and 3 of 4, rank 1 chunks 1 and 2
    assert results[0]["positions"] == [0, 1, 2, 3, 12, 13, 14, 15]
    assert results[1]["positions"] == [4, 5, 6, 7, 8, 9, 10, 11]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """CP=1 and CP=2 runs from the same initial weights, with checkpoints at step 2 of 4.

    Launches: CP=2 (MDM saving; ARM), then CP=1 (the initial weights saved; MDM saving; ARM; MDM
    resumed from the CP=2 checkpoint), then CP=2 resumed from the CP=1 checkpoint, then TP=2 x CP=2
    (4 processes) from the saved initial weights (a fresh TP=2 model draws other weights; CP does not
    change them).
    """
    root = tmp_path_factory.mktemp("cp")
    cp2_dir, cp1_dir, init_dir = str(root / "cp2"), str(root / "cp1"), str(root / "init")
    # larger initial weights than the default 0.02, so that attention is far from uniform: a wrong
    # RoPE position or causal mask then moves the loss by ~1e-2 relative instead of ~1e-5
    base = {"train_iters": ITERS, "init_method_std": 0.1}
    # MDM with random-length cuts: the CP ranks then count different numbers of tokens
    mdm, arm = dict(base, objective="mdm", random_length_prob=0.5), dict(base, objective="arm")
    cp2 = {"context_parallel_size": 2}
    out = {}
    out["cp2_mdm"], out["cp2_arm"] = run_distributed(
        train_runs_job, 2,
        [dict(mdm, **cp2, save=cp2_dir, save_interval=2), dict(arm, **cp2)])[0]
    _, out["cp1_mdm"], out["cp1_arm"], out["cp2_to_cp1"] = run_distributed(
        train_runs_job, 1,
        [dict(base, train_iters=0, save=init_dir), dict(mdm, save=cp1_dir, save_interval=2), arm,
         dict(mdm, load=cp2_dir, ckpt_iteration=2)])[0]
    out["cp1_to_cp2"] = run_distributed(
        train_runs_job, 2, [dict(mdm, **cp2, load=cp1_dir, ckpt_iteration=2)])[0][0]
    tp2cp2 = dict(cp2, tensor_model_parallel_size=2, load=init_dir, finetune=True)
    out["tp2cp2_mdm"], out["tp2cp2_arm"] = run_distributed(
        train_runs_job, 4, [dict(mdm, **tp2cp2), dict(arm, **tp2cp2)])[0]
    return out


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.parametrize("objective", ["mdm", "arm"])
def test_cp2_equals_cp1(runs, objective):
    ref = runs[f"cp1_{objective}"]
    assert len(ref["losses"]) == ITERS and ref["losses"][0] > 0
    for layout in ("cp2", "tp2cp2"):
        got = runs[f"{layout}_{objective}"]
        _close(got["losses"], ref["losses"])
        _close(got["grad_norms"], ref["grad_norms"])


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.parametrize("saved, resumed", [("cp2", "cp1"), ("cp1", "cp2")])
def test_cp_checkpoint_resumes_at_the_other_cp_size(runs, saved, resumed):
    got, full = runs[f"{saved}_to_{resumed}"], runs[f"{saved}_mdm"]
    assert got["iteration"] == ITERS and len(got["losses"]) == ITERS - 2
    _close(got["losses"], full["losses"][2:])
    _close(got["grad_norms"], full["grad_norms"][2:])


# ---- configuration (no processes) -------------------------------------------------------------------


def test_seq_length_must_split_into_2cp_chunks():
    from megatron_mdm.config import ConfigError

    cfg = tiny_cfg(context_parallel_size=2, seq_length=18)  # 18 = 4 chunks of 4.5
    with pytest.raises(ConfigError, match=r"^--seq-length: 18 is not divisible by 2 x --context-parallel-size"):
        cfg.validate(world_size=2)
    tiny_cfg(context_parallel_size=2, seq_length=20).validate(world_size=2)


def test_cp_comm_type_flag_reaches_the_te_config_only():
    import argparse

    from megatron_mdm.config import ConfigError, add_arguments, from_args
    from megatron_mdm.models.build import transformer_config

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert from_args(parser.parse_args([])).parallel.cp_comm_type == "p2p"  # Megatron-LM's default
    cfg = from_args(parser.parse_args(["--context-parallel-size", "2", "--cp-comm-type", "a2a"]))
    assert transformer_config(cfg, use_te=True).cp_comm_type == "a2a"
    assert transformer_config(cfg, use_te=False).cp_comm_type is None  # local spec: K/V all-gather
    with pytest.raises(ConfigError, match="cp-comm-type"):
        from_args(parser.parse_args(["--cp-comm-type", "ring"]))
