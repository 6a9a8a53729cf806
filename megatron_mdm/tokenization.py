"""The tokenizer wrapper: mask, pad, bos and eos ids, a stable hash, BPE training, vocabulary padding.

:class:`MDMTokenizer` wraps a Hugging Face ``PreTrainedTokenizerFast``. Masked diffusion needs a mask
token: a tokenizer's own (``[MASK]`` of BERT, ``<mask>`` of RoBERTa/XLM-R) is reused; one that lacks it
(e.g. a Llama-family tokenizer) gets ``<|mask|>`` appended with a warning (and ``<|pad|>``/``<|eos|>`` when
missing; a BERT-style ``[SEP]`` serves as end of document), and the new vocabulary size is logged. ``encode`` never adds
special tokens and treats special-token strings in the text as plain text, so raw data can never
produce the mask id. ``hash`` fingerprints what decides the ids (vocabulary, merges, special tokens):
the data manifests record it and the loader checks it against the model's tokenizer.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

log = logging.getLogger(__name__)

MASK_TOKEN = "<|mask|>"
PAD_TOKEN = "<|pad|>"
BOS_TOKEN = "<|bos|>"
EOS_TOKEN = "<|eos|>"
SPECIAL_TOKENS = [MASK_TOKEN, PAD_TOKEN, BOS_TOKEN, EOS_TOKEN]
# tokenizer_config.json classes that are tokenizer.json and nothing else (transformers 4 and 5 names)
_PLAIN_CLASSES = ("PreTrainedTokenizerFast", "TokenizersBackend")


def padded_vocab_size(vocab_size: int, make_vocab_size_divisible_by: int, tensor_model_parallel_size: int) -> int:
    """Round ``vocab_size`` up to a multiple of lcm(``make_vocab_size_divisible_by``, TP).

    Unlike Megatron-LM (a multiple of ``divisible_by * TP``), the padded size does not change with
    the TP size when ``divisible_by`` is a multiple of it (the default 128 with TP = 1, 2, 4, 8), so
    a checkpoint resumes on another TP layout with the same embedding shape.
    """
    multiple = math.lcm(make_vocab_size_divisible_by, tensor_model_parallel_size)
    return -(-vocab_size // multiple) * multiple


class MDMTokenizer:
    """A fast HF tokenizer with guaranteed mask, pad and eos tokens.

    Attributes:
        hf: the ``transformers.PreTrainedTokenizerFast``.
        vocab_size: number of ids including added tokens (before padding for TP).
        mask_id, pad_id, eos_id: ids of the mask, padding and end-of-document tokens.
        bos_id: id of the beginning-of-sequence token, or None when the tokenizer has none.
    """

    def __init__(self, hf) -> None:
        self.hf = hf
        self._ensure_special_tokens()
        # A separate backend that encodes special-token strings as text (data must not contain them).
        from tokenizers import Tokenizer

        self._plain = Tokenizer.from_str(hf.backend_tokenizer.to_str())
        self._plain.encode_special_tokens = True

    # ---- construction ----------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | os.PathLike) -> MDMTokenizer:
        """Load a tokenizer directory (ours or any HF fast tokenizer) or a bare ``tokenizer.json``."""
        from transformers import AutoTokenizer, PreTrainedTokenizerFast

        p = Path(path)
        if p.is_file():
            hf = PreTrainedTokenizerFast(tokenizer_file=str(p))
        elif p.is_dir():
            if (p / "tokenizer_config.json").is_file():
                tok_cfg = json.loads((p / "tokenizer_config.json").read_text(encoding="utf-8"))
                if tok_cfg.get("auto_map"):
                    raise ValueError(f"{p}: the tokenizer asks for its own Python code (auto_map in "
                                     "tokenizer_config.json); only tokenizer.json tokenizers are supported")
                if tok_cfg.get("tokenizer_class") in _PLAIN_CLASSES and (p / "tokenizer.json").is_file():
                    # the class itself: AutoTokenizer would read config.json first, and an exported MDM's
                    # auto_map there makes transformers ask "run the custom code? [y/N]" on stdin
                    hf = PreTrainedTokenizerFast.from_pretrained(str(p))
                else:
                    hf = AutoTokenizer.from_pretrained(str(p), use_fast=True, trust_remote_code=False)
            elif (p / "tokenizer.json").is_file():
                hf = PreTrainedTokenizerFast(tokenizer_file=str(p / "tokenizer.json"))
            else:
                raise FileNotFoundError(f"{p}: no tokenizer.json or tokenizer_config.json in the directory")
            if not getattr(hf, "is_fast", False):
                raise ValueError(f"{p}: only fast (tokenizer.json) tokenizers are supported")
        else:
            raise FileNotFoundError(f"{p}: tokenizer not found")
        return cls(hf)

    def _ensure_special_tokens(self) -> None:
        hf = self.hf
        before = len(hf)
        vocab = hf.get_vocab()
        add: dict[str, str] = {}
        if hf.mask_token is None:
            if MASK_TOKEN in vocab:
                hf.mask_token = MASK_TOKEN
            else:
                add["mask_token"] = MASK_TOKEN
        if hf.eos_token is None:
            if EOS_TOKEN in vocab:
                hf.eos_token = EOS_TOKEN
            elif hf.sep_token is not None:  # BERT-style: [SEP] ends a segment
                hf.eos_token = hf.sep_token
            else:
                add["eos_token"] = EOS_TOKEN
        if hf.pad_token is None:
            if PAD_TOKEN in vocab:
                hf.pad_token = PAD_TOKEN
            else:
                add["pad_token"] = PAD_TOKEN
        if hf.bos_token is None and BOS_TOKEN in vocab:
            hf.bos_token = BOS_TOKEN
        if add:
            hf.add_special_tokens(add)
            level = logging.WARNING if "mask_token" in add else logging.INFO
            log.log(level, "tokenizer: added %s%s; vocabulary size %d -> %d", sorted(add.values()),
                    f" (it had no mask token: id {hf.mask_token_id} is new)" if "mask_token" in add else "",
                    before, len(hf))

    # ---- ids -------------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return len(self.hf)

    @property
    def mask_id(self) -> int:
        return int(self.hf.mask_token_id)

    @property
    def pad_id(self) -> int:
        return int(self.hf.pad_token_id)

    @property
    def eos_id(self) -> int:
        return int(self.hf.eos_token_id)

    @property
    def bos_id(self) -> int | None:
        return None if self.hf.bos_token_id is None else int(self.hf.bos_token_id)

    # ---- encoding --------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; no special tokens added, special-token strings encoded as text."""
        return self._plain.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """``encode`` for a list of texts (parallel in the Rust backend)."""
        return [e.ids for e in self._plain.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    @property
    def backend_json(self) -> str:
        """The ``tokenizers`` JSON of the plain-text encoder (for worker processes)."""
        return self._plain.to_str()

    # ---- persistence -----------------------------------------------------------------------------
    def save(self, directory: str | os.PathLike) -> None:
        """Write a directory that ``transformers.AutoTokenizer.from_pretrained`` and ``load`` read."""
        Path(directory).mkdir(parents=True, exist_ok=True)
        self.hf.save_pretrained(str(directory))

    @property
    def hash(self) -> str:
        """sha256 of the vocabulary, merges and special tokens in a canonical form (stable across save/load)."""
        spec = json.loads(self.hf.backend_tokenizer.to_str())
        model = spec.get("model", {})
        merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", []) or []]
        vocab = model.get("vocab")
        canon = {
            "type": model.get("type"),
            "vocab": sorted(vocab.items()) if isinstance(vocab, dict) else vocab,
            "merges": merges,
            "added": sorted((t["id"], t["content"], bool(t.get("special"))) for t in spec.get("added_tokens", [])),
            "special": [self.mask_id, self.pad_id, self.bos_id, self.eos_id],
        }
        blob = json.dumps(canon, ensure_ascii=False, separators=(",", ":"))
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()

    def describe(self) -> dict:
        return {"vocab_size": self.vocab_size, "mask_id": self.mask_id, "pad_id": self.pad_id,
                "bos_id": self.bos_id, "eos_id": self.eos_id, "hash": self.hash}


def _texts(files: list[str], text_key: str, max_docs: int | None) -> Iterator[str]:
    from megatron_mdm.data.readers import InputReport, iter_documents

    report = InputReport()
    n = 0
    for f in files:
        for _, _, text in iter_documents(f, text_key, report):
            yield text
            n += 1
            if max_docs is not None and n >= max_docs:
                return


def train_bpe_tokenizer(files: list[str], vocab_size: int, output_dir: str | os.PathLike,
                        text_key: str = "text", min_frequency: int = 2,
                        max_docs: int | None = None) -> MDMTokenizer:
    """Train a byte-level BPE tokenizer and save it as an AutoTokenizer-loadable directory.

    Args:
        files: input files (jsonl, jsonl.zst, parquet, txt, txt.zst; read like ``mdm-data prepare``).
        vocab_size: total vocabulary size including the 256 byte tokens and the 4 special tokens.
        output_dir: directory to write (``tokenizer.json``, ``tokenizer_config.json``, ...).
        text_key: JSON field / parquet column with the text.
        min_frequency: minimum pair frequency for a merge.
        max_docs: read at most this many documents (None: all).

    Returns:
        The saved tokenizer, loaded back.
    """
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size {vocab_size} is smaller than 256 bytes + {len(SPECIAL_TOKENS)} special tokens")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(_texts(list(files), text_key, max_docs), trainer=trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, mask_token=MASK_TOKEN, pad_token=PAD_TOKEN,
                                 bos_token=BOS_TOKEN, eos_token=EOS_TOKEN)
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(str(output_dir))
    out = MDMTokenizer.load(output_dir)
    log.info("tokenizer: trained byte-level BPE, vocabulary size %d, saved to %s", out.vocab_size, output_dir)
    return out
