"""Compatibility shim: reading, export and import moved to the package ``megatron_mdm.hf``.

Kept so that existing imports (``from megatron_mdm.hf_io import export_to_hf, ...``) keep working.
"""

from megatron_mdm.hf.base import (  # noqa: F401 - re-exported
    ConversionError,
    parse_size,
    read_hf_state_dict,
    write_safetensors,
)
from megatron_mdm.hf.convert import export_to_hf, import_from_hf  # noqa: F401 - re-exported
from megatron_mdm.hf.io import (  # noqa: F401 - re-exported
    ensure_single_process_world,
    load_into_model,
    read_checkpoint_tensors,
)
from megatron_mdm.hf.io import save_megatron as _save_megatron  # noqa: F401 - re-exported

_parse_size = parse_size
