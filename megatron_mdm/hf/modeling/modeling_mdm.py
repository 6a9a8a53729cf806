"""Bidirectional Llama for masked diffusion language models (the Hugging Face side of megatron-mdm).

Shipped into exported directories by ``mdm-convert to-hf``; imports only ``torch`` and
``transformers``. The layers are transformers' own Llama layers (RMSNorm, rotate-half RoPE, GQA,
SwiGLU), so the numerics are those of ``LlamaModel``; the differences are:

* every attention module has ``is_causal = False`` and the mask is built bidirectionally (padding
  only), so each position attends to the whole sequence, as the Megatron MDM was trained;
* ``MDMForMaskedLM`` returns logits ``[batch, seq, vocab]`` for every position, or only for the
  positions in ``logits_to_keep`` (the last n, a slice, an index tensor, or a bool mask [b, s] giving
  ``[n, vocab]``): a diffusion sampler needs the current block, a likelihood the masked positions;
* options of adapted models: q/k/v biases (``qkv_bias``, from Qwen2) and the shifted prediction
  (``shift_logits``: the outputs are re-aligned so that entry i predicts token i: entry i is the head
  applied to the hidden state of position i - 1, entry 0 to its own).

**Per-layer K/V (``past_key_values``).** Block decoding (Fast-dLLM's prefix and dual caches) runs a
window of the sequence, ``input_ids`` = positions ``[start, start + q)`` with ``position_ids`` to match,
whose queries attend to the window's own keys/values and to cached ones of the other positions. The
model takes any object with transformers' ``Cache.update(key, value, layer_idx, ...)`` method: each
attention layer hands it the window's K/V ``[b, kv_heads, q, head_dim]`` (after RoPE) and attends to
the K/V it returns, in any order of positions (attention is bidirectional: no mask is needed). The
object is updated in place (as transformers' caches are; it is not repeated in the output, whose
cache field is named differently across transformers versions). A ``transformers.DynamicCache``
works as a plain prefix cache (it appends); megatron-mdm's ``decoding.KVCache`` keeps prefix and suffix.
With ``shift_logits``, entry 0 of a window that does not start the sequence has no previous position in
the window: ask for windows one position wider on the left.

**Sampling.** ``MDMForMaskedLM.generate`` (alias ``diffusion_generate``) is megatron-mdm's decoding loop
(``DiffusionGenerationMixin`` of ``hf_generation.py``): semi-autoregressive blocks, low-confidence / random /
margin / entropy remasking, temperature, top-k, top-p, classifier-free guidance, prefix and dual KV caches,
threshold and factor unmasking, stop at EOS. ``mdm-convert to-hf`` ships that module and the ones it imports
(``cache.py``, ``logits.py``, ``loop.py``, ``settings.py``, ``unmasking.py``) beside this file, byte for byte
the package's ``megatron_mdm/decoding/`` files; inside megatron-mdm they are imported from there.
"""

import inspect

import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutput, MaskedLMOutput
from transformers.models.llama.modeling_llama import LlamaModel, LlamaPreTrainedModel

from .configuration_mdm import MDMConfig

try:  # an export: the decoding modules are shipped beside this file
    from .hf_generation import DiffusionGenerationMixin
except ImportError:
    if not __name__.startswith("megatron_mdm."):
        raise
    from megatron_mdm.decoding.hf_generation import DiffusionGenerationMixin


def _bidirectional_mask(config, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None):
    """Padding-only attention mask in the form the configured attention backend expects (or None).

    ``attention_mask`` [b, keys] marks the keys the queries may attend to; with a cache the keys are the whole
    sequence and the queries (``inputs_embeds``) a window of it: every query gets the same key mask.
    """
    if attention_mask is None or attention_mask.dim() == 4:
        return attention_mask
    if bool(attention_mask.all()):
        return None
    b, q = inputs_embeds.shape[:2]
    keys = attention_mask.shape[-1]
    if keys != q:  # a window: the mask of the whole sequence, its first q query rows (all rows are alike)
        if getattr(config, "_attn_implementation", None) == "sdpa":
            return attention_mask[:, None, None, :].bool().expand(b, 1, q, keys)
        full = _bidirectional_mask(config, inputs_embeds.new_empty((b, keys, 0)), attention_mask)
        return full[:, :, :q] if full.shape[2] != 1 else full
    try:
        from transformers.masking_utils import create_bidirectional_mask
    except ImportError:  # older transformers: an additive [b, 1, 1, s] float mask
        keep = attention_mask[:, None, None, :].bool()
        neg = torch.finfo(inputs_embeds.dtype).min
        return torch.zeros(keep.shape, dtype=inputs_embeds.dtype, device=keep.device).masked_fill(~keep, neg)
    return create_bidirectional_mask(config=config, inputs_embeds=inputs_embeds, attention_mask=attention_mask)


def _cache_kwarg(layer: nn.Module) -> str:
    """The name under which this transformers version's decoder layer takes a KV cache."""
    params = inspect.signature(layer.forward).parameters
    for name in ("cache", "past_key_values", "past_key_value"):
        if name in params:
            return name
    raise TypeError("this transformers version's Llama layers take no KV cache argument")


def _keep_positions(x: torch.Tensor, keep):
    """Select positions of x [b, s, ...]: None/0 all, int n the last n, a slice, indices, or a bool [b, s]."""
    if keep is None or (isinstance(keep, int) and keep == 0):
        return x
    if isinstance(keep, int):
        return x[:, -keep:]
    if isinstance(keep, slice):
        return x[:, keep]
    if keep.dtype == torch.bool:
        return x[keep.to(x.device)]  # [n, ...]
    return x[:, keep.to(x.device)]


class MDMPreTrainedModel(LlamaPreTrainedModel):
    config_class = MDMConfig
    config: MDMConfig
    base_model_prefix = "model"


class MDMModel(MDMPreTrainedModel, LlamaModel):
    """Llama decoder stack with full (bidirectional) self-attention; returns hidden states."""

    _keys_to_ignore_on_load_unexpected = [r"^lm_head\."]  # noqa: RUF012 - the head of a full export

    def __init__(self, config: MDMConfig):
        LlamaModel.__init__(self, config)
        for layer in self.layers:
            layer.self_attn.is_causal = False
            if getattr(config, "qkv_bias", False):  # Qwen2: biases on q/k/v only (o_proj has none)
                for name in ("q_proj", "k_proj", "v_proj"):
                    old = getattr(layer.self_attn, name)
                    setattr(layer.self_attn, name, nn.Linear(old.in_features, old.out_features, bias=True))

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        past_key_values=None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        **kwargs,
    ) -> BaseModelOutput:
        """input_ids [b, q] (or inputs_embeds [b, q, h]) -> last_hidden_state [b, q, h].

        ``past_key_values`` (or ``cache``): an object with ``update(key, value, layer_idx, ...)`` (see
        the module docstring); default positions then start at its ``get_seq_length()``. With a cache,
        ``attention_mask`` [b, keys] is the padding mask of the keys the cache returns (the whole sequence).
        ``position_embeddings``: the (cos, sin) RoPE tables of ``position_ids``, when the caller has them (a
        decoder running one window many times); default: computed here.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids and inputs_embeds")
        cache = kwargs.pop("cache", None) if past_key_values is None else past_key_values
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if position_ids is None:
            start = cache.get_seq_length() if cache is not None and hasattr(cache, "get_seq_length") else 0
            position_ids = torch.arange(start, start + inputs_embeds.shape[1], device=inputs_embeds.device)[None]
        mask = _bidirectional_mask(self.config, inputs_embeds, attention_mask)
        hidden = inputs_embeds
        if position_embeddings is None:
            position_embeddings = self.rotary_emb(hidden, position_ids=position_ids)
        extra = {}
        if cache is not None:
            if not hasattr(self, "_cache_kw"):
                self._cache_kw = _cache_kwarg(self.layers[0])
            extra[self._cache_kw] = cache
        for layer in self.layers[: self.config.num_hidden_layers]:
            hidden = layer(hidden, attention_mask=mask, position_ids=position_ids,
                           position_embeddings=position_embeddings, is_causal=False, **extra)
        return BaseModelOutput(last_hidden_state=self.norm(hidden))


class MDMForMaskedLM(DiffusionGenerationMixin, MDMPreTrainedModel):
    """Bidirectional Llama with the output head: logits [b, s, vocab] at every position; ``generate`` samples."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}  # noqa: RUF012 - transformers API

    def __init__(self, config: MDMConfig):
        super().__init__(config)
        self.model = MDMModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, new_embeddings):
        self.lm_head = new_embeddings

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        past_key_values=None,
        logits_to_keep=None,
        position_embeddings=None,
        **kwargs,
    ) -> MaskedLMOutput:
        """input_ids [b, q] -> logits [b, q, vocab]; with ``labels`` (-100 = ignore) also the mean CE.

        Args:
            past_key_values: per-layer K/V of the other positions, updated in place (module docstring).
            logits_to_keep: positions that get logits: None/0 all, an int n the last n, a slice, an
                index tensor, or a bool mask [b, q] (logits ``[n, vocab]``); ``labels`` are selected alike.
            position_embeddings: precomputed RoPE (cos, sin) of ``position_ids`` (``MDMModel.forward``).
        """
        cache = kwargs.pop("cache", None) if past_key_values is None else past_key_values
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                            inputs_embeds=inputs_embeds, past_key_values=cache,
                            position_embeddings=position_embeddings).last_hidden_state
        if getattr(self.config, "shift_logits", False):  # output i predicts i + 1: entry i gets output i - 1
            hidden = torch.cat([hidden[:, :1], hidden[:, :-1]], dim=1)
        logits = self.lm_head(_keep_positions(hidden, logits_to_keep))
        loss = None
        if labels is not None:
            labels = _keep_positions(labels, logits_to_keep)
            loss = nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                               ignore_index=-100)
        return MaskedLMOutput(loss=loss, logits=logits)
