"""Bidirectional Llama for masked diffusion language models (the Hugging Face side of megatron-mdm).

Shipped into exported directories by ``mdm-convert to-hf``; imports only ``torch`` and
``transformers``. The layers are transformers' own Llama layers (RMSNorm, rotate-half RoPE, GQA,
SwiGLU), so the numerics are those of ``LlamaModel``; the differences are:

* every attention module has ``is_causal = False`` and the mask is built bidirectionally (padding
  only), so each position attends to the whole sequence, as the Megatron MDM was trained;
* no KV cache (a diffusion sampler re-reads the whole sequence at every step);
* ``MDMForMaskedLM`` returns logits ``[batch, seq, vocab]`` for every position;
* options of adapted models: q/k/v biases (``qkv_bias``, from Qwen2) and the shifted prediction
  (``shift_logits``: the logits are re-aligned so that entry i predicts token i).
"""


import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutput, MaskedLMOutput
from transformers.models.llama.modeling_llama import LlamaModel, LlamaPreTrainedModel

from .configuration_mdm import MDMConfig


def _bidirectional_mask(config, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None):
    """Padding-only attention mask in the form the configured attention backend expects (or None)."""
    if attention_mask is None or attention_mask.dim() == 4:
        return attention_mask
    if bool(attention_mask.all()):
        return None
    try:
        from transformers.masking_utils import create_bidirectional_mask
    except ImportError:  # older transformers: an additive [b, 1, 1, s] float mask
        keep = attention_mask[:, None, None, :].bool()
        neg = torch.finfo(inputs_embeds.dtype).min
        return torch.zeros(keep.shape, dtype=inputs_embeds.dtype, device=keep.device).masked_fill(~keep, neg)
    return create_bidirectional_mask(config=config, inputs_embeds=inputs_embeds, attention_mask=attention_mask)


class MDMPreTrainedModel(LlamaPreTrainedModel):
    config_class = MDMConfig
    config: MDMConfig
    base_model_prefix = "model"


class MDMModel(MDMPreTrainedModel, LlamaModel):
    """Llama decoder stack with full (bidirectional) self-attention; returns hidden states."""

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
        **kwargs,
    ) -> BaseModelOutput:
        """input_ids [b, s] (or inputs_embeds [b, s, h]) -> last_hidden_state [b, s, h]."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids and inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if position_ids is None:
            position_ids = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device).unsqueeze(0)
        mask = _bidirectional_mask(self.config, inputs_embeds, attention_mask)
        hidden = inputs_embeds
        position_embeddings = self.rotary_emb(hidden, position_ids=position_ids)
        for layer in self.layers[: self.config.num_hidden_layers]:
            hidden = layer(hidden, attention_mask=mask, position_ids=position_ids,
                           position_embeddings=position_embeddings, is_causal=False)
        return BaseModelOutput(last_hidden_state=self.norm(hidden))


class MDMForMaskedLM(MDMPreTrainedModel):
    """Bidirectional Llama with the output head: logits [b, s, vocab] at every position."""

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
        **kwargs,
    ) -> MaskedLMOutput:
        """input_ids [b, s] -> logits [b, s, vocab]; with ``labels`` (-100 = ignore) also the mean CE."""
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                            inputs_embeds=inputs_embeds).last_hidden_state
        logits = self.lm_head(hidden)
        if getattr(self.config, "shift_logits", False):  # output i predicts i + 1: entry i gets output i - 1
            logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)
        loss = None
        if labels is not None:
            loss = nn.functional.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100)
        return MaskedLMOutput(loss=loss, logits=logits)
