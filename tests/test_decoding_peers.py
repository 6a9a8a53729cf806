"""Our decoding modes give exactly the tokens of the peers' own algorithms.

The references are the ones benchmarks/bench_sampling.py times, written from the peers' code: LLaDA's
``generate`` (float32 softmax over every position, ``topk`` per row) and Fast-dLLM's ``generate``,
``generate_with_prefix_cache`` (the K/V before the block, concatenated at each step) and
``generate_with_dual_cache`` (the block's K/V written into the whole sequence's), with and without its
threshold rule. A fresh random model whose head never favours the mask token (as a trained model's; our
decoder excludes it, theirs does not), fresh prompts, greedy decoding.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from test_decoding import tiny_mdm

from megatron_mdm.decoding import DecodingConfig, decode
from megatron_mdm.decoding.hf_generation import HFForward

REPO = Path(__file__).resolve().parents[1]
V, MASK = 24, 23


def _bench():
    spec = importlib.util.spec_from_file_location("bench_sampling", REPO / "benchmarks" / "bench_sampling.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _model(seed: int):
    model = tiny_mdm(seed, vocab=V, mask_id=MASK, sharp=3.0)

    def no_mask(module, args, out):  # the mask token is never a prediction (a trained model's near-zero mass)
        out.logits[..., MASK] = float("-inf")

    model.register_forward_hook(no_mask)
    return model


@pytest.mark.parametrize("threshold", [None, 0.5])
def test_none_prefix_dual_equal_llada_and_fast_dllm(threshold):
    bench = _bench()
    seed = int(torch.randint(0, 10_000, ()))
    model = _model(seed)
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, MASK, (3, 5), generator=g)
    gen, block = 16, 4
    fired = False
    for cache in ("none", "prefix", "dual"):
        ours = decode(HFForward(model), prompt, DecodingConfig(gen_length=gen, steps=gen, block_length=block,
                                                               cache=cache, threshold=threshold), MASK, vocab_size=V)
        if cache == "none" and threshold is None:
            ref, forwards = bench.llada_generate(model, prompt, gen, gen, block, MASK)
        else:
            ref, forwards = bench.fastdllm_generate(model, prompt, gen, gen, block, MASK, cache, threshold)
        assert torch.equal(ours.tokens, ref), (cache, threshold)
        if threshold is None:
            assert ours.num_forward == forwards == gen
        else:
            fired |= ours.num_forward < gen
    if threshold is not None:
        assert fired, "the threshold never unmasked two tokens at once: nothing was compared"
