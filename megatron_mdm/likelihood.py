r"""Likelihood estimators for masked diffusion models: MC ELBO, conditional MC and chain rule.

All functions are pure, take a model-agnostic ``LogitsFn`` (input_ids [b, s] -> logits [b, s, V]),
draw randomness only from the ``torch.Generator`` passed in, and mask exactly as training does
(``objective.sample_t`` and ``objective.forward_mask``: the project's single masking function).
Logits at ids >= ``vocab_size`` are ignored and the mask token is never a prediction
(``decoding.logits.model_logits``). Logits are asked for the scored positions only, so a model that supports
it (``decoding.logits.ModelForward``: the HF export, ``decoding.backends.megatron.MegatronForward``) runs its output head
there only, as training does with ``--masked-only-logits``.

**ELBO** (SMDM Eq. 3; the training loss): for x_0 with n eligible positions,

    -log p(x_0) <= E_{t ~ U(eps, 1)} E_{x_t ~ q(.|x_0, t)} [ (1/t) sum_{i masked} -log p(x_0[i] | x_t) ]

:func:`mc_elbo` averages N draws of (t, x_t) per sequence and divides by n: an upper bound on the
NLL in nats/token, with the standard error of the N-sample mean; exp(bound) bounds the perplexity.
With ``t_sampling="antithetic"`` the N values of t of one sequence are stratified over [eps, 1)
(one shared offset); the reported stderr then uses the i.i.d. formula and is conservative.

**Conditional MC** (SMDM ``_eval_target_nll_mc``): the prompt is kept, only the completion is masked
at rate t; the same 1/t-weighted sum (not divided by the length) bounds -log p(completion | prompt),
so :func:`mc_conditional_loglik` returns its negative: a lower bound on the log-likelihood.

**Chain rule**: starting with the completion all masked, unmask one position per forward, add
log p(true token at that position | current context), and write the true token there:

* ``left_to_right``: positions in order; this is SMDM's ``chain_rule`` estimator
  (``_eval_target_nll_ar``), all c forwards are independent and batched together;
* ``greedy``: the masked position where the model is most confident in its OWN argmax prediction
  (max_v p(v | context)), the order of SMDM's greedy decoding (``suffix_greedy_prediction``), with the
  true token teacher-forced; c sequential forwards. ``is_greedy`` is True when every argmax at the
  chosen position was the true token, i.e. when greedy decoding would produce the completion.

Both give the exact log-probability of the completion under that unmasking order's factorisation.
Unsupervised CFG (``cfg_scale``) applies to both estimators and to the MC one, with the prompt masked
in the unconditional input (``decoding.logits.apply_cfg``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from megatron_mdm.decoding.logits import LogitsFn, model_logits
from megatron_mdm.objective import forward_mask, sample_t

T_SAMPLING = ("uniform", "antithetic")
ORDERS = ("greedy", "left_to_right")


@dataclass
class ElboResult:
    """Monte Carlo ELBO per sequence.

    Attributes:
        nll_per_token: [b] upper bound on -log p(x) / n (nats/token).
        stderr: [b] standard error of ``nll_per_token`` over the N samples.
        num_tokens: [b] eligible positions n per sequence.
        samples: [b, N] per-sample values (nats/token).
    """

    nll_per_token: torch.Tensor
    stderr: torch.Tensor
    num_tokens: torch.Tensor
    samples: torch.Tensor

    @property
    def perplexity_bound(self) -> torch.Tensor:
        """[b] exp(nll_per_token), an upper bound on each sequence's perplexity."""
        return torch.exp(self.nll_per_token)

    def corpus_nll(self) -> tuple[float, float]:
        """Token-weighted mean bound over the batch and its standard error (nats/token)."""
        w = self.num_tokens.double() / self.num_tokens.double().sum()
        mean = float((w * self.nll_per_token.double()).sum())
        se = float(torch.sqrt((w**2 * self.stderr.double() ** 2).sum()))
        return mean, se


@dataclass
class LoglikResult:
    """A log-likelihood estimate of a completion given a prompt (nats)."""

    loglik: float
    stderr: float = 0.0
    is_greedy: bool = False
    num_tokens: int = 0


def _token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(targets) under logits [..., V], in float64. targets: [...]."""
    return torch.log_softmax(logits.double(), dim=-1).gather(-1, targets[..., None]).squeeze(-1)


def _check_args(mask_id: int, num_samples: int, t_sampling: str, *seqs: torch.Tensor) -> None:
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    if t_sampling not in T_SAMPLING:
        raise ValueError(f"t_sampling: expected one of {T_SAMPLING}, got {t_sampling!r}")
    for s in seqs:
        if bool((s == mask_id).any()):
            raise ValueError(f"the tokens to score contain the mask token id {mask_id}")


def _mc_weighted_nll(
    logits_fn: LogitsFn,
    tokens: torch.Tensor,
    eligible: torch.Tensor,
    mask_id: int,
    num_samples: int,
    eps: float,
    t_sampling: str,
    generator: torch.Generator | None,
    vocab_size: int | None,
    batch_size: int | None,
    cfg_scale: float,
) -> torch.Tensor:
    """Per-sample sum_{i masked} -log p(x_0[i] | x_t) / t. tokens, eligible: [b, s]. Returns [b, N]."""
    b = tokens.shape[0]
    antithetic = t_sampling == "antithetic"
    # t for the N samples of each sequence, stratified per sequence when antithetic
    t = torch.stack([sample_t(num_samples, eps, generator, antithetic) for _ in range(b)])  # [b, N]
    rows = tokens.repeat_interleave(num_samples, dim=0)  # [b*N, s]
    rows_eligible = eligible.repeat_interleave(num_samples, dim=0)  # [b*N, s]
    t_rows = t.reshape(-1)  # [b*N]
    chunk = batch_size or rows.shape[0]
    out = torch.empty(rows.shape[0], dtype=torch.float64)
    for start in range(0, rows.shape[0], chunk):
        sl = slice(start, start + chunk)
        noisy, masked = forward_mask(rows[sl], t_rows[sl].to(rows.device), mask_id, generator, rows_eligible[sl])
        out[sl] = _masked_nll_over_t(logits_fn, rows[sl], noisy, masked, t_rows[sl], rows_eligible[sl], mask_id,
                                     vocab_size, cfg_scale)
    return out.view(b, num_samples)


def _masked_nll_over_t(logits_fn, rows, noisy, masked, t_rows, eligible, mask_id, vocab_size, cfg_scale):
    """sum_{i masked} -log p(rows[i] | noisy) / t for each row (float64, CPU): rows/noisy/masked [c, s].

    Logits are asked for the masked positions only (the head runs there only, when the model can)."""
    prompt_mask = ~eligible if cfg_scale != 0.0 else None
    masked = masked.to(noisy.device)
    logits = model_logits(logits_fn, noisy, mask_id, vocab_size, cfg_scale, prompt_mask, select=masked)  # [n, V]
    nll = -_token_logprobs(logits, rows[masked].to(logits.device))  # [n]
    row_of = masked.nonzero(as_tuple=True)[0].to(nll.device)  # [n] row of each masked entry
    per_row = torch.zeros(rows.shape[0], dtype=nll.dtype, device=nll.device).index_add_(0, row_of, nll)
    return (per_row / t_rows.double().to(nll.device)).cpu()


def _mean_stderr(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and standard error over the last dim of x [..., N] (0 when N == 1)."""
    n = x.shape[-1]
    se = x.std(dim=-1, correction=1) / math.sqrt(n) if n > 1 else torch.zeros_like(x[..., 0])
    return x.mean(dim=-1), se


@torch.no_grad()
def mc_elbo(
    logits_fn: LogitsFn,
    tokens: torch.Tensor,
    mask_id: int,
    num_samples: int,
    eps: float = 1e-3,
    t_sampling: str = "uniform",
    loss_mask: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    vocab_size: int | None = None,
    batch_size: int | None = None,
) -> ElboResult:
    """Monte Carlo ELBO: an upper bound on the NLL per token of each sequence.

    Args:
        logits_fn: bidirectional model, input_ids [b, s] -> logits [b, s, V_padded].
        tokens: clean sequences x_0, int64 [b, s].
        mask_id: id of the mask token.
        num_samples: N draws of (t, x_t) per sequence.
        eps: lower bound of t (as in training).
        t_sampling: ``uniform`` (i.i.d.) or ``antithetic`` (stratified over each sequence's N draws).
        loss_mask: [b, s], nonzero where a position is scored (and may be masked); default all.
        generator: the only source of randomness.
        vocab_size: real vocabulary size; logits beyond it are ignored.
        batch_size: rows per forward (default: all b * N at once).

    Returns:
        :class:`ElboResult` with nll_per_token [b] and stderr [b].
    """
    _check_args(mask_id, num_samples, t_sampling, tokens)
    eligible = torch.ones_like(tokens, dtype=torch.bool) if loss_mask is None else loss_mask != 0  # [b, s]
    n = eligible.sum(dim=1)  # [b]
    if bool((n == 0).any()):
        raise ValueError("a sequence has no eligible position (loss_mask all zero)")
    nll = _mc_weighted_nll(
        logits_fn, tokens, eligible, mask_id, num_samples, eps, t_sampling, generator, vocab_size, batch_size, 0.0
    )  # [b, N]
    per_token = nll / n.double().cpu()[:, None]
    mean, se = _mean_stderr(per_token)
    return ElboResult(mean, se, n.cpu(), per_token)


def _pair(prompt_ids: Sequence[int], completion_ids: Sequence[int], device) -> tuple[torch.Tensor, int]:
    prompt = torch.as_tensor(list(prompt_ids), dtype=torch.long)
    completion = torch.as_tensor(list(completion_ids), dtype=torch.long)
    if completion.numel() == 0:
        raise ValueError("the completion is empty")
    return torch.cat([prompt, completion]).to(device), prompt.numel()


@torch.no_grad()
def mc_conditional_loglik(
    logits_fn: LogitsFn,
    prompt_ids: Sequence[int],
    completion_ids: Sequence[int],
    mask_id: int,
    num_samples: int,
    eps: float = 1e-3,
    t_sampling: str = "antithetic",
    generator: torch.Generator | None = None,
    vocab_size: int | None = None,
    batch_size: int | None = None,
    cfg_scale: float = 0.0,
    device: torch.device | str | None = None,
) -> LoglikResult:
    """Monte Carlo lower bound on log p(completion | prompt) (prompt kept, completion masked at rate t).

    Args:
        logits_fn: bidirectional model.
        prompt_ids: prompt ids (may be empty).
        completion_ids: completion ids (non-empty).
        mask_id: id of the mask token.
        num_samples: N draws of (t, x_t).
        eps: lower bound of t.
        t_sampling: ``uniform`` or ``antithetic`` (stratified t over the N draws; SMDM's default).
        generator: the only source of randomness.
        vocab_size: real vocabulary size.
        batch_size: rows per forward (default N).
        cfg_scale: unsupervised CFG scale w (prompt masked in the unconditional input).
        device: where the ids are placed; default CPU.

    Returns:
        :class:`LoglikResult`: loglik (nats, summed over the completion) and its stderr.
    """
    seq, p = _pair(prompt_ids, completion_ids, device or "cpu")
    _check_args(mask_id, num_samples, t_sampling, seq)
    eligible = torch.zeros_like(seq, dtype=torch.bool)
    eligible[p:] = True
    nll = _mc_weighted_nll(
        logits_fn, seq[None], eligible[None], mask_id, num_samples, eps, t_sampling, generator, vocab_size,
        batch_size, cfg_scale,
    )[0]  # [N]
    mean, se = _mean_stderr(nll)
    return LoglikResult(-float(mean), float(se), False, seq.numel() - p)


@torch.no_grad()
def mc_conditional_loglik_candidates(
    logits_fn: LogitsFn,
    prompt_ids: Sequence[int],
    completions: Sequence[Sequence[int]],
    mask_id: int,
    num_samples: int,
    eps: float = 1e-3,
    t_sampling: str = "antithetic",
    generator: torch.Generator | None = None,
    vocab_size: int | None = None,
    batch_size: int | None = None,
    cfg_scale: float = 0.0,
    device: torch.device | str | None = None,
) -> list[LoglikResult]:
    """``mc_conditional_loglik`` for several candidate completions of one length, with shared draws.

    The N draws of (t, mask positions) depend only on the sequence shape, so they are drawn once and
    used for every candidate (common random numbers): the differences between candidates carry much
    less variance than with independent draws, and each value equals what ``mc_conditional_loglik``
    returns for that candidate from a generator in the same state (with ``batch_size`` None).

    Args:
        completions: C candidate completions, all of the same length.
        (the others as in ``mc_conditional_loglik``; ``batch_size`` counts rows per forward.)
    Returns:
        One :class:`LoglikResult` per candidate.
    """
    lengths = {len(c) for c in completions}
    if len(lengths) != 1:
        raise ValueError(f"candidates must have one length (pad them, e.g. with EOS); got lengths {sorted(lengths)}")
    seqs = torch.stack([_pair(prompt_ids, c, device or "cpu")[0] for c in completions])  # [C, s]
    p = len(prompt_ids)
    _check_args(mask_id, num_samples, t_sampling, seqs)
    eligible = torch.zeros(num_samples, seqs.shape[1], dtype=torch.bool, device=seqs.device)
    eligible[:, p:] = True
    t = sample_t(num_samples, eps, generator, t_sampling == "antithetic")  # [N]
    _, masked = forward_mask(seqs[:1].expand(num_samples, -1), t.to(seqs.device), mask_id, generator,
                             eligible)  # [N, s]: the same draws for every candidate
    c, n = seqs.shape[0], num_samples
    rows = seqs.repeat_interleave(n, dim=0)  # [C*N, s]
    m_rows, e_rows, t_rows = masked.repeat(c, 1), eligible.repeat(c, 1), t.repeat(c)
    noisy = torch.where(m_rows, torch.full_like(rows, mask_id), rows)
    chunk = batch_size or rows.shape[0]
    nll = torch.empty(rows.shape[0], dtype=torch.float64)
    for start in range(0, rows.shape[0], chunk):
        sl = slice(start, start + chunk)
        nll[sl] = _masked_nll_over_t(logits_fn, rows[sl], noisy[sl], m_rows[sl], t_rows[sl], e_rows[sl], mask_id,
                                     vocab_size, cfg_scale)
    mean, se = _mean_stderr(nll.view(c, n))
    return [LoglikResult(-float(mean[i]), float(se[i]), False, seqs.shape[1] - p) for i in range(c)]


@torch.no_grad()
def chain_rule_loglik(
    logits_fn: LogitsFn,
    prompt_ids: Sequence[int],
    completion_ids: Sequence[int],
    mask_id: int,
    order: str = "greedy",
    cfg_scale: float = 0.0,
    vocab_size: int | None = None,
    batch_size: int | None = None,
    device: torch.device | str | None = None,
) -> LoglikResult:
    """Chain-rule log p(completion | prompt), unmasking one completion token per forward.

    Args:
        logits_fn: bidirectional model.
        prompt_ids: prompt ids (may be empty).
        completion_ids: completion ids (c >= 1).
        mask_id: id of the mask token.
        order: ``greedy`` (most confident own prediction first) or ``left_to_right``.
        cfg_scale: unsupervised CFG scale w.
        vocab_size: real vocabulary size.
        batch_size: rows per forward for ``left_to_right`` (default all c).
        device: where the ids are placed; default CPU.

    Returns:
        :class:`LoglikResult` with the summed log-probability (exact for that order; stderr 0) and
        ``is_greedy``.
    """
    if order not in ORDERS:
        raise ValueError(f"order: expected one of {ORDERS}, got {order!r}")
    seq, p = _pair(prompt_ids, completion_ids, device or "cpu")
    _check_args(mask_id, 1, "uniform", seq)
    c = seq.numel() - p
    prompt_mask = torch.zeros_like(seq, dtype=torch.bool)
    prompt_mask[:p] = True
    if order == "left_to_right":
        # row j: completion positions >= j masked; predicts position p + j
        pos = torch.arange(c, device=seq.device)
        rows = seq.repeat(c, 1)  # [c, s]
        rows[:, p:] = torch.where(pos[None, :] >= pos[:, None], torch.full_like(rows[:, p:], mask_id), rows[:, p:])
        chunk = batch_size or c
        total, greedy = 0.0, True
        for start in range(0, c, chunk):
            r = rows[start : start + chunk]
            j = pos[start : start + chunk]
            at_pos = torch.zeros_like(r, dtype=torch.bool)
            at_pos[torch.arange(r.shape[0]), p + j] = True  # row i scores position p + j_i
            at = model_logits(logits_fn, r, mask_id, vocab_size, cfg_scale, prompt_mask.expand_as(r),
                              select=at_pos)  # [c', V]
            total += float(_token_logprobs(at, seq[p + j]).sum())
            greedy &= bool((at.argmax(-1) == seq[p + j]).all())
        return LoglikResult(total, 0.0, greedy, c)
    x = seq.clone()
    x[p:] = mask_id
    total, greedy = 0.0, True
    for _ in range(c):
        is_masked = x == mask_id  # [s]
        logits = model_logits(logits_fn, x[None], mask_id, vocab_size, cfg_scale, prompt_mask[None],
                              select=is_masked[None])  # [m, V]
        masked = is_masked.nonzero(as_tuple=True)[0]  # [m]
        logp = torch.log_softmax(logits.double(), dim=-1)  # [m, V]
        conf, pred = logp.max(dim=-1)  # confidence in the model's own argmax
        k = int(conf.argmax())  # first position among equally confident ones
        i = int(masked[k])
        total += float(logp[k, seq[i]])
        greedy &= int(pred[k]) == int(seq[i])
        x[i] = seq[i]
    return LoglikResult(total, 0.0, greedy, c)
