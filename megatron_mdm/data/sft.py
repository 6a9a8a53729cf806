"""Supervised-finetuning data: prompt/completion jsonl into ``tokens`` and ``loss_mask`` batches.

A sample is ``prompt ids + completion ids + EOS``, padded with EOS to ``seq_length`` (as LLaDA's SFT
does, so the model learns to end). ``loss_mask`` is 0 on prompt positions and 1 on the completion, its
EOS and the EOS padding. A sample longer than ``seq_length`` is an error naming file and line (filter or
raise ``--seq-length``; silently truncating a completion would teach the model to stop mid-answer).

The loader keeps every sample in memory (SFT sets are small). Each epoch is a permutation seeded by
``(seed, epoch)``, split over data-parallel ranks by stride and cut to the same length on every rank.
The state is global (``{seed, dp_size, num_samples}``; the trainer adds ``consumed_samples``): each rank
has read ``consumed_samples / dp_size`` samples, which fixes its epoch and position. Resuming with another
``dp_size``, seed or data is refused unless ``override`` (``--override-data-state``).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from megatron_mdm.data.format import DataError

log = logging.getLogger(__name__)


def encode_prompt_completion(tokenizer, prompt: str, completion: str, seq_length: int
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode one SFT pair.

    Args:
        tokenizer: an ``MDMTokenizer``.
        prompt, completion: raw texts (special-token strings are encoded as text).
        seq_length: output length.

    Returns:
        ``tokens`` LongTensor[seq_length] and ``loss_mask`` FloatTensor[seq_length].

    Raises:
        DataError: prompt + completion + EOS is longer than ``seq_length``.
    """
    p = tokenizer.encode(prompt)
    c = tokenizer.encode(completion)
    n = len(p) + len(c) + 1
    if n > seq_length:
        raise DataError(f"sample of {n} tokens (prompt {len(p)}, completion {len(c)}, EOS) is longer than "
                        f"seq_length {seq_length}")
    tokens = torch.full((seq_length,), tokenizer.eos_id, dtype=torch.long)
    tokens[: len(p) + len(c)] = torch.tensor(p + c, dtype=torch.long)
    loss_mask = torch.ones(seq_length, dtype=torch.float32)
    loss_mask[: len(p)] = 0.0
    return tokens, loss_mask


def _read_pairs(path: str) -> Iterator[tuple[int, str, str]]:
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()  # SFT files are small
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read SFT file: {e}") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{n}: malformed JSON: {e.msg}") from None
        if not isinstance(rec, dict) or not isinstance(rec.get("prompt"), str) or \
                not isinstance(rec.get("completion"), str):
            raise DataError(f"{path}:{n}: expected string fields 'prompt' and 'completion'")
        yield n, rec["prompt"], rec["completion"]


class SFTLoader:
    """Infinite iterable of ``{"tokens": LongTensor[b, s], "loss_mask": FloatTensor[b, s]}`` for one dp rank."""

    def __init__(self, tokens: torch.Tensor, loss_mask: torch.Tensor, micro_batch_size: int, dp_rank: int,
                 dp_size: int, seed: int, shuffle: bool, override: bool = False) -> None:
        n = tokens.shape[0]
        self.per_rank = n // dp_size
        if self.per_rank < 1:
            raise DataError(f"{n} SFT samples are fewer than dp_size {dp_size}")
        self.tokens, self.loss_mask = tokens, loss_mask  # [n, s]
        self.mbs, self.dp_rank, self.dp_size, self.seed, self.shuffle = micro_batch_size, dp_rank, dp_size, seed, shuffle
        self.override = override
        self._state = {"epoch": 0, "pos": 0}

    def _order(self, epoch: int) -> np.ndarray:
        n = self.tokens.shape[0]
        order = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
        return order[self.dp_rank::self.dp_size][: self.per_rank]

    def __iter__(self) -> Iterator[dict]:
        epoch, pos = self._state["epoch"], self._state["pos"]
        order = self._order(epoch)
        while True:
            idx = []
            for _ in range(self.mbs):
                idx.append(int(order[pos]))
                pos += 1
                if pos >= self.per_rank:
                    epoch, pos = epoch + 1, 0
                    order = self._order(epoch)
            self._state = {"epoch": epoch, "pos": pos}
            yield {"tokens": self.tokens[idx], "loss_mask": self.loss_mask[idx]}

    def state_dict(self) -> dict:
        """The order's description (the trainer adds ``consumed_samples``)."""
        return {"kind": "sft", "dp_size": self.dp_size, "seed": self.seed, "num_samples": int(self.tokens.shape[0])}

    def load_state_dict(self, state: dict) -> None:
        """Start after ``state["consumed_samples"]``; DataError when the order differs (unless override)."""
        if "consumed_samples" not in state:
            raise DataError("SFT loader state has no consumed_samples (the trainer adds it when saving)")
        for k, now in self.state_dict().items():
            if k in state and state[k] != now:
                msg = (f"cannot resume the SFT data order exactly: {k} was {state[k]} when saved and is {now} now")
                if not self.override:
                    raise DataError(msg + "; pass --override-data-state to continue in this run's order")
                log.warning("--override-data-state: %s", msg)
        epoch, pos = divmod(int(state["consumed_samples"]) // self.dp_size, self.per_rank)
        self._state = {"epoch": epoch, "pos": pos}


def build_sft_loader(files: list[str], tokenizer, seq_length: int, micro_batch_size: int, dp_rank: int,
                     dp_size: int, seed: int, shuffle: bool = True, override: bool = False) -> SFTLoader:
    """Load, encode and check every prompt/completion pair; errors name file and line.

    Args:
        files: jsonl files with string fields ``prompt`` and ``completion``.
        tokenizer: an ``MDMTokenizer``.
        seq_length, micro_batch_size: batch shape ``[micro_batch_size, seq_length]``.
        dp_rank, dp_size: data-parallel rank and size.
        seed: seeds the per-epoch order.
        shuffle: permute each epoch (False: file order).
        override: resume even when the saved order differs (``--override-data-state``).
    """
    toks, masks = [], []
    for path in files:
        for n, prompt, completion in _read_pairs(path):
            try:
                t, m = encode_prompt_completion(tokenizer, prompt, completion, seq_length)
            except DataError as e:
                raise DataError(f"{path}:{n}: {e}") from None
            toks.append(t)
            masks.append(m)
    if not toks:
        raise DataError(f"no SFT samples in {files}")
    return SFTLoader(torch.stack(toks), torch.stack(masks), micro_batch_size, dp_rank, dp_size, seed, shuffle,
                     override)
