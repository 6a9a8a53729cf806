"""``prepare_sft()``: instruction jsonl -> the shard format of pretraining, with a loss mask and example starts.

Each record becomes one example (``chat.encode_example``: ``prompt``/``completion`` or multi-turn
``messages``). Examples are laid out in sequences of ``seq_length`` tokens in one of two layouts:

* ``packed`` (default): several whole examples per sequence, first-fit over the last ``open_bins`` open
  sequences (deterministic, in input order); the rest of a sequence is EOS padding, out of the loss, and
  its own segment. An example never spans two sequences. Training keeps attention inside each example (a
  block-diagonal mask from the example starts) and normalises each example's loss by its own length.
* ``padded`` (LLaDA's SFT layout): one example per sequence, padded with EOS, the padding in the loss
  (loss-mask value 2) so that the model learns to end.

A sample is ``{key}.tokens.zst``, ``{key}.lmask.zst`` (uint8 per token: 0 context, 1 completion, 2 padding in
the loss) and ``{key}.docs.zst`` (the example starts, the padding's start included), so the pretraining
loader streams it (global order, resumable, data-parallel split, blends of several datasets).

Bad input never stops the others: a malformed line, a line without the expected keys, an unknown role, an
empty completion, an example longer than the sequence (unless ``truncate``), each is reported with file and
line (logged, counted in the manifest's ``report``) and skipped; ``strict`` fails on the first instead.
``max_examples`` caps the examples taken (the first ones, in input order): Flan's per-task "examples cap",
one dataset directory per task, mixed with ``--data-path`` weights (``mixture_weights`` computes
examples-proportional weights). The output directory is rewritten whole on each run (not resumable).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from megatron_mdm.data import format as fmt
from megatron_mdm.data.chat import CONTEXT, PAD_IN_LOSS, ExampleError, encode_example, fit_length, has_chat_template
from megatron_mdm.data.readers import InputError, InputReport, _decode, _raw_lines, expand_inputs
from megatron_mdm.data.writer import ShardWriter

log = logging.getLogger(__name__)

SHARD_PREFIX = "sft"


class _Bin:
    def __init__(self) -> None:
        self.ids: list[np.ndarray] = []
        self.masks: list[np.ndarray] = []
        self.n = 0


def _finish(b: _Bin, seq_length: int, eos_id: int, pad_mask: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    starts = np.cumsum([0] + [len(x) for x in b.ids])[:-1]
    pad = seq_length - b.n
    ids = np.concatenate(b.ids + [np.full(pad, eos_id, np.int64)])
    mask = np.concatenate(b.masks + [np.full(pad, pad_mask, np.uint8)])
    if pad and pad_mask == CONTEXT:  # padding out of the loss: its own segment
        starts = np.append(starts, b.n)
    return ids, starts.astype(np.int64), mask


def layout_examples(examples: Iterator[tuple[np.ndarray, np.ndarray]], seq_length: int, eos_id: int,
                    layout: str = "packed", open_bins: int = 8
                    ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Sequences ``(tokens int64 [S], example starts int64 [k], loss mask uint8 [S])`` from examples
    ``(ids, mask)`` of at most ``seq_length`` tokens each."""
    if layout not in fmt.SFT_LAYOUTS:
        raise ValueError(f"--layout must be one of {fmt.SFT_LAYOUTS}, got {layout!r}")
    bins: list[_Bin] = []
    for ids, mask in examples:
        if layout == "padded":
            b = _Bin()
            b.ids, b.masks, b.n = [ids], [mask], len(ids)
            yield _finish(b, seq_length, eos_id, PAD_IN_LOSS)
            continue
        target = next((b for b in bins if b.n + len(ids) <= seq_length), None)
        if target is None:
            if len(bins) >= open_bins:
                yield _finish(bins.pop(0), seq_length, eos_id, CONTEXT)
            target = _Bin()
            bins.append(target)
        target.ids.append(ids)
        target.masks.append(mask)
        target.n += len(ids)
    for b in bins:
        yield _finish(b, seq_length, eos_id, CONTEXT)


def _records(files: list[str], report: InputReport) -> Iterator[tuple[str, int, object]]:
    for path in files:
        for n, raw in _raw_lines(path, report, None):
            if not raw.strip():
                continue
            try:
                rec = json.loads(_decode(raw, path, n, report))
            except json.JSONDecodeError as e:
                report.add("malformed_json", path, n, f"{e.msg} at column {e.colno}; record skipped")
                continue
            yield path, n, rec


def prepare_sft(inputs: list[str], tokenizer: str, output: str, seq_length: int, layout: str = "packed",
                truncate: bool = False, chat_template: str = "auto", max_examples: int | None = None,
                strict: bool = False, shard_tokens: int = 1 << 26, zstd_level: int = fmt.ZSTD_LEVEL,
                open_bins: int = 8) -> dict:
    """Encode, lay out and shard instruction data; returns the manifest.

    Args:
        inputs: jsonl / jsonl.zst files, globs or directories.
        tokenizer: tokenizer directory or tokenizer.json.
        output: dataset directory to (re)write.
        seq_length: tokens per sequence.
        layout: ``"packed"`` or ``"padded"`` (module doc).
        truncate: cut an over-long example (context from the left, then the tail) instead of skipping it.
        chat_template: ``"auto"`` or ``"default"`` (``chat.encode_example``).
        max_examples: take at most this many examples (None: all).
        strict: fail on the first bad record.
        shard_tokens: approximate tokens per shard.
        zstd_level: zstd level of the members.
        open_bins: sequences kept open for first-fit packing.

    Raises:
        InputError: unreadable input, a bad record with ``strict``, no example at all.
    """
    from megatron_mdm.data.prepare import _check_output_outside_inputs
    from megatron_mdm.tokenization import MDMTokenizer

    if seq_length < 2:
        raise ValueError(f"--seq-length must be >= 2, got {seq_length}")
    if max_examples is not None and max_examples < 1:
        raise ValueError(f"--max-examples must be >= 1, got {max_examples}")
    _check_output_outside_inputs(inputs, output)
    files = expand_inputs(inputs)
    tok = MDMTokenizer.load(tokenizer)
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    for p in list(out.glob(f"{SHARD_PREFIX}-*.tar")) + list(out.glob(f"{SHARD_PREFIX}-*{fmt.INDEX_SUFFIX}")):
        p.unlink()
    (out / fmt.MANIFEST).unlink(missing_ok=True)
    report = InputReport(strict=strict)
    stats = {"examples": 0, "completion_tokens": 0, "context_tokens": 0, "truncated": 0}
    t0 = last = time.monotonic()

    def examples() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        nonlocal last
        for path, n, rec in _records(files, report):
            if max_examples is not None and stats["examples"] >= max_examples:
                return
            try:
                ids, mask = encode_example(tok, rec, chat_template)
                fitted = fit_length(ids, mask, seq_length, truncate)
            except ExampleError as e:
                report.add(e.kind, path, n, f"{e}; record skipped")
                continue
            if len(fitted[0]) < len(ids):
                stats["truncated"] += 1
            ids, mask = fitted
            stats["examples"] += 1
            stats["completion_tokens"] += int((mask != CONTEXT).sum())
            stats["context_tokens"] += int((mask == CONTEXT).sum())
            if time.monotonic() - last > 10:
                last = time.monotonic()
                log.info("prepare-sft: %d examples, %.0f examples/s", stats["examples"],
                         stats["examples"] / (last - t0))
            yield ids, mask

    dtype = fmt.token_dtype(tok.vocab_size)
    writer = ShardWriter(out, SHARD_PREFIX, max(1, shard_tokens // seq_length), dtype, True, zstd_level)
    samples = 0
    for tokens, starts, mask in layout_examples(examples(), seq_length, tok.eos_id, layout, open_bins):
        writer.write(tokens, starts, mask)
        samples += 1
    shards = writer.close()
    rep = report.to_dict()
    if stats["examples"] == 0:
        bad = {k: v for k, v in rep["counts"].items() if v}
        raise InputError(f"no example in {', '.join(files[:3])}{', ...' if len(files) > 3 else ''} (bad input: "
                         f"{bad or 'none'}); expected jsonl records with 'prompt'/'completion' or 'messages'")
    text = stats["completion_tokens"] + stats["context_tokens"]
    manifest = {
        "format": fmt.FORMAT_NAME, "version": fmt.FORMAT_VERSION, "split": "train",
        "seq_length": seq_length, "dtype": fmt.dtype_name(dtype), "vocab_size": tok.vocab_size,
        "tokenizer_hash": tok.hash, "eos_id": tok.eos_id, "mask_id": tok.mask_id, "pad_id": tok.pad_id,
        "zstd_level": zstd_level, "doc_boundaries": True,
        "num_samples": samples, "num_tokens": samples * seq_length, "num_documents": stats["examples"],
        "num_text_tokens": text, "padding_tokens": samples * seq_length - text, "valid": None,
        "sft": {"layout": layout, "chat_template": "tokenizer" if chat_template == "auto" and has_chat_template(tok)
                else "default", "truncate": truncate, "max_examples": max_examples, **stats,
                "fill": text / max(1, samples * seq_length)},
        "inputs": [{"path": f, "bytes": Path(f).stat().st_size} for f in files],
        "report": rep, "shards": shards,
    }
    fmt.write_json_atomic(out / fmt.MANIFEST, manifest)
    log.info("prepare-sft: %d examples -> %d sequences of %d tokens (%s, %.0f%% of tokens are examples) in %d "
             "shards; bad input: %s", stats["examples"], samples, seq_length, layout, 100 * manifest["sft"]["fill"],
             len(shards), {k: v for k, v in rep["counts"].items() if v} or "none")
    return manifest


def mixture_weights(directories: list[str], cap: int | None = None) -> list[tuple[float, str]]:
    """Examples-proportional mixing with a cap (Flan): task ``i`` gets ``min(examples_i, cap)`` / total of the
    examples drawn. The blend draws sequences, so its weight is that share divided by the task's examples per
    sequence (packing puts several in one)."""
    sizes = []
    for d in directories:
        m = fmt.read_manifest(d)
        if not m.get("sft"):
            raise InputError(f"{Path(d) / fmt.MANIFEST}: not an instruction dataset (written by mdm-data prepare-sft)")
        n = m["num_documents"]
        sizes.append((min(n, cap) if cap else n) * m["num_samples"] / max(1, n))
    total = sum(sizes)
    return [(s / total, d) for s, d in zip(sizes, directories)]
