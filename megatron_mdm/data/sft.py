"""Small instruction sets held in memory (``--sft-data``): jsonl -> ``tokens``/``loss_mask`` batches.

Records are encoded as ``mdm-data prepare-sft`` encodes them (``chat.encode_example``: ``prompt``/``completion``
or multi-turn ``messages``), in its ``padded`` layout (LLaDA's SFT): one example per sequence, padded with EOS,
the completion, its EOS and the EOS padding in the loss (so the model learns to end). A sample longer than
``seq_length`` is an error naming file and line (silently truncating a completion would teach the model to
stop mid-answer). For sets that do not fit in memory, blends, packing and ``--truncate``, prepare shards with
``mdm-data prepare-sft`` and train with ``--data-path``.

Batches: ``tokens``, ``loss_mask`` (1 where the loss is), ``answer_mask`` (the completion tokens, for the
completion-only loss) and ``doc_ids`` (zeros: one example per sequence, normalised by its own length).
The loader keeps every sample in memory. Each epoch is a permutation seeded by ``(seed, epoch)``, split over
data-parallel ranks by stride and cut to the same length on every rank. The state is global
(``{seed, dp_size, num_samples}``; the trainer adds ``consumed_samples``): each rank has read
``consumed_samples / dp_size`` samples, which fixes its epoch and position. Resuming with another
``dp_size``, seed or data is refused unless ``override`` (``--override-data-state``).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from megatron_mdm.data.chat import PAD_IN_LOSS, ExampleError, encode_example
from megatron_mdm.data.format import DataError

log = logging.getLogger(__name__)


def encode_record(tokenizer, rec, seq_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One record in the padded layout: ``tokens`` LongTensor[seq_length] and the uint8 loss mask
    ``[seq_length]`` (0 context, 1 completion, 2 EOS padding in the loss).

    Raises:
        ExampleError: a bad record, or one longer than ``seq_length`` (kind ``too_long``).
    """
    ids, mask = encode_example(tokenizer, rec)
    n = len(ids)
    if n > seq_length:
        raise ExampleError("too_long", f"example of {n} tokens ({int((mask != 0).sum())} in the loss) is longer "
                           f"than seq_length {seq_length}")
    tokens = torch.full((seq_length,), tokenizer.eos_id, dtype=torch.long)
    tokens[:n] = torch.from_numpy(ids)
    lm = torch.full((seq_length,), PAD_IN_LOSS, dtype=torch.uint8)
    lm[:n] = torch.from_numpy(mask)
    return tokens, lm


def encode_prompt_completion(tokenizer, prompt: str, completion: str, seq_length: int
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    """``tokens`` LongTensor[seq_length] and ``loss_mask`` FloatTensor[seq_length] of one pair (padded layout).

    Raises:
        DataError: a bad pair, or prompt + completion + EOS longer than ``seq_length``.
    """
    try:
        tokens, lm = encode_record(tokenizer, {"prompt": prompt, "completion": completion}, seq_length)
    except ExampleError as e:
        raise DataError(str(e)) from None
    return tokens, (lm != 0).float()


def _read_records(path: str) -> Iterator[tuple[int, object]]:
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
        yield n, rec


class SFTLoader:
    """Infinite iterable of ``{"tokens", "loss_mask", "answer_mask", "doc_ids"}`` ``[b, s]`` batches of one dp rank."""

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
            lm = self.loss_mask[idx]
            yield {"tokens": self.tokens[idx], "loss_mask": (lm != 0).float(), "answer_mask": lm == 1,
                   "doc_ids": torch.zeros(lm.shape, dtype=torch.long)}

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
        files: jsonl files of ``prompt``/``completion`` or ``messages`` records.
        tokenizer: an ``MDMTokenizer``.
        seq_length, micro_batch_size: batch shape ``[micro_batch_size, seq_length]``.
        dp_rank, dp_size: data-parallel rank and size.
        seed: seeds the per-epoch order.
        shuffle: permute each epoch (False: file order).
        override: resume even when the saved order differs (``--override-data-state``).
    """
    toks, masks = [], []
    for path in files:
        for n, rec in _read_records(path):
            try:
                t, m = encode_record(tokenizer, rec, seq_length)
            except ExampleError as e:
                raise DataError(f"{path}:{n}: {e}") from None
            toks.append(t)
            masks.append(m)
    if not toks:
        raise DataError(f"no SFT samples in {files}")
    return SFTLoader(torch.stack(toks), torch.stack(masks), micro_batch_size, dp_rank, dp_size, seed, shuffle,
                     override)
