"""Resolves a run's config from its files, and builds the tokenizer and the train/validation loaders.

``resolve_config`` fills what the flags leave to the run's files, once, before the config is validated and
saved: the vocabulary size (the tokenizer's) and the random-length rule (off for instruction data).
``build_data`` then builds the loaders without changing the config.

``resolve_config`` imports no Megatron (the launcher, ``mdm-pretrain``, runs it before any worker starts).
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

from megatron_mdm.config import Config, ConfigError, parse_data_path
from megatron_mdm.objective import PRETRAIN_RANDOM_LENGTH_PROB
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
    """An SFT loader whose batches drop ``loss_mask`` (and the completion mask): every position (prompt,
    completion, EOS padding) may be masked and is in the loss, i.e. the pretraining objective on the sequence
    (packed examples keep their ``doc_ids``: attention and normalisers stay per example)."""

    def __init__(self, loader):
        self.loader = loader

    def __iter__(self):
        for batch in self.loader:
            yield {k: v for k, v in batch.items() if k not in ("loss_mask", "answer_mask")}

    def state_dict(self):
        return self.loader.state_dict()

    def load_state_dict(self, state):
        self.loader.load_state_dict(state)


def sft_layout(loader) -> str | None:
    """``"packed"``/``"padded"`` when a loader reads prepare-sft shards, else None."""
    from megatron_mdm.data.loader import is_sft

    return is_sft(getattr(loader, "loader", loader))


def check_packing(cfg: Config) -> None:
    """Packed examples need the block-diagonal mask of the local spec, on one context-parallel rank and one
    pipeline stage (the stages without data would not see it); one line naming the option otherwise."""
    from megatron_mdm.models.build import use_te_for

    p = cfg.parallel
    if p.context_parallel_size > 1:
        raise ConfigError("--context-parallel-size > 1 with packed instruction data is not supported (the example "
                          "mask is not built for the gathered keys): prepare the data with --layout padded")
    if p.pipeline_model_parallel_size > 1:
        raise ConfigError("--pipeline-model-parallel-size > 1 with packed instruction data is not supported: "
                          "prepare the data with --layout padded")
    if use_te_for(cfg):
        raise ConfigError("packed instruction data needs --transformer-impl local (the Transformer Engine spec "
                          "would need THD packed-sequence parameters, not implemented): or prepare with "
                          "--layout padded")
    if cfg.objective.shift_logits:  # the output before an example's first token sits in the previous example
        raise ConfigError("--shift-logits with packed instruction data is not supported: prepare with "
                          "--layout padded")


def is_instruction_data(cfg: Config, train_loader=None) -> bool:
    """Whether the run trains on instruction data: ``--sft-data``, or shards written by ``mdm-data prepare-sft``
    (read from the given loader, else from the manifests of ``--data-path``)."""
    if cfg.data.sft_data:
        return True
    if train_loader is not None:
        return sft_layout(train_loader) is not None
    if not cfg.data.data_path:
        return False
    from megatron_mdm.data.format import read_manifest

    return any((read_manifest(d).get("sft") or {}).get("layout") for _, d in parse_data_path(cfg.data.data_path))


def resolve_config(cfg: Config, train_loader=None) -> MDMTokenizer:
    """Fill the fields the run's files decide, in place, and return the run's tokenizer.

    ``model.vocab_size`` becomes the tokenizer's (a different explicit value is an error), and an unset
    ``objective.random_length_prob`` becomes 0 for instruction data (the random-length trick would cut
    completions) and SMDM's value otherwise. Called once, before the config is validated and saved; calling it
    again changes nothing.
    """
    tok = load_tokenizer(cfg)
    if cfg.objective.random_length_prob is None:
        cfg.objective.random_length_prob = 0.0 if is_instruction_data(cfg, train_loader) else PRETRAIN_RANDOM_LENGTH_PROB
    return tok


def build_data(cfg: Config, train_loader=None, valid_loader=None, tokenizer: MDMTokenizer | None = None):
    """(tokenizer, train loader, validation loader or None) for this rank.

    ``tokenizer`` is the one ``resolve_config`` returned; without it the config is resolved here first.
    """
    from megatron.core import parallel_state as ps

    from megatron_mdm.data.loader import build_pretrain_loader, build_valid_loader, resolve_valid_path

    tok = tokenizer if tokenizer is not None else resolve_config(cfg, train_loader)
    d, mbs = cfg.data, cfg.optim.micro_batch_size
    dp_rank, dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    if train_loader is None and d.mock_data:
        from megatron_mdm.data.mock import VALID_STREAM, MockLoader

        def mock(gbs: int, stream: int) -> MockLoader:
            return MockLoader(tok.vocab_size, d.seq_length, gbs, mbs, dp_rank, dp_size, cfg.logging.seed,
                              tok.mask_id, stream)

        train_loader = mock(cfg.optim.global_batch_size, 0)
        if valid_loader is None and cfg.logging.eval_interval:
            valid_loader = mock(mbs * dp_size, VALID_STREAM)
        log.info("--mock-data: training on random tokens (no dataset read)")
    if train_loader is None:
        if d.sft_data:
            from megatron_mdm.data.sft import build_sft_loader

            files = sorted(glob.glob(d.sft_data))
            if not files:
                raise ConfigError(f"--sft-data: no file matches {d.sft_data}")
            train_loader = build_sft_loader(files, tok, d.seq_length, mbs, dp_rank, dp_size,
                                            seed=cfg.logging.seed, override=d.override_data_state)
        else:
            if not d.data_path:
                raise ConfigError("--data-path: no training data given")
            train_loader = build_pretrain_loader(
                parse_data_path(d.data_path), d.seq_length, cfg.optim.global_batch_size, mbs, dp_rank, dp_size,
                num_workers=d.num_workers, seed=cfg.logging.seed, shuffle=d.data_shuffle, tokenizer_hash=tok.hash,
                verify=d.verify_data, override=d.override_data_state, vocab_size=tok.vocab_size)
        if d.sft_train_on_prompt:
            if not d.sft_data and sft_layout(train_loader) is None:
                raise ConfigError("--sft-train-on-prompt needs instruction data (--sft-data or --data-path "
                                  "directories written by mdm-data prepare-sft)")
            train_loader = WholeSequence(train_loader)
    if sft_layout(train_loader) == "packed":
        check_packing(cfg)
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
