"""A Hugging Face masked LM behind the decoding interface, and ``generate`` for the exported model.

* ``HFForward(model, device)`` wraps a loaded masked LM as a :class:`~.logits.ModelForward`. Any model
  returning ``.logits`` works as a plain ``LogitsFn``; the exported MDM (``hf/modeling/modeling_mdm.py``,
  which accepts ``past_key_values`` and ``logits_to_keep``) also gets the KV cache and the output head
  where needed only. Its K/V layout is transformers' ``[b, kv_heads, s, head_dim]``. The Megatron model
  has the same interface in ``megatron_mdm.decoding.backends.megatron.MegatronForward``.
* :class:`DiffusionGenerationMixin` gives the exported ``MDMForMaskedLM`` its ``generate`` (alias
  ``diffusion_generate``, Dream's name): the decoding loop of ``decoding.loop``, with the settings of
  ``decoding.settings.DecodingConfig``, so a model loaded with transformers alone samples exactly as
  ``mdm-generate`` does.

This module and the modules it imports (``cache``, ``logits``, ``loop``, ``settings``, ``unmasking``) import
only torch (and the standard library): ``mdm-convert to-hf`` ships them, byte for byte, beside the export's
``modeling_mdm.py``, where transformers loads them with ``trust_remote_code=True``. Keep their imports of one
another relative (``from .loop import decode``) and flat (no sub-packages).
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .cache import KVCache
from .logits import ModelForward, Select, apply_select
from .loop import decode
from .settings import DecodingConfig


class HFForward(ModelForward):
    """A Hugging Face masked LM as a ``LogitsFn`` / ``ModelForward``.

    Args:
        model: e.g. ``MDMForMaskedLM`` or any ``AutoModelForMaskedLM``; put in eval mode here.
        device: where the model runs; inputs are moved there, logits come back there as float.
    """

    def __init__(self, model: torch.nn.Module, device: str | torch.device = "cpu"):
        self.model = model.eval()
        self.device = torch.device(device)
        params = inspect.signature(model.forward).parameters
        self._keeps = "logits_to_keep" in params
        self.supports_cache = "past_key_values" in params and self._keeps
        self.supports_padding = self.supports_cache  # the export: a key mask with a cache, positions per row
        self.shift = bool(getattr(getattr(model, "config", None), "shift_logits", False))  # re-aligned in the model
        self._positions = torch.arange(0, device=self.device)[None]
        # the export takes precomputed RoPE tables: a window decoded many times computes them once
        self._rope = getattr(getattr(model, "model", None), "rotary_emb", None) \
            if "position_embeddings" in params else None
        self._tables: dict = {}

    def _position_ids(self, start: int, q: int) -> torch.Tensor:
        """[1, q] positions ``start..start + q - 1``, sliced from one arange that grows when needed."""
        if self._positions.shape[1] < start + q:
            self._positions = torch.arange(2 * (start + q), device=self.device)[None]
        return self._positions[:, start : start + q]

    def forward(self, input_ids: torch.Tensor, select: Select = None, start: int = 0, cache=None,
                pad: torch.Tensor | None = None) -> torch.Tensor:
        kwargs = {}
        q = input_ids.shape[1]
        if cache is not None or start:
            if not self.supports_cache:
                raise ValueError(f"{type(self.model).__name__} takes no past_key_values: use cache='none'")
            kwargs["position_ids"] = self._position_ids(start, q)
            kwargs["past_key_values"] = cache
        if pad is not None:
            if not self.supports_padding:
                raise ValueError(f"{type(self.model).__name__} takes no padding")
            pad = pad.to(self.device)
            kwargs["position_ids"] = (self._position_ids(start, q) - pad[:, None]).clamp(min=0)
            keys = q if cache is None else cache.key_length(q)
            kwargs["attention_mask"] = (self._position_ids(0, keys) >= pad[:, None]).long()
        if cache is not None and self._rope is not None:
            kwargs["position_embeddings"] = self._rope_tables(kwargs["position_ids"], start, q, pad)
        if select is not None and self._keeps:
            kwargs["logits_to_keep"] = select
        with torch.no_grad():
            logits = self.model(input_ids=input_ids.to(self.device), **kwargs).logits.float()
        return logits if self._keeps else apply_select(logits, select)

    def _rope_tables(self, position_ids: torch.Tensor, start: int, q: int, pad: torch.Tensor | None):
        """(cos, sin) of ``position_ids``, kept per window (start, width, padding) of the current decoding."""
        key = (start, q, None if pad is None else id(pad))
        if key not in self._tables:
            if len(self._tables) > 64 or (pad is not None and self._tables.get("pad") is not pad):
                self._tables = {"pad": pad}
            dtype = self.model.get_input_embeddings().weight.dtype
            self._tables[key] = self._rope(torch.empty(0, dtype=dtype, device=self.device), position_ids=position_ids)
        return self._tables[key]

    def new_cache(self) -> KVCache:
        if not self.supports_cache:
            return super().new_cache()
        return KVCache(seq_dim=2)


@dataclass
class DiffusionGenerationOutput:
    """What ``generate(..., return_dict_in_generate=True)`` returns.

    Attributes:
        sequences: [b, p + max_new_tokens]: ``input_ids`` as given (padding included), then each row's
            generated tokens (after a row's EOS, EOS to the end when it stops at EOS).
        num_forward: model forwards made (a guided forward counts once).
        forwards_per_row: per row, the forwards in which it had a token to unmask.
    """

    sequences: torch.Tensor
    num_forward: int = 0
    forwards_per_row: list[int] = field(default_factory=list)


_ALIASES = {"max_new_tokens": "gen_length"}  # transformers' name -> DecodingConfig's


class DiffusionGenerationMixin:
    """``generate`` for a masked diffusion LM loaded with transformers (mixed into ``MDMForMaskedLM``).

    The settings are the fields of :class:`~.settings.DecodingConfig` (``gen_length`` or
    ``max_new_tokens``, ``steps``, ``block_length``, ``temperature``, ``top_k``, ``top_p``, ``remasking``,
    ``cfg_scale``, ``cache``, ``threshold``, ``factor``, ``refresh_interval``); the model's defaults are the
    ``decoding`` entry of its ``generation_config.json`` (written by ``mdm-convert to-hf``), then
    ``DecodingConfig``'s own.
    """

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor | Sequence[Sequence[int]] | None = None,
        attention_mask: torch.Tensor | None = None,
        generation_config: Any = None,
        generator: torch.Generator | None = None,
        seed: int | None = None,
        eos_token_id: int | None | str = "default",
        return_dict_in_generate: bool = False,
        progress: bool = False,
        token_type_ids: torch.Tensor | None = None,
        **settings: Any,
    ) -> torch.Tensor | DiffusionGenerationOutput:
        """Sample completions of ``input_ids`` by iterative unmasking (``megatron_mdm.decoding.loop``).

        Args:
            input_ids: [b, p] prompt ids (left- or right-padded, with ``attention_mask``), or a list of lists.
            attention_mask: [b, p], 1 at the prompt's tokens, 0 at padding (dropped: rows of one prompt
                length are decoded together, the bidirectional model never sees a pad token).
            generation_config: an object or dict whose ``decoding`` entry (a dict of settings) replaces the
                model's ``generation_config.decoding``.
            generator: the only source of randomness (sampling at temperature > 0, random remasking).
            seed: a fresh CPU generator with this seed when ``generator`` is None (``mdm-generate --seed``).
            eos_token_id: stop a row at this id (the model's ``eos_token_id`` by default; None never stops).
            return_dict_in_generate: return a :class:`DiffusionGenerationOutput` instead of the sequences.
            progress: a tqdm bar of unmasked tokens on stderr.
            token_type_ids: ignored (a tokenizer's output may hold it: ``generate(**inputs)``).
            **settings: :class:`~.settings.DecodingConfig` fields (``max_new_tokens`` = ``gen_length``).

        Returns:
            [b, p + gen_length] int64: ``input_ids`` followed by the generated tokens of each row.
        """
        if input_ids is None:
            raise ValueError("generate needs input_ids (the prompt; [b, p] ids or a list of lists)")
        config = getattr(self, "config", None)
        mask_id = getattr(config, "mask_token_id", None)
        if mask_id is None:
            raise ValueError("the model's config has no mask_token_id: not a masked diffusion model")
        decoding = _resolve_settings(generation_config or getattr(self, "generation_config", None), settings)
        if eos_token_id == "default":
            eos_token_id = _first(getattr(getattr(self, "generation_config", None), "eos_token_id", None))
            if eos_token_id is None:
                eos_token_id = _first(getattr(config, "eos_token_id", None))
        if generator is None and seed is not None:
            generator = torch.Generator().manual_seed(int(seed))
        device = next(self.parameters()).device
        ids = input_ids if isinstance(input_ids, torch.Tensor) else None
        if ids is not None and ids.dim() == 1:
            ids = ids[None]
        rows = _rows(ids if ids is not None else input_ids, attention_mask)
        out = decode(HFForward(self, device), rows, decoding, int(mask_id), eos_id=eos_token_id, generator=generator,
                     vocab_size=getattr(config, "vocab_size", None), device=device, progress=progress)
        n = out.gen_length
        generated = torch.stack([out.tokens[i, p : p + n] for i, p in enumerate(out.prompt_lengths)])
        if ids is None:
            width = max(out.prompt_lengths, default=0)
            pad = eos_token_id if eos_token_id is not None else int(mask_id)
            ids = torch.full((len(rows), width), pad, dtype=torch.long)
            for i, r in enumerate(rows):
                ids[i, width - len(r) :] = torch.tensor(r, dtype=torch.long)  # left-padded, as tokenizers do
        sequences = torch.cat([ids.to(device), generated.to(device)], dim=1)
        if return_dict_in_generate:
            return DiffusionGenerationOutput(sequences, out.num_forward, out.forwards_per_row)
        return sequences

    def diffusion_generate(self, *args: Any, **kwargs: Any):
        """:meth:`generate` under Dream's name."""
        return self.generate(*args, **kwargs)


def _first(eos: Any) -> int | None:
    """One EOS id (the first of a list, as lists of stop ids are written in configs)."""
    if isinstance(eos, (list, tuple)):
        return int(eos[0]) if eos else None
    return None if eos is None else int(eos)


def _resolve_settings(generation_config: Any, settings: dict[str, Any]) -> DecodingConfig:
    """DecodingConfig defaults < the model's ``generation_config.decoding`` < ``settings``; ValueError naming
    an unknown setting."""
    defaults = generation_config.get("decoding") if isinstance(generation_config, dict) else \
        getattr(generation_config, "decoding", None)
    names = DecodingConfig.names()
    given = {_ALIASES.get(k, k): v for k, v in settings.items()}
    unknown = sorted(set(given) - set(names))
    if unknown:
        raise ValueError(f"generate: unknown setting(s) {', '.join(unknown)}; the settings are "
                         f"{', '.join(['max_new_tokens', *names])}")
    base = DecodingConfig.from_strings({k: v for k, v in (defaults or {}).items() if k in names})
    return dataclasses.replace(base, **given).validate()


def _rows(input_ids: Any, attention_mask: torch.Tensor | None) -> list[list[int]]:
    """Each prompt's ids without its padding."""
    if not isinstance(input_ids, torch.Tensor):
        return [list(map(int, r)) for r in input_ids]
    if attention_mask is None:
        return input_ids.tolist()
    keep = attention_mask.to(torch.bool).view(input_ids.shape).cpu()
    return [row[k].tolist() for row, k in zip(input_ids.cpu(), keep)]
