"""Distributed-optimizer checkpoints with PyTorch's Adam: what Megatron-core needs around a load.

Megatron-LM runs its ``DistributedOptimizer`` on Transformer Engine's or Apex's ``FusedAdam``, which
keeps ``step`` in the param groups. Without them (the CPU development mode, GPUs without TE/Apex)
Megatron-core falls back to ``torch.optim.Adam``, which keeps a ``step`` tensor per parameter, and
three places of megatron-core 0.16.1 (unchanged on Megatron-LM main) then fail on a resume. Each
function below covers one, on the optimizer instance (nothing is patched globally), and is a no-op
for FusedAdam. Used by ``checkpointing`` only.
"""

from __future__ import annotations

import torch


def _distributed(optimizer) -> list:
    """The ``DistributedOptimizer``s inside ``optimizer`` (a ``ChainedOptimizer`` or one optimizer)."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    return [o for o in getattr(optimizer, "chained_optimizers", [optimizer])
            if isinstance(o, DistributedOptimizer)]


def _torch_adam(opt) -> bool:
    return isinstance(getattr(opt, "optimizer", None), (torch.optim.Adam, torch.optim.AdamW))


def init_optimizer_state(optimizer) -> None:
    """Allocate the state of a never-stepped distributed optimizer, in place (before save or load).

    The root cause of "``assert len(steps) == 1``" on resume: ``sharded_state_dict(is_loading=True)``
    calls ``DistributedOptimizer.state_dict()``, which with PyTorch's Adam collects the per-parameter
    ``step`` of the inner optimizer's state, empty in a fresh optimizer. Megatron-LM's
    ``load_checkpoint`` builds its loading template from the same fresh optimizer and relies on the
    optimizer holding its state layout first, as Megatron-core's other optimizers arrange by calling
    ``init_state_fn`` before building a loading template (``FP32Optimizer`` and
    ``Float16OptimizerWithFloat16Params.sharded_state_dict``). Do the same for the distributed
    optimizer: ``init_state_fn`` (zero moments) plus the zero ``step`` PyTorch's Adam creates on its
    first step, so an Adam step on this state is identical to one on a fresh optimizer.
    """
    for opt in _distributed(optimizer):
        inner = opt.optimizer
        if len(inner.state) > 0:
            continue
        if getattr(opt, "init_state_fn", None) is not None:
            opt.init_state_fn(inner, opt.config)
        if not _torch_adam(opt):
            continue
        for group in inner.param_groups:
            for p in group["params"]:
                state = inner.state[p]
                if "step" not in state:
                    on_device = group.get("capturable") or group.get("fused")
                    state["step"] = torch.zeros((), dtype=torch.float32,
                                                device=p.device if on_device else "cpu")


def keep_adam_step_on_load(optimizer) -> None:
    """Let a distributed optimizer with PyTorch's Adam load ``fully_reshardable`` parameter state.

    ``DistributedOptimizer._set_main_param_and_optimizer_states`` copies every key of the local state
    (``param``, ``exp_avg``, ``exp_avg_sq`` and, with PyTorch's Adam, ``step``) from the loaded
    tensors, but the checkpoint stores the step once in the param groups (restored by
    ``load_state_dict`` before this runs), not per parameter: ``KeyError: 'step'`` (megatron-core
    0.16.1 and Megatron-LM main; FusedAdam has no per-parameter step). Keys the checkpoint does not
    carry keep their current (already restored) value. Instance-level, nothing is patched globally.
    """
    for opt in _distributed(optimizer):
        setter = getattr(opt, "_set_main_param_and_optimizer_states", None)
        getter = getattr(opt, "_get_main_param_and_optimizer_states", None)
        if setter is None or getter is None or getattr(setter, "_mdm_keeps_step", False):
            continue
        if not _torch_adam(opt):
            continue

        def set_states(model_param, tensors, _set=setter, _get=getter):
            current = _get(model_param)
            _set(model_param, {**{k: v for k, v in current.items() if k not in tensors}, **tensors})

        set_states._mdm_keeps_step = True
        opt._set_main_param_and_optimizer_states = set_states


def unshare_adam_steps(optimizer) -> None:
    """Give every parameter its own Adam ``step`` tensor after a distributed-optimizer load.

    ``DistributedOptimizer.load_state_dict`` puts *one* step tensor into the state of every
    parameter and PyTorch's Adam increments each parameter's step in place, so the first resumed
    step advanced the shared counter once per parameter (step 2 -> 9 with 7 parameters): a wrong
    bias correction from then on. Found by the bit-exact distributed-optimizer resume test.
    """
    for opt in _distributed(optimizer):
        if not _torch_adam(opt):
            continue
        for state in opt.optimizer.state.values():
            if isinstance(state.get("step"), torch.Tensor):
                state["step"] = state["step"].clone()
