"""The JSONL task files ``mdm-eval mc`` reads: the native form and the two Mosaic (llm-foundry ICL) forms.

Each line is one example; the form is told by its keys (one form per file):

* **multiple choice** ``{"context", "choices", "gold"}`` (native) or Mosaic's ``{"query", "choices", "gold"}``
  (``query`` is the context): scored by ``multiple_choice.score_multiple_choice``;
* **language modeling** Mosaic's ``{"context", "continuation"}`` (LAMBADA-style): scored as lm-eval scores a
  ``loglikelihood`` task (:func:`score_language_modeling`): ``acc`` is the share of continuations that
  greedy decoding produces (the chain rule's ``is_greedy``; always False with the Monte Carlo bound, as in the
  lm-eval adapter), ``perplexity`` is ``exp(-mean log p(continuation | context))``.

``continuation_delimiter`` (llm-foundry's option of that name) is put between context and continuation;
the default ``""`` takes the strings as written. Every problem is an ``EvalInputError`` naming ``file:line``.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from tqdm.auto import tqdm

from megatron_mdm.decoding.logits import LogitsFn
from megatron_mdm.evaluation.multiple_choice import Example, accuracy, conditional_loglik, encode_pair

FORMS = {
    "mc": ("context", "choices", "gold"),
    "mosaic_mc": ("query", "choices", "gold"),
    "mosaic_lm": ("context", "continuation"),
}


@dataclass
class TaskFile:
    """The examples of one file and its form (``mc``: :data:`Example` triples; ``lm``: (context, continuation))."""

    kind: str  # "mc" or "lm"
    form: str  # a key of FORMS
    examples: list = field(default_factory=list)


def _form(row: Any) -> str | None:
    if not isinstance(row, dict):
        return None
    keys = set(row)
    if {"choices", "gold"} <= keys:
        return "mc" if "context" in keys else "mosaic_mc" if "query" in keys else None
    return "mosaic_lm" if {"context", "continuation"} <= keys else None


def read_task_file(path: str, continuation_delimiter: str = "") -> TaskFile:
    """Read a JSONL task file of any form in :data:`FORMS` (one form per file).

    Raises:
        EvalInputError: a missing file, a line of no known form or of another form than the first line's,
            a malformed field (the message names ``file:line``).
    """
    from megatron_mdm.evaluation.loading import EvalInputError, iter_jsonl, read_data_lines
    from megatron_mdm.evaluation.multiple_choice import parse_mc_row

    out: TaskFile | None = None
    forms = "; ".join("{" + ", ".join(f'"{k}"' for k in keys) + "}" for keys in FORMS.values())
    for k, row in iter_jsonl(path, read_data_lines(path)):
        form = _form(row)
        if form is None:
            raise EvalInputError(f"{path}:{k}: expected an object of one of the forms {forms}")
        if out is None:
            out = TaskFile("lm" if form == "mosaic_lm" else "mc", form)
        elif form != out.form:
            raise EvalInputError(f"{path}:{k}: a {form} example in a file of {out.form} examples")
        if out.kind == "mc":
            context, choices, gold = parse_mc_row(row, "query" if form == "mosaic_mc" else "context", f"{path}:{k}")
            out.examples.append((context + continuation_delimiter, choices, gold))
        else:
            if not (isinstance(row["context"], str) and isinstance(row["continuation"], str) and row["continuation"]):
                raise EvalInputError(f"{path}:{k}: context and continuation must be strings (a non-empty continuation)")
            out.examples.append((row["context"] + continuation_delimiter, row["continuation"]))
    if out is None:
        raise EvalInputError(f"{path}: holds no example to evaluate (an empty file or only blank lines)")
    return out


@dataclass
class LanguageModelingResult:
    """Greedy accuracy and perplexity over (context, continuation) examples, with per-example records."""

    accuracy: float
    stderr: float
    perplexity: float
    per_example: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"accuracy": self.accuracy, "stderr": self.stderr, "perplexity": self.perplexity,
                "num_examples": len(self.per_example)}


def score_language_modeling(
    logits_fn: LogitsFn,
    encode: Callable[[str], list[int]],
    examples: Iterable[tuple[str, str]],
    mask_id: int,
    progress: bool = True,
    **likelihood: Any,
) -> LanguageModelingResult:
    """lm-eval's ``loglikelihood`` metrics: ``acc`` = mean of ``is_greedy``, ``perplexity`` = exp(-mean log p).

    ``likelihood``: ``multiple_choice.conditional_loglik``'s settings (``method``, default the chain rule, whose
    ``is_greedy`` the accuracy needs; ``num_samples``, ``generator``, ``vocab_size``, ``cfg_scale``,
    ``batch_size``, ``order``). The continuation's tokens follow the context's as in multiple-choice scoring
    (``encode_pair``: trailing context spaces move onto the continuation, as lm-eval does).
    """
    likelihood.setdefault("method", "chain")
    records = []
    for context, continuation in tqdm(examples, desc="lm", unit="example", disable=not progress, file=sys.stderr):
        ctx, cont = encode_pair(encode, context, continuation)
        ll, greedy = conditional_loglik(logits_fn, ctx, cont, mask_id, **likelihood)
        records.append({"loglik": ll, "is_greedy": bool(greedy), "num_tokens": len(cont)})
    acc, se = accuracy([r["is_greedy"] for r in records])
    ppl = math.exp(-sum(r["loglik"] for r in records) / len(records))
    return LanguageModelingResult(acc, se, ppl, records)


__all__ = ["FORMS", "Example", "LanguageModelingResult", "TaskFile", "read_task_file", "score_language_modeling"]
