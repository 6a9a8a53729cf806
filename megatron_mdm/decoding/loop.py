r"""The one decoding loop: reverse-diffusion sampling for masked diffusion language models.

Start from ``prompt + [MASK] * gen_length`` and unmask. The generated span is split into
semi-autoregressive blocks of ``block_length`` tokens, decoded left to right (LLaDA, Sec. 2.4). In every
step of a block:

1. one forward gives logits for the block (two rows per sequence, batched, under unsupervised CFG;
   see ``decoding.logits``); ids >= vocab_size and the mask token are excluded; the output head runs
   on the block's positions only when the model supports it (a :class:`~.logits.ModelForward`);
2. candidates and scores for the masked positions of the block, and the number to unmask, come from
   ``decoding.unmasking`` (schedule with ``steps / num_blocks`` steps per block, or the
   ``threshold`` / ``factor`` rules of confidence-aware parallel decoding);
3. with a KV cache (``cache="prefix"|"dual"``, ``decoding.cache``) the first forward of each block
   (and every ``refresh_interval`` forwards) is a full one that records the cache; the other steps run
   only the block (dual) or the block and the masked suffix (prefix) against it.

Stop at EOS: once a row's generated span holds ``eos_id`` at position j and every position before j is
unmasked, positions after j are set to ``eos_id`` and the row is done; the loop stops when all rows are.

Prompts may differ in length (given as a list of lists). A model that takes padding
(``ModelForward.supports_padding``: the exported HF model) decodes them as one batch, left-padded to the
longest prompt: the pad positions are left out of every attention (a key mask) and each row's RoPE positions
start at its first token, so a row attends exactly to what it would alone. Other models decode the rows of
each prompt length as one batch. Either way no pad token is seen by the bidirectional model, and a row's
tokens sit at ``[p_i, p_i + gen_length)`` of the output. At temperature 0 with ``low_confidence``/``margin``/``entropy``
the output is a deterministic function of the logits (ties broken by position, stable sort). With
``cache="none"`` and the schedule rule this is exactly the LLaDA sampler.

The number of forwards is counted per batch (``num_forward``; a CFG forward counts once) and per row
(``forwards_per_row``: the forwards in which the row had a token to unmask).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from .logits import LogitsFn, ModelForward, model_logits
from .settings import DecodingConfig
from .unmasking import (
    confidence,
    count_factor,
    count_threshold,
    filter_top_k_top_p,
    num_transfer_tokens,
    sample_candidates,
)


@dataclass
class GenerationOutput:
    """Result of :func:`generate`.

    Attributes:
        tokens: [b, max_p + gen_length] int64; row i is ``prompt_i + generated_i`` followed by
            ``pad_id`` where prompt_i is shorter than the longest prompt.
        prompt_lengths: p_i per row.
        gen_length: number of generated positions per row.
        num_forward: model forward calls made (a CFG forward counts once; it is one batch).
        forwards_per_row: per row, the forwards in which it had a token to unmask.
    """

    tokens: torch.Tensor
    prompt_lengths: list[int]
    gen_length: int
    num_forward: int = 0
    eos_id: int | None = field(default=None, repr=False)
    forwards_per_row: list[int] = field(default_factory=list)

    def completions(self, strip_eos: bool = True) -> list[list[int]]:
        """Generated ids of each row, cut before the first EOS when ``strip_eos``."""
        out = []
        for row, p in zip(self.tokens.tolist(), self.prompt_lengths):
            gen = row[p : p + self.gen_length]
            if strip_eos and self.eos_id is not None and self.eos_id in gen:
                gen = gen[: gen.index(self.eos_id)]
            out.append(gen)
        return out


@dataclass
class _Settings:
    gen_length: int
    steps_per_block: int
    block_length: int
    temperature: float
    top_k: int | None
    top_p: float | None
    remasking: str
    cfg_scale: float
    mask_id: int
    eos_id: int | None
    vocab_size: int | None
    cache: str
    threshold: float | None
    factor: float | None
    refresh_interval: int | None


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


class _BlockForward:
    """The forwards of one group: full, or a window against the group's KV cache."""

    def __init__(self, model: LogitsFn, s: _Settings, prompt_mask: torch.Tensor, pad: torch.Tensor | None = None):
        self.model, self.s, self.prompt_mask, self.pad = model, s, prompt_mask, pad
        self.cache = None
        if s.cache != "none":
            if not isinstance(model, ModelForward) or not model.supports_cache:
                raise ValueError(f"cache={s.cache!r}: this model has no KV cache support (use cache='none', "
                                 "or a model from decoding.backends.hf / decoding.backends.megatron.MegatronForward)")
            self.cache = model.new_cache()

    def logits(self, x: torch.Tensor, lo: int, hi: int, refresh: bool, want: torch.Tensor | None = None):
        """Guided, clipped logits of the block ``[lo, hi)`` of x [g, L]: [g, hi - lo, V], or [n, V] at the
        True entries of ``want`` [g, hi - lo] (row-major order) when it is given."""
        s, L = self.s, x.shape[1]
        # a shifted model (--shift-logits) gets entry i from position i - 1: windows start one earlier
        ws = max(lo - 1, 0) if getattr(self.model, "shift", False) else lo
        if self.cache is None or refresh:
            if self.cache is not None:
                self.cache.record(ws, hi if s.cache == "dual" else None)
            start, ids = 0, x
        elif s.cache == "prefix":
            self.cache.window(ws, L)
            start, ids = ws, x[:, ws:]
        else:  # dual
            self.cache.window(ws, hi)
            start, ids = ws, x[:, ws:hi]
        if want is None:
            sel = None if (start, ids.shape[1]) == (lo, hi - lo) else slice(lo - start, hi - start)
        elif (start, ids.shape[1]) == (lo, hi - lo):
            sel = want
        else:
            sel = torch.zeros(ids.shape, dtype=torch.bool, device=want.device)
            sel[:, lo - start : hi - start] = want
        pm = self.prompt_mask[:, start : start + ids.shape[1]] if s.cfg_scale != 0.0 else None
        return model_logits(self.model, ids, s.mask_id, s.vocab_size, s.cfg_scale, pm, select=sel, start=start,
                            cache=self.cache, pad=self.pad)


def _num_to_unmask(s: _Settings, score: torch.Tensor, candidate: torch.Tensor, planned: torch.Tensor | None):
    if s.threshold is not None:
        return count_threshold(score, candidate, s.threshold)
    if s.factor is not None:
        return count_factor(score, candidate, s.factor)
    return planned


@torch.no_grad()
def _decode_group(model: LogitsFn, prompt: torch.Tensor, s: _Settings, generator, progress,
                  pad: torch.Tensor | None = None) -> tuple:
    """Decode one batch. prompt: [g, p], left-padded by ``pad`` [g] positions per row (None: no padding).
    Returns (x [g, p + n], forwards, per_row)."""
    g, p = prompt.shape
    x = torch.full((g, p + s.gen_length), s.mask_id, dtype=torch.long, device=prompt.device)
    x[:, :p] = prompt
    prompt_mask = torch.zeros_like(x, dtype=torch.bool)
    prompt_mask[:, :p] = True
    if pad is not None:
        prompt_mask &= torch.arange(x.shape[1], device=x.device)[None, :] >= pad[:, None]
    done = torch.zeros(g, dtype=torch.bool, device=x.device)  # rows stopped at EOS (only with eos_id)
    per_row = torch.zeros(g, dtype=torch.long, device=x.device)
    fwd = _BlockForward(model, s, prompt_mask, pad)
    forwards = 0
    adaptive = s.threshold is not None or s.factor is not None
    stops = s.eos_id is not None
    uniform_forwards = 0  # forwards in which every row had tokens to unmask (counted per step otherwise)
    for blk in range(s.gen_length // s.block_length):
        lo, hi = p + blk * s.block_length, p + (blk + 1) * s.block_length
        same = None
        if not adaptive:
            plan = num_transfer_tokens((x[:, lo:hi] == s.mask_id).sum(dim=1), s.steps_per_block)  # [g, steps]
            busy = (plan.max(dim=0).values > 0).tolist()  # steps with something to unmask (before EOS stops)
            # every row unmasks the same number at each step (no EOS stop): that number, else None
            same = plan[0].tolist() if not stops and bool((plan == plan[:1]).all()) else None
        step, block_forwards = 0, 0
        while True:
            if stops and bool(done.all()):
                return x, forwards, (per_row + uniform_forwards).cpu()
            masked = x[:, lo:hi] == s.mask_id  # [g, B]
            candidate = masked & ~done[:, None] if stops else masked  # [g, B]
            if adaptive:
                if not bool(candidate.any()):
                    break
                planned = None
                wants = candidate.any(dim=1)  # [g]
            else:
                if step == s.steps_per_block:
                    break
                step += 1
                if not busy[step - 1]:
                    continue
                if same is None:
                    planned = plan[:, step - 1].masked_fill(done, 0) if stops else plan[:, step - 1]  # [g]
                    if stops and int(planned.max()) == 0:
                        continue
                    wants = planned > 0
            refresh = block_forwards == 0 or (s.refresh_interval is not None and block_forwards % s.refresh_interval == 0)
            rows, cols = candidate.nonzero(as_tuple=True)
            lg = fwd.logits(x, lo, hi, refresh, candidate)  # [n, V]: the candidates' logits only
            forwards += 1
            block_forwards += 1
            if same is None:
                per_row += wants
            else:  # every row had tokens to unmask
                uniform_forwards += 1
            x0 = sample_candidates(filter_top_k_top_p(lg, s.top_k, s.top_p), s.temperature, generator)  # [n]
            score = torch.full(masked.shape, float("-inf"), dtype=torch.float64, device=x.device)
            score[rows, cols] = confidence(lg, x0, s.remasking, generator)
            block = x[:, lo:hi]  # [g, B] view: written in place
            proposal = torch.empty_like(block)
            proposal[rows, cols] = x0
            order = torch.sort(score, dim=1, descending=True, stable=True).indices  # best first, ties by position
            if same is not None:  # the k best of every row
                chosen = order[:, : same[step - 1]]
                block.scatter_(1, chosen, proposal.gather(1, chosen))
                unmasked = chosen.numel()
            else:
                n = _num_to_unmask(s, score, candidate, planned)  # [g]
                transfer = (order.argsort(dim=1) < n[:, None]) & candidate  # rank < n
                block.copy_(torch.where(transfer, proposal, block))
                unmasked = transfer
            if progress is not None:
                progress.update(unmasked if isinstance(unmasked, int) else int(unmasked.sum()))
            if stops:
                _apply_eos(x, p, s.gen_length, s.mask_id, s.eos_id, done)
    return x, forwards, (per_row + uniform_forwards).cpu()


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
    cache: str = "none",
    threshold: float | None = None,
    factor: float | None = None,
    refresh_interval: int | None = None,
    progress: bool = False,
) -> GenerationOutput:
    """Sample completions by iterative unmasking (see the module docstring for the algorithm).

    The sampler's settings are the fields of :class:`~megatron_mdm.decoding.settings.DecodingConfig` (defaults
    there); :func:`decode` takes them as one object.

    Args:
        logits_fn: bidirectional model, input_ids [b, s] -> logits [b, s, V_padded]; a
            :class:`~megatron_mdm.decoding.logits.ModelForward` for the KV cache and block-only logits.
        prompt_ids: [b, p] tensor or a list of b prompts (lists of ids, possibly of different lengths).
        gen_length: number of positions to generate per row.
        steps: total iterations of the schedule rule; a multiple of the number of blocks (unused by
            the threshold and factor rules, which take as many steps as a block needs).
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
        cache: ``none`` | ``prefix`` | ``dual`` (see ``decoding.cache``).
        threshold: unmask every candidate whose confidence exceeds it (at least one per step).
        factor: Fast-dLLM's factor-based parallel unmasking rule.
        refresh_interval: with a cache, also re-record it every this many forwards of a block
            (1 = every step, the uncached computation); None = at the start of each block only.
        progress: show a tqdm bar of unmasked tokens (on stderr, only when it is a terminal).

    Returns:
        :class:`GenerationOutput` with ``tokens`` [b, max_p + gen_length] and the forward counts.
    """
    settings = DecodingConfig(gen_length=gen_length, steps=steps, block_length=block_length, temperature=temperature,
                              top_k=top_k, top_p=top_p, remasking=remasking, cfg_scale=cfg_scale, cache=cache,
                              threshold=threshold, factor=factor, refresh_interval=refresh_interval)
    return decode(logits_fn, prompt_ids, settings, mask_id, eos_id=eos_id, generator=generator,
                  vocab_size=vocab_size, pad_id=pad_id, device=device, progress=progress)


@torch.no_grad()
def decode(
    logits_fn: LogitsFn,
    prompt_ids: torch.Tensor | Sequence[Sequence[int]],
    settings: DecodingConfig,
    mask_id: int,
    eos_id: int | None = None,
    generator: torch.Generator | None = None,
    vocab_size: int | None = None,
    pad_id: int | None = None,
    device: str | torch.device | None = None,
    progress: bool = False,
) -> GenerationOutput:
    """:func:`generate` with its sampler settings as one :class:`~megatron_mdm.decoding.settings.DecodingConfig`
    (validated here; ValueError naming the setting); the other arguments are :func:`generate`'s."""
    d = settings.validate()
    gen_length = d.gen_length
    s = _Settings(gen_length, d.steps // d.num_blocks, d.block, d.temperature, d.top_k, d.top_p, d.remasking,
                  d.cfg_scale, mask_id, eos_id, vocab_size, d.cache, d.threshold, d.factor, d.refresh_interval)
    rows = _as_rows(prompt_ids)
    for r in rows:
        if mask_id in r:
            raise ValueError("a prompt contains the mask token id")
    device = torch.device(device) if device is not None else torch.device("cpu")
    pad = pad_id if pad_id is not None else (eos_id if eos_id is not None else mask_id)
    lengths = [len(r) for r in rows]
    max_p = max(lengths) if lengths else 0
    out = torch.full((len(rows), max_p + gen_length), pad, dtype=torch.long)
    per_row = [0] * len(rows)
    forwards = 0
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(rows) * gen_length, unit="tok", desc="decoding", disable=None, leave=False)
    padded = len(set(lengths)) > 1 and getattr(logits_fn, "supports_padding", False)
    groups = [list(range(len(rows)))] if padded else [[i for i, n in enumerate(lengths) if n == p]
                                                         for p in sorted(set(lengths))]
    try:
        for idx in groups:
            p = max(lengths[i] for i in idx)
            prompt = torch.zeros((len(idx), p), dtype=torch.long)
            for k, i in enumerate(idx):  # left-padded (only in a padded batch)
                prompt[k, p - lengths[i] :] = torch.tensor(rows[i], dtype=torch.long)
            left = torch.tensor([p - lengths[i] for i in idx], device=device) if padded else None
            x, n, counts = _decode_group(logits_fn, prompt.to(device), s, generator, bar, left)
            x = x.cpu()
            for k, i in enumerate(idx):
                out[i, : lengths[i] + gen_length] = x[k, p - lengths[i] :]
            forwards += n
            for i, c in zip(idx, counts.tolist()):
                per_row[i] = c
    finally:
        if bar is not None:
            bar.close()
    return GenerationOutput(out, lengths, gen_length, forwards, eos_id, per_row)
