"""Load a Hugging Face model directory as a model-agnostic ``LogitsFn``.

The HF export of our MDMs (``mdm-convert to-hf``) loads with ``trust_remote_code=True`` and returns
``.logits``; any bidirectional masked LM (``AutoModelForMaskedLM``, e.g. a BERT) works the same way.
The mask id comes from the model config (``mask_token_id``), else from the tokenizer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from megatron_mdm.guidance import LogitsFn


@dataclass
class HFTokenizer:
    """The few tokenizer attributes evaluation needs, over a ``transformers`` tokenizer."""

    tok: Any

    @property
    def vocab_size(self) -> int:
        return len(self.tok)

    @property
    def mask_id(self) -> int | None:
        return self.tok.mask_token_id

    @property
    def pad_id(self) -> int | None:
        return self.tok.pad_token_id

    @property
    def bos_id(self) -> int | None:
        return self.tok.bos_token_id

    @property
    def eos_id(self) -> int | None:
        return self.tok.eos_token_id if self.tok.eos_token_id is not None else self.tok.sep_token_id

    def encode(self, text: str) -> list[int]:
        return list(self.tok.encode(text, add_special_tokens=False))

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=False)


def _load_tokenizer(path: str) -> Any:
    try:  # the project's tokenizer, when the directory was written by our export
        from megatron_mdm.tokenization import MDMTokenizer

        return MDMTokenizer.load(path)
    except Exception:  # noqa: BLE001 - any failure falls back to transformers
        from transformers import AutoTokenizer

        return HFTokenizer(AutoTokenizer.from_pretrained(path, trust_remote_code=True))


def _load_model(path: str, dtype: torch.dtype) -> torch.nn.Module:
    import transformers

    errors = []
    for auto in (transformers.AutoModelForMaskedLM, transformers.AutoModel):
        try:
            return auto.from_pretrained(path, trust_remote_code=True, dtype=dtype)
        except (ValueError, KeyError, OSError) as e:
            errors.append(f"{auto.__name__}: {e}")
    raise ValueError(f"cannot load a masked LM from {path}:\n" + "\n".join(errors))


def load_logits_fn(
    path: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> tuple[LogitsFn, Any, int, int]:
    """Load a HF directory as (logits_fn, tokenizer, mask_id, vocab_size).

    Args:
        path: directory with config.json, weights and tokenizer files.
        device: where the model runs; the LogitsFn moves inputs there.
        dtype: parameter dtype.

    Returns:
        logits_fn (input_ids [b, s] -> float logits [b, s, V_padded]), tokenizer (``encode``/``decode``,
        ``eos_id``...), mask_id, vocab_size (real size, mask token included).
    """
    model = _load_model(path, dtype).to(device).eval()
    tokenizer = _load_tokenizer(path)
    mask_id = getattr(model.config, "mask_token_id", None)
    if mask_id is None:
        mask_id = tokenizer.mask_id
    if mask_id is None:
        raise ValueError(f"{path}: no mask token id in config.json (mask_token_id) or in the tokenizer")
    vocab_size = max(int(tokenizer.vocab_size), int(mask_id) + 1)
    vocab_size = min(vocab_size, int(getattr(model.config, "vocab_size", vocab_size)))

    from megatron_mdm.decoding.backends import HFForward  # KV cache and selected logits for our export

    return HFForward(model, device), tokenizer, int(mask_id), vocab_size
