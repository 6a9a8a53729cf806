"""The sampler of megatron_mdm/sampling.py before the decoding package (commit c57ae75), frozen.

The reference that ``megatron_mdm.decoding`` must reproduce token for token with ``cache="none"`` and
the schedule rule (tests/test_decoding.py). Its logits helpers (formerly guidance.py) are inlined so
that it shares no code with the package under test.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

LogitsFn = Callable[[torch.Tensor], torch.Tensor]
"""input_ids [b, s] (int64) -> logits [b, s, V] (float); bidirectional for an MDM."""


def apply_cfg(cond: torch.Tensor, uncond: torch.Tensor, cfg_scale: float) -> torch.Tensor:
    """Unsupervised classifier-free guidance: ``uncond + (w + 1) * (cond - uncond)``.

    Args:
        cond: logits of the conditional input, [..., V].
        uncond: logits of the input with the prompt masked, same shape.
        cfg_scale: the guidance scale w (SMDM/LLaDA convention; 0 returns ``cond``).

    Returns:
        Guided logits, same shape as ``cond``.
    """
    if cfg_scale == 0.0:
        return cond
    return uncond + (cfg_scale + 1.0) * (cond - uncond)


def clip_logits(logits: torch.Tensor, mask_id: int, vocab_size: int | None) -> torch.Tensor:
    """Drop padded-vocabulary logits and forbid the mask token.

    Args:
        logits: [b, s, V_padded] model output.
        mask_id: id of the mask token (its logit becomes -inf).
        vocab_size: real vocabulary size (mask token included); None keeps all of V_padded.

    Returns:
        float32 (or float64, if given) logits [b, s, V].
    """
    if vocab_size is not None:
        logits = logits[..., :vocab_size]
    if not logits.is_floating_point() or logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    else:
        logits = logits.clone()
    if 0 <= mask_id < logits.shape[-1]:
        logits[..., mask_id] = float("-inf")
    return logits


def model_logits(
    logits_fn: LogitsFn,
    input_ids: torch.Tensor,
    mask_id: int,
    vocab_size: int | None = None,
    cfg_scale: float = 0.0,
    prompt_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Logits of p_theta(x_0 | input_ids), with optional unsupervised CFG, in one forward.

    Args:
        logits_fn: the model, input_ids [b, s] -> logits [b, s, V_padded].
        input_ids: [b, s] int64 (mask tokens where x_0 is to be predicted).
        mask_id: id of the mask token.
        vocab_size: real vocabulary size; logits beyond it are ignored.
        cfg_scale: guidance scale w; 0 disables CFG (a single plain forward).
        prompt_mask: [b, s] bool, True at prompt positions; required when ``cfg_scale != 0``.
            The unconditional row is ``input_ids`` with these positions set to ``mask_id``.

    Returns:
        float logits [b, s, V] with the mask token at -inf.
    """
    if cfg_scale == 0.0:
        return clip_logits(logits_fn(input_ids), mask_id, vocab_size)
    if prompt_mask is None:
        raise ValueError("cfg_scale != 0 needs prompt_mask (the positions masked in the unconditional input)")
    uncond_ids = input_ids.masked_fill(prompt_mask.to(input_ids.device), mask_id)  # [b, s]
    both = logits_fn(torch.cat([input_ids, uncond_ids], dim=0))  # [2b, s, V_padded]
    both = clip_logits(both, mask_id, vocab_size)
    cond, uncond = both.chunk(2, dim=0)
    guided = apply_cfg(cond, uncond, cfg_scale)
    if 0 <= mask_id < guided.shape[-1]:
        guided[..., mask_id] = float("-inf")  # -inf - (-inf) is nan: restore it
    return guided


REMASKING = ("low_confidence", "random", "margin", "entropy")


@dataclass
class GenerationOutput:
    """Result of :func:`generate`.

    Attributes:
        tokens: [b, max_p + gen_length] int64; row i is ``prompt_i + generated_i`` followed by
            ``pad_id`` where prompt_i is shorter than the longest prompt.
        prompt_lengths: p_i per row.
        gen_length: number of generated positions per row.
        num_forward: model forward calls made (a CFG forward counts once; it is one batch).
    """

    tokens: torch.Tensor
    prompt_lengths: list[int]
    gen_length: int
    num_forward: int = 0
    eos_id: int | None = field(default=None, repr=False)

    def completions(self, strip_eos: bool = True) -> list[list[int]]:
        """Generated ids of each row, cut before the first EOS when ``strip_eos``."""
        out = []
        for row, p in zip(self.tokens.tolist(), self.prompt_lengths):
            gen = row[p : p + self.gen_length]
            if strip_eos and self.eos_id is not None and self.eos_id in gen:
                gen = gen[: gen.index(self.eos_id)]
            out.append(gen)
        return out


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


def _filter_top_k_top_p(logits: torch.Tensor, top_k: int | None, top_p: float | None) -> torch.Tensor:
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


def _uniform(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """float64 U(0, 1) drawn on the generator's device, moved to ``device``."""
    gen_device = generator.device if generator is not None else torch.device("cpu")
    return torch.rand(shape, generator=generator, dtype=torch.float64, device=gen_device).to(device)


def _sample(
    logits: torch.Tensor, temperature: float, generator: torch.Generator | None
) -> torch.Tensor:
    """Candidate x_0 per row of logits [n, V]: argmax at T = 0, else Gumbel-max in float64."""
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    u = _uniform(tuple(logits.shape), generator, logits.device).clamp_(min=1e-300)
    gumbel = -torch.log(-torch.log(u))  # [n, V]
    return (logits.double() / temperature + gumbel).argmax(dim=-1)


def _confidence(
    logits: torch.Tensor, x0: torch.Tensor, remasking: str, generator: torch.Generator | None
) -> torch.Tensor:
    """Score [n] of each candidate; higher is unmasked first. logits: [n, V], x0: [n]."""
    if remasking == "random":
        return _uniform((logits.shape[0],), generator, logits.device)
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


def _apply_eos(x: torch.Tensor, p: int, gen_length: int, mask_id: int, eos_id: int, done: torch.Tensor) -> None:
    """Mark rows whose span holds EOS with everything before it unmasked; fill their tail with EOS."""
    span = x[:, p : p + gen_length]  # [g, n] view
    is_eos = span == eos_id
    has_eos = is_eos.any(dim=1)
    first = torch.where(has_eos, is_eos.float().argmax(dim=1), torch.full_like(has_eos, gen_length, dtype=torch.long))
    pos = torch.arange(gen_length, device=x.device)[None, :]
    masked_before = ((span == mask_id) & (pos < first[:, None])).any(dim=1)
    finish = has_eos & ~masked_before & ~done
    if bool(finish.any()):
        tail = finish[:, None] & (pos > first[:, None])
        span.masked_fill_(tail, eos_id)
        done |= finish


@torch.no_grad()
def _generate_group(
    logits_fn: LogitsFn,
    prompt: torch.Tensor,
    gen_length: int,
    steps_per_block: int,
    block_length: int,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    remasking: str,
    cfg_scale: float,
    mask_id: int,
    eos_id: int | None,
    generator: torch.Generator | None,
    vocab_size: int | None,
) -> tuple[torch.Tensor, int]:
    """Sample rows that share one prompt length. prompt: [g, p]. Returns (x [g, p + n], forwards)."""
    g, p = prompt.shape
    x = torch.full((g, p + gen_length), mask_id, dtype=torch.long, device=prompt.device)
    x[:, :p] = prompt
    prompt_mask = torch.zeros_like(x, dtype=torch.bool)
    prompt_mask[:, :p] = True
    done = torch.zeros(g, dtype=torch.bool, device=x.device)
    forwards = 0
    for blk in range(gen_length // block_length):
        lo, hi = p + blk * block_length, p + (blk + 1) * block_length
        in_block = torch.zeros(x.shape[1], dtype=torch.bool, device=x.device)
        in_block[lo:hi] = True
        plan = num_transfer_tokens((x[:, lo:hi] == mask_id).sum(dim=1), steps_per_block)  # [g, k]
        for step in range(steps_per_block):
            if bool(done.all()):
                return x, forwards
            k = plan[:, step].masked_fill(done, 0)  # [g]
            if int(k.max()) == 0:
                continue
            logits = model_logits(logits_fn, x, mask_id, vocab_size, cfg_scale, prompt_mask)  # [g, L, V]
            forwards += 1
            candidate = (x == mask_id) & in_block[None, :]  # [g, L]
            rows, cols = candidate.nonzero(as_tuple=True)
            lg = logits[rows, cols]  # [n, V]
            x0 = _sample(_filter_top_k_top_p(lg, top_k, top_p), temperature, generator)  # [n]
            conf = torch.full(x.shape, float("-inf"), dtype=torch.float64, device=x.device)
            conf[rows, cols] = _confidence(lg, x0, remasking, generator)
            proposal = x.clone()
            proposal[rows, cols] = x0
            order = torch.sort(conf, dim=1, descending=True, stable=True).indices  # [g, L]
            rank = torch.empty_like(order).scatter_(1, order, torch.arange(x.shape[1], device=x.device).expand(g, -1))
            transfer = candidate & (rank < k[:, None])  # [g, L]
            x = torch.where(transfer, proposal, x)
            if eos_id is not None:
                _apply_eos(x, p, gen_length, mask_id, eos_id, done)
    return x, forwards


def _as_rows(prompt_ids: torch.Tensor | Sequence[Sequence[int]]) -> list[list[int]]:
    if isinstance(prompt_ids, torch.Tensor):
        if prompt_ids.dim() != 2:
            raise ValueError(f"prompt_ids: expected a [b, p] tensor, got shape {tuple(prompt_ids.shape)}")
        return prompt_ids.tolist()
    return [list(map(int, r)) for r in prompt_ids]


@torch.no_grad()
def generate(
    logits_fn: LogitsFn,
    prompt_ids: torch.Tensor | Sequence[Sequence[int]],
    gen_length: int,
    steps: int,
    mask_id: int,
    block_length: int | None = None,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    remasking: str = "low_confidence",
    cfg_scale: float = 0.0,
    eos_id: int | None = None,
    generator: torch.Generator | None = None,
    vocab_size: int | None = None,
    pad_id: int | None = None,
    device: str | torch.device | None = None,
) -> GenerationOutput:
    """Sample completions by iterative unmasking (see the module docstring for the algorithm).

    Args:
        logits_fn: bidirectional model, input_ids [b, s] -> logits [b, s, V_padded].
        prompt_ids: [b, p] tensor or a list of b prompts (lists of ids, possibly of different lengths).
        gen_length: number of positions to generate per row.
        steps: total iterations; a multiple of the number of blocks (steps <= gen_length is usual).
        mask_id: id of the mask token.
        block_length: semi-autoregressive block size dividing ``gen_length``; None = one block.
        temperature: 0 = greedy argmax (exactly reproducible); > 0 samples softmax(l / T).
        top_k: keep only the k most likely ids when sampling.
        top_p: nucleus sampling mass.
        remasking: ``low_confidence`` | ``random`` | ``margin`` | ``entropy``.
        cfg_scale: unsupervised CFG scale w (``uncond + (w + 1) (cond - uncond)``); 0 = no CFG.
        eos_id: stop a row at EOS (see module docstring); None never stops early.
        generator: the only source of randomness (Gumbel noise, random remasking).
        vocab_size: real vocabulary size; logits at ids >= vocab_size are ignored.
        pad_id: fills ``tokens`` after rows with shorter prompts; default ``eos_id``, else ``mask_id``.
        device: where input ids are placed; default CPU.

    Returns:
        :class:`GenerationOutput` with ``tokens`` [b, max_p + gen_length].
    """
    if remasking not in REMASKING:
        raise ValueError(f"remasking: unknown strategy {remasking!r}; expected one of {REMASKING}")
    if gen_length <= 0 or steps <= 0:
        raise ValueError(f"gen_length ({gen_length}) and steps ({steps}) must be positive")
    block_length = gen_length if block_length is None else block_length
    if block_length <= 0 or gen_length % block_length:
        raise ValueError(f"block_length ({block_length}) must divide gen_length ({gen_length})")
    num_blocks = gen_length // block_length
    if steps % num_blocks:
        raise ValueError(f"steps ({steps}) must be a multiple of the number of blocks ({num_blocks})")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    rows = _as_rows(prompt_ids)
    for r in rows:
        if mask_id in r:
            raise ValueError("a prompt contains the mask token id")
    device = torch.device(device) if device is not None else torch.device("cpu")
    pad = pad_id if pad_id is not None else (eos_id if eos_id is not None else mask_id)
    lengths = [len(r) for r in rows]
    max_p = max(lengths) if lengths else 0
    out = torch.full((len(rows), max_p + gen_length), pad, dtype=torch.long)
    forwards = 0
    for p in sorted(set(lengths)):
        idx = [i for i, n in enumerate(lengths) if n == p]
        prompt = torch.tensor([rows[i] for i in idx], dtype=torch.long, device=device).view(len(idx), p)
        x, n = _generate_group(
            logits_fn, prompt, gen_length, steps // num_blocks, block_length, temperature, top_k, top_p,
            remasking, cfg_scale, mask_id, eos_id, generator, vocab_size,
        )
        out[idx, : p + gen_length] = x.cpu()
        forwards += n
    return GenerationOutput(out, lengths, gen_length, forwards, eos_id)
