"""Hugging Face modeling code that ``mdm-convert to-hf`` copies into exported MDM directories.

The files here import only ``torch`` and ``transformers`` (never ``megatron_mdm``), so an exported
directory loads on its own with ``trust_remote_code=True``.
"""
