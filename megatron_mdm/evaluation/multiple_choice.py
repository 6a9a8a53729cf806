r"""Zero-shot multiple-choice scoring with MDM likelihoods (SMDM Table 1 protocol).

For each example (context, choices, gold) every choice is scored by log p(choice | context), either
the Monte Carlo lower bound (``method="mc"``) or the chain rule (``method="chain"``), see
``megatron_mdm.likelihood``. The prediction is the argmax of the score after normalisation:

* ``none``: log p;   ``token``: log p / number of choice tokens;   ``char``: log p / len(choice).

Accuracy is reported with the standard error of a mean of 0/1 outcomes, sqrt(acc (1 - acc) / (n - 1))
(the lm-eval convention). Choice tokens are ``encode(context + choice)`` minus the context's tokens
when the context tokenises as a prefix, else ``encode(choice)``.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from megatron_mdm.decoding.logits import LogitsFn
from megatron_mdm.likelihood import chain_rule_loglik, mc_conditional_loglik

NORMALIZATIONS = ("none", "token", "char")
METHODS = ("mc", "chain")

Example = tuple[str, Sequence[str], int]


@dataclass
class MultipleChoiceResult:
    """Accuracy over the examples, its standard error, and per-example records."""

    accuracy: float
    stderr: float
    per_example: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"accuracy": self.accuracy, "stderr": self.stderr, "num_examples": len(self.per_example)}


def encode_pair(encode: Callable[[str], list[int]], context: str, choice: str) -> tuple[list[int], list[int]]:
    """(context ids, choice ids), moving trailing context spaces onto the choice as lm-eval does."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, choice = context[:-n_spaces], context[-n_spaces:] + choice
    ctx = encode(context)
    whole = encode(context + choice)
    if whole[: len(ctx)] == ctx and len(whole) > len(ctx):
        return ctx, whole[len(ctx) :]
    return ctx, encode(choice)


def conditional_loglik(
    logits_fn: LogitsFn,
    prompt_ids: Sequence[int],
    completion_ids: Sequence[int],
    mask_id: int,
    method: str = "mc",
    num_samples: int = 128,
    generator: torch.Generator | None = None,
    vocab_size: int | None = None,
    cfg_scale: float = 0.0,
    batch_size: int | None = None,
    order: str = "left_to_right",
    eps: float = 1e-3,
) -> tuple[float, bool]:
    """log p(completion | prompt) by ``method`` (``mc`` or ``chain``) and whether it is greedy."""
    if method == "mc":
        r = mc_conditional_loglik(
            logits_fn, prompt_ids, completion_ids, mask_id, num_samples, eps=eps, generator=generator,
            vocab_size=vocab_size, batch_size=batch_size, cfg_scale=cfg_scale,
        )
        return r.loglik, False
    if method == "chain":
        r = chain_rule_loglik(
            logits_fn, prompt_ids, completion_ids, mask_id, order=order, cfg_scale=cfg_scale,
            vocab_size=vocab_size, batch_size=batch_size,
        )
        return r.loglik, r.is_greedy
    raise ValueError(f"method: expected one of {METHODS}, got {method!r}")


def score_multiple_choice(
    logits_fn: LogitsFn,
    encode: Callable[[str], list[int]],
    examples: Iterable[Example],
    mask_id: int,
    method: str = "mc",
    normalization: str = "none",
    num_samples: int = 128,
    generator: torch.Generator | None = None,
    vocab_size: int | None = None,
    cfg_scale: float = 0.0,
    batch_size: int | None = None,
    order: str = "left_to_right",
    progress: bool = True,
) -> MultipleChoiceResult:
    """Accuracy of argmax-likelihood choice selection.

    Args:
        logits_fn: bidirectional model.
        encode: text -> ids (no special tokens).
        examples: (context, choices, gold index) triples.
        mask_id: id of the mask token.
        method: ``mc`` (Monte Carlo bound, ``num_samples`` draws) or ``chain`` (chain rule, ``order``).
        normalization: ``none`` | ``token`` | ``char``.
        num_samples: MC draws per choice.
        generator: randomness for ``mc``.
        vocab_size: real vocabulary size.
        cfg_scale: unsupervised CFG scale w.
        batch_size: rows per forward.
        order: chain-rule order (``left_to_right`` or ``greedy``).
        progress: a tqdm bar on stderr over examples.

    Returns:
        :class:`MultipleChoiceResult`.
    """
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization: expected one of {NORMALIZATIONS}, got {normalization!r}")
    records = []
    bar = tqdm(examples, desc="mc", unit="example", disable=not progress, file=sys.stderr)
    for context, choices, gold in bar:
        scores = []
        for choice in choices:
            ctx, cont = encode_pair(encode, context, choice)
            ll, _ = conditional_loglik(
                logits_fn, ctx, cont, mask_id, method, num_samples, generator, vocab_size, cfg_scale, batch_size,
                order,
            )
            denom = {"none": 1.0, "token": float(len(cont)), "char": float(max(len(choice), 1))}[normalization]
            scores.append(ll / denom)
        pred = max(range(len(scores)), key=lambda i: scores[i])
        records.append({"scores": scores, "pred": pred, "gold": int(gold), "correct": pred == int(gold)})
    return MultipleChoiceResult(*accuracy([r["correct"] for r in records]), records)


def accuracy(outcomes: Sequence[bool]) -> tuple[float, float]:
    """(mean of 0/1 outcomes, its standard error sqrt(acc (1 - acc) / (n - 1))); ValueError when there are none."""
    n = len(outcomes)
    if n == 0:
        raise ValueError("no examples to score")
    acc = sum(map(bool, outcomes)) / n
    return acc, math.sqrt(acc * (1 - acc) / (n - 1)) if n > 1 else 0.0


def load_jsonl_examples(path: str) -> list[Example]:
    """Read multiple-choice lines: ``{"context", "choices", "gold"}`` or Mosaic's ``{"query", "choices", "gold"}``.

    Raises:
        EvalInputError: a missing file, or a line that is not such an object (the message names file:line).
    """
    from megatron_mdm.evaluation.jsonl_tasks import read_task_file
    from megatron_mdm.evaluation.loading import EvalInputError

    task = read_task_file(path)
    if task.kind != "mc":
        raise EvalInputError(f"{path}: expected multiple-choice examples (context, choices, gold), found {task.form}")
    return task.examples


def parse_mc_row(row: dict, context_key: str, where: str) -> Example:
    """(context, choices, gold) of one multiple-choice line; EvalInputError naming ``where`` if malformed."""
    from megatron_mdm.evaluation.loading import EvalInputError

    context, choices, gold = row[context_key], row["choices"], row["gold"]
    if not (isinstance(context, str) and isinstance(choices, list) and choices
            and all(isinstance(c, str) for c in choices)):
        raise EvalInputError(f"{where}: {context_key} must be a string and choices a non-empty list of strings")
    index = _as_index(gold)
    if index is None or not 0 <= index < len(choices):
        raise EvalInputError(f"{where}: gold must be the index of a choice (0..{len(choices) - 1}), got {gold!r}")
    return context, list(choices), index


def _as_index(v: Any) -> int | None:
    """An integer written as 2, 2.0 or "2"; None for anything else (bool, 2.5, "two", null)."""
    if isinstance(v, bool):
        return None
    if isinstance(v, int):
        return v
    if isinstance(v, float) and v.is_integer():
        return int(v)
    if isinstance(v, str) and v.strip().isdigit():
        return int(v)
    return None


def format_table(rows: list[dict[str, Any]], columns: Sequence[str]) -> str:
    """A Markdown table of ``rows`` (floats with 4 decimals)."""
    def cell(v: Any) -> str:
        return f"{v:.4f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)
