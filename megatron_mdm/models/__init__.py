"""The model families, each registered with one record (``registry``), and how a run's model is built.

* ``registry``: :class:`~megatron_mdm.models.registry.ModelFamily`, the one record per ``--architecture``
  (layer spec, model class, ``TransformerConfig`` options, parameter count, config checks, Hugging Face map,
  export details) and :func:`~megatron_mdm.models.registry.family`; nothing else branches on the family;
* ``llama``: the Llama-style stack (MDM and ARM; Qwen2 biases and Llama 3 RoPE scaling as options);
* ``bert``: the BERT-family encoders (BERT, RoBERTa, XLM-R) as MDMs, on the modules of ``encoder``;
* ``build``: our config -> Megatron ``TransformerConfig`` and the layer spec with the objective's mask, and
  ``build_model``;
* ``flops``: parameter counts and training FLOPs (no torch);
* ``attention``: core attention on ``scaled_dot_product_attention`` for the local spec;
* ``output_head``: the output layer run only where the loss or the sampler needs logits.

Importing the package, ``registry``, ``llama``, ``bert`` or ``flops`` imports neither torch nor Megatron, so a
config can be checked against its family before any worker starts.
"""
