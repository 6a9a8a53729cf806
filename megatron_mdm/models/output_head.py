r"""Logits only where they are needed: GPTModel's output layer and cross-entropy on selected positions.

An MDM's loss lives on the masked positions only (a fraction t of the sequence, t ~ U(eps, 1): half on
average), yet ``GPTModel`` runs its output layer (h x V per position) and the vocabulary-parallel
cross-entropy on every position. With ``--masked-only-logits`` the hidden states of the positions with
a nonzero loss weight are gathered *before* the head, so the head, the logits and the cross-entropy
(forward and backward) cost n/(b·s) of the full computation, with the same loss and gradients.

**How, without a fork.** ``GPTModel._postprocess`` calls ``self.output_layer(hidden_states [s, b, h],
weight=..., runtime_gather_output=...)`` and then, given labels, ``compute_language_model_loss(labels
[b, s], logits)`` (the same two calls in megatron-core 0.16 and 0.19). A forward pre-hook on
``output_layer`` (:func:`select_output`) replaces ``hidden_states`` by the selected rows ``[n, 1, h]``,
and the caller passes the labels gathered the same way, ``[1, n]``: the model returns the per-token
loss ``[1, n]``, which the objective weights with the gathered weights. Shapes become data-dependent
only after the decoder, on the last pipeline stage: pipeline p2p shapes stay static.

* **TP**: the selected rows are replicated on the tensor-parallel ranks (the batch and the masks are),
  the head keeps its vocabulary split and Megatron's cross-entropy its all-reduces.
* **Sequence parallelism**: the head's input is split over TP ranks along the sequence; the hook
  gathers it (backward: keep the local slice), selects, pads n to a multiple of TP and scatters again,
  so the output layer's own all-gather sees equal shares.
* **PP**: only the last stage has an output layer; it receives the prepared batch (weights included)
  in ``training.forward_step`` like the first stage.
* **CP**: ``forward_step`` splits the batch over context-parallel ranks before the head sees it, so
  each rank selects among its own positions (its hidden states are exactly those positions).

Padding rows (to a multiple of TP, and at least one row so that no tensor is empty) repeat position
(0, 0) with weight 0. Inference uses the same hook with a slice (a decoding block) or a bool mask (the
masked positions of a likelihood estimate): ``decoding.backends.megatron.MegatronForward``.
"""

from __future__ import annotations

import dataclasses
from contextlib import contextmanager

import torch


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The ``GPTModel`` inside DDP / Float16Module wrappers."""
    while hasattr(model, "module"):
        model = model.module
    return model


@dataclasses.dataclass
class Positions:
    """Selected (row, position) pairs in row-major order, padded to a multiple.

    Attributes:
        rows, cols: [n_pad] int64 batch row and sequence position of each selected entry.
        valid: [n_pad] bool, False for padding entries.
    """

    rows: torch.Tensor
    cols: torch.Tensor
    valid: torch.Tensor

    @classmethod
    def from_mask(cls, keep: torch.Tensor, multiple: int = 1) -> Positions:
        """The True entries of ``keep`` [b, s], padded with (0, 0) to a positive multiple of ``multiple``."""
        rows, cols = keep.nonzero(as_tuple=True)  # row-major order
        n = rows.numel()
        n_pad = max(multiple, -(-n // multiple) * multiple)
        valid = torch.zeros(n_pad, dtype=torch.bool, device=keep.device)
        valid[:n] = True
        pad = torch.zeros(n_pad - n, dtype=rows.dtype, device=keep.device)
        return cls(torch.cat([rows, pad]), torch.cat([cols, pad]), valid)

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """x [b, s, ...] -> [n_pad, ...] (padding entries hold x[0, 0])."""
        return x[self.rows.to(x.device), self.cols.to(x.device)]


def _select_rows(hidden: torch.Tensor, select) -> torch.Tensor:
    """hidden [s, b, h] -> the selected rows: [len, b, h] for a slice, [n, 1, h] for ``Positions``."""
    if isinstance(select, slice):
        return hidden[select]
    return hidden[select.cols.to(hidden.device), select.rows.to(hidden.device)].unsqueeze(1)


@contextmanager
def select_output(model: torch.nn.Module, select, shift: bool = False):
    """While active, the model's output layer computes logits only at ``select``.

    Args:
        model: a ``GPTModel`` (wrappers are looked through); a no-op for a stage without output layer.
        select: a slice of sequence positions, or :class:`Positions` (then logits come back as
            ``[1, n, V]``, per-token losses as ``[1, n]``); None selects everything.
        shift: re-align a ``--shift-logits`` model for inference: entry i gets the hidden state of
            position i - 1 (entry 0 its own), as ``objective.shift_logits`` does to logits.
    """
    core = unwrap(model)
    layer = getattr(core, "output_layer", None) if getattr(core, "post_process", False) else None
    if (select is None and not shift) or layer is None:
        yield
        return

    def hook(module, args, kwargs):
        from megatron.core import tensor_parallel

        hidden = args[0] if args else kwargs.pop("input_")
        sp = bool(getattr(module, "sequence_parallel", False))
        if sp:  # the head's input is split along the sequence over TP ranks: gather, select, re-split
            hidden = tensor_parallel.gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=False)
        if shift:
            hidden = torch.cat([hidden[:1], hidden[:-1]], dim=0)  # [s, b, h]
        rows = hidden if select is None else _select_rows(hidden, select)
        if sp:
            rows = tensor_parallel.scatter_to_sequence_parallel_region(rows)
        return (rows, *args[1:]), kwargs

    handle = layer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def loss_position_multiple(model: torch.nn.Module) -> int:
    """Selected rows must come in multiples of this (the TP size under sequence parallelism)."""
    core = unwrap(model)
    layer = getattr(core, "output_layer", None)
    if layer is not None and getattr(layer, "sequence_parallel", False):
        from megatron.core import parallel_state as ps

        return ps.get_tensor_model_parallel_world_size()
    return 1


def forward_at_loss_positions(model: torch.nn.Module, batch, position_ids: torch.Tensor):
    """``model(inputs, labels=...)`` with the head and cross-entropy only where ``batch.weights != 0``.

    Args:
        model: the (DDP-wrapped) model chunk of this stage.
        batch: an ``objective.PreparedBatch`` (already split for context parallelism).
        position_ids: [b, s] as for the full forward.

    Returns:
        (output, gathered): the model output (per-token loss [1, n_pad] on the last stage) and a copy
        of ``batch`` whose ``labels``/``weights`` are gathered to [1, n_pad] (padding weight 0), for
        the objective's ``loss``.
    """
    pos = Positions.from_mask(batch.weights != 0, loss_position_multiple(model))
    labels = pos.gather(batch.labels)[None]  # [1, n_pad]
    weights = torch.where(pos.valid.to(batch.weights.device), pos.gather(batch.weights), 0.0)[None]
    with select_output(model, pos):
        output = model(batch.inputs, position_ids, getattr(batch, "attention_mask", None), labels=labels)
    answer = getattr(batch, "answer_weights", None)
    if answer is not None:  # the completion-only loss (instruction data) rides on the same positions
        answer = torch.where(pos.valid.to(answer.device), pos.gather(answer), 0.0)[None]
    return output, dataclasses.replace(batch, labels=labels, weights=weights, answer_weights=answer)
