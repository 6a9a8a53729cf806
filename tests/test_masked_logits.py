"""Masked-only logits (``--masked-only-logits``): the loss and gradients of the full head, at TP1, TP2, PP2.

The reference is the full computation (output layer and vocabulary-parallel cross-entropy on every
position, then weighted) on the same model, weights, batches and masks in the same processes; only
the head's input differs (gathered rows vs all rows). Float32: the two differ by reduction order only
(measured ~1e-7 relative); a wrong gather (labels/weights misaligned, a dropped or doubled row, a
tensor-parallel gradient counted twice) gives O(1) differences.
"""

from __future__ import annotations

import pytest
from dist import run_distributed

pytestmark = [pytest.mark.dist]

TOL = 1e-6


def masked_vs_full_job(rank: int, world: int, overrides: dict) -> dict:
    """One training step's micro-batches (forward + backward) and a validation pass, full vs masked-only."""
    from jobs import make_trainer, tiny_cfg

    from megatron_mdm.training.loop import run_microbatches

    cfg = tiny_cfg(**overrides)
    trainer = make_trainer(cfg)
    nmb = trainer.num_microbatches
    loader = iter(trainer.train_loader)
    raw = [next(loader) for _ in range(nmb)]
    out = {}
    for masked in (False, True):
        cfg.model.masked_only_logits = masked
        for m in trainer.model:
            m.zero_grad_buffer()
        total = run_microbatches(cfg, trainer.model, trainer.objective, iter(raw), nmb, 0, forward_only=False)
        grads = {f"{i}.{n}": p.main_grad.detach().clone() for i, m in enumerate(trainer.model)
                 for n, p in m.module.named_parameters()}
        val = run_microbatches(cfg, trainer.model, trainer.eval_objective, iter(raw), nmb, 0, forward_only=True)
        out[masked] = (total, grads, val)
    (t0, g0, v0), (t1, g1, v1) = out[False], out[True]
    scale = max(float(g.abs().max()) for g in g0.values())
    return {
        "loss": (float(t0[0]), float(t1[0])),
        "tokens": (float(t0[1]), float(t1[1])),
        "val": (float(v0[0]), float(v1[0])),
        "grad_rel": max(float((g0[k] - g1[k]).abs().max()) for k in g0) / scale,
        "grad_nonzero": scale > 0,
        "head_grad": any("output_layer" in k and float(g0[k].abs().max()) > 0 for k in g0),
    }


def _check(results: list) -> None:
    for r in results:
        (a, b), (va, vb) = r["loss"], r["val"]
        assert a > 0 and abs(a - b) <= TOL * abs(a), r
        assert abs(va - vb) <= TOL * abs(va), r
        assert r["tokens"][0] == r["tokens"][1]
        assert r["grad_nonzero"] and r["grad_rel"] <= TOL, r
    assert any(r["head_grad"] for r in results)  # the stage with the head took part


@pytest.mark.parametrize("objective", ["mdm", "arm"])
def test_masked_only_logits_tp1(objective):
    _check(run_distributed(masked_vs_full_job, 1, {"objective": objective}))


@pytest.mark.slow
def test_masked_only_logits_tp2():
    _check(run_distributed(masked_vs_full_job, 2, {"tensor_model_parallel_size": 2}))


@pytest.mark.slow
def test_masked_only_logits_pp2():
    _check(run_distributed(masked_vs_full_job, 2, {"pipeline_model_parallel_size": 2}))


def sequence_parallel_head_job(rank: int, world: int) -> dict:
    """The selection hook on a sequence-parallel output layer (TP2) vs selecting from the full logits.

    The local spec has no sequence-parallel norms, so a whole model cannot run SP on CPU; the hook's SP
    branch (gather over TP, select, pad, scatter) is checked on Megatron's ColumnParallelLinear alone.
    """
    import torch
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import ColumnParallelLinear, gather_from_sequence_parallel_region
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_mdm import runtime
    from megatron_mdm.config import ParallelConfig
    from megatron_mdm.models.output_head import Positions, loss_position_multiple, select_output

    runtime.init_distributed(ParallelConfig(tensor_model_parallel_size=2), 2)
    conf = TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=2, tensor_model_parallel_size=2,
                             sequence_parallel=True, use_cpu_initialization=True)

    class Head(torch.nn.Module):  # what select_output expects of a GPTModel: post_process + output_layer
        post_process = True

        def __init__(self):
            super().__init__()
            self.output_layer = ColumnParallelLinear(8, 12, config=conf, init_method=torch.nn.init.normal_,
                                                     bias=False, gather_output=False)

    torch.manual_seed(0)
    head = Head()
    s, b = 6, 3
    full = torch.randn(s, b, 8, dtype=torch.float32)  # the same on both ranks
    keep = torch.rand(b, s, generator=torch.Generator().manual_seed(1)) < 0.4  # [b, s]
    tp = ps.get_tensor_model_parallel_world_size()
    local = full.chunk(tp, dim=0)[ps.get_tensor_model_parallel_rank()]

    def run(select):
        x = local.clone().requires_grad_(True)
        head.output_layer.weight.grad = None
        with select_output(head, select):
            logits, _ = head.output_layer(x)  # [rows, 1|b, 12 / tp]
        return logits, x

    ref_logits, x_ref = run(None)  # [s, b, 6]: all rows
    pos = Positions.from_mask(keep, loss_position_multiple(head))
    sel_ref = ref_logits[pos.cols, pos.rows][pos.valid]  # [n, 6]
    g = torch.randn(sel_ref.shape, generator=torch.Generator().manual_seed(2))
    (sel_ref * g).sum().backward()
    ref_w, ref_x = head.output_layer.weight.grad.clone(), x_ref.grad.clone()
    logits, x = run(pos)  # [n_pad, 1, 6]
    got = logits[:, 0][pos.valid]
    (got * g).sum().backward()
    return {
        "multiple": loss_position_multiple(head), "n_pad": int(pos.valid.numel()),
        "logits": float((got - sel_ref).abs().max()),
        "grad_w": float((head.output_layer.weight.grad - ref_w).abs().max()),
        "grad_x": float((x.grad - ref_x).abs().max()), "grad_x_norm": float(ref_x.abs().max()),
        "gathered": tuple(gather_from_sequence_parallel_region(local.clone()).shape),
    }


@pytest.mark.slow
def test_sequence_parallel_head_selection_tp2():
    for r in run_distributed(sequence_parallel_head_job, 2):
        assert r["multiple"] == 2 and r["n_pad"] % 2 == 0 and r["gathered"] == (6, 3, 8), r
        assert r["grad_x_norm"] > 0, r
        assert max(r["logits"], r["grad_w"], r["grad_x"]) <= 1e-6, r


def _local_spec_has_context_parallelism() -> bool:
    import inspect

    from megatron_mdm.models.attention import SDPAttention

    return "context parallelism needs" not in inspect.getsource(SDPAttention.__init__)


@pytest.mark.slow
def test_masked_only_logits_cp2():
    """Each context-parallel rank selects among its own (load-balanced) chunk positions."""
    if not _local_spec_has_context_parallelism():
        pytest.skip("the local spec's attention has no context parallelism in this tree")
    _check(run_distributed(masked_vs_full_job, 2, {"context_parallel_size": 2}))
