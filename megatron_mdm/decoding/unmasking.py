r"""Which masked positions to fill at a decoding step, and with what: the decoder of the loop.

At each step of a block every masked position i of the block gets a candidate x_0[i] and a score:

* candidate: ``argmax l[i]`` at temperature 0, else Gumbel-max ``argmax(l[i] / T + G)``,
  G ~ Gumbel(0, 1) in float64 from the explicit generator (an exact sample of softmax(l / T)), after
  optional top-k / top-p (nucleus) filtering;
* score (the remasking strategy, from the unfiltered softmax(l[i]), temperature 1 as LLaDA):
  ``low_confidence`` p(x_0[i]); ``random`` uniform; ``margin`` p(top-1) - p(top-2); ``entropy``
  minus the entropy of softmax(l[i]).

Candidates are ranked by score (ties by position: stable sort) and the n best are unmasked, where n is
given by one of three rules:

* **schedule** (LLaDA ``get_num_transfer_tokens``): a block with m masks and k steps unmasks
  ``m // k`` per step, the first ``m % k`` steps one more, so it is full after k steps;
* **threshold** (Fast-dLLM, confidence-aware parallel decoding): every candidate whose score exceeds
  ``threshold`` (strictly), at least one per step; a block takes as many steps as it needs;
* **factor** (Fast-dLLM's factor-based rule): with the scores sorted, c_1 >= c_2 >= ..., the largest n
  such that c_j >= 1 - factor / (j + 1) for every j <= n (n >= 1). Fast-dLLM's loop also takes the
  last candidate when only it fails; here the rule is applied as written.

Threshold and factor need a score in [0, 1] (``low_confidence`` or ``margin``).
"""

from __future__ import annotations

import torch

from .settings import PROBABILITY_SCORES, REMASKING  # noqa: E402,F401 - names live there


def num_transfer_tokens(num_masked: torch.Tensor, steps: int) -> torch.Tensor:
    """Linear schedule: how many masks to fill at each step (LLaDA ``get_num_transfer_tokens``).

    Args:
        num_masked: [b] masks in the block at its start.
        steps: iterations given to the block.

    Returns:
        [b, steps] int64, each row summing to ``num_masked``; earlier steps take the remainder.
    """
    base = num_masked[:, None] // steps  # [b, 1]
    rem = num_masked[:, None] % steps  # [b, 1]
    idx = torch.arange(steps, device=num_masked.device)[None, :]  # [1, steps]
    return base + (idx < rem).long()


def filter_top_k_top_p(logits: torch.Tensor, top_k: int | None, top_p: float | None) -> torch.Tensor:
    """Set logits outside the top-k / nucleus (top-p) set to -inf. logits: [n, V]."""
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]  # [n, 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True, stable=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # drop a token when the mass strictly before it already reaches top_p (the top-1 always stays)
        drop_sorted = (probs.cumsum(-1) - probs) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def uniform(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """float64 U(0, 1) drawn on the generator's device, moved to ``device``."""
    gen_device = generator.device if generator is not None else torch.device("cpu")
    return torch.rand(shape, generator=generator, dtype=torch.float64, device=gen_device).to(device)


def sample_candidates(logits: torch.Tensor, temperature: float, generator: torch.Generator | None) -> torch.Tensor:
    """Candidate x_0 per row of logits [n, V]: argmax at T = 0, else Gumbel-max in float64."""
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    u = uniform(tuple(logits.shape), generator, logits.device).clamp_(min=1e-300)
    gumbel = -torch.log(-torch.log(u))  # [n, V]
    return (logits.double() / temperature + gumbel).argmax(dim=-1)


def confidence(
    logits: torch.Tensor, x0: torch.Tensor, remasking: str, generator: torch.Generator | None
) -> torch.Tensor:
    """Score [n] of each candidate; higher is unmasked first. logits: [n, V], x0: [n]."""
    if remasking == "random":
        return uniform((logits.shape[0],), generator, logits.device)
    probs = torch.softmax(logits.double(), dim=-1)  # [n, V]
    if remasking == "low_confidence":
        return probs.gather(-1, x0[:, None]).squeeze(-1)
    if remasking == "margin":
        top2 = torch.topk(probs, 2, dim=-1).values  # [n, 2]
        return top2[:, 0] - top2[:, 1]
    if remasking == "entropy":
        plogp = torch.where(probs > 0, probs * probs.log(), torch.zeros_like(probs))
        return plogp.sum(-1)  # = -entropy
    raise ValueError(f"remasking: unknown strategy {remasking!r}; expected one of {REMASKING}")


def count_threshold(score: torch.Tensor, candidate: torch.Tensor, threshold: float) -> torch.Tensor:
    """[g] candidates to unmask: those scoring above ``threshold``, at least one (if any).

    Args:
        score: [g, n] scores (any value where ``candidate`` is False).
        candidate: [g, n] bool.
        threshold: the confidence a candidate must exceed.
    """
    m = candidate.sum(dim=1)  # [g]
    above = (candidate & (score > threshold)).sum(dim=1)
    return torch.minimum(above.clamp(min=1), m)


def count_factor(score: torch.Tensor, candidate: torch.Tensor, factor: float) -> torch.Tensor:
    """[g] candidates to unmask by the factor rule: the largest n with c_j >= 1 - factor/(j+1), j <= n."""
    g, n = score.shape
    s = torch.where(candidate, score.double(), torch.full_like(score, float("-inf"), dtype=torch.float64))
    s = torch.sort(s, dim=1, descending=True).values  # [g, n]
    j = torch.arange(1, n + 1, device=score.device, dtype=torch.float64)  # 1-based rank
    ok = s >= 1.0 - factor / (j + 1.0)  # [g, n]
    ok[:, 0] = True  # at least one per step
    ok &= j[None, :] <= candidate.sum(dim=1, keepdim=True)  # only real candidates
    return ok.long().cumprod(dim=1).sum(dim=1)
