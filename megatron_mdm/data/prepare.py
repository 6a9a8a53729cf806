"""``prepare()``: tokenize text files in parallel, pack, and write shards plus a manifest.

Work is split by input file. Files are assigned to MPI ranks deterministically (largest first to the
least loaded rank) when run under ``mpirun`` (mpi4py is imported only then); each rank tokenizes its
files with a process pool, packs each file's documents on its own (EOS after each document) and writes
the full sequences to that file's shards ``{file:05d}-{part:05d}.tar``. A file is finished when its
record ``.parts/{file:05d}.json`` (shards with sha256, the leftover tokens) is written. Rank 0 then packs
the leftovers of all files, in file order, into ``tail-*.tar`` (the last sequence padded with EOS) and
writes ``manifest.json``. The sequences are therefore the same for any number of ranks and workers.

A re-run keeps every file whose record, parameters, shards and index sidecars (size and sha256) check out
and redoes the others; temporary files left by a killed run (``.NAME.tmpPID``) are removed. ``val_fraction``
sends whole documents (chosen by a hash of file name and line) to a separate dataset in ``OUTPUT/valid/``.

Refused at start: an ``--output`` inside an ``--input`` directory (it would read its own manifest and
shards as input). Refused at the end: an input without a single document (unless ``allow_empty``).
"""

from __future__ import annotations

import collections
import hashlib
import json
import logging
import multiprocessing as mp
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from megatron_mdm.data import format as fmt
from megatron_mdm.data.readers import (
    InputError,
    InputReport,
    expand_inputs,
    iter_documents,
)
from megatron_mdm.data.writer import Packer, ShardWriter, pack_tails

log = logging.getLogger(__name__)

PARTS_DIR = ".parts"
_SHARD_RE = re.compile(r"^(\d{5}|tail)-\d{5}\.tar$")
_TMP_RE = re.compile(r"^\.((\d{5}|tail)-\d{5}\.tar|(\d{5}|tail)-\d{5}\.idx\.npy|manifest\.json|\d{5}\.json)\.tmp\d+$")

# ---- tokenization in worker processes -------------------------------------------------------------

_WORKER_TOK = None


def _init_worker(tokenizer_json: str, single_threaded: bool = True) -> None:
    global _WORKER_TOK  # one tokenizer per worker process
    if single_threaded:  # the pool provides the parallelism
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    from tokenizers import Tokenizer

    _WORKER_TOK = Tokenizer.from_str(tokenizer_json)
    _WORKER_TOK.encode_special_tokens = True


def _tokenize(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Encode a batch; returns (all ids concatenated [n], lengths [docs]) for cheap pickling."""
    enc = _WORKER_TOK.encode_batch(texts, add_special_tokens=False)  # type: ignore[union-attr]
    lens = np.fromiter((len(e.ids) for e in enc), dtype=np.int64, count=len(enc))
    flat = np.fromiter((i for e in enc for i in e.ids), dtype=np.int64, count=int(lens.sum()))
    return flat, lens


# ---- MPI ------------------------------------------------------------------------------------------


def _mpi_comm():
    """The MPI world communicator when launched by mpirun/srun with more than one rank, else None."""
    keys = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE", "MPI_LOCALNRANKS")
    if not any(int(os.environ.get(k, "1") or 1) > 1 for k in keys):
        return None
    try:
        from mpi4py import MPI
    except ImportError as e:
        raise RuntimeError("launched under MPI with several ranks but mpi4py is not installed "
                           "(pip install 'megatron-mdm[mpi]')") from e
    return MPI.COMM_WORLD


def assign_files(sizes: list[int], world: int) -> list[list[int]]:
    """Deterministic split of file indices over ranks: largest first to the least loaded rank."""
    loads = [0] * world
    out: list[list[int]] = [[] for _ in range(world)]
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        r = min(range(world), key=lambda r: (loads[r], r))
        out[r].append(i)
        loads[r] += sizes[i]
    return [sorted(x) for x in out]


def _in_valid(path: str, line: int, val_fraction: float) -> bool:
    if val_fraction <= 0:
        return False
    h = hashlib.blake2b(f"{os.path.basename(path)}:{line}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") / 2**64 < val_fraction


# ---- progress -------------------------------------------------------------------------------------


class _Progress:
    def __init__(self, total_bytes: int, rank: int, every_s: float = 10.0) -> None:
        self.total, self.rank, self.every = max(1, total_bytes), rank, every_s
        self.done = 0
        self.tokens = 0
        self.t0 = self.last = time.monotonic()

    def bytes(self, n: int) -> None:
        self.done += n

    def maybe_log(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self.last < self.every:
            return
        self.last = now
        el = max(now - self.t0, 1e-9)
        frac = min(1.0, self.done / self.total)
        eta = el * (1 - frac) / frac if frac > 0 else float("nan")
        log.info("prepare[rank %d]: %.1f%% of input, %d tokens, %.0f tokens/s, ETA %.0fs",
                 self.rank, 100 * frac, self.tokens, self.tokens / el, eta)


# ---- one file -------------------------------------------------------------------------------------


def _part_path(output: Path, i: int) -> Path:
    return output / PARTS_DIR / f"{i:05d}.json"


def _check_shards(directory: Path, records: list[dict]) -> bool:
    for r in records:
        if "index" not in r:  # written before index sidecars existed
            return False
        for f in (r, r["index"]):
            p = directory / f["path"]
            if not p.is_file() or p.stat().st_size != f["bytes"] or fmt.sha256_file(p) != f["sha256"]:
                log.warning("prepare: shard %s is missing or corrupt; its input file is redone", p)
                return False
    return True


def _remove(paths) -> None:
    for p in paths:
        p.unlink(missing_ok=True)


def _remove_leftovers(directory: Path, prefix: str = "") -> None:
    """Temporary files of a killed run (``.NAME.tmpPID``), of one input file (``prefix``) or all."""
    if directory.is_dir():
        _remove(p for p in directory.glob(f".{prefix}*.tmp*") if _TMP_RE.match(p.name))


def _file_done(output: Path, i: int, path: str, params: dict) -> bool:
    pp = _part_path(output, i)
    if not pp.is_file():
        return False
    try:
        rec = json.loads(pp.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    st = os.stat(path)
    if rec.get("params") != params or rec.get("input") != os.path.abspath(path) or \
            rec.get("input_bytes") != st.st_size or rec.get("input_mtime_ns") != st.st_mtime_ns:
        return False
    return _check_shards(output, rec["train"]["shards"]) and \
        _check_shards(output / fmt.VALID_DIR, rec["valid"]["shards"])


PIECE_CHARS = 1 << 20
"""A longer document is tokenized in pieces of at most this many characters (memory and progress stay bounded)."""
BATCH_CHARS = 4 << 20
"""A tokenization task holds at most ``batch_docs`` documents and about this many characters."""


def document_pieces(text: str, limit: int = PIECE_CHARS) -> Iterator[str]:
    """``text`` in pieces of at most ``limit`` characters, each cut just before a space that starts a word.

    Byte-level BPE (what ``mdm-tokenizer`` trains; GPT-2 and Llama 3 style) and whitespace pre-tokenizers split
    the text there too, so the pieces' tokens, concatenated, are the whole document's. A stretch of ``limit``
    characters without such a space is cut at ``limit``.
    """
    start = 0
    while len(text) - start > limit:
        end = cut = start + limit
        while True:
            cut = text.rfind(" ", start + 1, cut)
            if cut <= start:
                cut = end
                break
            if not text[cut + 1].isspace():
                break
        yield text[start:cut]
        start = cut
    yield text[start:]


def _batches(path, text_key, report, progress, batch_docs):
    """Tasks of ``(line, piece, last piece of its document?, input bytes it stands for)``; a long document is
    split into pieces (``document_pieces``) and its input bytes are shared out, so progress moves inside it."""
    piece_chars = PIECE_CHARS
    read = [0]

    def count(n: int) -> None:
        read[0] += n

    batch: list[tuple[int, str, bool, int]] = []
    chars = 0
    for _, line, text in iter_documents(path, text_key, report, count):
        nbytes, read[0] = read[0], 0
        if len(text) > piece_chars:
            log.info("prepare: %s:%d is one document of %d characters: tokenized in pieces of at most %d",
                     path, line, len(text), piece_chars)
        pieces = document_pieces(text, piece_chars)
        piece = next(pieces)
        while piece is not None:
            following = next(pieces, None)
            share = nbytes if following is None else nbytes * len(piece) // max(1, len(text))
            nbytes -= share
            batch.append((line, piece, following is None, share))
            chars += len(piece)
            if len(batch) >= batch_docs or chars >= BATCH_CHARS:
                yield batch
                batch, chars = [], 0
            piece = following
    if batch:
        yield batch
    progress.bytes(read[0])  # trailing bytes after the last document


def _process_file(i: int, path: str, output: Path, params: dict, tok, pool, progress: _Progress,
                  strict: bool, batch_docs: int) -> dict:
    for d in (output, output / fmt.VALID_DIR):  # drop shards of an earlier, unfinished attempt
        _remove(d.glob(f"{i:05d}-*.tar"))
        _remove(d.glob(f"{i:05d}-*{fmt.INDEX_SUFFIX}"))
        _remove_leftovers(d, f"{i:05d}-")
    report = InputReport(strict=strict)
    dtype = fmt.token_dtype(tok.vocab_size)
    spp = max(1, params["shard_tokens"] // params["seq_length"])
    splits = {}
    for split, d in (("train", output), ("valid", output / fmt.VALID_DIR)):
        splits[split] = (Packer(params["seq_length"], tok.eos_id, tok.mask_id),
                         ShardWriter(d, f"{i:05d}", spp, dtype, params["doc_boundaries"], params["zstd_level"]))
    batches = _batches(path, params["text_key"], report, progress, batch_docs)
    pending = collections.deque()  # (batch) kept to pair with the tokenized results in order

    def texts_of(bs):
        for b in bs:
            pending.append([(line, last, share) for line, _, last, share in b])
            yield [t for _, t, _, _ in b]

    results = pool.imap(_tokenize, texts_of(batches)) if pool else map(_tokenize, texts_of(batches))
    parts: list[np.ndarray] = []  # the pieces of a long document so far
    for flat, lens in results:
        batch = pending.popleft()
        for (line, last, share), ids in zip(batch, np.split(flat, np.cumsum(lens)[:-1])):
            progress.bytes(share)
            if not last:
                parts.append(ids)
                continue
            if parts:
                ids, parts = np.concatenate(parts + [ids]), []
            packer, writer = splits["valid" if _in_valid(path, line, params["val_fraction"]) else "train"]
            if not packer.add(ids):
                report.add("mask_token", path, line, "document tokenizes to the mask id; skipped")
                continue
            for seq, starts in packer.take():
                writer.write(seq, starts)
        progress.tokens += int(lens.sum())
        progress.maybe_log()
    st = os.stat(path)
    rec = {"input": os.path.abspath(path), "input_bytes": st.st_size, "input_mtime_ns": st.st_mtime_ns,
           "params": params, "report": report.to_dict()}
    for split, (packer, writer) in splits.items():
        tail, starts = packer.tail()
        rec[split] = {"shards": writer.close(), "tail": tail.tolist(), "tail_starts": starts.tolist(),
                      "documents": packer.documents, "text_tokens": packer.text_tokens}
    (output / PARTS_DIR).mkdir(exist_ok=True)
    fmt.write_json_atomic(_part_path(output, i), rec)
    return rec


# ---- merge (rank 0) -------------------------------------------------------------------------------


def _merge_split(directory: Path, recs: list[dict], split: str, params: dict, tok, files: list[str],
                 report: dict, valid: str | None) -> dict:
    dtype = fmt.token_dtype(tok.vocab_size)
    _remove(directory.glob("tail-*.tar"))
    _remove(directory.glob(f"tail-*{fmt.INDEX_SUFFIX}"))
    _remove_leftovers(directory)  # every rank has finished: no temporary file is being written
    tails = [(np.asarray(r[split]["tail"], np.int64), np.asarray(r[split]["tail_starts"], np.int64)) for r in recs]
    seqs, pad = pack_tails(tails, params["seq_length"], tok.eos_id)
    spp = max(1, params["shard_tokens"] // params["seq_length"])
    w = ShardWriter(directory, "tail", spp, dtype, params["doc_boundaries"], params["zstd_level"])
    for seq, starts in seqs:
        w.write(seq, starts)
    shards = [s for r in recs for s in r[split]["shards"]] + w.close()
    keep = {s["path"] for s in shards}
    for p in directory.glob("*.tar"):  # shards of inputs no longer in the input list
        if _SHARD_RE.match(p.name) and p.name not in keep:
            _remove([p, p.with_name(fmt.index_name(p.name))])
    n = sum(s["samples"] for s in shards)
    manifest = {
        "format": fmt.FORMAT_NAME, "version": fmt.FORMAT_VERSION, "split": split,
        "seq_length": params["seq_length"], "dtype": fmt.dtype_name(dtype), "vocab_size": tok.vocab_size,
        "tokenizer_hash": tok.hash, "eos_id": tok.eos_id, "mask_id": tok.mask_id, "pad_id": tok.pad_id,
        "zstd_level": params["zstd_level"], "doc_boundaries": params["doc_boundaries"],
        "num_samples": n, "num_tokens": n * params["seq_length"],
        "num_documents": sum(r[split]["documents"] for r in recs),
        "num_text_tokens": sum(r[split]["text_tokens"] for r in recs), "padding_tokens": pad,
        "val_fraction": params["val_fraction"], "text_key": params["text_key"],
        "valid": valid, "inputs": [{"path": f, "bytes": r["input_bytes"]} for f, r in zip(files, recs)],
        "report": report, "shards": shards,
    }
    fmt.write_json_atomic(directory / fmt.MANIFEST, manifest)
    return manifest


def _merge(output: Path, files: list[str], params: dict, tok, allow_empty: bool) -> dict:
    _remove_leftovers(output / PARTS_DIR)
    recs = []
    for i, f in enumerate(files):
        pp = _part_path(output, i)
        if not pp.is_file():
            raise InputError(f"{pp}: missing record of finished input {f} (did a rank fail?)")
        recs.append(json.loads(pp.read_text()))
    report = InputReport(max_messages=1000)
    for r in recs:
        report.merge(r["report"])
    rep = report.to_dict()
    documents = sum(r[split]["documents"] for r in recs for split in ("train", "valid"))
    if documents == 0:
        bad = {k: v for k, v in rep["counts"].items() if v}
        msg = (f"the input holds no document ({len(files)} file(s): {', '.join(files[:3])}"
               f"{', ...' if len(files) > 3 else ''}; bad input: {bad or 'none'}; text key {params['text_key']!r})")
        if not allow_empty:
            raise InputError(f"{msg}: nothing to train on; check --input and --text-key, or pass --allow-empty")
        log.warning("prepare: %s; writing an empty dataset (--allow-empty)", msg)
    valid = None
    if params["val_fraction"] > 0:
        _merge_split(output / fmt.VALID_DIR, recs, "valid", params, tok, files, rep, None)
        valid = fmt.VALID_DIR
    return _merge_split(output, recs, "train", params, tok, files, rep, valid)


# ---- entry point ----------------------------------------------------------------------------------


def _check_output_outside_inputs(inputs: list[str], output: str) -> None:
    """An output directory inside an input directory (or holding an input file) would be read as input."""
    out = Path(output).resolve()
    for pat in inputs:
        p = Path(pat).resolve()
        if p == out or out in p.parents or (p.is_dir() and (out == p or p in out.parents)):
            raise InputError(f"--output {output} is inside the --input {pat}: prepare would read its own manifest "
                             "and shards as input; write the output outside the input directories")


def prepare(inputs: list[str], tokenizer: str, output: str, seq_length: int, text_key: str = "text",
            shard_tokens: int = 1 << 26, workers: int = 1, val_fraction: float = 0.0, strict: bool = False,
            doc_boundaries: bool = False, zstd_level: int = fmt.ZSTD_LEVEL, batch_docs: int = 256,
            allow_empty: bool = False) -> dict:
    """Tokenize, pack and shard ``inputs`` into ``output``; resumable; MPI-aware.

    Args:
        inputs: files, globs or directories (jsonl, jsonl.zst, parquet, txt, txt.zst).
        tokenizer: tokenizer directory or tokenizer.json (``MDMTokenizer.load``).
        output: dataset directory to write (``manifest.json``, shards, ``valid/``).
        seq_length: tokens per packed sequence.
        text_key: JSON field / parquet column with the text.
        shard_tokens: approximate tokens per shard (``shard_tokens // seq_length`` sequences).
        workers: tokenizer processes per rank (1: tokenize in this process).
        val_fraction: fraction of documents sent to the validation split.
        strict: fail on the first bad input instead of reporting it.
        doc_boundaries: also store document start offsets per sequence.
        zstd_level: zstd compression level of the members.
        batch_docs: documents per tokenization task.
        allow_empty: write an empty dataset (with a warning) when the input holds no document.

    Returns:
        The training manifest (on every rank).

    Raises:
        InputError: unreadable or empty input, ``output`` inside an input directory, bad input in strict mode.
    """
    from megatron_mdm.tokenization import MDMTokenizer

    if seq_length < 1:
        raise ValueError(f"--seq-length must be positive, got {seq_length}")
    if not 0 <= val_fraction < 1:
        raise ValueError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    _check_output_outside_inputs(inputs, output)
    files = expand_inputs(inputs)
    _check_output_outside_inputs(files, output)
    tok = MDMTokenizer.load(tokenizer)
    comm = _mpi_comm()
    rank, world = (comm.Get_rank(), comm.Get_size()) if comm is not None else (0, 1)
    out = Path(output)
    (out / PARTS_DIR).mkdir(parents=True, exist_ok=True)
    params = {"seq_length": seq_length, "tokenizer_hash": tok.hash, "text_key": text_key,
              "shard_tokens": shard_tokens, "val_fraction": val_fraction, "doc_boundaries": doc_boundaries,
              "zstd_level": zstd_level}
    mine = assign_files([os.path.getsize(f) for f in files], world)[rank]
    error: str | None = None
    pool = None
    try:
        todo = [i for i in mine if not _file_done(out, i, files[i], params)]
        if len(todo) < len(mine):
            log.info("prepare[rank %d]: %d of %d input files already done (checksums verified); kept",
                     rank, len(mine) - len(todo), len(mine))
        progress = _Progress(sum(os.path.getsize(files[i]) for i in todo), rank)
        if todo and workers > 1:
            pool = mp.get_context("spawn").Pool(workers, _init_worker, (tok.backend_json,))
        elif todo:
            _init_worker(tok.backend_json, single_threaded=False)
        for i in todo:
            _process_file(i, files[i], out, params, tok, pool, progress, strict, batch_docs)
        progress.maybe_log(force=bool(todo))
    except (InputError, OSError, ValueError) as e:
        error = f"rank {rank}: {e}" if world > 1 else str(e)
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    if comm is not None:
        errors = [e for e in comm.allgather(error) if e]
        if errors:
            raise InputError("; ".join(errors))
    elif error:
        raise InputError(error)
    manifest = None
    if rank == 0:
        try:
            manifest = _merge(out, files, params, tok, allow_empty)
        except InputError as e:
            error = str(e)
    if comm is not None:
        manifest, error = comm.bcast((manifest, error), root=0)
    if manifest is None:
        raise InputError(error)
    if rank == 0:
        log.info("prepare: %d sequences of %d tokens (%d documents) in %d shards; bad input: %s",
                 manifest["num_samples"], seq_length, manifest["num_documents"], len(manifest["shards"]),
                 {k: v for k, v in manifest["report"]["counts"].items() if v} or "none")
    return manifest
