"""The models behind the decoding interface (``decoding.logits.ModelForward``), one module per backend.

* ``hf``: ``HFForward``, a Hugging Face masked LM (the export's ``MDMForMaskedLM`` gets the KV cache; the class
  lives in ``decoding.hf_generation``, which exports ship);
* ``megatron``: ``MegatronForward`` and ``load_megatron_for_inference``, a Megatron model in one process.

Import the module you need: the Megatron backend imports megatron-core, the HF one does not.
"""
