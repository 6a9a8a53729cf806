r"""Training objectives: the masked diffusion (MDM) loss and the autoregressive (ARM) baseline.

Masked diffusion (Nie et al. 2025, "Scaling up Masked Diffusion Models on Text"; SMDM):

    t ~ U(eps, 1)                              one draw per sequence
    x_t[i] = [MASK] with probability t         independently per eligible position i, else x_0[i]
    L = 1/(B * L) * sum_b sum_{i masked} -log p_theta(x_0[b, i] | x_t[b]) / t_b

``L`` is an upper bound on the negative log-likelihood per token (the ELBO). Positions excluded by
``loss_mask`` (prompts, padding) are never masked and carry no loss; the normaliser is then the
number of eligible positions (``B * L`` in pretraining, where every position is eligible).

Options:
  * ``t_sampling="antithetic"``: low-discrepancy t within a micro-batch (MDLM): u_b = (r + b)/B mod 1
    with a single r ~ U(0, 1), then t = eps + (1 - eps) u; lowers the variance of the estimate.
  * ``random_length_prob``: a fraction of sequences is cut to a random length l ~ U{1..L}; the tail is
    replaced by the pad token and is out of the loss (the SMDM/LLaDA variable-length trick, done per
    sequence with fixed tensor shapes so that pipeline parallelism keeps static shapes). Unset, it is
    0.01 in pretraining and 0 in instruction tuning (``data_setup``), where it would cut completions.

Instruction data (``doc_ids``, from ``mdm-data prepare-sft``): each example of a packed sequence draws its
own t and is normalised by its own eligible positions, the batch by its number of examples (LLaDA's SFT
loss, averaged over examples); ``document_attention_mask`` keeps attention inside each example.

ARM baseline: causal attention, next-token prediction: labels[i] = x[i + 1]; the last position has
no target; loss is the mean cross-entropy over predicted positions.

Adaptation from an autoregressive model (both off by default):
  * ``shift_logits`` (Dream, Ye et al. 2025; DiffuLLaMA, Gong et al. 2025): the output at position i
    predicts x_0[i + 1], as the AR head was trained to. The same masked set and 1/t weights, with the
    weight of the output at i taken from position i + 1; position 0 is context (never masked):

        L = 1/(B * (L - 1)) * sum_b sum_{i >= 1 masked} -log p_theta(x_0[b, i] | x_t[b])_{output i - 1} / t_b

    Decoders re-align the outputs with ``shift_logits``: aligned[:, i] = raw[:, i - 1] (position 0 keeps
    its own output, which is never used for a masked token: it is always part of the prompt).
  * ``attention_anneal_iters = N`` (DiffuLLaMA): at step k the attention mask is causal plus each
    non-causal pair (i, j > i) with probability r_k = min(1, k / N), one [S, S] draw per micro-batch shared
    by all layers and heads (``annealed_attention_mask``): causal at k = 0, bidirectional from k = N.
    DiffuLLaMA uses (k + 1) / N; k / N makes the first step exactly the AR model's attention.

Every function here is pure: randomness comes only from the ``torch.Generator`` passed in. The
per-token cross-entropy is computed by Megatron-core's vocabulary-parallel cross-entropy inside
``GPTModel.forward(labels=...)``, so tensor parallelism works; ``loss`` weights that tensor.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from megatron_mdm.config import ObjectiveConfig


def sample_t(
    batch_size: int,
    eps: float,
    generator: Optional[torch.Generator],
    antithetic: bool = False,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Draw the masking rates t ~ U(eps, 1), one per sequence.

    Args:
        batch_size: number of sequences B.
        eps: lower bound of t.
        generator: source of randomness (CPU generator).
        antithetic: stratify the B draws over [0, 1) with one shared offset (low discrepancy).
        device: device of the result.

    Returns:
        t: float32 tensor [B] with values in [eps, 1).
    """
    if antithetic:
        r = torch.rand(1, generator=generator, dtype=torch.float64)
        u = (r + torch.arange(batch_size, dtype=torch.float64)) / batch_size  # [B] in [0, 1)
        u = u % 1.0
    else:
        u = torch.rand(batch_size, generator=generator, dtype=torch.float64)
    t = eps + (1.0 - eps) * u
    return t.to(device=device, dtype=torch.float32)


def forward_mask(
    tokens: torch.Tensor,
    t: torch.Tensor,
    mask_id: int,
    generator: Optional[torch.Generator],
    loss_mask: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward (noising) process: replace each eligible token by ``mask_id`` with probability t.

    This is the project's single masking function: training, validation and likelihood estimation
    all call it.

    Args:
        tokens: clean tokens x_0, int64 [B, S].
        t: masking rate per sequence [B], or per position [B, S] (one rate per packed example).
        mask_id: id of the mask token.
        generator: source of randomness (CPU generator; draws are made on CPU so that every device
            and every tensor-parallel rank sees the same masks).
        loss_mask: optional [B, S], nonzero where a position may be masked (prompt/padding: 0).

    Returns:
        noisy: x_t, int64 [B, S].
        masked: bool [B, S], True where x_t is the mask token.
    """
    b, s = tokens.shape
    u = torch.rand(b, s, generator=generator, dtype=torch.float32)  # [B, S] on CPU
    rate = t.detach().float().cpu()
    masked = u < (rate if rate.dim() == 2 else rate[:, None])
    if loss_mask is not None:
        masked &= loss_mask.detach().cpu() != 0
    masked = masked.to(tokens.device)
    noisy = torch.where(masked, torch.full_like(tokens, mask_id), tokens)
    return noisy, masked


@dataclass
class PreparedBatch:
    """What the model consumes for one micro-batch, and how to weight its per-token loss."""

    inputs: torch.Tensor  # [B, S] int64: model input ids
    labels: torch.Tensor  # [B, S] int64: targets of the per-token cross-entropy
    weights: torch.Tensor  # [B, S] float32: per-token loss weight (0 = no loss)
    num_tokens: torch.Tensor  # [] int64: the normaliser of this micro-batch (eligible positions)
    t: Optional[torch.Tensor] = None  # [B] masking rates, [B, S] with doc_ids (MDM only)
    count_mask: Optional[torch.Tensor] = None  # [B, S] bool: the positions num_tokens counts
    attention_mask: Optional[torch.Tensor] = None  # [1 or B, 1, S, S] bool, True = masked out (annealing, packing)
    answer_weights: Optional[torch.Tensor] = None  # [B, S] float32: the completion-only loss (SFT), token-normalised
    answer_mask: Optional[torch.Tensor] = None  # [B, S] bool: the positions its normaliser counts

    def split(self, keys_to_tensors) -> "PreparedBatch":
        """A copy with ``inputs/labels/weights/count_mask`` replaced (a context-parallel slice);
        the normaliser becomes the count of the slice."""
        d = dict(keys_to_tensors)
        count = d.get("count_mask")
        return PreparedBatch(d["inputs"], d["labels"], d["weights"],
                             count.sum() if count is not None else self.num_tokens, self.t, count,
                             self.attention_mask, d.get("answer_weights"), d.get("answer_mask"))


def _check_no_mask_token(tokens: torch.Tensor, mask_id: int) -> None:
    if bool((tokens == mask_id).any()):
        raise ValueError(
            f"the data contains the mask token id {mask_id}: the mask token must never be a target "
            "(check the tokenizer used to prepare the shards)"
        )


PRETRAIN_RANDOM_LENGTH_PROB = 0.01
"""``random_length_prob`` when not set, outside instruction tuning (``data_setup`` sets 0 for SFT data)."""


def _random_length_keep(
    b: int, s: int, prob: float, generator: Optional[torch.Generator]
) -> Optional[torch.Tensor]:
    """[B, S] bool keep-mask for the random-length trick, or None when no sequence is cut."""
    if prob <= 0:
        return None
    cut = torch.rand(b, generator=generator) < prob  # [B]
    if not bool(cut.any()):
        return None
    lengths = torch.randint(1, s + 1, (b,), generator=generator)  # [B]
    lengths = torch.where(cut, lengths, torch.full_like(lengths, s))
    return torch.arange(s)[None, :] < lengths[:, None]  # [B, S]


class Objective:
    """The contract the training loop relies on: ``causal``, ``prepare`` and ``loss``."""

    causal: bool = False

    def __init__(self, cfg: ObjectiveConfig, mask_id: int, pad_id: int):
        self.cfg = cfg
        self.mask_id = mask_id
        self.pad_id = pad_id

    def prepare(
        self,
        tokens: torch.Tensor,
        loss_mask: Optional[torch.Tensor],
        generator: Optional[torch.Generator],
        doc_ids: Optional[torch.Tensor] = None,
        answer_mask: Optional[torch.Tensor] = None,
    ) -> PreparedBatch:
        """Turn clean tokens into model inputs, targets and per-token loss weights.

        Args:
            tokens: clean tokens [B, S] (int64).
            loss_mask: [B, S] or None; zero positions are never masked and carry no loss.
            generator: CPU generator seeded per (seed, iteration, global micro-batch index).
            doc_ids: [B, S] int64, the example of each position (instruction data): each example gets its
                own normaliser (its eligible positions; the batch normaliser counts examples) and, for the
                MDM, its own t.
            answer_mask: [B, S] bool, the completion tokens: the batch also carries the token-normalised
                completion-only loss (``answer_weights``).
        """
        raise NotImplementedError

    def attention_mask(self, seq_len: int, iteration: int, generator: torch.Generator) -> Optional[torch.Tensor]:
        """This step's attention mask ([1, 1, S, S] bool, True = masked out), or None for the spec's own."""
        return None

    @staticmethod
    def loss(batch: PreparedBatch, per_token_loss: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Weighted loss sum and normaliser: loss = loss_sum / num_tokens.

        Args:
            per_token_loss: cross-entropy -log p(labels | inputs), float [B, S].
        Returns:
            (loss_sum [], num_tokens []).
        """
        w = batch.weights.to(per_token_loss.device)
        return (per_token_loss.float() * w).sum(), batch.num_tokens.to(per_token_loss.device)


class MDMObjective(Objective):
    """Masked diffusion objective: bidirectional attention, 1/t-weighted masked cross-entropy."""

    causal = False

    def prepare(self, tokens, loss_mask, generator, doc_ids=None, answer_mask=None) -> PreparedBatch:
        _check_no_mask_token(tokens, self.mask_id)
        b, s = tokens.shape
        eligible = (
            torch.ones(b, s, dtype=torch.bool)
            if loss_mask is None
            else (loss_mask.detach().cpu() != 0)
        )  # [B, S]
        if self.cfg.shift_logits:
            eligible[:, 0] = False  # no output predicts position 0: it is context
        prob = self.cfg.random_length_prob
        keep = _random_length_keep(b, s, PRETRAIN_RANDOM_LENGTH_PROB if prob is None else prob, generator)
        if keep is not None:
            tokens = torch.where(keep.to(tokens.device), tokens, torch.full_like(tokens, self.pad_id))
            eligible &= keep
        if doc_ids is not None:  # one t per example (row-major over [B, examples])
            docs = doc_ids.detach().cpu().long()
            k = int(docs.max()) + 1
            t = sample_t(b * k, self.cfg.eps, generator, self.cfg.t_sampling == "antithetic").view(b, k)
            t = t.gather(1, docs)  # [B, S]
        else:
            t = sample_t(b, self.cfg.eps, generator, self.cfg.t_sampling == "antithetic")  # [B]
        noisy, masked = forward_mask(tokens, t, self.mask_id, generator, eligible)
        dev = tokens.device
        t_pos = (t if t.dim() == 2 else t[:, None]).to(dev)
        raw = masked.float() / t_pos  # [B, S]
        answer = None if answer_mask is None else raw * answer_mask.to(dev)
        weights, count = raw, eligible
        if doc_ids is not None:
            weights, count = per_example(raw, eligible, docs)  # (with --shift-logits: rolled below)
        count = count.to(dev)
        labels = tokens
        if self.cfg.shift_logits:  # the output at i is scored on token i + 1 (weights[:, -1] = old [:, 0] = 0)
            labels, weights, count = (torch.roll(x, shifts=-1, dims=1) for x in (tokens, weights, count))
        out = PreparedBatch(noisy, labels, weights, count.sum(), t.to(dev), count)
        if answer is not None:
            answer_mask = answer_mask.to(dev).bool()
            if self.cfg.shift_logits:
                answer, answer_mask = (torch.roll(x, shifts=-1, dims=1) for x in (answer, answer_mask))
            out.answer_weights, out.answer_mask = answer, answer_mask
        return out

    def attention_mask(self, seq_len: int, iteration: int, generator: torch.Generator) -> Optional[torch.Tensor]:
        """The annealed attention mask of step ``iteration`` (None when bidirectional); see the module doc."""
        if self.cfg.attention_anneal_iters <= 0:
            return None
        return annealed_attention_mask(seq_len, anneal_ratio(iteration, self.cfg.attention_anneal_iters), generator)


def anneal_ratio(iteration: int, anneal_iters: int) -> float:
    """r_k = min(1, k / N): the probability that a non-causal pair attends at step k (0 when N = 0 is unused)."""
    return 1.0 if anneal_iters <= 0 else min(1.0, iteration / anneal_iters)


def annealed_attention_mask(seq_len: int, ratio: float, generator: Optional[torch.Generator]) -> Optional[torch.Tensor]:
    """DiffuLLaMA's annealed mask: (i, j) attends when j <= i or u_ij < ratio, u ~ U[0, 1) per pair.

    Args:
        seq_len: S.
        ratio: r in [0, 1]; 0 is causal, 1 bidirectional.
        generator: source of u (CPU; every rank of a replica and every pipeline stage draws the same).
    Returns:
        [1, 1, S, S] bool, True where attention is masked out (Megatron's convention), or None when r >= 1.
    """
    if ratio >= 1.0:
        return None
    u = torch.rand(seq_len, seq_len, generator=generator)  # [S, S]
    causal = torch.ones(seq_len, seq_len, dtype=torch.bool).tril()
    return ~(causal | (u < ratio))[None, None]


def anneal_generator(seed: int, iteration: int, microbatch: int) -> torch.Generator:
    """The generator of one micro-batch's annealed mask: independent of the data draws of ``mask_generator``,
    so that pipeline stages without data draw the same mask."""
    return mask_generator(seed + 0x6A09E667, iteration, microbatch)


def shift_logits(logits: torch.Tensor) -> torch.Tensor:
    """Re-align a shifted model's output to the positions it predicts: out[:, i] = logits[:, i - 1], i >= 1.

    Position 0 keeps its own output (Dream's convention); it is never a masked position to predict.

    Args:
        logits: [b, s, V] raw outputs (output i predicts token i + 1).
    Returns:
        [b, s, V] logits where entry i predicts token i.
    """
    return torch.cat([logits[:, :1], logits[:, :-1]], dim=1)


def aligned_logits_fn(logits_fn, shift: bool):
    """``logits_fn`` (input_ids [b, s] -> logits [b, s, V]) with ``shift_logits`` applied when ``shift``.

    The one place a shifted model's outputs are re-aligned for the decoders (sampling, likelihoods, lm-eval):
    wrap the model's logits function where it is loaded, then every consumer sees position-aligned logits.
    """
    if not shift:
        return logits_fn
    return lambda input_ids: shift_logits(logits_fn(input_ids))


class ARMObjective(Objective):
    """Autoregressive baseline: causal attention, next-token cross-entropy."""

    causal = True

    def prepare(self, tokens, loss_mask, generator, doc_ids=None, answer_mask=None) -> PreparedBatch:
        b, s = tokens.shape
        labels = torch.roll(tokens, shifts=-1, dims=1)  # [B, S]: labels[i] = tokens[i + 1]
        weights = torch.ones(b, s, dtype=torch.float32, device=tokens.device)
        weights[:, -1] = 0.0  # the last position has no next token
        if loss_mask is not None:
            # a target counts when the *target* position is eligible (completion tokens in SFT)
            weights *= torch.roll(loss_mask.float(), shifts=-1, dims=1).to(tokens.device)
        if doc_ids is not None:  # no target across an example boundary
            weights *= (doc_ids == torch.roll(doc_ids, shifts=-1, dims=1)).to(weights)
        answer = None
        if answer_mask is not None:
            answer = weights.bool() & torch.roll(answer_mask.bool(), shifts=-1, dims=1).to(weights.device)
        counted = weights != 0
        if doc_ids is not None:
            weights, counted = per_example(weights, counted, doc_ids)
        out = PreparedBatch(tokens, labels, weights, counted.sum(), None, counted)
        if answer is not None:
            out.answer_weights, out.answer_mask = answer.float(), answer
        return out


def per_example(weights: torch.Tensor, eligible: torch.Tensor, doc_ids: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Each example's own normaliser: ``weights`` divided by the eligible positions of the example, and a count
    mask holding one position per example that has any (its first eligible one), so that the batch normaliser
    (its sum, also over context-parallel slices) is the number of examples.

    Args:
        weights: [B, S] float loss weights. eligible: [B, S] bool. doc_ids: [B, S] int64 example ids.
    Returns:
        (weights [B, S], count_mask [B, S] bool).
    """
    docs = doc_ids.to(weights.device).long()
    elig = eligible.to(weights.device).bool()
    b, s = docs.shape
    k = int(docs.max()) + 1
    n = torch.zeros(b, k, dtype=torch.float64, device=docs.device).scatter_add_(1, docs, elig.double())
    w = (weights.double() / n.gather(1, docs).clamp(min=1)).to(weights.dtype)
    pos = torch.arange(s, device=docs.device).expand(b, s)
    first = torch.full((b, k), s, dtype=torch.long, device=docs.device).scatter_reduce_(
        1, docs, torch.where(elig, pos, torch.full_like(pos, s)), reduce="amin")
    return w, elig & (pos == first.gather(1, docs))


def document_attention_mask(doc_ids: torch.Tensor) -> Optional[torch.Tensor]:
    """Block-diagonal mask of packed examples: [B, 1, S, S] bool, True = masked out (Megatron's convention):
    position i attends to j only inside its own example. None when no row holds two examples."""
    if int(doc_ids.max()) == 0:
        return None
    return (doc_ids[:, :, None] != doc_ids[:, None, :])[:, None]


def build_objective(cfg: ObjectiveConfig, mask_id: int, pad_id: int) -> Objective:
    """The objective named by ``cfg.objective``."""
    if cfg.objective == "mdm":
        return MDMObjective(cfg, mask_id, pad_id)
    if cfg.objective == "arm":
        return ARMObjective(cfg, mask_id, pad_id)
    raise ValueError(f"--objective: unknown objective {cfg.objective!r}")


def mask_generator(seed: int, iteration: int, microbatch: int) -> torch.Generator:
    """The CPU generator of one micro-batch's draws (t, masks, random lengths).

    Seeded from (seed, iteration, global micro-batch index) only, where the global index is
    ``dp_rank * num_microbatches + local index``: every TP/PP rank of a replica draws the same t
    and masks, replicas differ, a resumed run redraws exactly the same masks, and a DP=2 run draws
    what one process with the doubled batch draws.
    """
    g = torch.Generator()
    # a fixed mixing of the integers into 63 bits (splitmix-style odd constants)
    h = (seed * 0x9E3779B97F4A7C15 + iteration * 0xBF58476D1CE4E5B9
         + microbatch * 0x94D049BB133111EB) % (2**63 - 1)
    g.manual_seed(h)
    return g
