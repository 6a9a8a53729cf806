"""The Hugging Face backend: ``HFForward``, a loaded masked LM behind the decoding interface.

It lives in ``megatron_mdm.decoding.hf_generation`` (with the exported model's ``generate``), because
``mdm-convert to-hf`` ships that module, unchanged, into every export; this name stays for imports.
"""

from megatron_mdm.decoding.hf_generation import HFForward

__all__ = ["HFForward"]
