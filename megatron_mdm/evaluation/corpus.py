"""ELBO perplexity bound on held-out text: read documents, cut them into blocks, run ``mc_elbo``.

Documents come from a ``.txt`` file (one document per non-empty line) or ``.jsonl`` (field ``text``).
Each document is encoded and cut into blocks of at most ``seq_length`` tokens; every block is scored
with the Monte Carlo ELBO and the corpus figure is the token-weighted mean of the per-block bounds,
with the standard error combined over blocks (independent draws per block).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from megatron_mdm.decoding.logits import LogitsFn
from megatron_mdm.likelihood import mc_elbo


def read_texts(path: str, field: str = "text") -> list[str]:
    """Documents of a .txt (one per non-empty line) or .jsonl (``field``) file.

    Raises:
        EvalInputError: the file is missing or not UTF-8, or a jsonl line is not a JSON object with a
            string ``field``; the message names the file and line.
    """
    from megatron_mdm.evaluation.loading import EvalInputError, iter_jsonl, read_data_lines

    lines = read_data_lines(path)
    if not path.endswith(".jsonl"):
        return [ln for ln in lines if ln.strip()]
    texts = []
    for k, row in iter_jsonl(path, lines):
        if not isinstance(row, dict) or not isinstance(row.get(field), str):
            raise EvalInputError(f"{path}:{k}: expected a JSON object with a string {field!r} field")
        texts.append(row[field])
    return texts


def corpus_elbo(
    logits_fn: LogitsFn,
    encode: Callable[[str], list[int]],
    texts: Sequence[str],
    mask_id: int,
    seq_length: int = 512,
    num_samples: int = 32,
    t_sampling: str = "antithetic",
    eps: float = 1e-3,
    generator: torch.Generator | None = None,
    vocab_size: int | None = None,
    batch_size: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Token-weighted ELBO bound over a corpus (a tqdm bar on stderr over blocks unless ``progress`` is False).

    Returns:
        dict with ``nll_per_token`` (nats), ``stderr``, ``perplexity_bound`` = exp(nll_per_token),
        ``num_tokens``, ``num_blocks``, ``num_samples``.
    """
    total, var, n_tokens, n_blocks = 0.0, 0.0, 0, 0
    blocks = [ids[start : start + seq_length] for ids in map(encode, texts)
              for start in range(0, len(ids), seq_length)]
    for ids in tqdm(blocks, desc="elbo", unit="block", disable=not progress, file=sys.stderr):
        block = torch.tensor([ids], dtype=torch.long)  # [1, s]
        r = mc_elbo(
            logits_fn, block, mask_id, num_samples, eps=eps, t_sampling=t_sampling, generator=generator,
            vocab_size=vocab_size, batch_size=batch_size,
        )
        s = block.shape[1]
        total += float(r.nll_per_token[0]) * s
        var += (float(r.stderr[0]) * s) ** 2
        n_tokens += s
        n_blocks += 1
    if n_tokens == 0:
        raise ValueError("no tokens to evaluate")
    nll = total / n_tokens
    return {
        "nll_per_token": nll,
        "stderr": math.sqrt(var) / n_tokens,
        "perplexity_bound": math.exp(nll),
        "num_tokens": n_tokens,
        "num_blocks": n_blocks,
        "num_samples": num_samples,
    }
