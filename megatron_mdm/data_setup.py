"""Builds the tokenizer and the train/validation loaders of a run from ``cfg.data``.

Kept apart from ``training`` so that the loop only sees iterables with ``state_dict`` /
``load_state_dict``. Every tensor- and pipeline-parallel rank of one data-parallel replica builds
the same loader (same DP rank) and so reads identical batches, without a broadcast.

The loader contract: ``state_dict()`` describes the data order and is the same on every rank; the
trainer adds ``consumed_samples`` and stores it once in the checkpoint; ``load_state_dict(state)``
starts reading at ``state["consumed_samples"]`` (or refuses a state whose order differs).
"""

from __future__ import annotations

import glob
import logging
from pathlib import Path

from megatron.core import parallel_state as ps

from megatron_mdm.config import Config, ConfigError, parse_data_path
from megatron_mdm.tokenization import MDMTokenizer

log = logging.getLogger(__name__)


def load_tokenizer(cfg: Config) -> MDMTokenizer:
    if not cfg.data.tokenizer:
        raise ConfigError("--tokenizer: a tokenizer directory (from mdm-tokenizer train) is required")
    if not Path(cfg.data.tokenizer).exists():
        raise ConfigError(f"--tokenizer: {cfg.data.tokenizer} does not exist")
    tok = MDMTokenizer.load(cfg.data.tokenizer)
    if cfg.model.vocab_size is not None and cfg.model.vocab_size != tok.vocab_size:
        raise ConfigError(
            f"--vocab-size {cfg.model.vocab_size} differs from the tokenizer's {tok.vocab_size} "
            f"({cfg.data.tokenizer})")
    cfg.model.vocab_size = tok.vocab_size
    return tok


class WholeSequence:
    """An SFT loader whose batches drop ``loss_mask``: every position (prompt, completion, EOS
    padding) may be masked and is in the loss, i.e. the pretraining objective on the sequence."""

    def __init__(self, loader):
        self.loader = loader

    def __iter__(self):
        for batch in self.loader:
            yield {k: v for k, v in batch.items() if k != "loss_mask"}

    def state_dict(self):
        return self.loader.state_dict()

    def load_state_dict(self, state):
        self.loader.load_state_dict(state)


def build_data(cfg: Config, train_loader=None, valid_loader=None):
    """(tokenizer, train loader, validation loader or None) for this rank."""
    from megatron_mdm.data.loader import build_pretrain_loader, build_valid_loader, resolve_valid_path

    tok = load_tokenizer(cfg)
    d, mbs = cfg.data, cfg.optim.micro_batch_size
    dp_rank, dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    if train_loader is None:
        if d.sft_data:
            from megatron_mdm.data.sft import build_sft_loader

            files = sorted(glob.glob(d.sft_data))
            if not files:
                raise ConfigError(f"--sft-data: no file matches {d.sft_data}")
            train_loader = build_sft_loader(files, tok, d.seq_length, mbs, dp_rank, dp_size,
                                            seed=cfg.logging.seed, override=d.override_data_state)
            if d.sft_train_on_prompt:
                train_loader = WholeSequence(train_loader)
        else:
            if not d.data_path:
                raise ConfigError("--data-path: no training data given")
            train_loader = build_pretrain_loader(
                parse_data_path(d.data_path), d.seq_length, cfg.optim.global_batch_size, mbs, dp_rank, dp_size,
                num_workers=d.num_workers, seed=cfg.logging.seed, shuffle=d.data_shuffle, tokenizer_hash=tok.hash,
                verify=d.verify_data, override=d.override_data_state, vocab_size=tok.vocab_size)
    if valid_loader is None and cfg.logging.eval_interval:
        if d.valid_data_path:
            valid = parse_data_path(d.valid_data_path, "valid_data_path")
        elif d.data_path:
            valid = resolve_valid_path([p for _, p in parse_data_path(d.data_path)])
        else:
            valid = None
        if valid:
            valid_loader = build_valid_loader(valid, d.seq_length, mbs, dp_rank, dp_size, tok.hash, d.verify_data,
                                              tok.vocab_size)
        else:
            log.warning("--eval-interval is set but no validation data was found: validation is off")
    return tok, train_loader, valid_loader
