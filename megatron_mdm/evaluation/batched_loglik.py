r"""Log-likelihoods of many (context, continuation) requests, their forwards shared across requests.

The lm-eval adapter scores thousands of short requests; one request alone fills a forward with only its
own rows (N Monte Carlo draws, or c chain-rule rows). Here every request is turned into **rows** (model
input, clean targets, scored positions, the rate t of each row), rows of requests whose sequences have
the same length are stacked into forwards of ``batch_size`` rows, and each request's value is assembled
from its rows. A bidirectional model sees no padding: only sequences of one length share a forward.

Randomness is per request: each request's draws come from its own ``torch.Generator``, seeded from the
run seed and the request's tokens (:func:`request_seed`), and drawn the way the single-request
estimators of ``megatron_mdm.likelihood`` draw them with ``batch_size=None``. So a request's value does
not depend on the batch size, on the other requests or on their order, and equals
``mc_conditional_loglik`` / ``chain_rule_loglik(order="left_to_right")`` / ``mc_elbo`` called alone
with a generator in that state. Continuations of one length after one context get the same draws of
(t, masked positions): common random numbers for the choices of a multiple-choice question.
"""

from __future__ import annotations

import hashlib
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch

from megatron_mdm.decoding.logits import LogitsFn, model_logits
from megatron_mdm.objective import forward_mask, sample_t


def request_seed(seed: int, *parts: Sequence[int] | int) -> int:
    """A stable 63-bit seed from the run seed and a request's token ids (not Python's salted ``hash``)."""
    h = hashlib.sha256(str(int(seed)).encode())
    for part in parts:
        h.update(b"|" + (",".join(map(str, part)) if not isinstance(part, int) else str(part)).encode())
    return int.from_bytes(h.digest()[:8], "little") >> 1


@dataclass
class Rows:
    """The rows of one request (or one window of it), all of sequence length s.

    Attributes:
        owner: index of the result this row set adds to.
        inputs: [k, s] model input ids (mask tokens where predicted).
        targets: [k, s] clean ids.
        select: [k, s] bool, the positions scored (their log-probabilities are summed per row).
        prompt_mask: [k, s] bool, masked in the unconditional input under CFG.
        t: [k] float64, each row's sum is divided by it (the MC weight 1/t; 1 for the chain rule).
    """

    owner: int
    inputs: torch.Tensor
    targets: torch.Tensor
    select: torch.Tensor
    prompt_mask: torch.Tensor
    t: torch.Tensor
    key: int = -1


def mc_rows(owner: int, tokens: Sequence[int], prompt_len: int, num_samples: int, eps: float, mask_id: int,
            generator: torch.Generator) -> Rows:
    """N draws of (t, x_t) with the prompt kept: the draws of ``mc_conditional_loglik`` (antithetic t).

    With ``prompt_len`` 0 every position is eligible: the draws of ``mc_elbo`` on one sequence."""
    seq = torch.as_tensor(list(tokens), dtype=torch.long)
    eligible = torch.zeros_like(seq, dtype=torch.bool)
    eligible[prompt_len:] = True
    t = sample_t(num_samples, eps, generator, True).double()  # [N]
    rows = seq[None].repeat(num_samples, 1)  # [N, s]
    rows_eligible = eligible[None].repeat(num_samples, 1)
    noisy, masked = forward_mask(rows, t, mask_id, generator, rows_eligible)
    return Rows(owner, noisy, rows, masked, ~rows_eligible, t)


def chain_rows(owner: int, tokens: Sequence[int], prompt_len: int, mask_id: int) -> Rows:
    """The c rows of the left-to-right chain rule: row j has completion positions >= j masked, scores p + j."""
    seq = torch.as_tensor(list(tokens), dtype=torch.long)
    p, c = prompt_len, seq.numel() - prompt_len
    pos = torch.arange(c)
    rows = seq[None].repeat(c, 1)  # [c, s]
    inputs = rows.clone()
    inputs[:, p:] = torch.where(pos[None, :] >= pos[:, None], torch.full_like(rows[:, p:], mask_id), rows[:, p:])
    select = torch.zeros_like(rows, dtype=torch.bool)
    select[pos, p + pos] = True
    prompt_mask = torch.zeros_like(rows, dtype=torch.bool)
    prompt_mask[:, :p] = True
    return Rows(owner, inputs, rows, select, prompt_mask, torch.ones(c, dtype=torch.float64))


@dataclass
class Scorer:
    """Runs stacked rows through the model: per row, sum over selected positions of log p(target) / t."""

    logits_fn: LogitsFn
    mask_id: int
    vocab_size: int | None = None
    cfg_scale: float = 0.0

    @torch.no_grad()
    def __call__(self, rows: Rows) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (loglik [k] float64, greedy [k] bool: every selected argmax was the target)."""
        prompt_mask = rows.prompt_mask if self.cfg_scale != 0.0 else None
        logits = model_logits(self.logits_fn, rows.inputs, self.mask_id, self.vocab_size, self.cfg_scale, prompt_mask,
                              select=rows.select)  # [n, V]
        targets = rows.targets[rows.select].to(logits.device)  # [n]
        lp = torch.log_softmax(logits.double(), dim=-1).gather(-1, targets[:, None]).squeeze(-1)  # [n]
        row_of = rows.select.nonzero(as_tuple=True)[0].to(lp.device)  # [n]
        k = rows.inputs.shape[0]
        per_row = torch.zeros(k, dtype=torch.float64, device=lp.device).index_add_(0, row_of, lp)
        wrong = torch.zeros(k, dtype=torch.long, device=lp.device).index_add_(
            0, row_of, (logits.argmax(-1) != targets).long())
        return (per_row / rows.t.to(lp.device)).cpu(), (wrong == 0).cpu()


def _cat(parts: list[Rows]) -> Rows:
    return Rows(-1, *(torch.cat([getattr(r, f) for r in parts]) for f in ("inputs", "targets", "select",
                                                                          "prompt_mask", "t")))


def _cut(r: Rows, lo: int, hi: int) -> Rows:
    return Rows(r.owner, r.inputs[lo:hi], r.targets[lo:hi], r.select[lo:hi], r.prompt_mask[lo:hi], r.t[lo:hi], r.key)


def _take(pending: deque[Rows], n: int) -> list[Rows]:
    """The first n rows of the queue (splitting a set when it does not fit)."""
    out, have = [], 0
    while pending and have < n:
        r = pending.popleft()
        k = r.inputs.shape[0]
        if have + k > n:
            pending.appendleft(_cut(r, n - have, k))
            r = _cut(r, 0, n - have)
            k = n - have
        out.append(r)
        have += k
    return out


def run_batched(
    jobs: Iterable[tuple[int, Callable[[], Rows]]],
    scorer: Scorer,
    batch_size: int,
    on_done: Callable[[int, torch.Tensor, torch.Tensor], None],
) -> None:
    """Score row sets in forwards of ``batch_size`` rows, sharing forwards between sets of one length.

    Args:
        jobs: (sequence length, a function making the row set) per set, in the order to run them (sort
            them by length first: only consecutive sets of one length share a forward). Rows are made
            lazily, so only about ``batch_size`` rows plus one set are held at a time.
        scorer: the model and its settings.
        batch_size: rows per forward (a set larger than that is split over several forwards).
        on_done: called as ``on_done(owner, loglik [k], greedy [k])`` once per set, with its rows' values,
            as soon as its last row is scored.
    """
    batch_size = max(int(batch_size), 1)
    pending: deque[Rows] = deque()  # rows not yet run, all of one sequence length
    queued = 0
    parts: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}  # set key -> scored pieces
    sets: dict[int, tuple[int, int]] = {}  # set key -> (owner, rows)

    def run(n: int) -> None:
        nonlocal queued
        chunk = _take(pending, n)
        queued -= sum(r.inputs.shape[0] for r in chunk)
        ll, greedy = scorer(_cat(chunk))
        off = 0
        for r in chunk:
            k = r.inputs.shape[0]
            parts.setdefault(r.key, []).append((ll[off : off + k], greedy[off : off + k]))
            off += k
            owner, total = sets[r.key]
            if sum(p[0].numel() for p in parts[r.key]) == total:
                pieces = parts.pop(r.key)
                del sets[r.key]
                on_done(owner, torch.cat([p[0] for p in pieces]), torch.cat([p[1] for p in pieces]))

    length = None
    for key, (s, make) in enumerate(jobs):
        if s != length:
            while queued:
                run(batch_size)
            length = s
        r = make()
        r.key = key
        sets[key] = (r.owner, r.inputs.shape[0])
        pending.append(r)
        queued += r.inputs.shape[0]
        while queued >= batch_size:
            run(batch_size)
    while queued:
        run(batch_size)

