"""The model card (``README.md``) of an export: what the model is, and code that loads and samples it.

The usage block runs as written from the export's directory (``path = "."``) with transformers alone
(tests/test_hf_export.py runs it): the tokenizer with no flags, and, for an MDM of the Llama family,
``generate`` from the code shipped in the directory (``trust_remote_code=True``). Nothing in the card
names the exporting machine's paths.
"""

from __future__ import annotations

from megatron_mdm.config import Config


def model_card(cfg: Config, config: dict, mdm: bool, special: dict, vocab_size: int, run_name: str,
               iteration: int | None, ships_code: bool) -> str:
    """The card's Markdown.

    Args:
        cfg: the checkpoint's config.
        config: the export's ``config.json`` dict (its model type and classes).
        mdm: the objective is the masked diffusion one.
        special: the tokenizer's special ids (``mask``, ``eos``, ...).
        vocab_size: the vocabulary of the export.
        run_name: the name of the run directory (not its path).
        iteration: the checkpoint's iteration.
        ships_code: the export carries ``modeling_mdm.py`` and the decoding modules (``generate``).
    """
    from megatron_mdm.models.registry import family as model_family

    model_type = config.get("model_type", "")
    kind = ("a masked diffusion language model (MDM: bidirectional attention, sampled by iterative unmasking)"
            if mdm else "an autoregressive baseline (causal attention)")
    if mdm and cfg.objective.shift_logits:
        kind += "; shifted prediction (the network's output at i predicts token i + 1; `.logits` are re-aligned)"
    title = f"{run_name}: {'masked diffusion' if mdm else 'autoregressive'} language model (megatron-mdm)"
    at = f"iteration {iteration} of " if iteration is not None else ""
    tags = ", ".join(dict.fromkeys(["megatron-mdm", "masked-diffusion" if mdm else "causal-lm", model_type]))
    return f"""---
library_name: transformers
pipeline_tag: {'fill-mask' if mdm else 'text-generation'}
tags: [{tags}]
---
# {title}

{kind[0].upper() + kind[1:]}, trained with megatron-mdm and exported from {at}its run
`{run_name}` by `mdm-convert to-hf`.

- **Objective**: `{cfg.objective.objective}`
- **Mask token id**: `{special.get('mask')}`; end-of-sequence id `{special.get('eos')}`
- **Architecture**: {model_family(cfg).describe(cfg)}, vocabulary {vocab_size}, trained with sequence length
  {cfg.data.seq_length} (the tokenizer's `model_max_length`); `model_type` `{model_type}`

## Usage

{_usage(mdm, model_type, ships_code)}
"""


def _usage(mdm: bool, model_type: str, ships_code: bool) -> str:
    if not mdm:
        return """```python
from transformers import AutoModelForCausalLM, AutoTokenizer

path = "."  # this directory, or its hub id
tokenizer = AutoTokenizer.from_pretrained(path)
model = AutoModelForCausalLM.from_pretrained(path)
inputs = tokenizer(["Once upon a time"], return_tensors="pt")
out = model.generate(**inputs, max_new_tokens=16, do_sample=False)
print(tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1]:]))
```"""
    if not ships_code:  # an encoder of a family transformers has: the stock class, no custom code
        return f"""```python
from transformers import AutoModelForMaskedLM, AutoTokenizer

path = "."  # this directory, or its hub id
tokenizer = AutoTokenizer.from_pretrained(path)
model = AutoModelForMaskedLM.from_pretrained(path)  # transformers' own class ({model_type})
logits = model(**tokenizer(["Once upon a time"], return_tensors="pt")).logits  # [batch, seq, vocab]
```

Sample by reverse diffusion with megatron-mdm: `mdm-generate --model PATH --prompt "Once upon a time"
--gen-length 64 --steps 64 --block-length 32 --cache dual` (or `megatron_mdm.decoding.decode` in Python)."""
    stock = ("Without `trust_remote_code`, transformers' own `EuroBertForMaskedLM` loads the same weights and "
             "gives the same logits (a bidirectional Llama with a linear head is EuroBERT's architecture); only "
             "`generate` needs the shipped code." if model_type == "eurobert" else
             "No class of transformers computes this variant: loading needs `trust_remote_code=True`.")
    return f"""Sampling by reverse diffusion inside transformers: `generate` comes from the code shipped in this
directory (`modeling_mdm.py` and megatron-mdm's decoding modules), hence `trust_remote_code=True`:

```python
from transformers import AutoModelForMaskedLM, AutoTokenizer

path = "."  # this directory, or its hub id
tokenizer = AutoTokenizer.from_pretrained(path)
model = AutoModelForMaskedLM.from_pretrained(path, trust_remote_code=True)
inputs = tokenizer(["Once upon a time"], return_tensors="pt")
out = model.generate(**inputs, max_new_tokens=32, steps=32, block_length=16, cache="dual", seed=0)
print(tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
logits = model(**inputs).logits  # [batch, seq, vocab]
```

`generate` takes megatron-mdm's decoding settings (the same as `mdm-generate`'s flags, with the same
defaults, also in `generation_config.json` under `decoding`): `max_new_tokens` (or `gen_length`), `steps`,
`block_length`, `temperature`, `top_k`, `top_p`, `remasking` (`low_confidence`, `random`, `margin`,
`entropy`), `cfg_scale` (unsupervised classifier-free guidance), `cache` (`none`, `prefix`, `dual`: Fast-dLLM's
KV caches), `threshold` or `factor` (parallel unmasking), `refresh_interval`; and `generator` or `seed`,
`eos_token_id` (None: never stop early), `return_dict_in_generate`. `diffusion_generate` is the same method.
With the same settings and seed it returns the tokens of `mdm-generate`.

{stock}"""
