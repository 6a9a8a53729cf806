"""Module-level job functions run in gloo processes by tests (see ``dist.run_distributed``).

Each builds a tiny config, starts the parallel state, and trains or evaluates with the real
Megatron-core stack through ``megatron_mdm.training.Trainer``.
"""

from __future__ import annotations

import os
import signal
from typing import Optional

import torch

from megatron_mdm.config import Config

VOCAB, MASK_ID, PAD_ID = 100, 99, 98


def tiny_cfg(**overrides) -> Config:
    cfg = Config()
    cfg.model.num_layers = 2
    cfg.model.hidden_size = 64
    cfg.model.num_attention_heads = 4
    cfg.model.num_query_groups = 2
    cfg.model.ffn_hidden_size = 128
    cfg.model.make_vocab_size_divisible_by = 64  # the same padded vocabulary at TP=1 and TP=2
    cfg.data.seq_length = 16
    cfg.optim.micro_batch_size = 2
    cfg.optim.global_batch_size = 8
    cfg.optim.lr = 1e-3
    cfg.optim.min_lr = 1e-4
    cfg.optim.train_iters = 3
    cfg.logging.log_interval = 1
    cfg.objective.random_length_prob = 0.0
    for k, v in overrides.items():
        from megatron_mdm.config import set_field

        set_field(cfg, k, v)
    return cfg


def make_trainer(cfg: Config, loader=None):
    from megatron.core import parallel_state as ps
    from synthetic import SyntheticLoader

    from megatron_mdm import runtime
    from megatron_mdm.training.loop import Trainer

    runtime.init_distributed(cfg.parallel, cfg.model.num_layers)
    if loader is None:
        loader = SyntheticLoader(PAD_ID, cfg.data.seq_length, cfg.optim.micro_batch_size,
                                 ps.get_data_parallel_rank(), ps.get_data_parallel_world_size(),
                                 num_samples=64, seed=5)
    return Trainer(cfg, VOCAB, MASK_ID, PAD_ID, loader)


def train_job(rank: int, world: int, overrides: dict, loader_kind: str = "synthetic",
              stop_after: Optional[int] = None, stop_signal: str = "SIGTERM") -> dict:
    """Train with ``overrides``; returns per-step losses and grad norms (and the final iteration).
    ``stop_after``: rank 0 sends itself ``stop_signal`` after that many steps."""
    cfg = tiny_cfg(**overrides)
    loader = None
    if loader_kind == "memorise":  # the same 4 sequences every step
        from synthetic import SyntheticLoader

        loader = SyntheticLoader(PAD_ID, cfg.data.seq_length, cfg.optim.micro_batch_size, num_samples=4)
    if loader_kind == "dp2_as_one":
        loader = DP2AsOneLoader(cfg.data.seq_length, cfg.optim.micro_batch_size,
                                cfg.optim.global_batch_size // cfg.optim.micro_batch_size // 2)
    trainer = make_trainer(cfg, loader)
    trainer.load()
    if stop_after is not None:  # deliver the signal to ourselves after this many steps
        original = trainer.train_step

        def step_then_signal():
            out = original()
            if trainer.state.iteration == stop_after and rank == 0:
                os.kill(os.getpid(), getattr(signal, stop_signal))
            return out

        trainer.train_step = step_then_signal
    result = trainer.train()
    return {
        "losses": result["losses"],
        "grad_norms": [h["grad_norm"] for h in trainer.history],
        "lrs": [h["lr"] for h in trainer.history],
        "iteration": result["iteration"],
        "val": result["val"],
        "stopped_by_signal": result.get("stopped_by_signal", False),
        "exit_reason": result.get("exit_reason"),
        "skipped_steps": result["skipped_steps"],
    }


class DP2AsOneLoader:
    """One process reading, per step, what DP rank 0 then DP rank 1 read (the doubled batch)."""

    def __init__(self, seq_length: int, mbs: int, mb_per_rank: int):
        from synthetic import SyntheticLoader

        self.ranks = [SyntheticLoader(PAD_ID, seq_length, mbs, r, 2, num_samples=64, seed=5)
                      for r in range(2)]
        self.mb_per_rank = mb_per_rank

    def __iter__(self):
        its = [iter(r) for r in self.ranks]
        while True:
            for it in its:
                for _ in range(self.mb_per_rank):
                    yield next(it)

    def state_dict(self):
        return {"kind": "synthetic"}

    def load_state_dict(self, state):
        """The trainer's contract: ``consumed_samples`` (global) fixes both ranks' positions."""
        for r in self.ranks:
            r.load_state_dict(state)


def model_checks_job(rank: int, world: int, tp: int) -> dict:
    """Attention direction and the vocab-parallel per-token loss vs float64 CE of gathered logits."""
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from megatron_mdm import runtime
    from megatron_mdm.models.build import build_model

    cfg = tiny_cfg(tensor_model_parallel_size=tp)
    runtime.init_distributed(cfg.parallel, cfg.model.num_layers)
    runtime.set_seed(3)
    out = {}
    g = torch.Generator().manual_seed(11)
    x = torch.randint(0, 90, (2, 16), generator=g)
    pos = torch.arange(16)[None].expand(2, -1)
    x2 = x.clone()
    x2[:, -1] = (x2[:, -1] + 1) % 90
    x3 = x.clone()
    x3[:, 0] = (x3[:, 0] + 1) % 90
    for name, causal in (("mdm", False), ("arm", True)):
        model = build_model(cfg, VOCAB, causal)[0].eval()
        with torch.no_grad():
            full = lambda inp, model=model: gather_from_tensor_model_parallel_region(model(inp, pos, None))
            a, b, c = full(x), full(x2), full(x3)
            out[f"{name}_pos0_change_last"] = (a[:, 0] - b[:, 0]).abs().max().item()
            out[f"{name}_last_change_first"] = (a[:, -1] - c[:, -1]).abs().max().item()
            ce = model(x, pos, None, labels=x)  # [b, s] from the vocab-parallel cross-entropy
            ref = torch.nn.functional.cross_entropy(a.double().reshape(-1, a.shape[-1]), x.reshape(-1),
                                                    reduction="none").view(2, 16)
            out[f"{name}_ce_err"] = (ce.double() - ref).abs().max().item()
    return out


def sdpa_vs_megatron_job(rank: int, world: int) -> dict:
    """SDPAttention vs Megatron's DotProductAttention (GQA), no_mask and causal."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    from megatron_mdm import runtime
    from megatron_mdm.models.attention import SDPAttention
    from megatron_mdm.models.build import transformer_config

    cfg = tiny_cfg()
    runtime.init_distributed(cfg.parallel, cfg.model.num_layers)
    runtime.set_seed(1)
    tconf = transformer_config(cfg, use_te=False)
    g = torch.Generator().manual_seed(2)
    s, b, nq, nkv, d = 12, 2, 4, 2, 16
    q = torch.randn(s, b, nq, d, generator=g)
    k = torch.randn(s, b, nkv, d, generator=g)
    v = torch.randn(s, b, nkv, d, generator=g)
    errs = {}
    for mt in (AttnMaskType.no_mask, AttnMaskType.causal):
        ours = SDPAttention(tconf, 1, mt, "self")
        ref = DotProductAttention(tconf, 1, mt, "self")
        mask = None
        if mt == AttnMaskType.causal:
            mask = torch.triu(torch.ones(s, s, dtype=torch.bool), diagonal=1)[None, None]
        errs[mt.name] = (ours(q, k, v, None) - ref(q, k, v, mask)).abs().max().item()
    return errs


def crash_during_save_job(rank: int, world: int, overrides: dict) -> str:
    """Train, and make the checkpoint save at the last iteration die halfway (files half written)."""
    from pathlib import Path

    from megatron_mdm.checkpoint import checkpointing

    real_save = checkpointing.dist_checkpointing.save

    def dying_save(sd, path, **kwargs):
        (Path(path) / "__0_0.distcp").write_bytes(b"partial")
        raise OSError("simulated node failure during checkpoint save")

    cfg = tiny_cfg(**overrides)
    trainer = make_trainer(cfg)
    trainer.load()
    original_save = trainer.save

    def save_then_die():
        if trainer.state.iteration == cfg.optim.train_iters:
            checkpointing.dist_checkpointing.save = dying_save
        try:
            original_save()
        finally:
            checkpointing.dist_checkpointing.save = real_save

    trainer.save = save_then_die
    try:
        trainer.train()
    except checkpointing.CheckpointError as e:
        return str(e)
    return "no error"


def nan_job(rank: int, world: int, overrides: dict, nan_iters: list) -> dict:
    """Train with the loss made non-finite at the given iterations (1-based)."""
    cfg = tiny_cfg(**overrides)
    trainer = make_trainer(cfg)
    obj = trainer.objective
    real_loss = obj.loss

    def loss(batch, per_token_loss):
        s, n = real_loss(batch, per_token_loss)
        if trainer.state.iteration + 1 in nan_iters:
            s = s * float("nan")
        return s, n

    obj.loss = loss
    params_before = [p.detach().clone() for p in trainer.model[0].parameters()]
    try:
        result = trainer.train()
    except Exception as e:  # noqa: BLE001 - reported to the test
        return {"error": f"{type(e).__name__}: {e}", "iteration": trainer.state.iteration}
    changed = any(not torch.equal(a, b) for a, b in zip(params_before, trainer.model[0].parameters()))
    return {"losses": result["losses"], "skipped": result["skipped_steps"], "changed": changed}


def skipped_step_keeps_weights_job(rank: int, world: int) -> bool:
    """A step whose loss is NaN leaves every weight unchanged."""
    cfg = tiny_cfg(train_iters=1)
    trainer = make_trainer(cfg)
    real_loss = trainer.objective.loss
    trainer.objective.loss = lambda b, t: (real_loss(b, t)[0] * float("nan"), real_loss(b, t)[1])
    before = [p.detach().clone() for p in trainer.model[0].parameters()]
    trainer.train()
    return all(torch.equal(a, b) for a, b in zip(before, trainer.model[0].parameters()))
