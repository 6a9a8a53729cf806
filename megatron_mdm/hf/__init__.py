"""Hugging Face <-> Megatron conversion: one mechanism (``base``), one module per family.

* ``base``: the :class:`~megatron_mdm.hf.base.Family` record, the map applied in both directions (the
  HF -> Megatron direction is the derived inverse), vocabulary padding, layer stacking, shape checks,
  safetensors reading and writing;
* ``llama``: Llama and Mistral (``PARAM_MAP``, q/k/v and gate/up fusion, config translation);
* ``io``: the Megatron side (read a checkpoint's tensors in one process, save a checkpoint from tensors);
* ``convert``: ``export_to_hf`` and ``import_from_hf``.
"""

from megatron_mdm.hf.base import ConversionError, Family
from megatron_mdm.hf.convert import export_to_hf, family_for_hf, family_of, import_from_hf
from megatron_mdm.hf.io import ensure_single_process_world, load_into_model, read_checkpoint_tensors

__all__ = [
    "ConversionError",
    "Family",
    "ensure_single_process_world",
    "export_to_hf",
    "family_for_hf",
    "family_of",
    "import_from_hf",
    "load_into_model",
    "read_checkpoint_tensors",
]
